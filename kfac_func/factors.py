r"""Kronecker factors, their moving averages and decompositions (pure functions on pytrees).

For a layer with homogeneous inputs ``ā`` (``N`` examples, ``S`` positions) and scaled output gradients
``g`` (from :func:`kfac_func.capture`, which already carries ``R`` and the ``1/M`` of MC sampling):

* expand (default; exact for weight sharing when the loss sums over positions):
  ``A = 1/(N S) Σₙ,ₛ ā āᵀ``,  ``G = Σᵥ,ₙ,ₛ g gᵀ``;
* reduce (exact when positions are pooled before the loss):
  ``A = 1/N Σₙ â âᵀ`` with ``â = 1/S Σₛ ā``,  ``G = Σᵥ,ₙ ĝ ĝᵀ`` with ``ĝ = Σₛ g``.

The curvature block of ``vec(W̄)`` (row-major ``W̄ = [W, b]``) is ``G ⊗ A``; factors carry a leading
block dim ``B`` (conv groups). Each side is held as the size policy (:mod:`kfac_func.layout`) says: dense,
block-diagonal, diagonal or a multiple of the identity (:mod:`kfac_func.sides`). An embedding (one-hot
inputs, so ``A`` is the diagonal of token frequencies) keeps ``A`` as a vector ``(B, d_a)``, its
eigenbasis ``Q_A`` as ``None`` (the identity) and its inverse as a vector: never a dense vocabulary ×
vocabulary matrix. Decompositions clamp eigenvalues at 0 and never form an explicit ``inverse``; moving
averages live in :mod:`kfac_func.averaging`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

import torch
from torch import Tensor

from . import precision, sides
from .capture import Capture, require_curvature
from .layers import LayerSpec
from .layout import DEFAULT_MAX_FACTOR_DIM, Overrides, Side, side_layout
from .phases import phase


F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
    """Run ``fn`` with autocast disabled: curvature statistics and solves stay in the factors' dtype (at
    least float32) when the model runs under ``torch.autocast`` with bfloat16/float16 activations."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class KroneckerFactors(NamedTuple):
    """``A``: ``(B, d_a, d_a)``, ``G``: ``(B, d_g, d_g)``, or either held block-diagonal or diagonal
    (:mod:`kfac_func.sides`)."""

    A: Tensor
    G: Tensor


class EigenFactors(NamedTuple):
    """``A = Q_A diag(d_A) Q_Aᵀ``, ``G = Q_G diag(d_G) Q_Gᵀ`` (eigenvalues ``(B, d)`` clamped at 0; a basis is
    block-diagonal for a blocked side and ``None`` for a diagonal one)."""

    QA: Tensor | None
    dA: Tensor
    QG: Tensor | None
    dG: Tensor


class InverseFactors(NamedTuple):
    """π-damped inverse factors ``(A + λ_A I)⁻¹`` (a vector for a diagonal ``A``), ``(G + λ_G I)⁻¹`` (from
    Cholesky factors) and the damping ``λ`` they include."""

    A_inv: Tensor
    G_inv: Tensor
    damping: Tensor


@phase("statistics")
@full_precision
def kronecker_factors(
    cap: Capture,
    *,
    reduce: bool | Mapping[str, bool] = False,
    layers: Mapping[str, LayerSpec] | None = None,
    max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
    factor_sides: Overrides | None = None,
) -> dict[str, KroneckerFactors]:
    """The batch's Kronecker factors per layer: expand, or reduce where ``reduce`` says so (one flag for
    all layers, or per layer name; see :func:`default_reduce`). Each side is held as
    :func:`~kfac_func.layout.side_layout` decides from ``max_factor_dim`` and ``factor_sides``; with ``layers``
    (``trace(...).layers``), layers with a diagonal ``A`` (embeddings) keep it as a vector."""
    require_curvature(cap)
    unknown = sorted(set(reduce) - set(cap.a)) if isinstance(reduce, Mapping) else []
    if unknown:
        raise ValueError(f"reduce names unknown layers {unknown}; the layers are {sorted(cap.a)}")
    dims = {name: (a.shape[1], cap.g[name].shape[-1], a.shape[-1]) for name, a in cap.a.items()}
    layout = side_layout(dims, layers, max_factor_dim, factor_sides)
    out = {}
    for name, a in cap.a.items():
        g = cap.g[name]
        side_a, side_g = layout[name]
        n, positions = a.shape[0], g.shape[3]  # (an embedding's counted a has one position: its g has them all)
        if reduces(reduce, name):
            a, g, count = a.mean(2), g.sum(3), n
        else:
            count = n * positions
        out[name] = KroneckerFactors(_gram(a, 1, side_a) / count, _gram(g, 2, side_g))
    return out


def reduces(reduce: bool | Mapping[str, bool], name: str) -> bool:
    """Whether layer ``name`` takes the reduce convention under ``reduce`` (one flag, or per layer)."""
    return reduce.get(name, False) if isinstance(reduce, Mapping) else reduce


def default_reduce(plan) -> dict[str, bool]:
    """Eschenhagen et al. (2023)'s choice per layer: *expand* when the loss is taken per position (the
    model output keeps positions: more than 2 dims, e.g. ``(N, C, L)`` logits of a sequence loss, or several
    rows per example, e.g. the ``(N·L, C)`` logits of a language model),
    *reduce* when positions are pooled before the loss (``(N, C)`` output)."""
    return {name: plan.output_dims <= 2 and plan.output_layout.rows == 1 for name in plan.layers}


def _gram(x: Tensor, block_dim: int, side: Side) -> Tensor:
    """``Σ x xᵀ`` over every dim but ``block_dim`` and the last, held as ``side``."""
    rows = x.movedim(block_dim, 0).reshape(x.shape[block_dim], -1, x.shape[-1])
    return sides.gram(rows, side.kind, side.block)


@phase("decompositions")
@full_precision
def eigendecompose(
    factors: dict[str, KroneckerFactors], dtype: torch.dtype | None = torch.float64, damping: float | Tensor | None = None
) -> dict[str, EigenFactors]:
    """Eigendecompositions computed in ``dtype`` and returned in each factor's dtype. ``dtype=None``
    (:mod:`kfac_func.precision`): float32 for the wide factors of a layer whose bound
    ``ε₃₂ max d_A max d_G / damping`` is within :data:`~kfac_func.precision.FLOAT32_TOLERANCE` (decomposed in
    float32 first, redone in float64 if not), float64 elsewhere."""
    auto = dtype is None and damping is not None and precision.auto_applies(factors)

    def decompose(f: KroneckerFactors, wide: torch.dtype) -> EigenFactors:
        pick = lambda m: precision.working_dtype(m, wide) if auto else (dtype or torch.float64)  # noqa: E731
        return EigenFactors(*sides.eigh(f.A, pick(f.A)), *sides.eigh(f.G, pick(f.G)))

    out = {name: decompose(f, torch.float32) for name, f in factors.items()}
    if auto:
        bounds = [e.dA.amax().double() * e.dG.amax().double() / damping for e in out.values()]
        for name, redo in zip(list(out), precision.exceeds(bounds)):
            if redo:
                out[name] = decompose(factors[name], torch.float64)
    return out


def factor_dims(f: NamedTuple) -> tuple[int, int, int]:
    """``(B, d_g, d_a)`` of any factor type (the E-KFAC scaling has exactly that shape)."""
    if isinstance(f, KroneckerFactors):
        return f.A.shape[0], sides.dim(f.G), sides.dim(f.A)
    if isinstance(f, EigenFactors):
        return f.dA.shape[0], f.dG.shape[-1], f.dA.shape[-1]
    if isinstance(f, InverseFactors):
        return f.A_inv.shape[0], sides.dim(f.G_inv), sides.dim(f.A_inv)
    return tuple(f.scale.shape)


def factor_dtype(f: NamedTuple) -> torch.dtype:
    """The dtype a layer's factors (of any factor type) are held and applied in."""
    return next(t for t in f if isinstance(t, Tensor)).dtype


def traced(t: Any) -> bool:
    """Whether ``t``'s value cannot be read on the host: under ``torch.compile``, or a tensor batched by ``vmap``."""
    return torch.compiler.is_compiling() or (isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t))


def check_damping(damping: float | Tensor, *, positive: bool) -> None:
    """A ``ValueError`` naming ``damping`` unless it is finite and ``> 0`` (``positive``) or ``>= 0``. A number is
    always checked; a tensor in eager mode (one host read), not under ``torch.compile`` or ``vmap``, where its
    value cannot be read."""
    if isinstance(damping, Tensor) and traced(damping):
        return
    d = torch.as_tensor(damping, dtype=torch.float64)
    if not bool((torch.isfinite(d) & ((d > 0) if positive else (d >= 0))).all()):
        value = d.item() if d.numel() == 1 else d.tolist()
        raise ValueError(f"damping must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def pi_damping(dA: Tensor, dG: Tensor, damping: float | Tensor) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping ``λ_A = π√λ``, ``λ_G = √λ/π`` with
    ``π² = (tr A / dim A) / (tr G / dim G)`` per block (``π = 1`` when a trace vanishes).

    ``dA``, ``dG``: eigenvalues or diagonals ``(B, d)`` (only their sums matter); returns ``(B, 1)`` in float64."""
    # in float64: a float32 ratio of a large A and a vanishing G overflows to an infinite π
    mean_a = dA.double().sum(-1, keepdim=True) / dA.shape[-1]
    mean_g = dG.double().sum(-1, keepdim=True) / dG.shape[-1]
    valid = (mean_a > 0) & (mean_g > 0)
    pi = torch.where(valid, (mean_a / torch.where(valid, mean_g, 1.0)).sqrt(), 1.0)
    root = torch.as_tensor(damping, dtype=torch.float64, device=dA.device).sqrt()
    return pi * root, root / pi


@phase("decompositions")
@full_precision
def inverse_factors(
    factors: dict[str, KroneckerFactors],
    damping: float | Tensor,
    dtype: torch.dtype | None = torch.float64,
    *,
    checked: bool = False,
) -> dict[str, InverseFactors]:
    """π-damped inverses ``(A + λ_A I)⁻¹``, ``(G + λ_G I)⁻¹`` from Cholesky factors (computed in ``dtype``),
    so that preconditioning costs two matmuls per layer. Needs a finite ``damping > 0`` (positive definite),
    checked by :func:`check_damping` unless ``checked`` (the caller validated it: no host read).
    ``dtype=None`` (:mod:`kfac_func.precision`): a wide float32 factor in float32 where ``ε₃₂ tr M / λ_M``
    (``tr M ≥ ‖M‖``) is within :data:`~kfac_func.precision.FLOAT32_TOLERANCE`, float64 elsewhere.

    A factor is positive semi-definite only up to the rounding of its own dtype (a float32 ``A`` of inputs of
    scale 10⁴ can have eigenvalues of −10): the shift is at least ``d·ε·max diag`` (``ε`` of the factor's dtype,
    at most ``ε‖M‖``-relative), so that the Cholesky factorisation exists for any damping, however small."""
    if not checked:
        check_damping(damping, positive=True)

    def chol_inv(m: Tensor, lam: Tensor, dtype: torch.dtype) -> Tensor:
        if m.dim() == 2:  # a diagonal factor: its inverse is a vector
            return sides.damped_inverse(m, lam, dtype)
        floor = sides.dim(m) * torch.finfo(m.dtype).eps * sides.diagonal(m).amax(-1, keepdim=True)
        return sides.damped_inverse(m, torch.maximum(lam, floor), dtype)

    parts = {}  # name → ((A, λ_A, tr A), (G, λ_G, tr G))
    for name, f in factors.items():
        diag_a, diag_g = sides.diagonal(f.A), sides.diagonal(f.G)
        lam_a, lam_g = pi_damping(diag_a, diag_g, damping)
        parts[name] = ((f.A, lam_a, diag_a.sum(-1, keepdim=True)), (f.G, lam_g, diag_g.sum(-1, keepdim=True)))
    dtypes = [dtype or torch.float64] * (2 * len(parts))
    if dtype is None and precision.auto_applies(factors):
        bounds = [(trace / lam).amax().double() for pair in parts.values() for _, lam, trace in pair]
        dtypes = [precision.working_dtype(m, torch.float64 if redo else torch.float32)
                  for (m, _, _), redo in zip((p for pair in parts.values() for p in pair), precision.exceeds(bounds))]
    out, kinds = {}, iter(dtypes)
    for name, ((A, lam_a, _), (G, lam_g, _)) in parts.items():
        damping_t = torch.as_tensor(damping, dtype=A.dtype, device=A.device)
        out[name] = InverseFactors(chol_inv(A, lam_a, next(kinds)), chol_inv(G, lam_g, next(kinds)), damping_t)
    return out
