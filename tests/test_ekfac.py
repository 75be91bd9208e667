r"""E-KFAC (DESIGN.md §3–4) against ``torch.func`` oracles in float64: exact where K-FAC is exact, the
scaling is ``diag(Qᵀ C Q)`` of the exact block, it is never worse than K-FAC in Frobenius norm, it is
projected with ``Q_Gᵀ ∇W̄ Q_A`` (not the lineage's ``Q_G ∇W̄ Q_Aᵀ``), and preconditioning with it is a
dense solve with ``Q diag(S + λ) Qᵀ``."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import kfac_func as kf
import kfac_func.ekfac as ekfac_module
from kfac_func.layers import LayerSpec
from oracles import (
    GroupedNet,
    KINDS,
    REDUCTIONS,
    assert_close,
    seeds,
    DT,
    Layer,
    budget,
    ekfac_dense,
    empirical_fisher_block,
    ggn_block,
    kfac_dense,
    layer_vector,
    linear_layers,
    make_target,
    mlp,
    params_of,
    per_example_grads,
    random_orthogonal,
    rel_err,
    reduction_scale,
)



def _ekfac(cap):
    """K-FAC factors, their eigenbasis, and the E-KFAC factors of one capture."""
    factors = kf.kronecker_factors(cap)
    eigen = kf.eigendecompose(factors)
    return factors, eigen, kf.ekfac_factors(eigen, kf.ekfac_scaling(cap, eigen))


def _dense(f: kf.EKFACFactors) -> torch.Tensor:
    return ekfac_dense(f.QA, f.QG, f.scale)


def _basis(f) -> torch.Tensor:
    """``blockdiag_b (Q_G,b ⊗ Q_A,b)``."""
    return torch.block_diag(*[torch.kron(f.QG[b], f.QA[b]) for b in range(f.QA.shape[0])])


def _oracle(fisher):
    return ggn_block if fisher == "exact" else empirical_fisher_block


class CNN(nn.Module):
    """Grouped conv (B = 2, several positions) → relu → conv (optionally shared) → tanh → linear."""

    def __init__(self, bias, stride, shared):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 2, stride=stride, padding=1, groups=2, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, 2, padding="same", groups=2, bias=bias)
        self.shared = shared
        self.fc = nn.LazyLinear(3, bias=bias)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        if self.shared:
            h = torch.tanh(self.conv2(h))
        return self.fc(h.flatten(1))


class OneByOne(nn.Module):
    """A grouped conv whose output is 1x1 (S = 1 with B = 2 blocks) → tanh → linear."""

    def __init__(self, bias):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 4, groups=2, bias=bias)
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _cnn(seed, n, bias, stride, shared, one_by_one=False):
    torch.manual_seed(seed)
    if one_by_one:
        gen = torch.Generator().manual_seed(seed)
        return OneByOne(bias).to(DT), torch.randn(n, 4, 4, 4, generator=gen, dtype=DT), gen
    model = CNN(bias, stride, shared)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=gen, dtype=DT)
    model(x.float())  # materialise the lazy layer
    return model.to(DT), x, gen


# ----------------------------------------------------------------------------------------------------
# 1. where K-FAC is exact, so is E-KFAC
# ----------------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    depth=st.integers(2, 3),
    width=st.integers(2, 4),
    d_in=st.integers(1, 4),
    d_out=st.integers(2, 3),
    bias=st.booleans(),
    act=st.sampled_from(["tanh", "relu"]),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "exact", "empirical"]),
)
@settings(max_examples=budget(10))
def test_single_example_ekfac_is_exact(seed, depth, width, d_in, d_out, bias, act, kind, reduction, fisher):
    model = mlp([d_in] + [width] * (depth - 1) + [d_out], bias, act, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, d_in, generator=gen, dtype=DT)
    y = make_target(kind, (1, d_out), gen)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    factors, _, ek = _ekfac(cap)
    for name, layer in linear_layers(model).items():
        oracle = _oracle(fisher)(model, params, x, y, kind, reduction, layer)
        assert_close(_dense(ek[name]), oracle)
        assert_close(_dense(ek[name]), kfac_dense(factors[name].A, factors[name].G))


@given(
    seed=seeds,
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    n=st.integers(2, 5),
    bias=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
@settings(max_examples=budget(10))
def test_deep_linear_mse_ekfac_is_exact(seed, sizes, n, bias, reduction):
    model = mlp(sizes, bias, None, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=gen, dtype=DT)
    y = torch.randn(n, sizes[-1], generator=gen, dtype=DT)
    cap = kf.capture(model, params, x, y, kf.Loss("mse", reduction), fisher="exact")
    factors, _, ek = _ekfac(cap)
    for name, layer in linear_layers(model).items():
        oracle = ggn_block(model, params, x, y, "mse", reduction, layer)
        assert_close(_dense(ek[name]), oracle)
        assert_close(_dense(ek[name]), kfac_dense(factors[name].A, factors[name].G))


# ----------------------------------------------------------------------------------------------------
# 2. S = diag(Qᵀ C Q) with C the exact block of the captured curvature
# ----------------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    n=st.integers(2, 4),
    bias=st.booleans(),
    act=st.sampled_from(["tanh", "relu"]),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "empirical"]),
    random_basis=st.booleans(),
)
@settings(max_examples=budget(10))
def test_scaling_is_diagonal_of_projected_block_mlp(seed, n, bias, act, kind, reduction, fisher, random_basis):
    """Dense layers (S = 1, the one-matmul path), with the K-FAC eigenbasis or any orthogonal basis."""
    model = mlp([3, 4, 3], bias, act, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=DT)
    y = make_target(kind, (n, 3), gen)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    assert all(a.shape[2] == 1 for a in cap.a.values())
    eigen = kf.eigendecompose(kf.kronecker_factors(cap))
    if random_basis:
        eigen = {k: e._replace(QA=random_orthogonal(*e.QA.shape[:2], gen), QG=random_orthogonal(*e.QG.shape[:2], gen))
                 for k, e in eigen.items()}
    scale = kf.ekfac_scaling(cap, eigen)
    for name, layer in linear_layers(model).items():
        C = _oracle(fisher)(model, params, x, y, kind, reduction, layer)
        Q = _basis(eigen[name])
        d_g = params[layer.weight].shape[0]
        assert scale[name].shape == (1, d_g, layer_vector(params, layer).numel() // d_g)
        assert_close(scale[name].reshape(-1), torch.diagonal(Q.T @ C @ Q))


@given(
    seed=seeds,
    n=st.integers(1, 3),
    bias=st.booleans(),
    stride=st.sampled_from([1, 2]),
    shared=st.booleans(),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "empirical"]),
    random_basis=st.booleans(),
    one_by_one=st.booleans(),
    chunked=st.booleans(),
)
@example(seed=0, n=3, bias=True, stride=1, shared=True, kind="cross_entropy", reduction="mean", fisher="exact",
         random_basis=True, one_by_one=False, chunked=True)
@settings(max_examples=budget(12))
def test_scaling_is_diagonal_of_projected_block_cnn(seed, n, bias, stride, shared, kind, reduction, fisher,
                                                    random_basis, one_by_one, chunked):
    """Grouped convolutions with several positions (optionally shared at two depths), and a grouped conv
    with a 1x1 output (the one-position path with B = 2 blocks); ``chunked``: the projected per-example
    gradients bounded to one example at a time (:data:`~kfac_func.ekfac.PROJECTION_ENTRIES`)."""
    model, x, gen = _cnn(seed, n, bias, stride, shared, one_by_one)
    params = params_of(model)
    y = make_target(kind, (n, 3), gen)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    first = cap.a["conv" if one_by_one else "conv1"]
    assert first.shape[1] == 2 and (first.shape[2] == 1) == one_by_one
    eigen = kf.eigendecompose(kf.kronecker_factors(cap))
    if random_basis:
        eigen = {k: e._replace(QA=random_orthogonal(*e.QA.shape[:2], gen), QG=random_orthogonal(*e.QG.shape[:2], gen))
                 for k, e in eigen.items()}
    entries = 1 if chunked else ekfac_module.PROJECTION_ENTRIES
    with mock.patch.object(ekfac_module, "PROJECTION_ENTRIES", entries):
        scale = kf.ekfac_scaling(cap, eigen)
    for name, layer in linear_layers(model).items():
        C = _oracle(fisher)(model, params, x, y, kind, reduction, layer)
        Q = _basis(eigen[name])
        assert_close(scale[name].reshape(-1), torch.diagonal(Q.T @ C @ Q))


# ----------------------------------------------------------------------------------------------------
# 3. E-KFAC is never further from the exact block than K-FAC (Frobenius)
# ----------------------------------------------------------------------------------------------------


def _check_ekfac_beats_kfac(C, kfac, ekfac):
    """``‖C − EKFAC‖ ≤ ‖C − KFAC‖``, in the sharp (Pythagorean) form: both are diagonal in the same basis and
    ``C − EKFAC`` has a zero diagonal there, so ``‖C − KFAC‖² = ‖C − EKFAC‖² + ‖EKFAC − KFAC‖²``."""
    e_ek, e_k, gap = (C - ekfac).norm(), (C - kfac).norm(), (ekfac - kfac).norm()
    tol = 1e-9 * C.norm()
    assert e_ek <= e_k + tol, (float(e_ek), float(e_k))
    assert abs(float(e_k**2 - e_ek**2 - gap**2)) <= 1e-8 * float(C.norm()) ** 2
    return float(e_ek), float(e_k)


@given(
    seed=seeds,
    n=st.integers(2, 5),
    bias=st.booleans(),
    act=st.sampled_from(["tanh", "relu"]),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "empirical"]),
)
@settings(max_examples=budget(10))
def test_ekfac_closer_than_kfac_mlp(seed, n, bias, act, kind, reduction, fisher):
    model = mlp([3, 4, 4, 3], bias, act, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=DT)
    y = make_target(kind, (n, 3), gen)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    factors, _, ek = _ekfac(cap)
    for name, layer in linear_layers(model).items():
        C = _oracle(fisher)(model, params, x, y, kind, reduction, layer)
        _check_ekfac_beats_kfac(C, kfac_dense(factors[name].A, factors[name].G), _dense(ek[name]))


@given(
    seed=seeds,
    n=st.integers(1, 3),
    bias=st.booleans(),
    stride=st.sampled_from([1, 2]),
    shared=st.booleans(),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "empirical"]),
)
@settings(max_examples=budget(10))
def test_ekfac_closer_than_kfac_cnn(seed, n, bias, stride, shared, kind, reduction, fisher):
    model, x, gen = _cnn(seed, n, bias, stride, shared)
    params = params_of(model)
    y = make_target(kind, (n, 3), gen)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    factors, _, ek = _ekfac(cap)
    for name, layer in linear_layers(model).items():
        C = _oracle(fisher)(model, params, x, y, kind, reduction, layer)
        _check_ekfac_beats_kfac(C, kfac_dense(factors[name].A, factors[name].G), _dense(ek[name]))


def test_ekfac_strictly_closer_on_a_nonlinear_net():
    """Power check: on a fixed nonlinear MLP and CNN with N > 1 the improvement is strict and sizeable."""
    model = mlp([3, 4, 4, 3], True, "tanh", 0)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    y = make_target("cross_entropy", (5, 3), gen)
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    factors, _, ek = _ekfac(cap)
    for name, layer in linear_layers(model).items():
        C = ggn_block(model, params, x, y, "cross_entropy", "mean", layer)
        e_ek, e_k = _check_ekfac_beats_kfac(C, kfac_dense(factors[name].A, factors[name].G), _dense(ek[name]))
        assert e_ek < (0.9 if name == "0" else 0.9999) * e_k, (name, e_ek, e_k)
    model, x, gen = _cnn(0, 3, True, 1, False)
    params = params_of(model)
    y = make_target("mse", (3, 3), gen)
    cap = kf.capture(model, params, x, y, "mse", fisher="exact")
    factors, _, ek = _ekfac(cap)
    for name in ("conv1", "conv2"):
        C = ggn_block(model, params, x, y, "mse", "mean", linear_layers(model)[name])
        e_ek, e_k = _check_ekfac_beats_kfac(C, kfac_dense(factors[name].A, factors[name].G), _dense(ek[name]))
        assert e_ek < 0.95 * e_k, (name, e_ek, e_k)


# ----------------------------------------------------------------------------------------------------
# 4. the projection is Q_Gᵀ ∇W̄ Q_A, not the lineage's Q_G ∇W̄ Q_Aᵀ
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_projection_basis_is_transposed_correctly(kind):
    """The per-example gradients ``Γₙ`` (``vmap(grad)``, empirical Fisher, so ``S = R Σₙ (·)²``) projected
    both ways, densely: the library's ``S`` matches ``Q_Gᵀ Γ Q_A`` and misses ``Q_G Γ Q_Aᵀ`` widely."""
    model = mlp([4, 5, 3], True, "tanh", 3)
    params = params_of(model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen, dtype=DT)
    y = make_target(kind, (6, 3), gen)
    cap = kf.capture(model, params, x, y, kind, fisher="empirical")
    eigen = kf.eigendecompose(kf.kronecker_factors(cap))
    scale = kf.ekfac_scaling(cap, eigen)
    R = reduction_scale(kind, "mean", model(x), y)
    for name, layer in linear_layers(model).items():
        d_g = params[layer.weight].shape[0]
        grads = per_example_grads(model, params, x, y, kind, layer).reshape(x.shape[0], d_g, -1)
        QA, QG = eigen[name].QA[0], eigen[name].QG[0]
        right = R * sum((QG.T @ gn @ QA).square() for gn in grads)
        wrong = R * sum((QG @ gn @ QA.T).square() for gn in grads)
        assert_close(scale[name][0], right)
        assert rel_err(wrong, right) > 0.1, name
        assert rel_err(scale[name][0], wrong) > 0.1, name


# ----------------------------------------------------------------------------------------------------
# 5. preconditioning with E-KFAC factors = dense solve; method validation
# ----------------------------------------------------------------------------------------------------


def _dense_ekfac_solve(f: kf.EKFACFactors, vec_grad: torch.Tensor, damping: float) -> torch.Tensor:
    """``(Q diag(S + λ) Qᵀ)⁻¹ vec Γ`` with ``Q = blockdiag_b(Q_G ⊗ Q_A)``, by a dense solve."""
    Q = _basis(f)
    M = Q @ torch.diag((f.scale + damping).reshape(-1)) @ Q.T
    return torch.linalg.solve(M, vec_grad)


@given(seed=seeds, bias=st.booleans(), damping=st.sampled_from([1e-3, 0.1, 2.0]), kind=st.sampled_from(KINDS),
       method=st.sampled_from([None, "ekfac"]), fisher=st.sampled_from(["exact", "mc"]))
@settings(max_examples=budget(8))
def test_precondition_ekfac_equals_dense_solve(seed, bias, damping, kind, method, fisher):
    torch.manual_seed(seed)
    model = GroupedNet(bias).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 4, 4, generator=gen, dtype=DT)
    y = make_target(kind, (3, 3), gen)
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, y, kind, fisher=fisher, key=kf.random.key(seed))
    factors, _, ek = _ekfac(cap)
    out = kf.precondition(params, cap.grads, ek, layers=plan.layers, damping=damping, method=method)
    assert set(out) == set(params)
    assert torch.equal(out["scale"], cap.grads["scale"])  # untracked: passed through
    kfac_out = kf.precondition(params, cap.grads, factors, layers=plan.layers, damping=damping)
    for name, layer in linear_layers(model).items():
        expected = _dense_ekfac_solve(ek[name], layer_vector(cap.grads, layer), damping)
        assert_close(layer_vector(out, layer), expected, atol=1e-9, rtol=1e-7)
    # power: on this nonlinear net (N = 3, conv positions) E-KFAC's update is not K-FAC's
    assert rel_err(layer_vector(out, linear_layers(model)["conv"]),
                   layer_vector(kfac_out, linear_layers(model)["conv"])) > 1e-6


@given(seed=seeds, groups=st.integers(1, 3), d_a=st.integers(1, 4), d_g=st.integers(1, 4),
       damping=st.sampled_from([0.0, 1e-2, 1.0]), as_tensor=st.booleans())
def test_precondition_ekfac_random_factors(seed, groups, d_a, d_g, damping, as_tensor):
    """Random orthogonal bases and positive scalings (damping 0 allowed: then the exact inverse)."""
    gen = torch.Generator().manual_seed(seed)
    f = kf.EKFACFactors(random_orthogonal(groups, d_a, gen), random_orthogonal(groups, d_g, gen),
                        0.1 + torch.rand(groups, d_g, d_a, generator=gen, dtype=DT) * 3)
    has_bias = d_a > 1
    W = torch.randn(groups * d_g, d_a - 1 if has_bias else d_a, generator=gen, dtype=DT)
    params = {"w": W, **({"b": torch.randn(groups * d_g, generator=gen, dtype=DT)} if has_bias else {}),
              "other": torch.randn(2, generator=gen, dtype=DT)}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    spec = LayerSpec("lay", "linear", "w", "b" if has_bias else None, groups)
    layer = Layer("w", "b" if has_bias else None, groups)
    lam = torch.tensor(damping, dtype=DT) if as_tensor else damping
    out = kf.precondition(params, grads, {"lay": f}, layers={"lay": spec}, damping=lam, method="ekfac")
    assert_close(layer_vector(out, layer), _dense_ekfac_solve(f, layer_vector(grads, layer), damping),
                 atol=1e-9, rtol=1e-7)
    assert torch.equal(out["other"], grads["other"])


def test_precondition_ekfac_validation():
    model = mlp([3, 4, 2], True, "tanh", 0)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    y = make_target("cross_entropy", (4, 2), gen)
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    factors, eigen, ek = _ekfac(cap)
    call = lambda f, **kw: kf.precondition(params, cap.grads, f, layers=plan.layers, damping=0.1, **kw)  # noqa: E731
    call(ek, method="ekfac")  # the valid calls go through
    call(factors, method="kfac")
    with pytest.raises(ValueError, match="EKFACFactors"):
        call(factors, method="ekfac")
    with pytest.raises(ValueError, match="EKFACFactors"):
        call(eigen, method="ekfac")
    with pytest.raises(ValueError, match="ekfac"):
        call(ek, method="kfac")
    mixed = dict(ek, **{"2": eigen["2"]})
    with pytest.raises(ValueError, match="EKFACFactors"):
        call(mixed, method="ekfac")
    with pytest.raises(ValueError, match="eigen"):
        call(ek, mode="factored")
    with pytest.raises(ValueError, match="eigen"):
        call(ek, mode="factored", method="ekfac")
    with pytest.raises(ValueError, match="method"):
        call(ek, method="e-kfac")
    bad = dict(ek, **{"0": ek["0"]._replace(scale=ek["0"].scale[..., :-1])})
    with pytest.raises(ValueError, match="scaling has shape"):
        call(bad)
    with pytest.raises(ValueError, match="curvature vectors"):
        kf.ekfac_scaling(kf.capture(model, params, x, y, "cross_entropy", fisher=None), eigen)
