r"""Output-space curvature of the supported losses.

A loss is ``L = R Σₙ ℓₙ``: ``ℓₙ`` is the *sum* of example ``n``'s loss terms and ``R`` the reduction
scale exactly as torch applies it (``mean``: ``1/N`` for cross-entropy with class indices, counting only
targets ``!= ignore_index``; ``1/numel`` for MSE, BCE and cross-entropy with class probabilities, i.e.
the mean runs over every output element; ``sum``: ``R = 1``).

The curvature is ``C = R Σₙ Σᵥ ∇ℓₙ,ᵥ ∇ℓₙ,ᵥᵀ``; :func:`cotangents` returns output-space vectors
``u_{v,n}`` with ``Σᵥ u uᵀ = R · (output-space curvature of ℓₙ)`` so one vector-Jacobian product per
``v`` gives scaled output gradients of every layer:

* ``"mc"``: ``M`` targets sampled from the model's predictive distribution (categorical of the softmax;
  Gaussian ``N(y, ½I)`` whose NLL is the squared error; Bernoulli of the sigmoid), each scaled by
  ``√(R/M)``. ``E[u uᵀ]`` is the loss Hessian in output space.
* ``"exact"`` (type-2 Fisher = GGN): the columns of a square root ``S`` of the loss Hessian,
  ``S Sᵀ = ∇²ℓ``; for softmax cross-entropy ``S = diag(√p) − p √pᵀ``, for squared error ``√2 I``, for
  BCE ``diag(√(p(1−p)))``. One column per output element of an example.
* ``"empirical"``: the gradient of ``ℓₙ`` at the true targets, scaled by ``√R``.

Cross-entropy logits carry their classes in dim ``c`` (``Loss.class_dim``): ``1`` is torch's
``(N, C, d₁, …)``, ``-1`` the class-last ``(N, d₁, …, C)`` of language models; on 2-D ``(N, C)`` both
coincide. ``None`` resolves ``c`` from the targets (:meth:`Loss.resolve`): class indices have the logits'
shape without dim ``c``; when both dims fit (``(B, T, T)`` logits, ``(B, T)`` targets), for class
probabilities on ≥3 dims and without targets it is an error, never a guess. Every returned tensor keeps
the logits' own layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import random
from .subnormal import flush

FISHER_TYPES = ("mc", "exact", "empirical")
_KINDS = ("cross_entropy", "mse", "bce_with_logits")
SLICE_ELEMENTS = 2**22  # output entries per slice of Loss.sliced_value (16 MB of float32 logits)
_PASS_CLASS_DIM = ('pass Loss("cross_entropy", class_dim=-1) for class-last (N, d1, ..., C) logits (language '
                   "models) or class_dim=1 for torch's (N, C, d1, ...) layout")


@dataclass(frozen=True)
class Loss:
    """A supported loss: ``kind`` in ``cross_entropy | mse | bce_with_logits``, ``reduction`` in
    ``mean | sum``; ``ignore_index`` applies to cross-entropy with class-index targets.

    ``reduction_scale`` fixes ``R`` from outside instead of from the batch: the value becomes
    ``R · Σ ℓ``. Data-parallel training sets it to the *global* batch's ``R`` on every rank, so that the
    ranks' losses, gradients and curvature statistics simply add up (:mod:`kfac_func.distributed`).

    ``class_dim`` (cross-entropy only): the logits' class dim, ``1`` (torch's ``(N, C, d₁, …)``), ``-1``
    (class-last ``(N, d₁, …, C)``) or ``None``: resolved from the targets (:meth:`resolve`)."""

    kind: str
    reduction: str = "mean"
    ignore_index: int = -100
    reduction_scale: float | None = None
    class_dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unsupported loss {self.kind!r}; expected one of {_KINDS}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"unsupported reduction {self.reduction!r}; expected 'mean' or 'sum'")
        if not (self.class_dim is None or type(self.class_dim) is int and self.class_dim in (1, -1)):
            raise ValueError(f"class_dim must be None, 1 or -1, got {self.class_dim!r}")
        if self.class_dim is not None and self.kind != "cross_entropy":
            raise ValueError(f"class_dim applies to cross_entropy only, not {self.kind!r}")

    def resolve(self, out: Tensor, target: Tensor | None = None) -> int:
        """The class dim ``c ≥ 0`` of cross-entropy logits ``out``: ``1`` on ≤2 dims; else from ``class_dim``,
        or with ``class_dim=None`` the one dim (``1`` or the last) whose removal from ``out.shape`` gives
        class-index targets' shape. Raises when both fit, for class probabilities or without ``target``
        (≥3 dims, ``class_dim=None``), and when class-index targets fit no layout."""
        if self.kind != "cross_entropy":
            raise ValueError(f"{self.kind}: only cross_entropy has a class dim")
        shape = tuple(out.shape)
        if len(shape) < 2:
            raise ValueError(f"cross_entropy: logits must be (N, C, ...), got {shape}")
        last = len(shape) - 1
        dim = 1 if last == 1 else {1: 1, -1: last, None: None}[self.class_dim]
        if target is None:
            if dim is None:
                raise ValueError(
                    f"cross_entropy: without targets the class dim of logits {shape} is unknown; pass "
                    'loss=kf.Loss("cross_entropy", class_dim=-1) for (B, T, V) logits or class_dim=1 for (B, V, T)'
                )
            return dim
        if target.is_floating_point():
            if dim is None:
                raise ValueError(
                    f"cross_entropy: class-probability targets on {len(shape)}-dim logits {shape} do not tell which "
                    f"dim holds the classes; {_PASS_CLASS_DIM}"
                )
            return dim
        without = {c: shape[:c] + shape[c + 1:] for c in (1, last)}
        got = tuple(target.shape)
        if dim is not None:
            if got != without[dim]:
                raise ValueError(f"cross_entropy: class-index targets for logits {shape} with class dim {dim} must "
                                 f"have shape {without[dim]}, got {got}")
            return dim
        fits = [c for c in (1, last) if got == without[c]]
        if len(fits) == 2:
            raise ValueError(
                f"cross_entropy: logits {shape} with class-index targets {got} fit both layouts (dim 1 and the last "
                f"dim have the same size); {_PASS_CLASS_DIM}"
            )
        if not fits:
            raise ValueError(
                f"cross_entropy: class-index targets must have shape {without[1]} for torch's (N, C, d1, ...) logits "
                f"{shape} (class_dim=1) or {without[last]} for class-last (N, d1, ..., C) ones (class_dim=-1), "
                f"got {got}"
            )
        return fits[0]

    def value(self, out: Tensor, target: Tensor) -> Tensor:
        """The loss exactly as torch computes it (``R · Σ ℓ`` with a fixed ``reduction_scale``)."""
        self._check(out, target)
        target = self.class_indices(target)
        reduction = "sum" if self.reduction_scale is not None else self.reduction
        if self.kind == "cross_entropy":
            c = self.resolve(out, target)
            if target.is_floating_point():
                target = target.movedim(c, 1)
            value = F.cross_entropy(out.movedim(c, 1), target, reduction=reduction, ignore_index=self.ignore_index)
        elif self.kind == "mse":
            value = F.mse_loss(out, target, reduction=reduction)
        else:
            value = F.binary_cross_entropy_with_logits(out, target, reduction=reduction)
        return value if self.reduction_scale is None else self.reduction_scale * value

    def sliced_value(self, out: Tensor, target: Tensor, elements: int = SLICE_ELEMENTS) -> Tensor:
        """:meth:`value` in float64, evaluated on slices of ``out``'s dim 0 of at most ``elements`` output
        entries each (one slice if a row is larger): ``R · Σ_slices Σ ℓ``. For evaluations without gradients
        (the reduction ratio's loss after a step): torch's cross-entropy holds a log-softmax as large as the
        logits, one slice's worth here. Dim 0 is never the class dim (:meth:`resolve` gives ``c ≥ 1``)."""
        self._check(out, target)  # a 0-dim or empty output is an error here too
        rows = max(1, elements // max(1, out[0].numel()))
        if rows >= out.shape[0]:
            return self.value(out, target).double()
        fixed = self.class_dim
        if self.kind == "cross_entropy":  # resolved once on the whole batch; each slice then takes it as given
            fixed = 1 if self.resolve(out, target) == 1 else -1
        summed = replace(self, reduction="sum", reduction_scale=None, class_dim=fixed)
        total = sum(summed.value(o, t).double() for o, t in zip(out.split(rows), target.split(rows)))
        return self.scale(out, target) * total

    def terms(self, target: Tensor) -> Tensor | int:
        """How many terms a mean runs over: targets ``≠ ignore_index`` for class indices (a tensor),
        positions for class probabilities, elements for MSE and BCE (ints: known from the shape)."""
        if self.kind == "cross_entropy" and not target.is_floating_point():
            return self.kept(target).sum()
        per_term = target.shape[self.resolve(target, target)] if self.kind == "cross_entropy" else 1
        return target.numel() // per_term

    def terms_of(self, out: Tensor) -> int:
        """The terms of :meth:`terms` on output ``out`` with every target counted: positions for
        cross-entropy (raises where :meth:`resolve` needs targets), elements for MSE and BCE."""
        return out.numel() // (out.shape[self.resolve(out)] if self.kind == "cross_entropy" else 1)

    def stand_in_targets(self, out: Tensor) -> Tensor:
        """Targets that count every term of ``out``, for curvature without the true targets (they set only
        ``R`` and the class weights): class indices ``0`` of ``out``'s shape without its class dim for
        cross-entropy (raises where :meth:`resolve` needs targets), ``out`` itself for MSE and BCE."""
        if self.kind != "cross_entropy":
            return out
        c = self.resolve(out)
        return out.new_zeros(out.shape[:c] + out.shape[c + 1:], dtype=torch.int64)

    def scale(self, out: Tensor, target: Tensor) -> Tensor | float:
        """The reduction scale ``R``: ``reduction_scale`` if set, else ``1/terms`` (mean) or ``1`` (sum)."""
        if self.reduction_scale is not None:
            return self.reduction_scale
        if self.reduction == "sum":
            return 1.0
        terms = self.terms(target)
        return 1.0 / (terms.to(out.dtype) if isinstance(terms, Tensor) else terms)

    def grad(self, out: Tensor, target: Tensor) -> Tensor:
        """``∂(Σₙ ℓₙ)/∂out`` at the true targets (no reduction scale), in ``out``'s layout."""
        if self.kind == "mse":
            return 2 * (out - target)
        if self.kind == "bce_with_logits":
            return torch.sigmoid(out) - target
        c = self.resolve(out, target)
        p = out.movedim(c, -1).softmax(-1)
        if target.is_floating_point():
            t = target.movedim(c, -1)
            return (t.sum(-1, keepdim=True) * p - t).movedim(-1, c)
        mask = self.kept(target)
        # p − onehot in place of p (no one-hot matrix: a vocabulary-wide output holds one copy), ignored rows zeroed
        idx = torch.where(mask, self.class_indices(target), 0).unsqueeze(-1)
        p = p.scatter_add(-1, idx, torch.full_like(idx, -1, dtype=p.dtype))
        return (p * mask.unsqueeze(-1)).movedim(-1, c)

    def sampled_grads(self, out: Tensor, target: Tensor, samples: int, key: Tensor) -> Tensor:
        """``(M, *out.shape)``: ``∂ℓₙ/∂out`` at targets sampled from the predictive distribution with the
        random ``key`` (:mod:`kfac_func.random`)."""
        shape = (samples,) + tuple(out.shape)
        if self.kind == "mse":
            return -(2**0.5) * random.normal(key, shape, out.dtype)
        if self.kind == "bce_with_logits":
            p = torch.sigmoid(out)
            return p - random.bernoulli(key, _finite_probs(p).expand(shape))
        c = self.resolve(out, target)
        p = out.movedim(c, -1).softmax(-1)  # (N, *pos, C)
        idx = random.categorical(key, p, samples).unsqueeze(-1)  # (M, N, *pos, 1)
        grads = p.expand(idx.shape[:-1] + p.shape[-1:]).scatter_add(-1, idx, torch.full_like(idx, -1, dtype=p.dtype))
        return (grads * self.class_weight(target, p.dtype).sqrt().unsqueeze(-1)).movedim(-1, c + 1)

    def hessian_sqrt(self, out: Tensor, target: Tensor) -> Tensor:
        """``(V, *out.shape)``: columns of ``S`` with ``S Sᵀ = ∇²ℓₙ`` in output space, V = elements per example."""
        if self.kind == "mse":
            return _diagonal_columns(torch.full_like(out, 2**0.5))
        if self.kind == "bce_with_logits":
            p = torch.sigmoid(out)
            return _diagonal_columns((p * (1 - p)).sqrt())
        c = self.resolve(out, target)
        p = out.movedim(c, -1).softmax(-1)  # (N, *pos, C)
        n, classes = p.shape[0], p.shape[-1]
        pos = p.shape[1:-1]
        eye = torch.eye(classes, dtype=p.dtype, device=p.device)
        cols = (eye.reshape((classes,) + (1,) * (p.dim() - 1) + (classes,)) - p) * p.sqrt().movedim(-1, 0).unsqueeze(-1)
        cols = cols * self.class_weight(target, p.dtype).sqrt().unsqueeze(-1)  # (C, N, *pos, C)
        positions = 1
        for d in pos:
            positions *= d
        if positions > 1:  # one column per (class, position): positions do not couple
            onehot_pos = torch.eye(positions, dtype=p.dtype, device=p.device).reshape((positions, 1) + tuple(pos) + (1,))
            cols = (cols.unsqueeze(1) * onehot_pos).reshape((classes * positions, n) + tuple(pos) + (classes,))
        return cols.movedim(-1, c + 1)

    def class_indices(self, target: Tensor) -> Tensor:
        """Cross-entropy class indices of any integer dtype as ``int64`` (what torch's ``cross_entropy`` and
        ``one_hot`` take); any other target as it is."""
        integer = self.kind == "cross_entropy" and not target.is_floating_point() and target.dtype != torch.int64
        return target.long() if integer else target

    def kept(self, target: Tensor) -> Tensor:
        """Where class-index targets count (``≠ ignore_index``), compared as ``int64``: in ``uint8`` the default
        ``-100`` would wrap round to class 156."""
        return self.class_indices(target) != self.ignore_index

    def class_weight(self, target: Tensor, dtype: torch.dtype) -> Tensor:
        """Per-position multiplier of the softmax Hessian, shaped like the logits without their class dim:
        the target mass, or the ignore mask."""
        if target.is_floating_point():
            return target.sum(self.resolve(target, target))
        return self.kept(target).to(dtype)

    def _check(self, out: Tensor, target: Tensor) -> None:
        if out.dim() < 1 or out.shape[0] == 0:
            raise ValueError(f"{self.kind}: model output must have a non-empty batch dimension, got {tuple(out.shape)}")
        if self.kind == "cross_entropy" and not target.is_floating_point():
            if target.dtype == torch.bool or target.is_complex():
                raise ValueError(
                    f"cross_entropy: targets must be class indices (an integer tensor) or class probabilities (a "
                    f"floating tensor of the output's shape and dtype), got {target.dtype}"
                )
            self.resolve(out, target)
            return
        if target.shape != out.shape:
            raise ValueError(f"{self.kind}: target shape {tuple(target.shape)} must equal output shape {tuple(out.shape)}")
        if target.dtype != out.dtype:
            hint = f" (integer targets: pass targets.to({out.dtype}))" if not target.is_floating_point() else ""
            raise ValueError(f"{self.kind}: target dtype {target.dtype} must equal output dtype {out.dtype}{hint}")
        if self.kind == "cross_entropy":
            self.resolve(out, target)


def as_loss(loss: Loss | str | nn.Module) -> Loss:
    """A :class:`Loss` from a :class:`Loss`, its kind name (mean reduction), or torch's loss module
    ``nn.CrossEntropyLoss`` (``class_dim=None``), ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with its
    ``reduction`` (``mean`` or ``sum``) and ``ignore_index``; class weights, label smoothing and
    ``pos_weight`` are refused (their curvature is not modelled)."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return Loss(loss)
    modules = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce_with_logits"}
    kind = next((k for cls, k in modules.items() if isinstance(loss, cls)), None)
    if kind is None:
        raise TypeError(
            "loss must be a kfac_func Loss, one of the names " + ", ".join(map(repr, _KINDS)) + ", or an "
            f"nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss; got {type(loss).__name__}"
        )
    name = type(loss).__name__
    unsupported = [
        option for option, present in (
            ("weight", getattr(loss, "weight", None) is not None),
            ("pos_weight", getattr(loss, "pos_weight", None) is not None),
            (f"label_smoothing={getattr(loss, 'label_smoothing', 0.0)}", getattr(loss, "label_smoothing", 0.0) != 0),
        ) if present
    ]
    if unsupported:
        raise ValueError(f"{name} with {', '.join(unsupported)} is not supported: use it without (the loss "
                         "curvature models the plain loss)")
    if loss.reduction not in ("mean", "sum"):
        raise ValueError(f"{name}(reduction={loss.reduction!r}) is not supported: K-FAC needs the scalar "
                         "objective, use reduction='mean' or 'sum'")
    if kind == "cross_entropy":
        return Loss(kind, loss.reduction, loss.ignore_index)
    return Loss(kind, loss.reduction)


def for_targets(loss: Loss | None, targets: Tensor) -> Loss:
    """``loss``, or — when none was named — the one loss the targets allow: class indices (an integer tensor)
    are cross-entropy's alone; floating targets fit mean squared error, binary and soft-label cross-entropy
    alike, so they need the loss named."""
    if loss is not None:
        return loss
    if not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool:
        return Loss("cross_entropy")
    raise ValueError(
        f"targets of dtype {targets.dtype} fit several losses: name it — loss='mse' (regression), "
        "'bce_with_logits' (binary or multi-label), 'cross_entropy' (class probabilities), a kfac_func.Loss, or "
        "torch's nn.MSELoss() / nn.BCEWithLogitsLoss() / nn.CrossEntropyLoss()"
    )


NAME_THE_LOSS = ("the ordinary loop never sees the targets, so the loss must be named: loss='cross_entropy' "
                 "(kf.Loss('cross_entropy', class_dim=-1) for (B, T, V) logits), 'mse', 'bce_with_logits', or torch's "
                 "nn.CrossEntropyLoss() / nn.MSELoss() / nn.BCEWithLogitsLoss()")


def cotangents(
    loss: Loss,
    out: Tensor,
    target: Tensor,
    fisher: str | None,
    samples: int = 1,
    key: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | float]:
    """Loss value, ``∂L/∂out``, the curvature vectors ``(V, *out.shape)`` (None if ``fisher`` is None)
    and the scale ``R``. For ``"empirical"`` the vectors are ``∂L/∂out / √R`` (no extra work). ``"mc"``
    samples with ``key`` (:mod:`kfac_func.random`); without one, a key is drawn from torch's global RNG."""
    if fisher is not None and fisher not in FISHER_TYPES:
        raise ValueError(f"unknown Fisher type {fisher!r}; expected one of {FISHER_TYPES}")
    if samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {samples}")
    value = loss.value(out, target)
    scale = loss.scale(out, target)
    true_grad = flush(scale * loss.grad(out, target))  # a loss near zero: no subnormals into the backward
    if fisher is None:
        return value, true_grad, None, scale
    if fisher == "empirical":
        curv = (true_grad / scale**0.5).unsqueeze(0)
    elif fisher == "exact":
        curv = scale**0.5 * loss.hessian_sqrt(out, target)
    else:
        curv = (scale / samples) ** 0.5 * loss.sampled_grads(out, target, samples, random.draw_key() if key is None else key)
    return value, true_grad, flush(curv), scale


def _finite_probs(p: Tensor) -> Tensor:
    """Probabilities safe to sample from: a non-finite output (whose step is skipped anyway) samples 1/2."""
    return torch.where(torch.isfinite(p), p, 0.5)


def _diagonal_columns(diag: Tensor) -> Tensor:
    """``diag`` of shape ``(N, *rest)`` → ``(D, N, *rest)``: column ``d`` is ``diag`` masked to element ``d``."""
    n = diag.shape[0]
    flat = diag.reshape(n, -1)
    eye = torch.eye(flat.shape[1], dtype=diag.dtype, device=diag.device)
    return (eye.unsqueeze(1) * flat.unsqueeze(0)).reshape((flat.shape[1],) + tuple(diag.shape))
