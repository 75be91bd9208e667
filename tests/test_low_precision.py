"""float16 / bfloat16 models (not autocast): statistics, decompositions, preconditioning and updates in float32,
parameters updated in their own dtype."""

from __future__ import annotations

import copy

import optree
import pytest
import torch
from torch import nn

import kfac_func as kf

LOW = [torch.bfloat16, torch.float16]
# unit roundoff (half the gap between 1 and the next number): 8 significand bits for bfloat16, 11 for float16
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(dtype: torch.dtype, n: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # learnable: the loss can fall well below log 3
    return x.to(dtype), y


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("options", [{"method": "kfac"}, {"method": "ekfac"}, {"damping_mode": "factored"}],
                         ids=["kfac", "ekfac", "factored"])
def test_low_precision_model_trains_with_float32_state(dtype, options):
    model = _mlp(dtype)
    x, y = _data(dtype)
    opt = kf.KFAC(model, lr=0.1, damping=1e-2, **options)
    losses = [float(opt.step(x, y)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    for p in model.parameters():
        assert p.dtype == dtype and p.grad.dtype == dtype and torch.isfinite(p).all()
    state = opt.kfac_state
    tensors = optree.tree_leaves((state.factors.value, state.eigen, state.inverses, state.scale, state.velocity))
    assert tensors and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point() and t.numel())


def _float32_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model).float()
    assert all(torch.equal(p.float(), q) for p, q in zip(model.parameters(), twin.parameters()))
    return twin


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_statistics_equal_the_float32_model_on_the_same_values(dtype, fisher):
    """The low-precision model's factors against the float32 model run on the same (upcast, exact) parameters
    and inputs. Layer 0's input ``a = x`` is exact in both: its ``A`` must agree to float32 precision (a
    factor accumulated or stored in low precision would be off by ~u). Every other ``a`` and ``g`` passes
    through at most k = 12 low-precision roundings on its way (forward: addmm, tanh, addmm; softmax, sqrt,
    subtraction, product, √R; backward: matmul, 1 − t², product), each a relative error ≤ u; to first order
    (sensitivities O(1) at this small initialisation) |δv| ≤ k u |v|, so ‖δF‖_F ≤ Σ 2|δv||v| ≤ 2 k u tr F."""
    model = _mlp(dtype)
    x, y = _data(dtype)
    twin = _float32_twin(model)
    cap = kf.capture(model, _params(model), x, y, "cross_entropy", fisher=fisher)
    ref = kf.capture(twin, _params(twin), x.float(), y, "cross_entropy", fisher=fisher)
    factors, expected = kf.kronecker_factors(cap), kf.kronecker_factors(ref)
    torch.testing.assert_close(factors["0"].A, expected["0"].A)  # float32 tolerances
    bound = 2 * 12 * ROUNDOFF[dtype]
    for name, f in factors.items():
        for got, want in zip(f, expected[name]):
            assert got.dtype == torch.float32
            assert (got - want).norm() <= bound * want[0].trace(), name


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_preconditioning_is_the_float32_one_rounded(dtype):
    """precondition on low-precision gradients = the float32 preconditioning of the same (upcast) gradients,
    rounded once to the gradients' dtype: the solve itself runs in the factors' float32."""
    model = _mlp(dtype)
    x, y = _data(dtype)
    params = _params(model)
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    layers = kf.trace(model, params, x).layers
    eigen = kf.eigendecompose(kf.kronecker_factors(cap), torch.float32)
    out = kf.precondition(params, cap.grads, eigen, layers=layers, damping=1e-3)
    up = {n: t.float() for n, t in params.items()}
    ref = kf.precondition(up, {n: g.float() for n, g in cap.grads.items()}, eigen, layers=layers, damping=1e-3)
    for n in params:
        assert out[n].dtype == dtype and torch.equal(out[n], ref[n].to(dtype)), n


@pytest.mark.parametrize("dtype", LOW)
def test_failed_low_precision_step_changes_nothing(dtype):
    """A step that raises (here: targets of the wrong shape, found after the key is split) leaves parameters,
    every state tensor (the sampling key included) and torch's global RNG as they were."""
    model = _mlp(dtype)
    x, y = _data(dtype)
    opt = kf.KFAC(model, lr=0.1, damping=1e-2)
    opt.step(x, y)
    params = [p.detach().clone() for p in model.parameters()]
    state, rng = copy.deepcopy(opt.kfac_state), torch.get_rng_state()
    with pytest.raises(ValueError, match="class-index targets for logits .* must have shape"):
        opt.step(x, y[:-1])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    leaves, before = optree.tree_leaves(opt.kfac_state), optree.tree_leaves(state)
    assert len(leaves) == len(before) and all(torch.equal(a, b) for a, b in zip(leaves, before))
    assert torch.equal(torch.get_rng_state(), rng)
    opt.step(x, y)  # and it carries on
