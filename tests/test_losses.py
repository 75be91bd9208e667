r"""``kfac_func.losses.cotangents`` against torch's own losses, ``torch.func.grad`` and
``torch.func.hessian``: the true gradient, the exact square-root columns (``Σᵥ u uᵀ = R ∇²ℓₙ``), the
empirical vectors, MC vectors (statistically) and reproducible sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, hessian, vmap

from kfac_func import random
from kfac_func.losses import Loss, cotangents
from oracles import DT, budget, example_hessians, example_loss, reduction_scale, torch_loss

seeds = st.integers(0, 2**16)


def assert_close(actual, expected, atol=1e-11, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@st.composite
def loss_cases(draw, kinds=("cross_entropy", "mse", "bce_with_logits")):
    """``(Loss, out, target)``: every loss and reduction, with extra output dims, CE class-index targets
    (with ignored entries, default and custom ``ignore_index``) and CE class-probability targets, in
    torch's ``(N, C, ...)`` layout (``class_dim=1``, or ``None`` where that resolves it)."""
    kind = draw(st.sampled_from(kinds))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(2, 4) if kind == "cross_entropy" else st.integers(1, 4))
    extra = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    g = torch.Generator().manual_seed(draw(seeds))
    if kind == "cross_entropy":
        shape = (n, c) + extra
        out = 2 * torch.randn(shape, generator=g, dtype=DT)
        if draw(st.booleans()):  # class probabilities, total mass per position not necessarily 1
            target = torch.randn(shape, generator=g, dtype=DT).softmax(1)
            if draw(st.booleans()):
                target = target * (0.5 + torch.rand((n, 1) + extra, generator=g, dtype=DT))
            return Loss(kind, reduction, class_dim=1 if extra else draw(st.sampled_from([None, 1, -1]))), out, target
        ignore_index = draw(st.sampled_from([-100, 1]))
        target = torch.randint(0, c, (n,) + extra, generator=g)
        if draw(st.booleans()):
            target = torch.where(torch.rand(target.shape, generator=g) < 0.4, ignore_index, target)
        flat = target.view(-1)
        flat[0] = 0  # at least one counted target (ignore_index is never 0 here)
        # torch's layout; the class dim resolved from the targets where only dim 1 fits
        class_dim = 1 if extra and extra[-1] == c else draw(st.sampled_from([None, 1]))
        return Loss(kind, reduction, ignore_index, class_dim=class_dim), out, target
    shape = (n,) + extra + (c,)
    out = torch.randn(shape, generator=g, dtype=DT)
    target = torch.randn(shape, generator=g, dtype=DT) if kind == "mse" else torch.rand(shape, generator=g, dtype=DT)
    return Loss(kind, reduction), out, target


def _per_example_outer(u: torch.Tensor) -> torch.Tensor:
    """``(V, N, *rest)`` → ``(N, K, K)``: ``Σᵥ u_{v,n} u_{v,n}ᵀ``."""
    flat = u.reshape(u.shape[0], u.shape[1], -1)
    return torch.einsum("vnk,vnl->nkl", flat, flat)


def _oracle_scaled_hessians(loss: Loss, out, target):
    R = reduction_scale(loss.kind, loss.reduction, out, target, loss.ignore_index)
    return R, R * example_hessians(loss.kind, out, target, loss.ignore_index)


@given(case=loss_cases(), fisher=st.sampled_from([None, "exact", "empirical", "mc"]))
@settings(max_examples=budget(25))
def test_value_and_true_gradient_match_torch(case, fisher):
    loss, out, target = case
    fn = torch_loss(loss.kind, loss.reduction, loss.ignore_index)
    value, true_grad, curv, scale = cotangents(loss, out, target, fisher, 2, random.key(0))
    assert_close(value, fn(out, target))
    assert_close(true_grad, grad(fn)(out, target))
    assert math.isclose(float(scale), reduction_scale(loss.kind, loss.reduction, out, target, loss.ignore_index),
                        rel_tol=1e-12)
    assert (curv is None) == (fisher is None)


@given(case=loss_cases(), elements=st.sampled_from([1, 2, 7, 2**22]))
@settings(max_examples=budget(25))
def test_sliced_value_is_torchs_loss(case, elements):
    """A slice of dim 0 at a time (one row per slice at ``elements=1``, the whole batch at 2²²) sums to
    torch's loss, means and ignored targets included."""
    loss, out, target = case
    want = torch_loss(loss.kind, loss.reduction, loss.ignore_index)(out, target)
    assert_close(loss.sliced_value(out, target, elements), want)


@pytest.mark.parametrize("reduction_scale", [None, 0.3])
def test_sliced_value_of_class_last_logits(reduction_scale):
    """Language-model logits ``(B, T, V)`` with ignored targets, sliced a sequence at a time, against
    torch's cross-entropy over the flattened positions (times a fixed ``R`` where set)."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(5, 4, 9, generator=g, dtype=DT)
    target = torch.randint(0, 9, (5, 4), generator=g)
    target[1, 2] = target[3, 0] = -100
    loss = Loss("cross_entropy", class_dim=-1, reduction_scale=reduction_scale)
    flat = (out.reshape(-1, 9), target.reshape(-1))
    want = (torch.nn.functional.cross_entropy(*flat) if reduction_scale is None
            else reduction_scale * torch.nn.functional.cross_entropy(*flat, reduction="sum"))
    assert_close(loss.sliced_value(out, target, elements=out[0].numel()), want)
    compiled = torch.compile(loss.sliced_value, backend="eager", fullgraph=True)  # the step compiles it so
    assert_close(compiled(out, target, out[0].numel()), want)


@given(case=loss_cases())
@settings(max_examples=budget(25))
def test_exact_vectors_are_a_hessian_square_root(case):
    """``Σᵥ u uᵀ = R ∇²ℓₙ`` per example, with ``∇²ℓₙ`` from ``torch.func.hessian`` of the sum-reduced
    per-example loss."""
    loss, out, target = case
    _, _, u, _ = cotangents(loss, out, target, "exact")
    assert u.shape[1:] == out.shape
    _, expected = _oracle_scaled_hessians(loss, out, target)
    assert_close(_per_example_outer(u), expected)


@given(case=loss_cases())
@settings(max_examples=budget(15))
def test_empirical_vectors_are_scaled_per_example_gradients(case):
    """One vector: ``√R ∇ℓₙ`` at the true targets, so ``Σᵥ u uᵀ = R ∇ℓₙ ∇ℓₙᵀ``."""
    loss, out, target = case
    _, _, u, _ = cotangents(loss, out, target, "empirical")
    assert u.shape == (1,) + tuple(out.shape)
    R = reduction_scale(loss.kind, loss.reduction, out, target, loss.ignore_index)
    per_example = vmap(grad(example_loss(loss.kind, loss.ignore_index)))(out, target)
    assert_close(u[0], math.sqrt(R) * per_example)


@pytest.mark.parametrize(
    "kind,target_type", [("cross_entropy", "index"), ("cross_entropy", "probs"), ("mse", None), ("bce_with_logits", None)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mc_vectors_average_to_hessian(kind, target_type, reduction):
    r"""``Σᵥ u uᵀ = (1/M) Σₘ Xₘ`` with ``Xₘ = R gₘ gₘᵀ``, ``E[Xₘ] = R ∇²ℓₙ``. The error of the mean is
    ``O(1/√M)``; its expected squared Frobenius norm ``SE²`` is estimated from the samples, and the
    error must stay below ``5·SE`` (a larger deviation has negligible probability; the seed is fixed),
    with ``5·SE`` under 10% of the Hessian's norm (M = 20000) and large enough errors (a 20% scale
    change) detected."""
    M = 20000
    g = torch.Generator().manual_seed(3)
    n, c, extra = 2, 3, (2,)
    if kind == "cross_entropy":
        out = torch.randn((n, c) + extra, generator=g, dtype=DT)
        if target_type == "probs":
            target = torch.randn(out.shape, generator=g, dtype=DT).softmax(1)
            loss = Loss(kind, reduction, class_dim=1)
        else:
            target = torch.tensor([[0, -1], [2, 1]])
            loss = Loss(kind, reduction, ignore_index=-1)
    else:
        out = torch.randn((n,) + extra + (c,), generator=g, dtype=DT)
        target = torch.rand(out.shape, generator=g, dtype=DT)
        loss = Loss(kind, reduction)
    _, _, u, _ = cotangents(loss, out, target, "mc", M, random.key(4))
    assert u.shape == (M,) + tuple(out.shape)
    _, expected = _oracle_scaled_hessians(loss, out, target)
    X = M * torch.einsum("mnk,mnl->mnkl", u.reshape(M, n, -1), u.reshape(M, n, -1))
    mean = X.mean(0)
    assert_close(_per_example_outer(u), mean)
    se = math.sqrt(float(((X - mean) ** 2).sum()) / (M * (M - 1)))
    assert 5 * se < 0.1 * float(expected.norm())
    assert float((mean - expected).norm()) < 5 * se
    assert float((mean - 1.2 * expected).norm()) > 5 * se


@given(case=loss_cases())
@settings(max_examples=budget(10))
def test_mc_sampling_is_reproducible(case):
    loss, out, target = case
    out = out.tanh()  # moderate probabilities, so that 256 draws are never all alike
    M = 256

    def draw(seed):
        return cotangents(loss, out, target, "mc", M, random.key(seed))[2]

    a, b = draw(7), draw(7)
    assert torch.equal(a, b)
    # a different seed, or a key split from it, gives different samples (where any vary)
    split = cotangents(loss, out, target, "mc", M, random.split(random.key(7))[0])[2]
    if (a != 0).any():
        assert not torch.equal(draw(8), a)
        assert not torch.equal(split, a)


def test_invalid_arguments():
    out = torch.randn(2, 3, dtype=DT)
    target = torch.randn(2, 3, dtype=DT)
    with pytest.raises(ValueError):
        cotangents(Loss("mse"), out, target, "bogus")
    with pytest.raises(ValueError):
        cotangents(Loss("mse"), out, target, "mc", 0)
    with pytest.raises(ValueError):
        Loss("hinge")
    with pytest.raises(ValueError):
        Loss("mse", "none")


# ----------------------------------------------------------------------------------------------------
# the class dim: class-last (B, T, V) logits and torch's (B, V, T), the same numbers permuted
# ----------------------------------------------------------------------------------------------------


def _lm_case(target_type: str, b: int = 2, t: int = 3, v: int = 4, seed: int = 0):
    """Class-last logits ``(B, T, V)``, the same numbers as torch's ``(B, V, T)`` and targets: class
    indices ``(B, T)`` (some ignored, ``ignore_index=-1``) or class probabilities ``(B, T, V)`` and
    ``(B, V, T)``."""
    g = torch.Generator().manual_seed(seed)
    last = 2 * torch.randn(b, t, v, generator=g, dtype=DT)
    first = last.movedim(-1, 1).contiguous()
    if target_type == "index":
        target = torch.randint(0, v, (b, t), generator=g)
        target[0, 1] = -1
        return last, first, target, target
    probs = torch.randn(b, t, v, generator=g, dtype=DT).softmax(-1) * (0.5 + torch.rand(b, t, 1, generator=g, dtype=DT))
    return last, first, probs, probs.movedim(-1, 1).contiguous()


def _lm_oracle(reduction: str, target_last: torch.Tensor):
    """torch's loss of class-last logits, the language-model way: rows ``(B·T, V)``."""
    v = target_last.shape[-1] if target_last.is_floating_point() else None

    def fn(out):
        rows = out.reshape(-1, out.shape[-1])
        target = target_last.reshape(-1, v) if v else target_last.reshape(-1)
        return torch.nn.functional.cross_entropy(rows, target, reduction=reduction, ignore_index=-1)

    return fn


def _block_diagonal(u: torch.Tensor) -> torch.Tensor:
    """``(V, N, *rest)`` → ``(K, K)`` over the whole output: ``blockdiag_n(Σᵥ u_{v,n} u_{v,n}ᵀ)``."""
    return torch.block_diag(*_per_example_outer(u))


@pytest.mark.parametrize("target_type", ["index", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("given_dim", [True, False])
def test_class_last_and_torch_layout_match_torch_func(target_type, reduction, given_dim):
    """Value, ``∂L/∂out``, the exact columns (``blockdiag Σ u uᵀ`` = the reduced loss's output-space Hessian
    from ``torch.func.hessian``, cross-example blocks zero) and ``output_hessian_product`` = ``H u``, each
    in the output's own layout; the torch-layout results are the class-last ones permuted. With
    ``given_dim=False`` class indices resolve the layout (class probabilities need it given)."""
    from kfac_func.quadratic import output_hessian_product

    last, first, t_last, t_first = _lm_case(target_type)
    resolve = given_dim or target_type == "probs"
    loss_last = Loss("cross_entropy", reduction, -1, class_dim=-1 if resolve else None)
    loss_first = Loss("cross_entropy", reduction, -1, class_dim=1 if resolve else None)
    assert (loss_last.resolve(last, t_last), loss_first.resolve(first, t_first)) == (2, 1)
    fn = _lm_oracle(reduction, t_last)
    k = last.numel()
    H = hessian(fn)(last).reshape(k, k)
    u = torch.randn(last.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    results = {}
    for name, loss, out, target in (("last", loss_last, last, t_last), ("first", loss_first, first, t_first)):
        value, true_grad, cols, _ = cotangents(loss, out, target, "exact")
        results[name] = true_grad, cols
        assert_close(value, fn(last))
        assert true_grad.shape == out.shape and cols.shape[1:] == out.shape
        product = output_hessian_product(loss, out, target, u if name == "last" else u.movedim(-1, 1))
        assert product.shape == out.shape
        if name == "first":
            cols, product, true_grad = cols.movedim(2, -1), product.movedim(1, -1), true_grad.movedim(1, -1)
        assert_close(true_grad, grad(fn)(last))
        assert_close(_block_diagonal(cols), H)
        assert_close(product.reshape(-1), H @ u.reshape(-1))
    assert_close(results["first"][0], results["last"][0].movedim(-1, 1))
    assert_close(results["first"][1], results["last"][1].movedim(-1, 2))


@pytest.mark.parametrize("class_dim", [-1, None])
def test_mc_vectors_of_class_last_logits_average_to_hessian(class_dim):
    """As :func:`test_mc_vectors_average_to_hessian` for class-last logits (the oracle: rows ``(B·T, V)``);
    the same key on the same numbers in torch's layout draws the same classes."""
    M = 20000
    last, first, target, _ = _lm_case("index", 2, 2, 3, seed=5)
    loss = Loss("cross_entropy", "mean", -1, class_dim=class_dim)
    _, _, u, _ = cotangents(loss, last, target, "mc", M, random.key(4))
    assert u.shape == (M,) + tuple(last.shape)
    n, k = last.shape[0], last[0].numel()
    fn = _lm_oracle("mean", target)
    expected = torch.stack([hessian(fn)(last).reshape(n, k, n, k)[i, :, i] for i in range(n)])
    X = M * torch.einsum("mnk,mnl->mnkl", u.reshape(M, n, -1), u.reshape(M, n, -1))
    mean = X.mean(0)
    se = math.sqrt(float(((X - mean) ** 2).sum()) / (M * (M - 1)))
    assert 5 * se < 0.1 * float(expected.norm())
    assert float((mean - expected).norm()) < 5 * se
    assert float((mean - 1.2 * expected).norm()) > 5 * se
    _, _, u_first, _ = cotangents(Loss("cross_entropy", "mean", -1), first, target, "mc", M, random.key(4))
    assert_close(u_first, u.movedim(-1, 2))


def test_ambiguous_class_dim_is_an_error():
    """``(B, T, T)`` logits with ``(B, T)`` class indices fit both layouts: every entry point refuses and
    names both choices; either choice then computes its layout's loss."""
    from kfac_func.quadratic import output_hessian_product

    g = torch.Generator().manual_seed(2)
    out = torch.randn(2, 3, 3, generator=g, dtype=DT)
    target = torch.randint(0, 3, (2, 3), generator=g)
    loss = Loss("cross_entropy")
    calls = [
        lambda: loss.value(out, target),
        lambda: cotangents(loss, out, target, "exact"),
        lambda: loss.grad(out, target),
        lambda: loss.hessian_sqrt(out, target),
        lambda: loss.sampled_grads(out, target, 2, random.key(0)),
        lambda: output_hessian_product(loss, out, target, out),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="fit both layouts") as info:
            call()
        message = str(info.value)
        assert 'Loss("cross_entropy", class_dim=-1)' in message and "class_dim=1" in message
        assert "language models" in message and "(N, C, d1, ...)" in message
    assert_close(Loss("cross_entropy", class_dim=-1).value(out, target), _lm_oracle("mean", target)(out))
    assert_close(Loss("cross_entropy", class_dim=1).value(out, target),
                 torch.nn.functional.cross_entropy(out, target))


def test_class_index_target_shapes():
    """``None`` takes the one layout that fits; no fit names both layouts' shapes; a given ``class_dim``
    names its own."""
    out = torch.zeros(2, 3, 4, dtype=DT)
    loss = Loss("cross_entropy")
    assert loss.resolve(out, torch.zeros(2, 3, dtype=torch.long)) == 2
    assert loss.resolve(out, torch.zeros(2, 4, dtype=torch.long)) == 1
    assert loss.resolve(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)) == 1
    assert Loss("cross_entropy", class_dim=-1).resolve(torch.zeros(5, 3)) == 1
    with pytest.raises(ValueError, match=r"\(2, 4\) for torch's .* or \(2, 3\) for class-last .* got \(2, 5\)"):
        loss.value(out, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have shape \(2, 3\), got \(2, 4\)"):
        Loss("cross_entropy", class_dim=-1).value(out, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \(N, C, \.\.\.\)"):
        loss.value(torch.zeros(3), torch.zeros((), dtype=torch.long))


def test_class_probabilities_on_three_dims_need_the_class_dim():
    last, first, p_last, p_first = _lm_case("probs")
    loss = Loss("cross_entropy")
    for call in (lambda: loss.value(last, p_last), lambda: loss.terms(p_last), lambda: loss.grad(last, p_last)):
        with pytest.raises(ValueError, match="class-probability targets .* class_dim=-1"):
            call()
    assert Loss("cross_entropy", class_dim=-1).terms(p_last) == 6
    assert Loss("cross_entropy", class_dim=1).terms(p_first) == 6
    assert Loss("cross_entropy").terms(p_last[:, 0]) == 2  # 2-D: classes in dim 1, no choice to make
    assert_close(Loss("cross_entropy").value(last[:, 0], p_last[:, 0]),
                 torch.nn.functional.cross_entropy(last[:, 0], p_last[:, 0]))


def test_stand_in_targets_count_every_term():
    """Class indices 0 of the logits' shape without the class dim (an error without one on ≥3 dims), ``out``
    itself for MSE and BCE; ``terms_of(out)`` = ``terms(stand_in_targets(out))``, and the exact curvature
    and ``R`` equal those of true targets none of which is ignored."""
    g = torch.Generator().manual_seed(3)
    out = torch.randn(2, 3, 4, generator=g, dtype=DT)
    for class_dim, shape, terms in ((-1, (2, 3), 6), (1, (2, 4), 8)):
        loss = Loss("cross_entropy", class_dim=class_dim)
        stand_in = loss.stand_in_targets(out)
        assert stand_in.shape == shape and stand_in.dtype == torch.int64 and not stand_in.any()
        assert loss.terms_of(out) == int(loss.terms(stand_in)) == terms
        true = torch.randint(0, out.shape[loss.resolve(out)], shape, generator=g)
        _, _, u, scale = cotangents(loss, out, stand_in, "exact")
        _, _, u_true, scale_true = cotangents(loss, out, true, "exact")
        assert_close(u, u_true)
        assert float(scale) == float(scale_true) == 1 / terms
    assert Loss("cross_entropy").stand_in_targets(out[:, 0]).shape == (2,)
    assert Loss("cross_entropy").terms_of(out[:, 0]) == 2
    for call in (Loss("cross_entropy").stand_in_targets, Loss("cross_entropy").terms_of):
        with pytest.raises(ValueError, match="without targets") as info:
            call(out)
        message = str(info.value)
        assert 'loss=kf.Loss("cross_entropy", class_dim=-1) for (B, T, V)' in message
        assert "class_dim=1 for (B, V, T)" in message
    for kind in ("mse", "bce_with_logits"):
        assert Loss(kind).stand_in_targets(out) is out
        assert Loss(kind).terms_of(out) == 24


def test_class_dim_validation():
    for bad in (0, 2, -2, True, 1.0):
        with pytest.raises(ValueError, match="class_dim must be None, 1 or -1"):
            Loss("cross_entropy", class_dim=bad)
    for kind in ("mse", "bce_with_logits"):
        with pytest.raises(ValueError, match="cross_entropy only"):
            Loss(kind, class_dim=-1)
        with pytest.raises(ValueError, match="only cross_entropy has a class dim"):
            Loss(kind).resolve(torch.zeros(2, 3))


def test_as_loss_takes_torchs_loss_modules():
    from torch import nn

    from kfac_func.losses import as_loss

    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 4, 2, generator=g, dtype=DT)
    index = torch.tensor([[0, 1], [3, 3], [2, 1]])
    real = torch.rand(out.shape, generator=g, dtype=DT)
    cases = [
        (nn.CrossEntropyLoss(), Loss("cross_entropy"), index),
        (nn.CrossEntropyLoss(reduction="sum", ignore_index=3), Loss("cross_entropy", "sum", 3), index),
        (nn.MSELoss(reduction="sum"), Loss("mse", "sum"), real),
        (nn.MSELoss(), Loss("mse"), real),
        (nn.BCEWithLogitsLoss(reduction="sum"), Loss("bce_with_logits", "sum"), real),
    ]
    for module, expected, target in cases:
        assert as_loss(module) == expected
        assert_close(as_loss(module).value(out, target), module(out, target))
    assert as_loss("mse") == Loss("mse")
    assert as_loss(Loss("cross_entropy", class_dim=-1)).class_dim == -1
    refused = [
        (nn.CrossEntropyLoss(weight=torch.ones(4)), "weight"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing=0.1"),
        (nn.BCEWithLogitsLoss(weight=torch.ones(2)), "weight"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(2)), "pos_weight"),
        (nn.CrossEntropyLoss(reduction="none"), r"reduction='none'.*'mean' or 'sum'"),
        (nn.MSELoss(reduction="none"), r"reduction='none'"),
        (nn.BCEWithLogitsLoss(reduction="none"), r"reduction='none'"),
    ]
    for module, match in refused:
        with pytest.raises(ValueError, match=match):
            as_loss(module)
    for other in (nn.L1Loss(), nn.NLLLoss(), 3, None):
        with pytest.raises(TypeError, match="nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss"):
            as_loss(other)
