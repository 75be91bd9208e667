r"""The stateless K-FAC transform: ``precondition(params, grads, factors, ...)``.

For each tracked layer, with ``Γ = ∇W̄`` as ``(B, d_g, d_a)``:

* ``mode="eigen"`` (exact damping of the Kronecker product):
  ``Δ = Q_G [(Q_Gᵀ Γ Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ``;
* ``mode="factored"`` (Tikhonov with π): ``Δ = (G + λ_G I)⁻¹ Γ (A + λ_A I)⁻¹``, which in the eigenbasis
  is the same formula with the denominator ``(d_G + λ_G)(d_A + λ_A)ᵀ``; with :class:`InverseFactors`
  (cached inverses) it costs two matmuls instead of four.

``factors[layer]`` may be raw :class:`KroneckerFactors` (decomposed here, in ``dtype``),
:class:`EigenFactors` or :class:`InverseFactors`. Untracked parameters (those of no layer) are passed
through unchanged: identity preconditioning, the documented fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factors import EigenFactors, InverseFactors, KroneckerFactors, eigendecompose, pi_damping
from .layers import LayerSpec, split_weight_matrix, weight_matrix

MODES = ("eigen", "factored")
Factors = KroneckerFactors | EigenFactors | InverseFactors


def precondition(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    factors: dict[str, Factors],
    *,
    layers: dict[str, LayerSpec],
    damping: float | Tensor | None,
    mode: str = "eigen",
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """The preconditioned gradient, a dict shaped like ``grads``."""
    if mode not in MODES:
        raise ValueError(f"unknown damping mode {mode!r}; expected one of {MODES}")
    if isinstance(damping, (int, float)) and damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    _check_grads(params, grads)
    out = dict(grads)
    for name, spec in layers.items():
        if name not in factors:
            raise ValueError(f"no factors for layer {name!r}; have {sorted(factors)}")
        f = factors[name]
        grad = weight_matrix(spec, grads[spec.weight], grads[spec.bias] if spec.bias else None)
        _check_factor_shapes(name, grad, f)
        if isinstance(f, KroneckerFactors):
            f = eigendecompose({name: f}, dtype)[name]
        if isinstance(f, InverseFactors):
            if mode != "factored" or damping is not None:
                raise ValueError(
                    f"layer {name!r}: inverse factors include their damping and serve mode='factored' only; "
                    "pass damping=None, or pass EigenFactors"
                )
            delta = f.G_inv @ grad @ f.A_inv
        else:
            if damping is None:
                raise ValueError("damping is required unless the factors are InverseFactors")
            delta = _eigen_solve(grad, f, damping, mode)
        out.update(split_weight_matrix(spec, delta, params))
    return out


def _eigen_solve(grad: Tensor, e: EigenFactors, damping: float | Tensor, mode: str) -> Tensor:
    if mode == "eigen":
        denom = e.dG.unsqueeze(-1) * e.dA.unsqueeze(-2) + damping
    else:
        lam_a, lam_g = pi_damping(e.dA, e.dG, damping)
        denom = (e.dG + lam_g).unsqueeze(-1) * (e.dA + lam_a).unsqueeze(-2)
    return e.QG @ ((e.QG.mT @ grad @ e.QA) / denom) @ e.QA.mT


def _check_grads(params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
    if set(grads) != set(params):
        missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
        raise ValueError(f"grads and params must have the same names; missing {missing}, unexpected {extra}")
    for n, g in grads.items():
        p = params[n]
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(
                f"gradient of {n!r} has shape {tuple(g.shape)} and dtype {g.dtype}; "
                f"the parameter has shape {tuple(p.shape)} and dtype {p.dtype}"
            )


def _check_factor_shapes(name: str, grad: Tensor, f: Factors) -> None:
    blocks, d_g, d_a = grad.shape
    got_a, got_g = (f[0].shape, f[2].shape) if isinstance(f, EigenFactors) else (f[0].shape, f[1].shape)
    if got_a != (blocks, d_a, d_a) or got_g != (blocks, d_g, d_g):
        raise ValueError(
            f"layer {name!r}: factors have shapes A {tuple(got_a)}, G {tuple(got_g)}; expected "
            f"A {(blocks, d_a, d_a)} and G {(blocks, d_g, d_g)} for its gradient"
        )
