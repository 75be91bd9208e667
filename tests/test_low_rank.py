"""Low-rank preconditioning: with ``Capture.low_rank`` parts ``Γ = gᵀā``, ``precondition`` takes a small batch's
first products through them (``(G⁻¹gᵀ)(āA⁻¹)``, ``(gQ_G)ᵀ(āQ_A)``); the result equals the dense formula, for
every kind of factors and the two-level corrections, and the parts reproduce the captured gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kfac_func as kf
from kfac_func.tree import flatten

DT = torch.float64


def mlp(params, x):
    h = torch.tanh(F.linear(x, params["l1"]["w"], params["l1"]["b"]))
    h = torch.tanh(F.linear(h, params["l2"]["w"], params["l2"]["b"]))
    return F.linear(h, params["l3"]["w"])


def _setup(n: int = 3):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.5 * torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    params = {"l1": {"w": r(24, 30), "b": r(24)}, "l2": {"w": r(20, 24), "b": r(20)}, "l3": {"w": r(4, 20)}}
    x, y = torch.randn(n, 30, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g)
    cap = kf.capture(mlp, params, x, y, "cross_entropy", fisher="mc", key=kf.random.key(1), low_rank=True)
    return params, cap, kf.trace(mlp, params, x)


def test_parts_reproduce_the_gradients():
    params, cap, plan = _setup()
    grads = flatten(cap.grads)[0]
    assert set(cap.low_rank) == set(plan.layers)
    for name, spec in plan.layers.items():
        g, a = cap.low_rank[name]
        want = kf.layers.weight_matrix(spec, grads[spec.weight], grads[spec.bias] if spec.bias else None)[0]
        torch.testing.assert_close(g.T @ a, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["eigen", "factored", "inverse", "ekfac", "two_level", "two_level_adef2"])
def test_low_rank_equals_dense(kind):
    params, cap, plan = _setup()
    averaged = {k: kf.KroneckerFactors(f.A + 0.1 * torch.eye(f.A.shape[-1], dtype=DT), f.G)
                for k, f in kf.kronecker_factors(cap).items()}
    eigen = kf.eigendecompose(averaged)
    kw = dict(layers=plan.layers, damping=1e-2, mode="eigen")
    factors = eigen
    if kind == "factored":
        kw["mode"] = "factored"
    elif kind == "inverse":
        factors, kw["damping"], kw["mode"] = kf.inverse_factors(averaged, 1e-2), None, "factored"
    elif kind == "ekfac":
        factors = kf.ekfac_factors(eigen, kf.ekfac_scaling(cap, eigen))
    elif kind.startswith("two_level"):
        space = kf.two_level.nicolaides_space(averaged)
        kw["coarse"] = kf.two_level.CoarseCorrection(space, kf.two_level.coarse_matrix(cap, space))
        if kind.endswith("adef2"):
            kw.update(combination="adef2", capture=cap)
    dense = flatten(kf.precondition(params, cap.grads, factors, **kw))[0]
    low = flatten(kf.precondition(params, cap.grads, factors, low_rank=cap.low_rank, **kw))[0]
    for name in dense:
        torch.testing.assert_close(low[name], dense[name], rtol=1e-10, atol=1e-12)


def test_large_batches_keep_the_dense_products(monkeypatch):
    params, cap, plan = _setup(n=64)  # 64 rows: more flops through the parts than through Γ
    module = __import__("sys").modules["kfac_func.precondition"]
    seen = []
    monkeypatch.setattr(module, "_sandwich", lambda grad, left, right, parts: seen.append(parts) or
                        left.mT @ module.right_multiply(grad, right))
    kf.precondition(params, cap.grads, kf.eigendecompose(kf.kronecker_factors(cap)), layers=plan.layers,
                    damping=1e-2, low_rank=cap.low_rank)
    assert seen and all(p is None for p in seen)
