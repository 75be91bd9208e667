r"""The local quadratic model and what K-FAC derives from it (Martens & Grosse 2015, §6–7).

``M(δ) = ½ δᵀ(C + (λ + η)I)δ + ∇ᵀδ`` with ``C`` the curvature of the current batch, ``λ`` the damping
and ``η`` the L2 coefficient. All pure functions:

* :func:`ggn_vector_product` — ``C v`` for the exact type-2 GGN ``Jᵀ H J`` through ``jvp`` of the model
  and the loss Hessian ``H`` in output space (never formed), with a ``vjp`` back;
* :func:`ggn_quadratic_forms` — ``δᵢᵀ C δⱼ = (J δᵢ)ᵀ H (J δⱼ)`` for a few directions: forward mode only;
* :func:`fisher_quadratic_forms` — the same for the captured MC/empirical Fisher, ``Σₙ,ᵥ (∇ℓ·δᵢ)(∇ℓ·δⱼ)``;
* :func:`solve_quadratic_model` — the coefficients ``x`` of ``δ = Σ xᵢ dᵢ`` minimising ``M`` (for K-FAC
  ``d = (Δ, δ_prev)``, the learning rate ``α`` and momentum ``μ``), some coefficients optionally fixed;
* :func:`reduction_ratio` and :func:`levenberg_marquardt` — ``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))`` and
  the damping rule: ``ρ < ¼`` (or NaN) → ``λ ← λ/ω``, ``ρ > ¾`` → ``λ ← ωλ``, clipped to ``[min, max]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .capture import Capture, Model, as_function
from .factors import full_precision
from .layers import LayerSpec, weight_matrix
from .losses import Loss, as_loss

Tree = dict[str, Tensor]


def output_hessian_product(loss: Loss, out: Tensor, target: Tensor, u: Tensor) -> Tensor:
    """``∇²_out L · u`` for the reduced loss (``R`` included), per position, without forming the Hessian."""
    scale = loss.scale(out, target)
    if loss.kind == "mse":
        return scale * 2 * u
    if loss.kind == "bce_with_logits":
        p = torch.sigmoid(out)
        return scale * p * (1 - p) * u
    p = out.softmax(1)
    weight = loss.class_weight(target, p.dtype).unsqueeze(1)
    return scale * weight * p * (u - (p * u).sum(1, keepdim=True))


def ggn_vector_product(
    model: Model, params: Tree, inputs: Any, targets: Tensor, loss: Loss | str, v: Tree
) -> Tree:
    """``C v`` for the exact GGN (= type-2 Fisher) of the batch loss, every parameter included."""
    loss = as_loss(loss)
    f = as_function(model)
    out, jv = jvp(lambda p: f(p, inputs), (params,), (v,))
    _, pullback = vjp(lambda p: f(p, inputs), params)
    return pullback(output_hessian_product(loss, out.detach(), targets, jv))[0]


def ggn_quadratic_forms(
    model: Model, params: Tree, inputs: Any, targets: Tensor, loss: Loss | str, directions: list[Tree]
) -> Tensor:
    """``[dᵢᵀ C dⱼ]`` for the exact GGN: one ``jvp`` per direction, no backward."""
    loss = as_loss(loss)
    f = as_function(model)
    outs = [jvp(lambda p: f(p, inputs), (params,), (d,)) for d in directions]
    out = outs[0][0].detach()
    jds = [jd for _, jd in outs]
    return torch.stack([
        torch.stack([(ji * output_hessian_product(loss, out, targets, jj)).sum() for jj in jds]) for ji in jds
    ])


@full_precision
def fisher_quadratic_forms(cap: Capture, directions: list[Tree], layers: dict[str, LayerSpec]) -> Tensor:
    """``[dᵢᵀ C dⱼ]`` for the captured curvature (MC, exact or empirical) from ``(a, g)``; ``directions``
    are parameter pytrees, of which only the tracked layers' parts enter (``C`` covers those)."""
    dots = []
    for d in directions:
        per = 0
        for name, spec in layers.items():
            w = weight_matrix(spec, d[spec.weight], d[spec.bias] if spec.bias else None)
            per = per + ((cap.g[name] @ w) * cap.a[name].unsqueeze(0)).sum((2, 3, 4))
        dots.append(per.reshape(-1))  # (V·N,): ∇ℓₙ,ᵥ · d
    z = torch.stack(dots)
    return z @ z.T


@full_precision
def solve_quadratic_model(
    curvature: Tensor, gram: Tensor, grad_dots: Tensor, damping: float, fixed: dict[int, float] | None = None
) -> tuple[Tensor, Tensor]:
    """Minimise ``M(x) = ½ xᵀ(K + (λ)G)x + bᵀx`` over the free coefficients.

    ``curvature`` ``K = [dᵢᵀ C dⱼ]``, ``gram`` ``G = [dᵢᵀ dⱼ]``, ``grad_dots`` ``b = [∇ᵀdᵢ]`` (include the
    L2 term in ``C``/``∇`` and ``λ + η`` in ``damping`` as wanted); ``fixed`` maps indices to values
    held fixed (e.g. a fixed momentum). Returns ``x`` and the model change ``M(x) − M(0)``. A direction
    that is zero (the first step's previous update) gets coefficient 0.
    """
    fixed = dict(fixed or {})
    m = curvature + damping * gram
    for i in range(len(grad_dots)):
        if float(gram[i, i]) == 0.0 and i not in fixed:
            fixed[i] = 0.0
    free = [i for i in range(len(grad_dots)) if i not in fixed]
    held = list(fixed)
    x = torch.zeros(len(grad_dots), dtype=m.dtype, device=m.device)
    x[held] = torch.tensor([fixed[i] for i in held], dtype=m.dtype, device=m.device)
    if free:
        rhs = -grad_dots[free] - m[free][:, held] @ x[held]
        # a pseudo-inverse: parallel directions (e.g. Δ ∥ δ_prev) leave the minimiser non-unique, not absent
        x[free] = torch.linalg.pinv(m[free][:, free], hermitian=True) @ rhs
    return x, 0.5 * x @ m @ x + grad_dots @ x


def reduction_ratio(loss_before: Tensor | float, loss_after: Tensor | float, model_change: Tensor | float) -> float:
    """``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))``; NaN when the model predicts no decrease or a loss is NaN."""
    change = float(model_change)
    if not change < 0:
        return float("nan")
    return (float(loss_after) - float(loss_before)) / change


def levenberg_marquardt(
    damping: float,
    rho: float,
    *,
    factor: float = 0.95**5,
    lower: float = 0.25,
    upper: float = 0.75,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
) -> float:
    """The Levenberg–Marquardt rule of Martens & Grosse (§6.5): ``ρ < lower`` or NaN → ``λ/factor``,
    ``ρ > upper`` → ``λ·factor``; ``factor = (19/20)^T₁`` with ``T₁ = 5`` by default; clipped."""
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    if rho != rho or rho < lower:
        damping = damping / factor
    elif rho > upper:
        damping = damping * factor
    return min(max(damping, min_damping), max_damping)
