r"""Two-level K-FAC (Tselepidis, Kohler & Orvieto 2020): a coarse-space correction that restores some
of the inter-layer curvature the block-diagonal K-FAC preconditioner ``P`` drops.

**Coarse space** ``R₀`` (``K × P``): ``k`` rows per tracked layer, each supported on that layer's ``W̄``
and of Kronecker (per-block rank-one) form ``Σ_b e_b ⊗ u_G,b ⊗ u_A,b``, held as ``UG (k, B, d_g)`` and
``UA (k, B, d_a)``:

* ``nicolaides`` — the normalised all-ones vector of each layer (the original method), ``k = 1``;
* ``spectral`` — the layer's ``k`` dominant Kronecker eigenvectors ``q_G ⊗ q_A`` (largest ``d_G d_A``).

**Coarse matrix** ``R₀ C R₀ᵀ``, rebuilt from each batch (then averaged like the factors, never
accumulated in place):

* ``exact`` — ``Σₙ,ᵥ zₙ,ᵥ zₙ,ᵥᵀ`` from the per-example scalars ``z = ⟨r, ∇ℓₙ,ᵥ⟩ = Σ_{b,s} (u_Gᵀ g)(u_Aᵀ ā)``:
  ``O(N·K²)`` after one pass over ``(a, g)``, convolutions included, no interpolation;
* ``kronecker`` — the original surrogate ``(u_Aᵢᵀ A_ij u_Aⱼ)(u_Gᵢᵀ G_ij u_Gⱼ)`` with cross-layer covariances
  ``A_ij = 1/N Σₙ âᵢ âⱼᵀ`` and ``G_ij = Σₙ,ᵥ ĝᵢ ĝⱼᵀ``. Layers of different spatial size are aligned per
  example with the reduce convention: ``â`` is the mean of ``ā`` over positions, ``ĝ`` the sum of ``g``
  (and blocks are summed), so the surrogate uses only per-example quantities.

The damped coarse matrix is ``C₀ = R₀ (C + λI) R₀ᵀ = R₀CR₀ᵀ + λ R₀R₀ᵀ`` and ``Q = R₀ᵀ C₀⁻¹ R₀``.
Combinations with ``C̃ = C + λI`` (``C`` the curvature of the current batch, applied from the captured
``(a, g)`` without materialising it):

* ``additive`` (the paper): ``Δ = ω₁ P⁻¹∇ + ω₂ Q∇``;
* ``adef2``: ``Δ = ((I − QC̃)P⁻¹ + Q)∇``;
* ``bnn`` (balanced): ``Δ = ((I − QC̃)P⁻¹(I − C̃Q) + Q)∇``.

If ``R₀`` spanned every parameter, ``adef2`` and ``bnn`` would return ``C̃⁻¹∇`` exactly; ``additive``
would not.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .capture import Capture, require_curvature
from .factors import EigenFactors, KroneckerFactors, factor_dims, factor_dtype, full_precision
from .phases import phase
from .sides import column

SPACES = ("nicolaides", "spectral")
COARSE_MODES = ("exact", "kronecker")
COMBINATIONS = ("additive", "adef2", "bnn")

Layerwise = dict[str, Tensor]  # layer → (B, d_g, d_a)


class CoarseSpace(NamedTuple):
    """Per layer, ``UG (k, B, d_g)`` and ``UA (k, B, d_a)``; rows are ordered layer by layer."""

    UG: dict[str, Tensor]
    UA: dict[str, Tensor]


class CoarseCorrection(NamedTuple):
    """A coarse space and its (undamped) coarse matrix ``R₀ C R₀ᵀ`` (``K × K``)."""

    space: CoarseSpace
    matrix: Tensor


def nicolaides_space(factors: dict[str, KroneckerFactors | EigenFactors]) -> CoarseSpace:
    """One normalised all-ones vector per layer (shapes read from the factors)."""
    ug, ua = {}, {}
    for name, f in factors.items():
        blocks, d_g, d_a = factor_dims(f)
        like = f.A if isinstance(f, KroneckerFactors) else f.dA
        ug[name] = like.new_full((1, blocks, d_g), (blocks * d_g) ** -0.5)
        ua[name] = like.new_full((1, blocks, d_a), d_a**-0.5)
    return CoarseSpace(ug, ua)


def spectral_space(eigen: dict[str, EigenFactors], vectors: int = 1) -> CoarseSpace:
    """The ``vectors`` dominant Kronecker eigenvectors ``q_G ⊗ q_A`` of each layer (largest ``d_G d_A``)."""
    ug, ua = {}, {}
    for name, e in eigen.items():
        blocks, d_a, d_g = e.dA.shape[0], e.dA.shape[-1], e.dG.shape[-1]
        if not 1 <= vectors <= blocks * d_g * d_a:
            raise ValueError(f"layer {name!r}: vectors must be in [1, {blocks * d_g * d_a}], got {vectors}")
        products = (e.dG.unsqueeze(-1) * e.dA.unsqueeze(-2)).reshape(-1)  # (B·d_g·d_a,)
        top = torch.topk(products, vectors).indices
        b, i, j = top // (d_g * d_a), (top // d_a) % d_g, top % d_a
        dtype = factor_dtype(e)
        onehot = torch.nn.functional.one_hot(b, blocks).to(dtype).unsqueeze(-1)  # (k, B, 1)
        ug[name] = onehot * column(e.QG, b, i, d_g, dtype).unsqueeze(1)
        ua[name] = onehot * column(e.QA, b, j, d_a, dtype).unsqueeze(1)
    return CoarseSpace(ug, ua)


def coarse_gram(space: CoarseSpace) -> Tensor:
    """``R₀ R₀ᵀ`` (the identity for the built-in spaces; computed, not assumed)."""
    blocks = [
        torch.einsum("jbo,kbo,jbi,kbi->jk", ug, ug, space.UA[name], space.UA[name]) for name, ug in space.UG.items()
    ]
    return torch.block_diag(*blocks)


@phase("statistics")
@full_precision
def coarse_matrix(cap: Capture, space: CoarseSpace, mode: str = "exact") -> Tensor:
    """The batch's undamped coarse matrix ``R₀ C R₀ᵀ`` (``exact``) or its Kronecker surrogate."""
    if mode not in COARSE_MODES:
        raise ValueError(f"unknown coarse mode {mode!r}; expected one of {COARSE_MODES}")
    require_curvature(cap)
    if mode == "exact":
        z = torch.cat([_per_example(cap, space, name) for name in space.UG], dim=-1)  # (V, N, K)
        z = z.reshape(-1, z.shape[-1])
        return z.T @ z
    inputs, grads = kronecker_coarse_parts(cap, space)
    return inputs * grads


@phase("statistics")
@full_precision
def kronecker_coarse_parts(cap: Capture, space: CoarseSpace) -> tuple[Tensor, Tensor]:
    """The two factors of the Kronecker surrogate, ``[u_Aᵢᵀ A_ij u_Aⱼ]`` (a mean over examples) and
    ``[u_Gᵢᵀ G_ij u_Gⱼ]`` (a sum, carrying ``R``); the surrogate is their elementwise product."""
    require_curvature(cap)
    alpha = torch.cat(
        [torch.einsum("nbi,jbi->nj", cap.a[name].mean(2), space.UA[name]) for name in space.UG], dim=-1
    )  # (N, K)
    gamma = torch.cat(
        [torch.einsum("vnbo,jbo->vnj", cap.g[name].sum(3), space.UG[name]) for name in space.UG], dim=-1
    ).reshape(-1, alpha.shape[-1])  # (V·N, K)
    return alpha.T @ alpha / alpha.shape[0], gamma.T @ gamma


def _per_example(cap: Capture, space: CoarseSpace, name: str) -> Tensor:
    """``z_{v,n,j} = Σ_{b,s} (u_G,jᵀ g)(u_A,jᵀ ā)`` for the layer's coarse vectors: ``(V, N, k)``."""
    ga = torch.einsum("vnbso,jbo->vnbsj", cap.g[name], space.UG[name])
    aa = torch.einsum("nbsi,jbi->nbsj", cap.a[name], space.UA[name])
    return (ga * aa).sum((2, 3))


def restrict(space: CoarseSpace, v: Layerwise) -> Tensor:
    """``R₀ v`` for a layerwise ``v``: ``(K,)``."""
    return torch.cat(
        [torch.einsum("jbo,boi,jbi->j", ug, v[name], space.UA[name]) for name, ug in space.UG.items()]
    )


def prolong(space: CoarseSpace, y: Tensor) -> Layerwise:
    """``R₀ᵀ y`` for ``y`` of shape ``(K,)``: layerwise."""
    out, start = {}, 0
    for name, ug in space.UG.items():
        k = ug.shape[0]
        out[name] = torch.einsum("j,jbo,jbi->boi", y[start : start + k], ug, space.UA[name])
        start += k
    return out


@full_precision
def curvature_product(cap: Capture, v: Layerwise) -> Layerwise:
    """``C v = Σₙ,ᵥ (∇ℓₙ,ᵥ·v) ∇ℓₙ,ᵥ`` for the captured curvature (MC, exact or empirical), restricted to
    the tracked layers, from ``(a, g)`` alone: a few matmuls per layer, ``C`` never formed."""
    require_curvature(cap)
    dots = sum(
        ((cap.g[name] @ v[name]) * cap.a[name].unsqueeze(0)).sum((2, 3, 4)) for name in v
    )  # (V, N): ∇ℓₙ,ᵥ · v
    return {name: torch.einsum("vn,vnbso,nbsi->boi", dots, cap.g[name], cap.a[name]) for name in v}


def coarse_solve(correction: CoarseCorrection, damping: float | Tensor) -> Callable[[Layerwise], Layerwise]:
    """``v ↦ Q v = R₀ᵀ C₀⁻¹ R₀ v`` with ``C₀ = R₀CR₀ᵀ + λR₀R₀ᵀ`` (Cholesky, in float64)."""
    c0 = correction.matrix + damping * coarse_gram(correction.space)
    chol = torch.linalg.cholesky(c0.double())

    def apply(v: Layerwise) -> Layerwise:
        r = restrict(correction.space, v).double().unsqueeze(-1)
        return prolong(correction.space, torch.cholesky_solve(r, chol).squeeze(-1).to(correction.matrix.dtype))

    return apply


def combine(
    grad: Layerwise,
    fine: Callable[[Layerwise], Layerwise],
    coarse: Callable[[Layerwise], Layerwise],
    combination: str,
    curvature: Callable[[Layerwise], Layerwise] | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
) -> Layerwise:
    """Apply a two-level combination; ``fine`` is ``P⁻¹``, ``coarse`` is ``Q`` and ``curvature`` is
    ``C̃ = C + λI`` (needed by ``adef2`` and ``bnn``)."""
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; expected one of {COMBINATIONS}")
    add = lambda x, y, s=1.0: {k: x[k] + s * y[k] for k in x}  # noqa: E731
    if combination == "additive":
        p, q = fine(grad), coarse(grad)
        return {k: weights[0] * p[k] + weights[1] * q[k] for k in p}
    if curvature is None:
        raise ValueError(f"combination {combination!r} needs curvature-vector products (pass the capture)")
    if combination == "adef2":
        u = fine(grad)
        return add(add(u, coarse(grad)), coarse(curvature(u)), -1.0)  # u + Q∇ − QC̃u
    y = coarse(grad)
    u = fine(add(grad, curvature(y), -1.0))  # P⁻¹(∇ − C̃Q∇)
    return add(add(u, coarse(curvature(u)), -1.0), y)  # u − QC̃u + Q∇
