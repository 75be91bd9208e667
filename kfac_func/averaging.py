"""Bias-corrected moving averages of curvature pytrees (factors, E-KFAC scalings, coarse matrices).

``F ← β F + (1−β) F_batch``, and the average read out as ``F / (1 − βᵗ)`` (the bias correction of
Adam), so the first steps are not pulled towards the zero initial value. A batch with any NaN/Inf is
rejected: the state is returned untouched, decided on the device without a host sync.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .phases import phase
from .subnormal import flush_tree


class MovingAverage(NamedTuple):
    """``value``: the raw sums ``Σₖ (1−β) β^{t−k} Fₖ`` (any pytree of tensors); ``weight``: ``1 − βᵗ``;
    ``updates``: the number of accepted batches."""

    value: Any
    weight: Tensor
    updates: Tensor


def all_finite(tree: Any) -> Tensor:
    """A 0-dim bool tensor: every leaf of ``tree`` is finite, decided from one sum per leaf (a NaN or Inf
    anywhere makes the sum non-finite; a finite sum that overflows its dtype counts as non-finite too).
    No host sync."""
    leaves = optree.tree_leaves(tree)
    return torch.isfinite(torch.stack([t.sum().to(torch.float64) for t in leaves]).sum())


def init_average(like: Any) -> MovingAverage:
    """An empty moving average shaped like ``like``."""
    ref = optree.tree_leaves(like)[0]
    return MovingAverage(
        optree.tree_map(torch.zeros_like, like), ref.new_zeros(()), torch.zeros((), dtype=torch.int64, device=ref.device)
    )


@phase("statistics")
def update_average(state: MovingAverage, batch: Any, decay: float, *, checked: bool = False) -> tuple[MovingAverage, Tensor]:
    """Fold ``batch`` into the average; returns the new state and whether the batch was accepted.

    ``checked=True`` states that the caller has already verified the batch is finite (skips the guard).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if optree.tree_structure(batch) != optree.tree_structure(state.value):
        raise ValueError("the batch does not have the structure (layers) of the moving average")
    if checked:
        ok = torch.ones((), dtype=torch.bool, device=state.weight.device)
        value = optree.tree_map(lambda m, f: torch.lerp(m, f, 1 - decay), state.value, batch)
    else:
        ok = all_finite(batch)
        value = optree.tree_map(lambda m, f: torch.where(ok, torch.lerp(m, f, 1 - decay), m), state.value, batch)
    weight = torch.where(ok, decay * state.weight + (1 - decay), state.weight)
    # a decaying average reaches subnormal values after ~1 700 steps without signal (0.95ᵗ < 1e-38): flushed
    return MovingAverage(flush_tree(value), weight, state.updates + ok.to(state.updates.dtype)), ok


def averaged(state: MovingAverage) -> Any:
    """The bias-corrected average (zeros before the first accepted batch)."""
    w = state.weight.clamp_min(torch.finfo(state.weight.dtype).tiny)
    return optree.tree_map(lambda m: m / w, state.value)
