r"""E-KFAC (George et al. 2018): K-FAC's eigenbasis with a re-estimated diagonal scaling.

With ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ``, K-FAC is diagonal in the basis
``Q_G ⊗ Q_A`` with entries ``d_G d_Aᵀ``. E-KFAC keeps the basis and replaces those entries by the
second moment of the per-example gradients projected into it:

    ``S = R Σₙ,ᵥ (Q_Gᵀ ∇W̄ₙ,ᵥ Q_A)²``   (elementwise square; ``∇W̄ₙ,ᵥ = Σₛ gₙ,ᵥ,ₛ āₙ,ₛᵀ``),

which is ``diag((Q_G ⊗ Q_A)ᵀ C (Q_G ⊗ Q_A))``: the best approximation of the curvature ``C`` in
Frobenius norm among matrices diagonal in that basis. For one position per example (dense layers) it
is one matmul of squared projections, ``Σ (Q_Gᵀ g)² ((Q_Aᵀ ā)²)ᵀ``; with several positions (convolutions,
sequences) the projected per-example gradient ``Σₛ (Q_Gᵀ gₛ)(Q_Aᵀ āₛ)ᵀ`` is formed first, a chunk of examples
at a time: at most :data:`PROJECTION_ENTRIES` entries (one example's at least) exist at once, so a
vocabulary-wide head never holds ``N`` of its ``d_g × d_a`` gradients.
Preconditioning: ``Δ = Q_G [(Q_Gᵀ ∇W̄ Q_A) ⊘ (S + λ)] Q_Aᵀ``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from .capture import Capture, require_curvature
from .factors import EigenFactors, full_precision
from .phases import phase
from .sides import right_multiply

PROJECTION_ENTRIES = 2**24  # the most projected per-example gradient entries held at once (64 MB in float32)


class EKFACFactors(NamedTuple):
    """Eigenbases ``Q_A``, ``Q_G`` (as in :class:`~kfac_func.factors.EigenFactors`) and the scaling ``S``
    ``(B, d_g, d_a)``."""

    QA: Tensor | None
    QG: Tensor | None
    scale: Tensor


@phase("statistics")
@full_precision
def ekfac_scaling(cap: Capture, eigen: dict[str, EigenFactors]) -> dict[str, Tensor]:
    """The batch's scaling ``S`` per layer, in the eigenbases of ``eigen`` (``g`` already carries ``R``)."""
    require_curvature(cap)
    out = {}
    for name, a in cap.a.items():
        e = eigen[name]
        aq = _project(a, e.QA, 1)  # (N, B, S, d_a): rows Q_Aᵀ ā
        gq = _project(cap.g[name], e.QG, 2)  # (V, N, B, S, d_g): rows Q_Gᵀ g
        if a.shape[2] == 1:
            sq_g = gq.squeeze(3).square().sum(0)  # (N, B, d_g): Σᵥ (Q_Gᵀ g)²
            out[name] = (sq_g.transpose(0, 1).mT @ aq.squeeze(2).square().transpose(0, 1))
        else:
            n, per_example = a.shape[0], gq.shape[0] * math.prod(gq.shape[2:3]) * gq.shape[-1] * aq.shape[-1]
            chunk = max(1, PROJECTION_ENTRIES // per_example)
            out[name] = sum(  # (V, chunk, B, d_g, d_a): Σₛ (Q_Gᵀg)(Q_Aᵀā)ᵀ, squared and summed over V and examples
                (gq[:, i : i + chunk].transpose(-1, -2) @ aq[i : i + chunk].unsqueeze(0)).square().sum((0, 1))
                for i in range(0, n, chunk))
    return out


def _project(x: Tensor, q: Tensor | None, block_dim: int) -> Tensor:
    """``x @ q`` for rows ``x`` with their block on ``block_dim`` and a basis ``q`` ``(B, d, d)`` (a diagonal or
    ``None``, or block-diagonal, as in :func:`~kfac_func.sides.right_multiply`): as one matmul per block over all
    rows — a broadcast ``x @ q`` would run one small matmul per example."""
    if q is None or q.dim() == 2:
        return right_multiply(x, q)
    rows = x.movedim(block_dim, 0)
    flat = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    return right_multiply(flat, q).reshape(rows.shape).movedim(0, block_dim)


def ekfac_factors(eigen: dict[str, EigenFactors], scale: dict[str, Tensor]) -> dict[str, EKFACFactors]:
    """Pair each layer's eigenbasis with its (averaged) scaling."""
    return {name: EKFACFactors(e.QA, e.QG, scale[name]) for name, e in eigen.items()}
