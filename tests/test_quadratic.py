"""The pure functions of the quadratic model (kfac_func.quadratic) against independent dense oracles.

* curvature-vector products and quadratic forms: the dense GGN ``Jᵀ H J`` with ``J`` from ``jacrev`` of
  the model over *all* flattened parameters and ``H`` from ``torch.func.hessian`` of torch's own reduced
  loss (no ``R`` or per-example Hessian of ours); the captured Fisher against ``oracles.ggn_full`` (exact)
  and ``oracles.empirical_fisher_full`` (per-example ``vmap(grad)``);
* ``solve_quadratic_model`` against ``numpy.linalg.solve`` on the explicit model and against its
  stationarity conditions;
* ``reduction_ratio`` and ``levenberg_marquardt`` on numbers written by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import hessian, jacrev

import kfac_func as kf
from kfac_func.quadratic import (
    fisher_quadratic_forms,
    ggn_quadratic_forms,
    ggn_vector_product,
    levenberg_marquardt,
    output_hessian_product,
    reduction_ratio,
    solve_quadratic_model,
)

import oracles as O

DT = torch.float64


# ----------------------------------------------------------------------------------------------------
# dense oracle over every parameter (tracked or not), built only with torch.func and torch's loss
# ----------------------------------------------------------------------------------------------------


def _flat(tree: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tree[n].reshape(-1) for n in names])


def _unflat(theta: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, p in like.items():
        out[n] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _torch_loss(loss: kf.Loss):
    def fn(out, target):
        if loss.kind == "cross_entropy":
            return F.cross_entropy(out, target, reduction=loss.reduction, ignore_index=loss.ignore_index)
        if loss.kind == "mse":
            return F.mse_loss(out, target, reduction=loss.reduction)
        return F.binary_cross_entropy_with_logits(out, target, reduction=loss.reduction)

    return fn


def _output_hessian(loss: kf.Loss, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``∇²_out L`` of torch's reduced loss, ``(K, K)`` with ``K = out.numel()``."""
    k = out.numel()
    return hessian(lambda o: _torch_loss(loss)(o, target))(out).reshape(k, k)


def _dense_ggn(model, params, x, target, loss: kf.Loss) -> torch.Tensor:
    """``Jᵀ (∇²_out L) J`` over all parameters, flattened in ``params`` order."""
    f = O.as_fn(model)
    names = list(params)
    theta = _flat(params, names)
    out = f(params, x)
    J = jacrev(lambda th: f(_unflat(th, params), x))(theta).reshape(out.numel(), theta.numel())
    return J.T @ _output_hessian(loss, out, target) @ J


# ----------------------------------------------------------------------------------------------------
# models and problems
# ----------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    """``Linear → ×s → tanh → Linear``; with ``positions`` the dense layers act on the last dim of
    ``(N, P, d_in)`` and the output is moved to ``(N, C, P)``. ``s`` is used elementwise (untracked)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, positions: int | None):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.s = nn.Parameter(torch.ones(hidden) + 0.3 * torch.randn(hidden))
        self.l2 = nn.Linear(hidden, d_out)
        self.positions = positions

    def forward(self, x):
        out = self.l2(torch.tanh(self.l1(x) * self.s))
        return out.movedim(-1, 1) if self.positions else out


# (kind, targets): "index" class indices, "prob" class probabilities, "real" for MSE / BCE
CASES = [
    ("cross_entropy", "index"),
    ("cross_entropy", "ignore"),
    ("cross_entropy", "prob"),
    ("mse", "real"),
    ("bce_with_logits", "real"),
]


def _problem(case, reduction, n, d_in, hidden, d_out, positions, seed):
    kind, targets = case
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _Net(d_in, hidden, d_out, positions).to(DT)
    shape = (n, d_in) if positions is None else (n, positions, d_in)
    x = torch.randn(shape, generator=gen, dtype=DT)
    params = O.params_of(model)
    out_shape = tuple(model(x).shape)
    ignore = -7
    # _Net returns (N, C, P): torch's layout, given (C = P with class indices, or class probabilities, is ambiguous)
    loss = kf.Loss(kind, reduction, ignore_index=ignore, class_dim=1 if kind == "cross_entropy" and positions else None)
    if targets == "prob":
        t = torch.randn(out_shape, generator=gen, dtype=DT).softmax(1)
    else:
        t = O.make_target(kind, out_shape, gen, ignore_frac=0.4 if targets == "ignore" else 0.0, ignore_index=ignore)
    return model, params, x, t, loss


def _random_tree(params, gen, scale=1.0):
    return {n: scale * torch.randn(p.shape, generator=gen, dtype=DT) for n, p in params.items()}


problems = st.tuples(
    st.sampled_from(CASES),
    st.sampled_from(["mean", "sum"]),
    st.integers(1, 4),  # N
    st.integers(1, 3),  # d_in
    st.integers(1, 3),  # hidden
    st.integers(2, 4),  # classes / outputs
    st.sampled_from([None, 1, 3]),  # positions: None → (N, C); else (N, C, P)
    st.integers(0, 2**16),
)


# ----------------------------------------------------------------------------------------------------
# exact GGN products
# ----------------------------------------------------------------------------------------------------


@settings(max_examples=O.budget(10))
@given(problems)
def test_output_hessian_product_is_the_hessian_of_torchs_loss(p):
    case, reduction, n, d_in, hidden, d_out, positions, seed = p
    model, params, x, t, loss = _problem(case, reduction, n, d_in, hidden, d_out, positions, seed)
    out = model(x).detach()
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    H = _output_hessian(loss, out, t)
    got = output_hessian_product(loss, out, t, u)
    assert got.shape == out.shape
    torch.testing.assert_close(got.reshape(-1), H @ u.reshape(-1), rtol=1e-10, atol=1e-12)


@settings(max_examples=O.budget(10))
@given(problems)
def test_ggn_vector_product_equals_dense_ggn(p):
    """``C v`` over every parameter (the untracked scale ``s`` included) = dense ``Jᵀ H J v``."""
    case, reduction, n, d_in, hidden, d_out, positions, seed = p
    model, params, x, t, loss = _problem(case, reduction, n, d_in, hidden, d_out, positions, seed)
    v = _random_tree(params, torch.Generator().manual_seed(seed + 2))
    C = _dense_ggn(model, params, x, t, loss)
    got = ggn_vector_product(model, params, x, t, loss, v)
    assert set(got) == set(params)
    names = list(params)
    expected = C @ _flat(v, names)
    assert float(expected.norm()) > 0
    torch.testing.assert_close(_flat(got, names), expected, rtol=1e-9, atol=1e-11)


def _directions(params, k: int, seed: int):
    """``k`` random parameter pytrees and their flat vectors as the columns of ``D``."""
    gen = torch.Generator().manual_seed(seed)
    dirs = [_random_tree(params, gen) for _ in range(k)]
    return dirs, torch.stack([_flat(d, list(params)) for d in dirs], 1)


@settings(max_examples=O.budget(10))
@given(problems, st.integers(1, 4))
def test_ggn_quadratic_forms_equal_dense_ggn(p, k):
    """``[dᵢᵀ C dⱼ]`` for ``k`` directions = ``Dᵀ (Jᵀ H J) D``."""
    case, reduction, n, d_in, hidden, d_out, positions, seed = p
    model, params, x, t, loss = _problem(case, reduction, n, d_in, hidden, d_out, positions, seed)
    dirs, D = _directions(params, k, seed + 3)
    C = _dense_ggn(model, params, x, t, loss)
    got = ggn_quadratic_forms(model, params, x, t, loss, dirs)
    assert got.shape == (k, k)
    torch.testing.assert_close(got, D.T @ C @ D, rtol=1e-9, atol=1e-11)


def _loss_terms(case, t: torch.Tensor, ignore: int = -7) -> int:
    """The terms torch's mean runs over, counted by hand: kept class indices, positions of class
    probabilities, elements for MSE and BCE."""
    kind, targets = case
    if targets in ("index", "ignore"):
        return int((t != ignore).sum())
    return t.numel() // t.shape[1] if kind == "cross_entropy" else t.numel()


@settings(max_examples=O.budget(10))
@given(problems, st.integers(1, 4), st.integers(1, 4))
@example((("cross_entropy", "ignore"), "mean", 4, 2, 3, 3, 3, 11), 2, 2)  # a mean over kept terms only
@example((("mse", "real"), "sum", 4, 2, 2, 2, None, 5), 1, 2)  # a sum: scaled up by N/m
def test_ggn_quadratic_forms_from_a_sub_batch(p, m, k):
    """``examples=m``: the first ``m`` rows' dense GGN with torch's *summed* loss, ``Σₙ₌₁..ₘ Jₙᵀ Hₙ Jₙ``,
    times ``1/Tₘ`` for a mean and ``T/Tₘ`` for a sum (``T``, ``Tₘ``: the loss terms of the batch and of
    the sub-batch, counted by hand); the whole batch when ``m ≥ N``."""
    case, reduction, n, d_in, hidden, d_out, positions, seed = p
    model, params, x, t, loss = _problem(case, reduction, n, d_in, hidden, d_out, positions, seed)
    dirs, D = _directions(params, k, seed + 4)
    rows = min(m, n)
    summed = _dense_ggn(model, params, x[:rows], t[:rows], kf.Loss(case[0], "sum", ignore_index=-7))
    terms, sub_terms = _loss_terms(case, t), max(_loss_terms(case, t[:rows]), 1)
    weight = 1 / sub_terms if reduction == "mean" else terms / sub_terms
    expected = D.T @ summed @ D * weight
    got = ggn_quadratic_forms(model, params, x, t, loss, dirs, examples=m)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    if m >= n:
        torch.testing.assert_close(got, ggn_quadratic_forms(model, params, x, t, loss, dirs), rtol=0, atol=0)


def test_ggn_products_for_a_function_model_and_a_string_loss():
    """A plain ``f(params, x)`` and ``loss="mse"`` (mean) work like a module."""
    gen = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(3, 4, generator=gen, dtype=DT), "c": torch.randn(3, generator=gen, dtype=DT)}

    def f(p, x):
        return torch.sin(F.linear(x, p["w"])) * p["c"]

    x = torch.randn(6, 4, generator=gen, dtype=DT)
    t = torch.randn(6, 3, generator=gen, dtype=DT)
    v = _random_tree(params, gen)
    C = _dense_ggn(f, params, x, t, kf.Loss("mse"))
    names = list(params)
    got = ggn_vector_product(f, params, x, t, "mse", v)
    torch.testing.assert_close(_flat(got, names), C @ _flat(v, names), rtol=1e-9, atol=1e-12)
    forms = ggn_quadratic_forms(f, params, x, t, "mse", [v, params])
    D = torch.stack([_flat(v, names), _flat(params, names)], 1)
    torch.testing.assert_close(forms, D.T @ C @ D, rtol=1e-9, atol=1e-12)


def test_ggn_products_through_scaled_dot_product_attention():
    """Forward mode through ``F.scaled_dot_product_attention`` (torch's fused CPU kernels have no ``jvp``;
    the products run it on the math backend): equal to the dense GGN built in reverse mode."""
    gen = torch.Generator().manual_seed(7)
    params = {"q": torch.randn(4, 4, generator=gen, dtype=DT), "o": torch.randn(3, 4, generator=gen, dtype=DT)}

    def f(p, x):  # (N, L, 4) → (N, 3): one attention head, pooled over positions
        h = F.linear(x, p["q"]).unsqueeze(1)
        return F.linear(F.scaled_dot_product_attention(h, h, h).squeeze(1).mean(1), p["o"])

    x = torch.randn(5, 6, 4, generator=gen, dtype=DT)
    t = torch.randint(0, 3, (5,), generator=gen)
    loss = kf.Loss("cross_entropy")
    v = _random_tree(params, gen)
    C = _dense_ggn(f, params, x, t, loss)
    names = list(params)
    torch.testing.assert_close(_flat(ggn_vector_product(f, params, x, t, loss, v), names), C @ _flat(v, names),
                               rtol=1e-9, atol=1e-12)
    forms = ggn_quadratic_forms(f, params, x, t, loss, [v, params])
    D = torch.stack([_flat(v, names), _flat(params, names)], 1)
    torch.testing.assert_close(forms, D.T @ C @ D, rtol=1e-9, atol=1e-12)


def test_ggn_products_do_not_modify_their_inputs():
    model, params, x, t, loss = _problem(("cross_entropy", "ignore"), "mean", 4, 3, 3, 3, 2, 0)
    v = _random_tree(params, torch.Generator().manual_seed(1))
    before = [{k: a.clone() for k, a in tree.items()} for tree in (params, v)] + [x.clone(), t.clone()]
    ggn_vector_product(model, params, x, t, loss, v)
    ggn_quadratic_forms(model, params, x, t, loss, [v, v])
    for old, new in zip(before[:2], (params, v)):
        for k in old:
            assert torch.equal(old[k], new[k])
    assert torch.equal(before[2], x) and torch.equal(before[3], t)


# ----------------------------------------------------------------------------------------------------
# captured curvature: fisher_quadratic_forms and curvature_product
# ----------------------------------------------------------------------------------------------------


def _mlp_with_untracked(seed):
    torch.manual_seed(seed)
    return _Net(3, 4, 3, None).to(DT)  # l1 and l2 tracked, s untracked


class _ConvNet(nn.Module):
    """A grouped convolution (B = 2 blocks) then a dense layer: ``(N, 2, 4, 4) → (N, 3)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2, groups=2)
        self.fc = nn.Linear(4 * 9, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _captured_problem(arch, kind, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        model = _mlp_with_untracked(seed)
        x = torch.randn(5, 3, generator=gen, dtype=DT)
        layers = [O.Layer("l1.weight", "l1.bias"), O.Layer("l2.weight", "l2.bias")]
    else:
        torch.manual_seed(seed)
        model = _ConvNet().to(DT)
        x = torch.randn(3, 2, 4, 4, generator=gen, dtype=DT)
        layers = [O.Layer("conv.weight", "conv.bias", 2), O.Layer("fc.weight", "fc.bias")]
    params = O.params_of(model)
    t = O.make_target(kind, tuple(model(x).shape), gen)
    return model, params, x, t, layers


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("kind", ["cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_fisher_quadratic_forms_equal_dense_captured_curvature(arch, kind, reduction, fisher):
    """``[dᵢᵀ C dⱼ]`` from the captured ``(a, g)`` = the dense curvature over the tracked layers (cross-layer
    blocks included): the exact GGN for ``"exact"``, ``R Σₙ ∇ℓₙ∇ℓₙᵀ`` (``vmap(grad)``) for ``"empirical"``.
    Directions also move the untracked ``s``, which the captured curvature does not cover."""
    model, params, x, t, layers = _captured_problem(arch, kind, reduction, 11)
    loss = kf.Loss(kind, reduction)
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, t, loss, fisher=fisher)
    oracle = O.ggn_full if fisher == "exact" else O.empirical_fisher_full
    C = oracle(model, params, x, t, kind, reduction, layers)
    gen = torch.Generator().manual_seed(3)
    dirs = [_random_tree(params, gen) for _ in range(3)]
    D = torch.stack([O.full_vector(d, layers) for d in dirs], 1)
    got = fisher_quadratic_forms(cap, dirs, plan.layers)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, D.T @ C @ D, rtol=1e-9, atol=1e-12)


def test_fisher_quadratic_forms_mc_equal_dense_from_captured_vectors():
    """MC Fisher: the forms equal ``Dᵀ (Σ_{v,n} zzᵀ) D`` with the dense matrix assembled from ``(a, g)``."""
    model, params, x, t, layers = _captured_problem("conv", "cross_entropy", "mean", 2)
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, t, "cross_entropy", fisher="mc", mc_samples=3,
                     key=kf.random.key(0))
    names = list(plan.layers)
    C = O.captured_full(cap.a, cap.g, names)
    gen = torch.Generator().manual_seed(4)
    dirs = [_random_tree(params, gen) for _ in range(2)]
    D = torch.stack([O.full_vector(d, layers) for d in dirs], 1)
    torch.testing.assert_close(fisher_quadratic_forms(cap, dirs, plan.layers), D.T @ C @ D, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_curvature_product_equals_dense_captured_curvature(arch, fisher):
    """``kf.curvature_product(cap, v)`` (layer-wise ``(B, d_g, d_a)``) = dense ``C vec(v)``."""
    model, params, x, t, layers = _captured_problem(arch, "cross_entropy", "mean", 7)
    cap = kf.capture(model, params, x, t, "cross_entropy", fisher=fisher)
    plan = kf.trace(model, params, x)
    oracle = O.ggn_full if fisher == "exact" else O.empirical_fisher_full
    C = oracle(model, params, x, t, "cross_entropy", "mean", layers)
    gen = torch.Generator().manual_seed(9)
    shapes = {name: O.to_wbar(params[l.weight], params[l.bias], l.groups).shape for name, l in zip(plan.layers, layers)}
    v = {name: torch.randn(s, generator=gen, dtype=DT) for name, s in shapes.items()}
    got = kf.curvature_product(cap, v)
    assert set(got) == set(v)
    expected = C @ torch.cat([v[name].reshape(-1) for name in plan.layers])
    torch.testing.assert_close(torch.cat([got[name].reshape(-1) for name in plan.layers]), expected,
                               rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# solve_quadratic_model
# ----------------------------------------------------------------------------------------------------


def _spd(k, gen, rank=None):
    a = torch.randn(k, rank or k, generator=gen, dtype=DT)
    return a @ a.T


def _model_value(m, b, x):
    return 0.5 * x @ m @ x + b @ x


@settings(max_examples=O.budget(10))
@given(st.integers(1, 4), st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_solve_equals_dense_numpy_solve(k, damping, seed):
    """``x = −(K + λG)⁻¹ b`` by ``numpy.linalg.solve``; the returned change is ``M(x) − M(0)``, and ``M``
    is lower at ``x`` than at perturbed points."""
    gen = torch.Generator().manual_seed(seed)
    K, G = _spd(k, gen, rank=max(1, k - 1)), _spd(k, gen) + 0.1 * torch.eye(k, dtype=DT)  # K may be singular
    b = torch.randn(k, generator=gen, dtype=DT)
    x, change = solve_quadratic_model(K, G, b, damping)
    m = (K + damping * G).numpy()
    expected = np.linalg.solve(m, -b.numpy())
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(float(change), -0.5 * b.numpy() @ np.linalg.solve(m, b.numpy()), rtol=1e-9, atol=1e-12)
    assert float(change) < 0
    mt = K + damping * G
    for _ in range(5):
        e = 1e-3 * torch.randn(k, generator=gen, dtype=DT)
        assert float(_model_value(mt, b, x + e)) > float(_model_value(mt, b, x))


def test_solve_two_by_two_by_hand():
    """K = [[2, 1], [1, 3]], G = I, λ = 1, b = (−1, 2): (K + I)x = −b gives x = (6/11, −7/11), M(x) − M(0) = ½bᵀx = −10/11."""
    K = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DT)
    b = torch.tensor([-1.0, 2.0], dtype=DT)
    x, change = solve_quadratic_model(K, torch.eye(2, dtype=DT), b, 1.0)
    torch.testing.assert_close(x, torch.tensor([6 / 11, -7 / 11], dtype=DT), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(change, torch.tensor(-10 / 11, dtype=DT), rtol=1e-14, atol=0)


@settings(max_examples=O.budget(10))
@given(st.integers(2, 4), st.data(), st.integers(0, 2**16))
def test_solve_with_fixed_coefficients(k, data, seed):
    """Fixed entries are returned exactly; the free ones zero the gradient of ``M`` in their coordinates
    (the reduced system, solved by numpy) and ``M`` is lower than at perturbed free coordinates."""
    gen = torch.Generator().manual_seed(seed)
    K, G = _spd(k, gen), _spd(k, gen)
    b = torch.randn(k, generator=gen, dtype=DT)
    nfixed = data.draw(st.integers(1, k - 1))
    idx = data.draw(st.permutations(range(k)))[:nfixed]
    fixed = {i: data.draw(st.floats(-2, 2)) for i in idx}
    lam = 0.3
    x, change = solve_quadratic_model(K, G, b, lam, fixed)
    for i, val in fixed.items():
        assert float(x[i]) == val
    m = (K + lam * G).numpy()
    free = [i for i in range(k) if i not in fixed]
    held = list(fixed)
    xh = np.array([fixed[i] for i in held])
    expected = np.linalg.solve(m[np.ix_(free, free)], -b.numpy()[free] - m[np.ix_(free, held)] @ xh)
    np.testing.assert_allclose(x.numpy()[free], expected, rtol=1e-9, atol=1e-11)
    grad = m @ x.numpy() + b.numpy()
    np.testing.assert_allclose(grad[free], 0.0, atol=1e-9 * (1 + np.abs(m).max() + np.abs(b.numpy()).max()))
    mt = K + lam * G
    np.testing.assert_allclose(float(change), float(_model_value(mt, b, x)), rtol=1e-12, atol=1e-14)
    for _ in range(5):
        e = torch.zeros(k, dtype=DT)
        e[free] = 1e-3 * torch.randn(len(free), generator=gen, dtype=DT)
        assert float(_model_value(mt, b, x + e)) > float(_model_value(mt, b, x))


def test_solve_all_fixed_returns_the_fixed_values_and_their_model_change():
    K = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DT)
    b = torch.tensor([-1.0, 2.0], dtype=DT)
    x, change = solve_quadratic_model(K, torch.eye(2, dtype=DT), b, 1.0, {0: 0.5, 1: -0.25})
    assert x.tolist() == [0.5, -0.25]
    m = K + torch.eye(2, dtype=DT)
    torch.testing.assert_close(change, _model_value(m, b, x), rtol=1e-14, atol=0)


def test_solve_zero_direction_gets_coefficient_zero():
    """The first step: the previous update is zero (zero row/column in K and G, zero b entry); it gets 0
    and the other coefficient is the 1-D minimiser ``−b₀/(K₀₀ + λG₀₀)``."""
    K = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=DT)
    G = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=DT)
    b = torch.tensor([-3.0, 0.0], dtype=DT)
    x, change = solve_quadratic_model(K, G, b, 0.5)
    assert torch.isfinite(x).all()
    assert float(x[1]) == 0.0
    torch.testing.assert_close(x[0], torch.tensor(3.0 / 5.0, dtype=DT), rtol=1e-14, atol=0)
    torch.testing.assert_close(change, torch.tensor(-0.5 * 9 / 5, dtype=DT), rtol=1e-14, atol=0)
    # a zero direction in the middle of four
    gen = torch.Generator().manual_seed(0)
    K4, G4 = _spd(4, gen), _spd(4, gen)
    b4 = torch.randn(4, generator=gen, dtype=DT)
    for mat in (K4, G4):
        mat[2, :] = 0
        mat[:, 2] = 0
    b4[2] = 0
    x4, _ = solve_quadratic_model(K4, G4, b4, 0.1)
    assert float(x4[2]) == 0.0
    keep = [0, 1, 3]
    m = (K4 + 0.1 * G4).numpy()[np.ix_(keep, keep)]
    np.testing.assert_allclose(x4.numpy()[keep], np.linalg.solve(m, -b4.numpy()[keep]), rtol=1e-9)


def test_solve_linearly_dependent_directions():
    """Two parallel directions (``d₁ = 2 d₀``, e.g. Δ ∥ δ_prev in a one-parameter model): ``K + λG`` is
    singular but the model is bounded below; any minimiser will do, and its change is the unique
    minimum ``−½ bᵀ(K + λG)⁺ b``. (Fails today: ``torch.linalg.solve`` raises on the singular matrix.)"""
    K = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=DT)
    b = torch.tensor([-1.0, -2.0], dtype=DT)
    x, change = solve_quadratic_model(K, K.clone(), b, 1.0)
    assert torch.isfinite(x).all()
    m = 2 * K
    torch.testing.assert_close(m @ x, -b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(change, -0.5 * b @ torch.linalg.pinv(m) @ b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# reduction ratio and Levenberg–Marquardt
# ----------------------------------------------------------------------------------------------------


def test_reduction_ratio_on_a_quartic_by_hand():
    """``L(θ) = θ⁴`` at ``θ = 1``: ``∇ = 4``, ``∇² = 12``; ``δ = −¼``: ``L(θ+δ) − L(θ) = 0.31640625 − 1``,
    ``M(δ) − M(0) = ½·12·(1/16) − 1 = −0.625``, so ``ρ = 0.68359375 / 0.625 = 1.09375``."""
    theta, delta = 1.0, -0.25
    model_change = 0.5 * 12 * delta**2 + 4 * delta
    assert model_change == -0.625
    assert reduction_ratio(theta**4, (theta + delta) ** 4, model_change) == 1.09375
    assert reduction_ratio(torch.tensor(1.0), torch.tensor(0.31640625), torch.tensor(-0.625)) == 1.09375
    # an increase of the loss gives a negative ratio
    assert reduction_ratio(1.0, 1.5, -0.25) == -2.0


@pytest.mark.parametrize("before, after, change", [
    (1.0, 0.5, 0.0),  # the model predicts no decrease
    (1.0, 0.5, 0.3),  # ... or an increase
    (1.0, float("nan"), -0.5),  # NaN loss after the step
    (float("nan"), 0.5, -0.5),
    (1.0, 0.5, float("nan")),
])
def test_reduction_ratio_nan_cases(before, after, change):
    assert math.isnan(reduction_ratio(before, after, change))


F5 = 0.95**5


@pytest.mark.parametrize("rho, expected", [
    (-3.0, 2.0 / F5), (0.0, 2.0 / F5), (0.2499, 2.0 / F5), (float("nan"), 2.0 / F5), (-math.inf, 2.0 / F5),
    (0.25, 2.0), (0.5, 2.0), (0.75, 2.0),
    (0.7501, 2.0 * F5), (1.0, 2.0 * F5), (7.0, 2.0 * F5), (math.inf, 2.0 * F5),
])
def test_levenberg_marquardt_default_rule(rho, expected):
    """Defaults: factor (19/20)⁵, thresholds ¼ and ¾ (strict), NaN treated as a failure."""
    assert levenberg_marquardt(2.0, rho) == pytest.approx(expected, rel=1e-15)


def test_levenberg_marquardt_custom_factor_and_thresholds():
    kw = dict(factor=0.5, lower=0.1, upper=0.9)
    assert levenberg_marquardt(1.0, 0.05, **kw) == 2.0
    assert levenberg_marquardt(1.0, 0.2, **kw) == 1.0  # would grow with the default ¼
    assert levenberg_marquardt(1.0, 0.8, **kw) == 1.0  # would shrink with the default ¾
    assert levenberg_marquardt(1.0, 0.95, **kw) == 0.5


def test_levenberg_marquardt_clips_to_bounds():
    kw = dict(factor=0.5, min_damping=1e-3, max_damping=10.0)
    assert levenberg_marquardt(8.0, 0.0, **kw) == 10.0  # 16 → max
    assert levenberg_marquardt(10.0, float("nan"), **kw) == 10.0
    assert levenberg_marquardt(1.5e-3, 1.0, **kw) == 1e-3  # 7.5e-4 → min
    assert levenberg_marquardt(1e-3, 1.0, **kw) == 1e-3
    assert levenberg_marquardt(4.0, 0.0, **kw) == 8.0  # inside: not clipped
    assert levenberg_marquardt(4e-3, 1.0, **kw) == 2e-3
    # defaults [1e-8, 1e8]
    assert levenberg_marquardt(1e8, 0.0) == 1e8
    assert levenberg_marquardt(1e-8, 1.0) == 1e-8


@pytest.mark.parametrize("factor", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_levenberg_marquardt_rejects_invalid_factor(factor):
    with pytest.raises(ValueError, match="factor"):
        levenberg_marquardt(1.0, 0.5, factor=factor)
