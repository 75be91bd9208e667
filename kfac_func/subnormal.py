r"""Subnormal floats flushed to zero where the curvature step creates them.

When a loss goes to zero its output gradients (``p − onehot`` with ``p`` within ``1e-39`` of a one-hot)
become *subnormal* — smaller than the dtype's smallest normal number — and so do the gradients,
Kronecker factors, moving averages and velocities built from them. CPUs run arithmetic on subnormals
10–100× slower (a report on this project's machines measured steps on a memorised batch 10–20× slower;
``benchmarks/bench_small_loss.py`` did not reproduce it on an AMD EPYC). Flushing such values to zero
where they arise (the loss's output-space vectors, the backward's outputs and the gradients, the moving
averages, the eigendecompositions cast to float32, the velocity and the update) keeps the step at its
normal speed without touching a global setting such as ``torch.set_flush_denormal``; a value below
``finfo.tiny`` (1.2e-38 in float32, 2.2e-308 in float64) is negligible next to any normal one it is
added to, so no result the oracles check changes. The flush is one fused elementwise pass
(``hardshrink`` at the largest subnormal: ``|x| < tiny → 0``, NaN and Inf kept), about 10× cheaper than an
``abs``/``lt``/``where`` chain.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import Tensor


def _largest_subnormal(dtype: torch.dtype) -> float:
    """The λ of ``hardshrink`` (which zeroes ``|x| ≤ λ``): exactly representable in ``dtype`` and a double."""
    tiny = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype)
    return float(torch.nextafter(tiny, torch.zeros((), dtype=dtype)))


# computed at import: a plain dict lookup is all torch.compile sees
_THRESHOLD = {dtype: _largest_subnormal(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def flush(t: Tensor) -> Tensor:
    """``t`` with every subnormal entry replaced by zero (integer tensors unchanged)."""
    if not t.is_floating_point():
        return t
    return F.hardshrink(t, _THRESHOLD[t.dtype] if t.dtype in _THRESHOLD else _largest_subnormal(t.dtype))


def flush_tree(tree: Any) -> Any:
    """:func:`flush` on every tensor leaf of a pytree."""
    return optree.tree_map(flush, tree)
