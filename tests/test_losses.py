r"""``kfac_func.losses.cotangents`` against torch's own losses, ``torch.func.grad`` and
``torch.func.hessian``: the true gradient, the exact square-root columns (``Σᵥ u uᵀ = R ∇²ℓₙ``), the
empirical vectors, MC vectors (statistically) and reproducible sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap

from kfac_func import random
from kfac_func.losses import Loss, cotangents
from oracles import DT, budget, example_hessians, example_loss, reduction_scale, torch_loss

seeds = st.integers(0, 2**16)


def assert_close(actual, expected, atol=1e-11, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@st.composite
def loss_cases(draw, kinds=("cross_entropy", "mse", "bce_with_logits")):
    """``(Loss, out, target)``: every loss and reduction, with extra output dims, CE class-index targets
    (with ignored entries, default and custom ``ignore_index``) and CE class-probability targets."""
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
            return Loss(kind, reduction), out, target
        ignore_index = draw(st.sampled_from([-100, 1]))
        target = torch.randint(0, c, (n,) + extra, generator=g)
        if draw(st.booleans()):
            target = torch.where(torch.rand(target.shape, generator=g) < 0.4, ignore_index, target)
        flat = target.view(-1)
        flat[0] = 0  # at least one counted target (ignore_index is never 0 here)
        return Loss(kind, reduction, ignore_index), out, target
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
            loss = Loss(kind, reduction)
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
