"""Step scales for ``kfac(..., step_scale=s)``: ``s(t)`` multiplies every update, ``t`` the steps taken."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def cosine_decay(steps: int, floor: float = 0.1) -> Callable[[Tensor], Tensor]:
    """``s(t) = floor + (1 − floor)·½(1 + cos(π·min(t / steps, 1)))``: 1 at the first step, falling along a
    half cosine to ``floor`` at step ``steps`` and held there — the annealing of the minimal-GPT recipes
    without their warmup (the quadratic model's step needs none). The quadratic model chooses the step for
    this batch's curvature and gradient; the scale takes its noise out towards the end of a run of known
    length. Pure torch: it compiles and vmaps with the step."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"cosine_decay: steps must be a positive int, got {steps!r}")
    if not 0 <= floor <= 1:
        raise ValueError(f"cosine_decay: floor must lie in [0, 1], got {floor!r}")

    def scale(step: Tensor) -> Tensor:
        progress = (torch.as_tensor(step).double() / steps).clamp(max=1.0)
        return floor + (1 - floor) * 0.5 * (1 + torch.cos(math.pi * progress))

    return scale
