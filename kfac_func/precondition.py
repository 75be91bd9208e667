r"""The stateless transform: ``precondition(params, grads, factors, ...)`` for K-FAC, E-KFAC and
two-level K-FAC.

For each tracked layer, with ``Γ = ∇W̄`` as ``(B, d_g, d_a)``:

* ``mode="eigen"`` (exact damping of the Kronecker product):
  ``Δ = Q_G [(Q_Gᵀ Γ Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ``;
* ``mode="factored"`` (Tikhonov with π): ``Δ = (G + λ_G I)⁻¹ Γ (A + λ_A I)⁻¹``, which in the eigenbasis
  is the same formula with the denominator ``(d_G + λ_G)(d_A + λ_A)ᵀ``; with :class:`InverseFactors`
  (cached inverses) it costs two matmuls instead of four;
* E-KFAC (:class:`~kfac_func.ekfac.EKFACFactors`): the eigen formula with ``S + λ`` as denominator.

With ``low_rank`` parts ``Γ = gᵀā`` (``N`` rows, :attr:`~kfac_func.Capture.low_rank`), a layer's first
product is taken through them where that costs fewer flops — ``G⁻¹Γ A⁻¹ = (G⁻¹gᵀ)(ā A⁻¹)`` and
``Q_Gᵀ Γ Q_A = (g Q_G)ᵀ(ā Q_A)``: ``2N(d_g² + d_a² + d_g d_a)`` instead of ``2 d_g d_a (d_g + d_a)``.

``factors[layer]`` may be raw :class:`KroneckerFactors` (decomposed here, in ``dtype``),
:class:`EigenFactors`, :class:`InverseFactors` or :class:`EKFACFactors`; ``method`` (``"kfac"``,
``"ekfac"``, ``"two_level"``) is inferred from them and from ``coarse`` when not given. With a
``coarse`` correction the layerwise solve above is ``P⁻¹`` of :mod:`kfac_func.two_level`, combined by
``combination``; ``adef2`` and ``bnn`` also need ``capture`` (the batch whose curvature ``C`` enters
``C̃ = C + λI``). Untracked parameters (those of no layer) are passed through unchanged: identity
preconditioning, the documented fallback. ``params`` and ``grads`` are pytrees (:mod:`kfac_func.tree`)
with the same leaf names; the result has ``grads``' structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .capture import Capture
from .ekfac import EKFACFactors
from .factors import (
    EigenFactors,
    InverseFactors,
    KroneckerFactors,
    check_damping,
    eigendecompose,
    factor_dims,
    factor_dtype,
    full_precision,
    pi_damping,
)
from .layers import LayerSpec, split_weight_matrix, weight_matrix
from .phases import phase
from .sides import block_width, left_multiply, right_multiply
from .tree import PyTree, flatten, require_names
from .two_level import CoarseCorrection, Layerwise, coarse_solve, combine, curvature_product

MODES = ("eigen", "factored")
METHODS = ("kfac", "ekfac", "two_level")
Factors = KroneckerFactors | EigenFactors | InverseFactors | EKFACFactors


@phase("preconditioning")
@full_precision
def precondition(
    params: PyTree,
    grads: PyTree,
    factors: dict[str, Factors],
    *,
    layers: dict[str, LayerSpec],
    damping: float | Tensor | None,
    mode: str = "eigen",
    dtype: torch.dtype = torch.float64,
    method: str | None = None,
    coarse: CoarseCorrection | None = None,
    combination: str = "additive",
    capture: Capture | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    all_reduce: Callable[[Any], Any] | None = None,
    checked: bool = False,
    low_rank: dict[str, tuple[Tensor, Tensor]] | None = None,
    uses: dict[str, Tensor] | None = None,
) -> PyTree:
    """The preconditioned gradient, a pytree shaped like ``grads``. ``all_reduce`` sums a pytree over
    data-parallel ranks (:meth:`kfac_func.distributed.Communicator.sum`): the curvature products of
    ``adef2``/``bnn`` then cover the global batch. ``damping`` must be finite and ``>= 0``
    (:func:`~kfac_func.factors.check_damping`; a tensor is read on the host in eager mode, not under
    ``torch.compile`` or ``vmap``) unless ``checked`` (the caller validated it: the pure optimizer).
    ``low_rank``: per layer ``(g, ā)`` with that layer's gradient matrix equal to ``gᵀā`` (the caller's
    promise; :attr:`kfac_func.Capture.low_rank`). ``uses``: for the layers of a tied weight, each use's share of
    its gradient (:attr:`kfac_func.Capture.uses`): each share is preconditioned by its own layer's factors and
    the results add up — K-FAC of the model with the weight untied, each copy's update summed back onto the
    one weight (as gradient descent on the untied copies sums to gradient descent on the tied weight)."""
    if mode not in MODES:
        raise ValueError(f"unknown damping mode {mode!r}; expected one of {MODES}")
    if damping is not None and not checked:
        check_damping(damping, positive=False)
    _check_method(method, factors, coarse)
    grads, spec = flatten(grads)
    _check_grads(flatten(params)[0], grads)
    missing = sorted(set(layers) - set(factors))
    if missing:
        raise ValueError(f"no factors for layers {missing}; have {sorted(factors)}")
    # solved in the factors' dtype (at least float32; a float16/bfloat16 model's gradient is upcast) and
    # returned in the gradient's
    uses = uses or {}
    grad = {
        name: (uses[name] if name in uses else weight_matrix(spec, grads[spec.weight], grads[spec.bias] if spec.bias
                                                             else None)).to(factor_dtype(factors[name]))
        for name, spec in layers.items()
    }
    for name, g in grad.items():
        _check_factor_shapes(name, g, factors[name])

    cheaper = {name: parts for name, parts in (low_rank or {}).items()
               if name in grad and _low_rank_pays(grad[name], parts, factors[name])}

    def fine(v: Layerwise) -> Layerwise:  # the factored parts describe the gradient only
        parts = cheaper if v is grad else {}
        return {name: _solve(name, v[name], factors[name], damping, mode, dtype, parts.get(name)) for name in v}

    if coarse is None:
        delta = fine(grad)
    else:
        lam = damping if damping is not None else next(iter(factors.values())).damping
        curvature = None
        if capture is not None:
            total = all_reduce or (lambda tree: tree)  # noqa: E731
            curvature = lambda v: {k: cv + lam * v[k] for k, cv in total(curvature_product(capture, v)).items()}  # noqa: E731
        delta = combine(grad, fine, coarse_solve(coarse, lam), combination, curvature, weights)
    out, summed = dict(grads), {}
    for name, layer in layers.items():
        # contiguous, as the gradients are: a strided view (an embedding's transpose, a weight beside its bias
        # column) would be copied again by each later pass over it (dots, the update, a jvp's tangent)
        parts = {k: v.contiguous() for k, v in
                 split_weight_matrix(layer, delta[name].to(grads[layer.weight].dtype), out).items()}
        if name in uses:  # a tied weight's uses add up
            summed[layer.weight] = summed[layer.weight] + parts.pop(layer.weight) if layer.weight in summed \
                else parts.pop(layer.weight)
        out.update(parts)
    out.update(summed)
    return spec.unflatten(out)


def _low_rank_pays(grad: Tensor, parts: tuple[Tensor, Tensor], f: Factors) -> bool:
    """Whether ``(g, ā)`` (``N`` rows) of a one-block gradient ``(1, d_g, d_a)`` make its first products cheaper
    (a side's cost per row is its :func:`~kfac_func.sides.block_width`: ``d`` dense, ``s`` blocked)."""
    blocks, d_g, d_a = grad.shape
    n = parts[0].shape[0]
    # a side's decomposition is as wide per row as the side itself (raw factors are decomposed first)
    if isinstance(f, KroneckerFactors):
        left, right = f.G, f.A
    else:
        left, right = (f.G_inv, f.A_inv) if isinstance(f, InverseFactors) else (f.QG, f.QA)
    w_g, w_a = block_width(left), block_width(right)
    return blocks == 1 and n * (d_g * w_g + d_a * w_a + d_g * d_a) < d_g * d_a * (w_g + w_a)


def _sandwich(grad: Tensor, left: Tensor | None, right: Tensor | None, parts: tuple[Tensor, Tensor] | None) -> Tensor:
    """``leftᵀ Γ right`` (each side any kind of :mod:`kfac_func.sides`), through ``Γ = gᵀā`` when ``parts`` are given."""
    if parts is None:
        return left_multiply(left, right_multiply(grad, right), transpose=True)
    g, a = (p.unsqueeze(0) for p in parts)
    return right_multiply(g.to(grad.dtype), left).mT @ right_multiply(a.to(grad.dtype), right)


def _solve(name: str, grad: Tensor, f: Factors, damping: float | Tensor | None, mode: str, dtype: torch.dtype,
           parts: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One layer's damped solve (``parts``: ``Γ = gᵀā``, see :func:`precondition`)."""
    if isinstance(f, KroneckerFactors):
        f = eigendecompose({name: f}, dtype)[name]
    if isinstance(f, InverseFactors):
        if mode != "factored" or damping is not None:
            raise ValueError(
                f"layer {name!r}: inverse factors include their damping and serve mode='factored' only; "
                "pass damping=None, or pass EigenFactors"
            )
        return _sandwich(grad, f.G_inv, f.A_inv, parts)  # G_inv is symmetric: G_invᵀ Γ A_inv
    if damping is None:
        raise ValueError("damping is required unless the factors are InverseFactors")
    if isinstance(f, EKFACFactors):
        if mode != "eigen":
            raise ValueError(f"layer {name!r}: E-KFAC adds the damping to its scaling; use mode='eigen'")
        return right_multiply(left_multiply(f.QG, _sandwich(grad, f.QG, f.QA, parts) / (f.scale + damping)), f.QA,
                              transpose=True)
    return _eigen_solve(grad, f, damping, mode, parts)


def _check_method(method: str | None, factors: dict[str, Factors], coarse: CoarseCorrection | None) -> None:
    if method is None:
        return
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    is_ekfac = [isinstance(f, EKFACFactors) for f in factors.values()]
    if method == "ekfac" and not all(is_ekfac):
        raise ValueError("method='ekfac' needs EKFACFactors for every layer (see kfac_func.ekfac_factors)")
    if method == "kfac" and any(is_ekfac):
        raise ValueError("method='kfac' got EKFACFactors; pass method='ekfac'")
    if (method == "two_level") != (coarse is not None):
        raise ValueError("method='two_level' and a coarse correction go together (pass coarse=CoarseCorrection)")


def _eigen_solve(grad: Tensor, e: EigenFactors, damping: float | Tensor, mode: str,
                 parts: tuple[Tensor, Tensor] | None = None) -> Tensor:
    if mode == "eigen":
        denom = e.dG.unsqueeze(-1) * e.dA.unsqueeze(-2) + damping
    else:
        lam_a, lam_g = (lam.to(e.dA.dtype) for lam in pi_damping(e.dA, e.dG, damping))
        denom = (e.dG + lam_g).unsqueeze(-1) * (e.dA + lam_a).unsqueeze(-2)
    return right_multiply(left_multiply(e.QG, _sandwich(grad, e.QG, e.QA, parts) / denom), e.QA, transpose=True)


def _check_grads(params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
    require_names(grads, params, "grads")
    for n, g in grads.items():
        p = params[n]
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(
                f"gradient of {n!r} has shape {tuple(g.shape)} and dtype {g.dtype}; "
                f"the parameter has shape {tuple(p.shape)} and dtype {p.dtype}"
            )


def _check_factor_shapes(name: str, grad: Tensor, f: Factors) -> None:
    if factor_dims(f) == tuple(grad.shape):
        return
    if isinstance(f, EKFACFactors):
        raise ValueError(f"layer {name!r}: E-KFAC scaling has shape {tuple(f.scale.shape)}, expected {tuple(grad.shape)}")
    blocks, d_g, d_a = grad.shape
    got_b, got_g, got_a = factor_dims(f)
    raise ValueError(
        f"layer {name!r}: factors have shapes (blocks, A, G) = {(got_b, got_a, got_g)}; expected "
        f"{(blocks, d_a, d_g)} for its gradient of shape {tuple(grad.shape)}"
    )
