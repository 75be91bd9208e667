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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import random
from .subnormal import flush

FISHER_TYPES = ("mc", "exact", "empirical")
_KINDS = ("cross_entropy", "mse", "bce_with_logits")


@dataclass(frozen=True)
class Loss:
    """A supported loss: ``kind`` in ``cross_entropy | mse | bce_with_logits``, ``reduction`` in
    ``mean | sum``; ``ignore_index`` applies to cross-entropy with class-index targets.

    ``reduction_scale`` fixes ``R`` from outside instead of from the batch: the value becomes
    ``R · Σ ℓ``. Data-parallel training sets it to the *global* batch's ``R`` on every rank, so that the
    ranks' losses, gradients and curvature statistics simply add up (:mod:`kfac_func.distributed`)."""

    kind: str
    reduction: str = "mean"
    ignore_index: int = -100
    reduction_scale: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unsupported loss {self.kind!r}; expected one of {_KINDS}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"unsupported reduction {self.reduction!r}; expected 'mean' or 'sum'")

    def value(self, out: Tensor, target: Tensor) -> Tensor:
        """The loss exactly as torch computes it (``R · Σ ℓ`` with a fixed ``reduction_scale``)."""
        self._check(out, target)
        target = self.class_indices(target)
        reduction = "sum" if self.reduction_scale is not None else self.reduction
        if self.kind == "cross_entropy":
            value = F.cross_entropy(out, target, reduction=reduction, ignore_index=self.ignore_index)
        elif self.kind == "mse":
            value = F.mse_loss(out, target, reduction=reduction)
        else:
            value = F.binary_cross_entropy_with_logits(out, target, reduction=reduction)
        return value if self.reduction_scale is None else self.reduction_scale * value

    def terms(self, target: Tensor) -> Tensor | int:
        """How many terms a mean runs over: targets ``≠ ignore_index`` for class indices (a tensor),
        positions for class probabilities, elements for MSE and BCE (ints: known from the shape)."""
        if self.kind == "cross_entropy" and not target.is_floating_point():
            return self.kept(target).sum()
        per_term = target.shape[1] if self.kind == "cross_entropy" else 1
        return target.numel() // per_term

    def scale(self, out: Tensor, target: Tensor) -> Tensor | float:
        """The reduction scale ``R``: ``reduction_scale`` if set, else ``1/terms`` (mean) or ``1`` (sum)."""
        if self.reduction_scale is not None:
            return self.reduction_scale
        if self.reduction == "sum":
            return 1.0
        terms = self.terms(target)
        return 1.0 / (terms.to(out.dtype) if isinstance(terms, Tensor) else terms)

    def grad(self, out: Tensor, target: Tensor) -> Tensor:
        """``∂(Σₙ ℓₙ)/∂out`` at the true targets (no reduction scale)."""
        if self.kind == "mse":
            return 2 * (out - target)
        if self.kind == "bce_with_logits":
            return torch.sigmoid(out) - target
        p = _class_last(out).softmax(-1)
        if target.is_floating_point():
            t = _class_last(target)
            return _class_second(t.sum(-1, keepdim=True) * p - t)
        mask = self.kept(target)
        onehot = F.one_hot(torch.where(mask, self.class_indices(target), 0), p.shape[-1]).to(p.dtype)
        return _class_second((p - onehot) * mask.unsqueeze(-1))

    def sampled_grads(self, out: Tensor, target: Tensor, samples: int, key: Tensor) -> Tensor:
        """``(M, *out.shape)``: ``∂ℓₙ/∂out`` at targets sampled from the predictive distribution with the
        random ``key`` (:mod:`kfac_func.random`)."""
        shape = (samples,) + tuple(out.shape)
        if self.kind == "mse":
            return -(2**0.5) * random.normal(key, shape, out.dtype)
        if self.kind == "bce_with_logits":
            p = torch.sigmoid(out)
            return p - random.bernoulli(key, _finite_probs(p).expand(shape))
        p = _class_last(out).softmax(-1)
        idx = random.categorical(key, _finite_probs(p), samples)
        onehot = F.one_hot(idx, p.shape[-1]).to(p.dtype)
        return _class_second((p - onehot) * self.class_weight(target, p.dtype).sqrt().unsqueeze(-1), batch_dims=2)

    def hessian_sqrt(self, out: Tensor, target: Tensor) -> Tensor:
        """``(V, *out.shape)``: columns of ``S`` with ``S Sᵀ = ∇²ℓₙ`` in output space, V = elements per example."""
        if self.kind == "mse":
            return _diagonal_columns(torch.full_like(out, 2**0.5))
        if self.kind == "bce_with_logits":
            p = torch.sigmoid(out)
            return _diagonal_columns((p * (1 - p)).sqrt())
        p = _class_last(out).softmax(-1)  # (N, *pos, C)
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
        return _class_second(cols, batch_dims=2)

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
        """Per-position multiplier of the softmax Hessian: the target mass, or the ignore mask."""
        if target.is_floating_point():
            return _class_last(target).sum(-1)
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
            expected = (out.shape[0],) + tuple(out.shape[2:])
            if tuple(target.shape) != expected:
                raise ValueError(f"cross_entropy: class-index targets must have shape {expected}, got {tuple(target.shape)}")
            return
        if target.shape != out.shape:
            raise ValueError(f"{self.kind}: target shape {tuple(target.shape)} must equal output shape {tuple(out.shape)}")
        if target.dtype != out.dtype:
            raise ValueError(f"{self.kind}: target dtype {target.dtype} must equal output dtype {out.dtype}")


def as_loss(loss: Loss | str) -> Loss:
    """Accept a :class:`Loss` or its kind name (mean reduction)."""
    return loss if isinstance(loss, Loss) else Loss(loss)


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


def _class_last(t: Tensor) -> Tensor:
    return t.movedim(1, -1) if t.dim() > 2 else t


def _class_second(t: Tensor, batch_dims: int = 1) -> Tensor:
    """Undo :func:`_class_last` for a tensor with ``batch_dims`` leading dims before the class-last layout."""
    return t.movedim(-1, batch_dims) if t.dim() > batch_dims + 1 else t


def _diagonal_columns(diag: Tensor) -> Tensor:
    """``diag`` of shape ``(N, *rest)`` → ``(D, N, *rest)``: column ``d`` is ``diag`` masked to element ``d``."""
    n = diag.shape[0]
    flat = diag.reshape(n, -1)
    eye = torch.eye(flat.shape[1], dtype=diag.dtype, device=diag.device)
    return (eye.unsqueeze(1) * flat.unsqueeze(0)).reshape((flat.shape[1],) + tuple(diag.shape))
