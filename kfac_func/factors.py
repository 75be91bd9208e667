r"""Kronecker factors, their moving averages and decompositions (pure functions on pytrees).

For a layer with homogeneous inputs ``ā`` (``N`` examples, ``S`` positions) and scaled output gradients
``g`` (from :func:`kfac_func.capture`, which already carries ``R`` and the ``1/M`` of MC sampling):

* expand (default; exact for weight sharing when the loss sums over positions):
  ``A = 1/(N S) Σₙ,ₛ ā āᵀ``,  ``G = Σᵥ,ₙ,ₛ g gᵀ``;
* reduce (exact when positions are pooled before the loss):
  ``A = 1/N Σₙ â âᵀ`` with ``â = 1/S Σₛ ā``,  ``G = Σᵥ,ₙ ĝ ĝᵀ`` with ``ĝ = Σₛ g``.

The curvature block of ``vec(W̄)`` (row-major ``W̄ = [W, b]``) is ``G ⊗ A``; factors carry a leading
block dim ``B`` (conv groups). Decompositions clamp eigenvalues at 0 and never form an explicit
``inverse``; moving averages live in :mod:`kfac_func.averaging`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .capture import Capture, require_curvature


class KroneckerFactors(NamedTuple):
    """``A``: ``(B, d_a, d_a)``, ``G``: ``(B, d_g, d_g)``."""

    A: Tensor
    G: Tensor


class EigenFactors(NamedTuple):
    """``A = Q_A diag(d_A) Q_Aᵀ``, ``G = Q_G diag(d_G) Q_Gᵀ`` (eigenvalues clamped at 0)."""

    QA: Tensor
    dA: Tensor
    QG: Tensor
    dG: Tensor


class InverseFactors(NamedTuple):
    """π-damped inverse factors ``(A + λ_A I)⁻¹``, ``(G + λ_G I)⁻¹`` (from Cholesky factors) and the
    damping ``λ`` they include."""

    A_inv: Tensor
    G_inv: Tensor
    damping: Tensor


def kronecker_factors(cap: Capture, *, reduce: bool = False) -> dict[str, KroneckerFactors]:
    """The batch's Kronecker factors per layer (expand, or reduce when ``reduce``)."""
    require_curvature(cap)
    out = {}
    for name, a in cap.a.items():
        g = cap.g[name]
        n, positions = a.shape[0], a.shape[2]
        if reduce:
            out[name] = KroneckerFactors(_gram(a.mean(2), 1) / n, _gram(g.sum(3), 2))
        else:
            out[name] = KroneckerFactors(_gram(a, 1) / (n * positions), _gram(g, 2))
    return out


def _gram(x: Tensor, block_dim: int) -> Tensor:
    """``Σ x xᵀ`` over every dim but ``block_dim`` and the last: ``(B, d, d)``, one matmul per block (a
    view, no copy, when ``B = 1``)."""
    rows = x.movedim(block_dim, 0).reshape(x.shape[block_dim], -1, x.shape[-1])
    return rows.mT @ rows


def eigendecompose(factors: dict[str, KroneckerFactors], dtype: torch.dtype = torch.float64) -> dict[str, EigenFactors]:
    """Eigendecompositions computed in ``dtype`` and returned in each factor's dtype."""

    def eig(m: Tensor) -> tuple[Tensor, Tensor]:
        d, q = torch.linalg.eigh(m.to(dtype))
        return q.to(m.dtype), d.clamp_min(0).to(m.dtype)

    out = {}
    for name, f in factors.items():
        qa, da = eig(f.A)
        qg, dg = eig(f.G)
        out[name] = EigenFactors(qa, da, qg, dg)
    return out


def pi_damping(dA: Tensor, dG: Tensor, damping: float | Tensor) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping ``λ_A = π√λ``, ``λ_G = √λ/π`` with
    ``π² = (tr A / dim A) / (tr G / dim G)`` per block (``π = 1`` when a trace vanishes).

    ``dA``, ``dG``: eigenvalues or diagonals ``(B, d)`` (only their sums matter); returns ``(B, 1)``."""
    mean_a = dA.sum(-1, keepdim=True) / dA.shape[-1]
    mean_g = dG.sum(-1, keepdim=True) / dG.shape[-1]
    valid = (mean_a > 0) & (mean_g > 0)
    pi = torch.where(valid, (mean_a / torch.where(valid, mean_g, 1.0)).sqrt(), 1.0)
    root = torch.as_tensor(damping, dtype=dA.dtype, device=dA.device).sqrt()
    return pi * root, root / pi


def inverse_factors(
    factors: dict[str, KroneckerFactors], damping: float | Tensor, dtype: torch.dtype = torch.float64
) -> dict[str, InverseFactors]:
    """π-damped inverses ``(A + λ_A I)⁻¹``, ``(G + λ_G I)⁻¹`` from Cholesky factors (computed in ``dtype``),
    so that preconditioning costs two matmuls per layer. Needs ``damping > 0`` (positive definite)."""

    def chol_inv(m: Tensor, lam: Tensor) -> Tensor:
        eye = torch.eye(m.shape[-1], dtype=dtype, device=m.device)
        return torch.cholesky_inverse(torch.linalg.cholesky(m.to(dtype) + lam.to(dtype).unsqueeze(-1) * eye)).to(m.dtype)

    out = {}
    for name, f in factors.items():
        lam_a, lam_g = pi_damping(f.A.diagonal(dim1=-2, dim2=-1), f.G.diagonal(dim1=-2, dim2=-1), damping)
        out[name] = InverseFactors(
            chol_inv(f.A, lam_a), chol_inv(f.G, lam_g), torch.as_tensor(damping, dtype=f.A.dtype, device=f.A.device)
        )
    return out
