"""A loss trained to zero makes output gradients subnormal; none may reach the factors, decompositions,
scalings, velocities, gradients or the update (CPUs slow down 10–100× on subnormal arithmetic). The
memorised-batch runs below reach the case every time: the raw softmax gradient ``p − onehot`` of the
final parameters has subnormal entries (asserted), while nothing the optimizer keeps or applies does."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf
import oracles as O
from kfac_func.subnormal import flush

METHODS = {
    "kfac-eigen": dict(),
    "kfac-factored": dict(damping_mode="factored"),
    "ekfac": dict(method="ekfac"),
    "two-level": dict(method="two_level"),
}


def subnormals(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


@pytest.mark.parametrize("name", list(METHODS))
def test_a_memorised_batch_leaves_no_subnormal_numbers(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    # the fixed step (lr 0.05, statistics every step) memorises the batch within the 100 steps
    opt = kf.KFAC(model, **O.fixed_step(lr=0.05, damping=1e-2, **METHODS[name]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    for _ in range(99):
        opt.step(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(x, y)
    assert float(loss) <= 1e-6
    with torch.no_grad():
        raw = model(x).softmax(1) - F.one_hot(y, 5).float()
    assert subnormals(raw) > 0  # the case is reached: the loss's own gradient is subnormal
    kept = {"state": opt.kfac_state, "grads": [p.grad for p in model.parameters()],
            "update": [p.detach() - b for p, b in zip(model.parameters(), before)]}
    for path, leaf in zip(*optree.tree_flatten_with_path(kept)[:2]):
        assert subnormals(leaf) == 0, path


def test_flush_zeroes_exactly_the_subnormals():
    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([0.0, tiny, tiny / 2, -tiny / 4, 1.0, -3e-39, float("nan"), float("inf")])
    out = flush(t)
    assert torch.equal(out[:6], torch.tensor([0.0, tiny, 0.0, 0.0, 1.0, 0.0]))
    assert out[6].isnan() and out[7] == float("inf")
    assert torch.equal(flush(torch.tensor([3, 0])), torch.tensor([3, 0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_flush_threshold_is_each_dtypes_smallest_normal(dtype):
    """Per dtype: ``±tiny`` and every normal number kept (sign included), every subnormal — the largest
    ``nextafter(tiny, 0)``, ``tiny/2``, the smallest — flushed to 0; the dtype unchanged. A float32 threshold
    on float64 would zero 1e-100 (normal there); on float16 it would keep 1e-6 (subnormal there)."""
    tiny = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype)
    zero = torch.zeros((), dtype=dtype)
    largest_sub = torch.nextafter(tiny, zero)
    smallest_sub = torch.nextafter(zero, tiny)
    assert 0 < smallest_sub <= largest_sub < tiny
    kept = torch.stack([tiny, -tiny, torch.nextafter(tiny, 2 * tiny), -2 * tiny, torch.ones((), dtype=dtype)])
    subs = torch.stack([largest_sub, -largest_sub, tiny / 2, -tiny / 2, smallest_sub, -smallest_sub])
    assert bool((subs.abs() < tiny).all() & (subs != 0).all())
    assert torch.equal(flush(kept), kept) and flush(kept).dtype == dtype
    assert torch.equal(flush(subs), torch.zeros_like(subs)) and flush(subs).dtype == dtype
    # the other dtypes' boundaries: normal in float64, subnormal in float16
    if dtype == torch.float64:
        normal = torch.tensor([1e-100, -1e-300, 3e-39], dtype=dtype)
        assert torch.equal(flush(normal), normal)
    if dtype == torch.float16:
        sub = torch.tensor([1e-6, -3e-5], dtype=dtype)
        assert bool((sub != 0).all()) and torch.equal(flush(sub), torch.zeros_like(sub))
