r"""The working precision of decompositions with ``decomposition_dtype=None`` ("auto", the optimizer's default):
float32 where it is as good as float64 for the damped solve, float64 where it is not.

A float32 ``eigh`` or Cholesky factorisation is backward stable — exact for ``M + E`` with ``‖E‖ ≈ ε₃₂‖M‖``
(``ε₃₂ = 1.2e-7``) — so it perturbs the eigen-damped solve ``(G ⊗ A + λI)⁻¹`` by about
``ε₃₂‖A‖‖G‖/λ`` relative, and a π-damped inverse ``(M + λ_M I)⁻¹`` by ``ε₃₂‖M‖/λ_M``. Where that bound is
within :data:`FLOAT32_TOLERANCE` (0.1%, far below the sampling error of a curvature estimate from a
mini-batch) a factor wider than :data:`ALWAYS_FLOAT64_DIM` is decomposed in float32, which halves the
time of its decomposition; narrower factors cost next to nothing and stay in float64. Float64 factors
(a float64 model) are decomposed in float64, and so is everything where values cannot be read on the
host to decide (under ``torch.compile`` or ``vmap``). ``decomposition_dtype=torch.float64`` forces
float64 throughout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FLOAT32_TOLERANCE = 1e-3
ALWAYS_FLOAT64_DIM = 128
EPS32 = torch.finfo(torch.float32).eps


def traced(t: Tensor) -> bool:
    """Whether ``t``'s value cannot be read on the host (under ``torch.compile`` or ``vmap``)."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_batchedtensor(t)


def auto_applies(factors: dict[str, Any]) -> bool:
    """Whether "auto" may choose float32: the factors (``.G`` of the first) are narrower than float64 and
    readable on the host."""
    first = next(iter(factors.values()), None)
    return first is not None and first.G.dtype != torch.float64 and not traced(first.G)


def exceeds(bounds: list[Tensor]) -> list[bool]:
    """``ε₃₂ · bound > FLOAT32_TOLERANCE`` for each 0-dim ``bound`` (``‖A‖‖G‖/λ`` or ``‖M‖/λ_M``), in one host read."""
    return (EPS32 * torch.stack(bounds) > FLOAT32_TOLERANCE).tolist() if bounds else []


def working_dtype(m: Tensor, wide: torch.dtype) -> torch.dtype:
    """``wide`` for a factor ``m`` wider than :data:`ALWAYS_FLOAT64_DIM` (a matrix; a block-diagonal side by its
    block width), float64 otherwise."""
    return wide if m.dim() == 3 and m.shape[-1] > ALWAYS_FLOAT64_DIM else torch.float64
