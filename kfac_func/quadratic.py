r"""The local quadratic model and what K-FAC derives from it (Martens & Grosse 2015, §6–7).

``M(δ) = ½ δᵀ(C + (λ + η)I)δ + ∇ᵀδ`` with ``C`` the curvature of the current batch, ``λ`` the damping
and ``η`` the L2 coefficient. All pure functions:

* :func:`ggn_vector_product` — ``C v`` for the exact type-2 GGN ``Jᵀ H J`` through ``jvp`` of the model
  and the loss Hessian ``H`` in output space (never formed), with a ``vjp`` back;
* :func:`ggn_quadratic_forms` — ``δᵢᵀ C δⱼ = (J δᵢ)ᵀ H (J δⱼ)`` for a few directions: forward mode, no
  backward, one ``jvp`` per direction, optionally estimated from the batch's first rows;
* both in reverse mode where the model has no forward-mode derivative (``nn.LSTM`` on the CPU, cuDNN's
  RNNs): ``u ↦ Jᵀu`` is linear, so ``J d`` is its ``vjp`` with the cotangent ``d`` — exactly the ``jvp``;
* ``seed``: every evaluation of the model runs with torch's RNG forked and seeded with it
  (:func:`kfac_func.random.seeded`), so that dropout and noise draw the same numbers in each (and in the
  caller's own evaluations with that seed), the same in each direction's ``jvp``;
* :func:`fisher_quadratic_forms` — the same for the captured MC/empirical Fisher, ``Σₙ,ᵥ (∇ℓ·δᵢ)(∇ℓ·δⱼ)``;
* :func:`solve_quadratic_model` — the coefficients ``x`` of ``δ = Σ xᵢ dᵢ`` minimising ``M`` (for K-FAC
  ``d = (Δ, δ_prev)``, the learning rate ``α`` and momentum ``μ``), some coefficients optionally fixed;
* :func:`safe_coefficients` — ``(α, μ)`` kept in ``α ≥ 0``, ``|μ| ≤ 1`` and scaled so that the model
  never promises a decrease larger than the objective itself;
* :func:`reduction_ratio` and :func:`levenberg_marquardt` — ``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))`` and
  the damping rule: ``ρ < ¼`` (or NaN) → ``λ ← λ/ω``, ``ρ > ¾`` → ``λ ← ωλ``, clipped to ``[min, max]``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .batching import batch_first, unbatch_first
from .calls import batch_size, first_examples, model_io
from .capture import Capture, Model, flat_call, trace
from .factors import full_precision
from .layers import LayerSpec, stat_dtype, weight_matrix
from .losses import Loss, as_loss
from .random import seeded
from .tree import PyTree, flatten

MODES = (None, "forward", "reverse")
QUADRATIC_MIN_TERMS = 256  # the loss terms a quarter of the batch must hold for sub_batch's rule to take it
# models whose evaluation lacked a forward-mode derivative: their products run in reverse mode from then on
_REVERSE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def output_hessian_product(loss: Loss, out: Tensor, target: Tensor, u: Tensor,
                           scale: Tensor | float | None = None) -> Tensor:
    """``∇²_out L · u`` for the reduced loss (``R`` included, or ``scale`` in its place), per position,
    without forming the Hessian; cross-entropy's classes lie along ``loss.resolve(out, target)``."""
    scale = loss.scale(out, target) if scale is None else scale
    if loss.kind == "mse":
        return scale * 2 * u
    if loss.kind == "bce_with_logits":
        p = torch.sigmoid(out)
        return scale * p * (1 - p) * u
    c = loss.resolve(out, target)
    p = out.softmax(c)
    weight = loss.class_weight(target, p.dtype).unsqueeze(c)
    return scale * weight * p * (u - (p * u).sum(c, keepdim=True))


def ggn_vector_product(
    model: Model, params: PyTree, inputs: Any, targets: Tensor, loss: Loss | str, v: PyTree, *,
    seed: int | None = None, mode: str | None = None,
) -> PyTree:
    """``C v`` for the exact GGN (= type-2 Fisher) of the batch loss, every parameter included; ``v`` has
    the parameters' names, the result their structure. ``seed`` and ``mode`` as in :func:`ggn_quadratic_forms`."""
    loss = as_loss(loss)
    flat, spec = flatten(params)
    f = lambda p: flat_call(model, spec, p, inputs)[0]  # noqa: E731
    tangent = spec.like(v, "v")

    def forward() -> tuple[Tensor, Tensor, Callable]:
        # torch's fused CPU attention kernels have no forward-mode derivative
        with seeded(seed, flat.values()), sdpa_kernel(SDPBackend.MATH):
            out, jv = jvp(f, (flat,), (tangent,))
        with seeded(seed, flat.values()):
            return out, jv, vjp(f, flat)[1]

    def reverse() -> tuple[Tensor, Tensor, Callable]:
        out, pullback, push = _linearised(f, flat, seed)
        return out, push((tangent,))[0], pullback

    out, jv, pullback = _forward_or_reverse(model, mode, forward, reverse)
    return spec.unflatten(pullback(output_hessian_product(loss, out.detach(), targets, jv))[0])


def ggn_quadratic_forms(
    model: Model, params: PyTree, inputs: Any, targets: Tensor, loss: Loss | str, directions: list[PyTree],
    examples: int | None = None, *, seed: int | None = None, mode: str | None = None,
) -> Tensor:
    """``[dᵢᵀ C dⱼ]`` for the exact GGN: one ``jvp`` per direction, no backward.

    ``mode``: ``"forward"`` (the ``jvp``), ``"reverse"`` (one forward and backward, then ``J dᵢ`` as the
    ``vjp`` of ``u ↦ Jᵀu``: the same forms, exactly) or ``None``: forward, and reverse from then on for a
    model found to lack a forward-mode derivative. ``seed``: torch's RNG forked and seeded with it for the
    model's evaluation (see the module's docstring).

    ``examples``: estimate the forms from the first ``m`` examples of the batch (of every batched input leaf,
    :mod:`kfac_func.calls`, and of the target rows of those examples, wherever the output holds them): the
    sub-batch's sum ``Σₙ₌₁..ₘ (Jₙdᵢ)ᵀHₙ(Jₙdⱼ)`` times
    ``R · T/Tₘ`` — the full batch's reduction scale ``R`` and the ratio of its loss terms ``T`` to the
    sub-batch's (``N/m`` for one term per example), so that a mean over the batch is estimated by the mean
    over the sub-batch and a sum by the scaled-up sum."""
    loss = as_loss(loss)
    flat, spec = flatten(params)
    scale = None
    io = model_io(model)
    n = batch_size(inputs, io.batch_dims)
    if examples is not None and examples < n:
        layout = trace(io, params, inputs).output_layout  # where the output (and so the targets) hold the examples
        sub_targets = unbatch_first(batch_first(targets, layout, n)[:examples], layout)
        # R·T/Tₘ: the batch's reduction scale and its loss terms over the sub-batch's (none: no curvature)
        terms, sub_terms = (torch.as_tensor(loss.terms(t), dtype=torch.float64, device=t.device)
                            for t in (targets, sub_targets))
        scale = loss.scale(terms, targets) * terms / sub_terms.clamp_min(1)
        inputs, targets = first_examples(inputs, examples, io.batch_dims), sub_targets
    f = lambda p: flat_call(model, spec, p, inputs)[0]  # noqa: E731
    # tangents in the parameters' dtype (jvp requires it); the forms in at least float32
    tangents = [{n: t[n].to(p.dtype) for n, p in flat.items()} for t in (spec.like(d, "each direction")
                                                                         for d in directions)]

    def forward() -> tuple[Tensor, Tensor]:
        # one jvp per direction, not one vmapped over them: a batched weight tangent would broadcast against the
        # input's leading dims inside fused layers (an (S, d_in, d_out) copy per direction of a sequence-first
        # attention's in-projection) and the directions would be stacked (a model's worth of memory each); the
        # model's evaluation is repeated instead, with the same seed (see ggn_vector_product for the kernel)
        jds = []
        for t in tangents:
            with seeded(seed, flat.values()), sdpa_kernel(SDPBackend.MATH):
                out, jd = jvp(f, (flat,), (t,))
            jds.append(jd)
        return out, torch.stack(jds)

    def reverse() -> tuple[Tensor, Tensor]:
        out, _, push = _linearised(f, flat, seed)  # one forward and backward, then a vjp per direction
        return out, torch.stack([push((t,))[0] for t in tangents])

    out, jds = _forward_or_reverse(model, mode, forward, reverse)
    dtype = stat_dtype(out.dtype)
    out, jds = out.detach().to(dtype), jds.to(dtype)
    hessian = vmap(lambda u: output_hessian_product(loss, out, targets, u, scale))(jds)
    return jds.flatten(1) @ hessian.flatten(1).T


def sub_batch(fraction: float | None, n: int, loss: Loss, targets: Tensor) -> int | None:
    """The first examples the GGN quadratic model is estimated from (``None``: the whole batch of ``n``):
    ``⌈fraction·n⌉``, or for ``fraction=None`` a quarter of the batch when that quarter holds at least
    :data:`QUADRATIC_MIN_TERMS` loss terms (counted from the targets' shape: a sequence batch, a wide
    output), else the whole batch — a GGN from a few rows can underestimate the curvature along the step
    (``docs/adaptive.md``), and the model costs a third of a step when taken from every row."""
    if fraction is None:
        per_class = loss.kind == "cross_entropy" and targets.is_floating_point()  # class probabilities
        terms = targets.numel() // (targets.shape[loss.resolve(targets, targets)] if per_class else 1)
        quarter = math.ceil(n / 4)
        return quarter if quarter < n and terms * quarter >= QUADRATIC_MIN_TERMS * n else None
    return max(1, math.ceil(fraction * n)) if fraction < 1 else None


def _load_jvp_decompositions() -> None:
    """torch loads its forward-mode decompositions at the first ``jvp`` of a process and scripts each with
    ``torch.jit.script``, which warns (a ``DeprecationWarning``) about twenty times into the user's log: load them
    here with exactly that warning silenced (later calls do nothing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        torch.autograd.forward_ad._maybe_load_decompositions()


def _linearised(f: Callable, flat: dict[str, Tensor], seed: int | None) -> tuple[Tensor, Callable, Callable]:
    """``(f(θ), u ↦ Jᵀu, d ↦ J d)`` in reverse mode: one forward and its backward; ``J d`` is the ``vjp`` of the
    linear map ``u ↦ Jᵀu`` (at ``u = 0``) with the cotangent ``d``. cuDNN's RNNs have no double backward:
    the forward runs without cuDNN on a CUDA device."""
    with seeded(seed, flat.values()), sdpa_kernel(SDPBackend.MATH), _without_cudnn(flat.values()):
        out, pullback = vjp(f, flat)
        _, push = vjp(pullback, torch.zeros_like(out))
    return out, pullback, push


@contextlib.contextmanager
def _without_cudnn(tensors: Iterable[Tensor]) -> Iterator[None]:
    """cuDNN disabled for the block when any of ``tensors`` is on a CUDA device."""
    enabled = torch.backends.cudnn.enabled
    cuda = any(t.device.type == "cuda" for t in tensors)
    if cuda:
        torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        if cuda:
            torch.backends.cudnn.enabled = enabled


def _forward_or_reverse(model: Model, mode: str | None, forward: Callable, reverse: Callable) -> Any:
    """``forward()`` or, for ``mode="reverse"`` or a model without a forward-mode derivative, ``reverse()``:
    with ``mode=None`` a ``NotImplementedError`` of the forward-mode pass (an op without a forward-mode formula,
    sparse tensors) is remembered for the model; the reverse pass raises any error of the model itself again."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:  # not read while compiling: a guard on the weak set would fail once a model in it is collected
        known = mode is None and not torch.compiler.is_compiling() and model in _REVERSE
    except TypeError:  # not hashable: nothing remembered
        known = False
    if mode == "reverse" or known:
        return reverse()
    if not torch.compiler.is_compiling():
        _load_jvp_decompositions()
    try:
        return forward()
    except NotImplementedError:  # an op without a forward-mode formula (LSTM on the CPU), sparse tensors under jvp
        if mode == "forward":
            raise  # (an unrelated NotImplementedError of the model is raised again by the reverse pass)
    try:
        _REVERSE.add(model)
    except TypeError:  # neither hashable nor weakly referenceable: found again at each call
        pass
    return reverse()


@full_precision
def fisher_quadratic_forms(cap: Capture, directions: list[PyTree], layers: dict[str, LayerSpec]) -> Tensor:
    """``[dᵢᵀ C dⱼ]`` for the captured curvature (MC, exact or empirical) from ``(a, g)``; ``directions``
    are parameter pytrees, of which only the tracked layers' parts enter (``C`` covers those)."""
    dots = []
    for d in map(lambda tree: flatten(tree)[0], directions):
        per = 0
        for name, spec in layers.items():
            w = weight_matrix(spec, d[spec.weight], d[spec.bias] if spec.bias else None).to(cap.g[name].dtype)
            per = per + ((cap.g[name] @ w) * cap.a[name].unsqueeze(0)).sum((2, 3, 4))
        dots.append(per.reshape(-1))  # (V·N,): ∇ℓₙ,ᵥ · d
    z = torch.stack(dots)
    return z @ z.T


@full_precision
def solve_quadratic_model(
    curvature: Tensor, gram: Tensor, grad_dots: Tensor, damping: float | Tensor, fixed: dict[int, float] | None = None
) -> tuple[Tensor, Tensor]:
    """Minimise ``M(x) = ½ xᵀ(K + (λ)G)x + bᵀx`` over the free coefficients.

    ``curvature`` ``K = [dᵢᵀ C dⱼ]``, ``gram`` ``G = [dᵢᵀ dⱼ]``, ``grad_dots`` ``b = [∇ᵀdᵢ]`` (include the
    L2 term in ``C``/``∇`` and ``λ + η`` in ``damping`` as wanted); ``fixed`` maps indices to values
    held fixed (e.g. a fixed momentum). Returns ``x`` and the model change ``M(x) − M(0)``. A direction
    that is zero (the first step's previous update) gets coefficient 0. Tensor operations only (no host
    sync): the free block is solved with a pseudo-inverse in which zero directions are masked out.
    """
    fixed = dict(fixed or {})
    k = len(grad_dots)
    m = curvature + damping * gram
    held = torch.zeros(k, dtype=torch.bool, device=m.device)
    x = torch.zeros(k, dtype=m.dtype, device=m.device)
    for i, v in fixed.items():
        held[i] = True
        x[i] = v
    free = ~held & (gram.diagonal() != 0)  # a zero direction stays at 0
    mask = free.unsqueeze(0) & free.unsqueeze(1)
    rhs = torch.where(free, -grad_dots - m @ x, 0.0)
    # a pseudo-inverse: parallel directions (e.g. Δ ∥ δ_prev) leave the minimiser non-unique, not absent
    x = x + torch.where(free, torch.linalg.pinv(torch.where(mask, m, 0.0), hermitian=True) @ rhs, 0.0)
    return x, 0.5 * x @ m @ x + grad_dots @ x


@full_precision
def safe_coefficients(curvature: Tensor, gram: Tensor, grad_dots: Tensor, damping: float | Tensor, x: Tensor,
                      objective: Tensor, momentum_free: bool) -> Tensor:
    """The K-FAC step's ``(α, μ)`` (``d = (−Δ, δ_prev)``) made safe, as tensor operations:

    1. ``|μ| ≤ 1`` when it is free: outside, the better (lower model value) of the model's minimisers on
       the edges ``μ = ±1``, ``α`` re-solved on each — a momentum beyond ±1 amplifies the previous update
       from step to step without bound (a moderately negative one, a partial undo, is a common minimiser). When ``μ`` is held (``adaptive="lr"``) and the model
       predicts that the step raises the objective, the momentum term is dropped (``μ = 0``, ``α`` re-solved);
    2. ``α ≥ 0``: ``−Δ`` is a descent direction of the damped model, a negative ``α`` only comes from a
       model that contradicts it;
    3. the model's predicted decrease is at most the objective itself (every supported loss and the L2 term
       are ≥ 0, so no step can lower it by more): a model promising more has curvature too small along
       the step by at least that factor, and ``(α, μ)`` are scaled down by it. This is what keeps a model
       built from a few noisy rows (``quadratic_curvature="fisher"`` with a small ``stats_fraction``) from
       taking a step that makes the loss explode.
    """
    m = curvature + damping * gram
    model = lambda v: 0.5 * v @ m @ v + grad_dots @ v  # noqa: E731
    def edge(mu: float) -> Tensor:  # the model's minimiser in α with μ held
        alpha = torch.where(m[0, 0] > 0, -(grad_dots[0] + m[0, 1] * mu) / torch.where(m[0, 0] > 0, m[0, 0], 1.0), 0.0)
        return torch.stack([alpha.clamp_min(0.0), torch.full_like(alpha, mu)])

    if momentum_free:
        low, high = edge(-1.0), edge(1.0)
        best_edge = torch.where(model(high) < model(low), high, low)
        x = torch.where(x[1].abs() <= 1, x, best_edge)
    else:  # μ held: when the model predicts that the step with it raises the objective, momentum is dropped
        x = torch.where(model(x) > 0, edge(0.0), x)
    x = torch.stack([x[0].clamp_min(0.0), x[1]])
    # the largest s ≤ 1 with −M(s·x) = −(s²q + s·l) ≤ L: the smaller root of q s² + l s + L = 0, written
    # 2L / (−l + √(l² − 4qL)) so that q = 0 needs no case (the root exists: max_s −M(s·x) ≥ −M(x) > L)
    q, lin = 0.5 * x @ m @ x, grad_dots @ x
    over = -(q + lin) > objective
    root = (lin.square() - 4 * q * objective).clamp_min(0.0).sqrt()
    scale = torch.where(over, 2 * objective / torch.where(over, root - lin, 1.0), 1.0)
    return x * scale


def reduction_ratio(loss_before: Tensor | float, loss_after: Tensor | float, model_change: Tensor | float) -> Tensor:
    """``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))`` (float64); NaN when the model predicts no decrease or a loss
    is NaN."""
    before, after, change = (torch.as_tensor(v, dtype=torch.float64) for v in (loss_before, loss_after, model_change))
    return torch.where(change < 0, (after - before) / torch.where(change < 0, change, -1.0), float("nan"))


def levenberg_marquardt(
    damping: float | Tensor,
    rho: float | Tensor,
    *,
    factor: float = 0.95**5,
    lower: float = 0.25,
    upper: float = 0.75,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
) -> Tensor:
    """The Levenberg–Marquardt rule of Martens & Grosse (§6.5): ``ρ < lower`` or NaN → ``λ/factor``,
    ``ρ > upper`` → ``λ·factor``; ``factor = (19/20)^T₁`` with ``T₁ = 5`` by default; clipped (float64)."""
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    damping, rho = torch.as_tensor(damping, dtype=torch.float64), torch.as_tensor(rho, dtype=torch.float64)
    damping = torch.where(~(rho >= lower), damping / factor, torch.where(rho > upper, damping * factor, damping))
    return damping.clamp(min_damping, max_damping)
