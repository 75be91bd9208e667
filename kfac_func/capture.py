r"""Find a model's tracked layers and capture, in one forward and one backward per cotangent, the loss, the
gradients and every tracked layer's inputs ``a`` and output gradients ``g``.

Layers are *found*, not declared: while the model runs, a :class:`~torch.overrides.TorchFunctionMode`
sees every call of ``F.linear``, ``torch.conv1d/2d/3d``, ``F.embedding`` and the norm layers
(``F.layer_norm``, ``F.group_norm``, ``F.batch_norm``) and recognises the weight (and bias) by tensor
identity against the parameters, or as a row slice of a parameter (``F.linear`` only: packed
projections). ``F.multi_head_attention_forward`` is rerun batch-first (:mod:`kfac_func.attention`).
In the capture pass the mode records each call's input and adds a zero "probe" tensor to its output;
the vector-Jacobian product with respect to the probes is exactly the output gradient ``∂ℓ/∂s`` of
every call — no hooks, one backward per cotangent for all layers, and it composes with
``torch.func`` (``vmap`` over an ensemble of parameter sets included).

The backward runs for ``1 + V`` cotangents — the true-loss gradient and the ``V`` curvature vectors of
:func:`kfac_func.losses.cotangents` — as a loop of ``vjp`` calls on one forward (a ``vmap`` beyond
:data:`LOOP_COTANGENTS`). Tracked weights are *not* differentiated:
their gradient is rebuilt from the layer input and the true output gradient with the kernels autograd
would use (``∇W = Σₙ,ₛ g aᵀ``; the native convolution weight backward), so the curvature vectors cost
only the input-gradient half of a backward. Parameters that no rule matches (*untracked*: free scales,
weights also used outside a layer call, unsupported options, ...) are differentiated by autograd and
reported with their reason in :attr:`Plan.reasons` (:func:`kfac_func.describe` prints the table);
:func:`kfac_func.precondition` passes their gradients through unchanged.

A weight used by several calls (weight sharing, tied layers of the same kind) is one layer whose
positions are the positions of all its calls (the *expand* rule: ``S`` counts every call).

``params`` may be any pytree of tensors (:mod:`kfac_func.tree`): parameters, layers and errors are named
by the leaves' paths, a function model gets the caller's structure back and ``Capture.grads`` has it.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode

from . import attention
from .batching import WHOLE, Layout, batch_first, batch_first_loss, batched_shape, infer, unbatch_first
from .calls import ModelIO, batch_leaves, batch_size, call as call_with, doubled, model_io, positional, select
from .layers import (
    EMBEDDING,
    LINEAR,
    NORMS,
    LayerCall,
    LayerSpec,
    Rows,
    bind_arguments,
    conv_call,
    input_patch_means,
    input_patches,
    output_grads,
    parameter_grads,
    token_counts,
    weight_matrix,
)
from .losses import Loss, as_loss, cotangents
from .phases import phase
from .precision import traced
from .subnormal import flush, flush_tree
from .tree import PyTree, Spec, flatten, require_names

Model = nn.Module | Callable[..., Any] | ModelIO
# up to this many backward cotangents (1 + V) run as a loop of vjps, more as one vmap: batched conv and
# pooling backwards copy their saved tensors per cotangent (benchmarks/bench_peers.py, CNN exact Fisher:
# 299 ms vmapped, 242 ms looped)
LOOP_COTANGENTS = 32
NOT_USED = "not used by the model"  # the reason of a parameter the forward never reads

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_SIGNATURES = {
    F.linear: ("input", "weight", "bias"),
    torch.conv1d: _CONV,
    torch.conv2d: _CONV,
    torch.conv3d: _CONV,
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}
_DEFAULTS = {"weight": None, "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "padding_idx": None,
             "max_norm": None, "scale_grad_by_freq": False, "sparse": False, "eps": 1e-5, "training": False,
             "momentum": 0.1}
T = "T"  # the rows of a parameter's transposed view, as an owner's second entry
# dense layers written as matrix products with a parameter (in, out), or its transposed view, as the second operand
_MATMULS = {torch.matmul: ("input", "other"), torch.Tensor.matmul: ("input", "other"),
            torch.Tensor.__matmul__: ("input", "other"), torch.mm: ("input", "mat2"), torch.Tensor.mm: ("input", "mat2"),
            torch.addmm: ("bias", "input", "weight", "beta", "alpha")}
# random layers the trace runs as the identity, so that the batch and the doubled batch see the same values
_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# calls on a parameter whose result does not depend on its values (a tensor made like it, its shape)
_METADATA = {torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
             torch.Tensor.new_tensor, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
             torch.rand_like, torch.randn_like, torch.randint_like, torch.Tensor.size, torch.Tensor.dim,
             torch.Tensor.numel, torch.Tensor.is_floating_point, torch.Tensor.element_size, torch.Tensor.get_device}
# views of a parameter that a layer call may use as its weight (row slices are attributed to their rows)
_SLICING = {torch.Tensor.split, torch.Tensor.chunk, torch.Tensor.narrow, torch.Tensor.__getitem__, torch.split,
            torch.chunk, torch.narrow}


@dataclass(frozen=True)
class Plan:
    """Static structure of a model on inputs of one shape up to the batch size: tracked layers (in call
    order of their first use), every tracked call with the layout of its examples (:mod:`kfac_func.batching`)
    and its output's shape on the traced batch (the probe's, resized by :func:`~kfac_func.batching.batched_shape`),
    untracked parameters with the reason for each, and the model output's number of dims and layout."""

    layers: dict[str, LayerSpec]
    calls: tuple[LayerCall, ...]
    untracked: tuple[str, ...]
    probes: tuple[tuple[torch.Size, torch.dtype, torch.device], ...] = field(repr=False)
    reasons: dict[str, str] = field(default_factory=dict)
    output_dims: int = 2
    slicings: tuple[tuple[str, tuple[Rows, ...]], ...] = ()
    layouts: tuple[Layout, ...] = ()
    output_layout: Layout = Layout()

    def inputs_first(self, n: int, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Each call's recorded input on ``n`` examples, batch-first (:func:`~kfac_func.batching.batch_first`)."""
        return [batch_first(x, lay, n) for x, lay in zip(inputs, self.layouts)]

    def grads_first(self, n: int, grads: Sequence[Tensor | None], lead: int = 1) -> list[Tensor | None]:
        """Each call's output gradients (``lead`` leading vector dims) on ``n`` examples, batch-first."""
        return [g if g is None else batch_first(g, lay, n, lead, grad=True) for g, lay in zip(grads, self.layouts)]

    @property
    def tied(self) -> frozenset[str]:
        """The layers whose weight another layer uses too (the uses of a tied weight, one layer each)."""
        whole = collections.Counter(s.weight for s in self.layers.values() if s.rows is None)
        return frozenset(n for n, s in self.layers.items() if s.rows is None and whole[s.weight] > 1)

    @property
    def tracked(self) -> tuple[str, ...]:
        """Names of the parameters owned by tracked layers (each once)."""
        names = (n for s in self.layers.values() for n in (s.weight, s.bias) if n is not None)
        return tuple(dict.fromkeys(names))


class Capture(NamedTuple):
    """What one capture pass returns (tensors only, so it can leave a ``vmap``).

    * ``loss``: the loss as torch computes it;
    * ``grads``: ``∂loss/∂params`` for every parameter, a pytree shaped like ``params``;
    * ``a``: per layer, homogeneous inputs ``(N, B, S, d_a)``;
    * ``g``: per layer, scaled output gradients ``(V, N, B, S, d_g)`` of the curvature vectors, such that
      the exact curvature block is ``Σ_{v,n} vec(Σₛ g āᵀ) vec(Σₛ g āᵀ)ᵀ`` (a ``pooled`` layer's: ``â``
      and ``ĝ`` with ``S = 1``);
    * ``low_rank`` (with ``capture(..., low_rank=True)``): for each dense layer called once on ``(N, d)``
      inputs, ``(g, ā)`` ``(N, d_g)``, ``(N, d_a)`` — the true output gradients and homogeneous inputs of
      the whole batch — whose product ``gᵀā`` is that layer's gradient matrix ``[∇W, ∇b]`` (for
      :func:`kfac_func.precondition`, which then preconditions it in ``O(N)`` matmuls when ``N`` is small);
    * ``uses``: for each use of a tied weight (:attr:`Plan.tied`), that use's share of the gradient as its
      layer's weight matrix ``(B, d_g, d_a)`` (the shares add up to the weight's gradient).

    ``a`` and ``g`` are empty when ``fisher=None``. ``buffers``: a module's buffers after this forward
    (BatchNorm running statistics); the module itself is not changed, :class:`~kfac_func.KFAC` commits
    them with the step. Empty for a function model.
    """

    loss: Tensor
    grads: PyTree
    a: dict[str, Tensor]
    g: dict[str, Tensor]
    buffers: dict[str, Tensor] = {}
    low_rank: dict[str, tuple[Tensor, Tensor]] = {}
    uses: dict[str, Tensor] = {}


def require_curvature(cap: Capture) -> None:
    """Raise a clear error when a capture was taken with ``fisher=None`` (no ``a``, ``g``)."""
    if not cap.g:
        raise ValueError(
            "the capture has no curvature vectors: it was taken with fisher=None (call capture(..., "
            "fisher='mc'|'exact'|'empirical')) or the model has no supported layer (kfac_func.describe lists them)"
        )


def require_layers(plan: Plan) -> None:
    """Raise when ``plan`` has no tracked layer: K-FAC would have no curvature at all (plain gradient descent)."""
    if plan.layers:
        return
    supported = ", ".join(f.__name__ for f in (*_SIGNATURES, F.multi_head_attention_forward))
    params = "; ".join(f"{n!r}: {r}" for n, r in plan.reasons.items())
    raise ValueError(
        f"no supported layer found in the model, so K-FAC has no curvature to precondition with (its parameters: "
        f"{params}). Supported layers are the calls {supported} (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, the "
        "norm layers, nn.MultiheadAttention) whose weight is a parameter; optimise such a model with torch.optim.SGD"
    )


def as_function(model: Model) -> Callable[[PyTree, Any], Tensor]:
    """``f(params, inputs)``: the tensor the loss reads (:func:`kfac_func.calls.select`) of ``model`` on any
    parameter pytree whose path names are the model's; an ``nn.Module`` runs through ``functional_call`` on
    copies of its buffers, a pure function that never changes the module (see :func:`module_call`).
    ``inputs`` may be :class:`~kfac_func.calls.Args`."""
    io = model_io(model)
    if not (isinstance(io.model, nn.Module) or callable(io.model)):
        raise TypeError(f"model must be an nn.Module or a function f(params, x), got {type(io.model).__name__}")
    return lambda params, x: flat_call(io, *reversed(flatten(params)), x)[0]


def flat_call(model: Model, spec: Spec, flat: dict[str, Tensor], x: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """``(output the loss reads, buffers after the call)`` of ``model`` on the flat parameters ``flat`` of
    structure ``spec``: a module through :func:`module_call`, a function on ``spec.unflatten(flat)`` (no
    buffers)."""
    io = model_io(model)
    if isinstance(io.model, nn.Module):
        out, buffers = module_call(io.model, flat, x)
    else:
        out, buffers = call_with(io.model, spec.unflatten(flat), x), {}
    return select(out, io.output), buffers


def module_call(model: nn.Module, params: dict[str, Tensor], x: Any) -> tuple[Any, dict[str, Tensor]]:
    """``(output, buffers after the call)``: the module runs on ``x`` (one argument, or
    :class:`~kfac_func.calls.Args`) with ``params`` and fresh copies of its buffers (made inside any enclosing
    transform, so that BatchNorm may update its running statistics under ``vjp``/``jvp``); the module's own
    buffers are left as they are."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    args, kwargs = positional(x)
    return functional_call(model, {**params, **buffers}, args, kwargs), buffers


def _bind(func: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    if func in _MATMULS:
        scalars = {"beta": 1, "alpha": 1}  # addmm's; also set for the products that have none
        bound = {**scalars, **bind_arguments(_MATMULS[func], scalars, args, kwargs)}
        return {**bound, "weight": bound.get("weight", bound.get("other", bound.get("mat2")))}
    return bind_arguments(_SIGNATURES[func], _DEFAULTS, args, kwargs)


def _dense_product(bound: dict[str, Any]) -> bool:
    """Whether a matrix product is a dense layer ``x @ W (+ b)``: ``x`` floating with at least 2 dims, ``W``
    2-D, ``addmm``'s ``beta`` and ``alpha`` 1."""
    x, w = bound["input"], bound["weight"]
    return (isinstance(x, Tensor) and isinstance(w, Tensor) and x.dim() >= 2 and w.dim() == 2
            and x.is_floating_point() and bound["beta"] == 1 and bound["alpha"] == 1)


def _layer_name(weight: str, rows: Rows) -> str:
    base = weight.removesuffix(".weight").removesuffix("_weight").removesuffix(".w")
    return base if rows is None else f"{base}[{rows[0]}:{rows[1]}]"


def _use(func: Callable, owner: tuple[str, Any]) -> str:
    """How a call uses its weight: ``"matmul"`` (``x @ W``, ``W`` stored ``(in, out)``), ``"linear"``
    (``F.linear``, or ``x @ W.T``) or the layer function's name."""
    if func in _MATMULS:
        return "linear" if owner[1] == T else "matmul"
    return func.__name__


def _transposes(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether the call transposes a 2-D tensor (``W.T``, ``W.mT``, ``W.t()``, ``W.transpose(0, 1)``,
    ``W.permute(1, 0)``): a dense weight stored ``(out, in)`` applied as ``x @ W.T``."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or x.dim() != 2:
        return False
    if getattr(func, "__name__", "") == "__get__":
        return getattr(func, "__self__", None) in (torch.Tensor.T, torch.Tensor.mT)
    if func in (torch.Tensor.t, torch.t):
        return True
    rest = list(args[1:]) + list(kwargs.values())[int(not args):]
    if func in (torch.Tensor.transpose, torch.transpose):
        return len(rest) == 2 and {int(d) % 2 for d in rest} == {0, 1}
    if func in (torch.Tensor.permute, torch.permute):
        dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
        return tuple(int(d) % 2 for d in dims) == (1, 0)
    return False


def _make_call(func: Callable, layer: str, bound: dict[str, Any]) -> LayerCall:
    weight = bound["weight"]
    if func is F.linear:
        return LayerCall(layer, LINEAR)
    if func in _MATMULS:  # x @ W with W (in, out); x @ W.T is F.linear
        return LayerCall(layer, LINEAR, transposed=bound["transposed"])
    if func is F.embedding:
        pad = bound["padding_idx"]
        return LayerCall(layer, EMBEDDING, padding_idx=None if pad is None else pad % weight.shape[0], vocab=weight.shape[0])
    if func is F.layer_norm:
        k = len(tuple(bound["normalized_shape"]))
        return LayerCall(layer, "layer_norm", param_dims=tuple(range(-k, 0)))
    if func in (F.group_norm, F.batch_norm):
        return LayerCall(layer, func.__name__, param_dims=(1,))
    return conv_call(layer, weight.shape[2:], bound["stride"], bound["padding"], bound["dilation"], bound["groups"])


def _evaluate(func: Callable, args: tuple, kwargs: dict, bound: dict[str, Any], call: LayerCall) -> tuple[Tensor, Tensor]:
    """``(recorded input, output)`` of a tracked call. Norm layers are split into the normalisation
    ``x̂`` (recorded) and the affine map ``x̂ γ + β``."""
    if call.kind not in NORMS:
        x = bound["input"]
        return (x.to_dense() if x.is_sparse else x), func(*args, **kwargs)
    x, weight, bias = bound["input"], bound["weight"], bound["bias"]
    if func is F.layer_norm:
        xhat = F.layer_norm(x, bound["normalized_shape"], None, None, bound["eps"])
        shape = weight.shape
    else:
        if func is F.group_norm:
            xhat = F.group_norm(x, bound["num_groups"], None, None, bound["eps"])
        else:
            xhat = F.batch_norm(x, bound["running_mean"], bound["running_var"], None, None, bound["training"],
                                bound["momentum"], bound["eps"])
        shape = (-1,) + (1,) * (x.dim() - 2)
    out = xhat * weight.reshape(shape)
    return xhat, (out + bias.reshape(shape) if bias is not None else out)


def _row_slice(base: Tensor, t: Tensor) -> Rows | str:
    """The rows of ``base`` that the view ``t`` is, or ``"other"`` when ``t`` is some other view."""
    same_rows = t.dim() == base.dim() > 0 and t.shape[1:] == base.shape[1:] and t.stride() == base.stride()
    if _storage(t) is None or not same_rows:
        return "other"
    offset = t.storage_offset() - base.storage_offset()
    if offset % base.stride(0):
        return "other"
    start = offset // base.stride(0)
    return (start, start + t.shape[0])


def _storage(t: Tensor) -> int | None:
    """The address of ``t``'s storage (``None`` where there is none to read, e.g. under ``vmap``)."""
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


class _LayerMode(TorchFunctionMode):
    """Dispatches tracked layer calls (weight a parameter, or a row slice of one) to :meth:`layer` and
    everything else to :meth:`other`; ``F.multi_head_attention_forward`` runs batch-first
    (:mod:`kfac_func.attention`) with this mode active, so that its projections are seen. The trace
    recognises views by their storage; the capture, where views under ``torch.func`` transforms cannot
    be inspected, by the slicing calls the trace saw, in the same order."""

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        # tensors are matched by identity (`is`, not `id()`): torch.compile then traces the capture
        # without guarding on the parameters' object ids, which change every step
        self.known = list(params.items())
        self.views: list[tuple[Tensor, tuple[str, Rows | str]]] = []  # capture: slices in traced order

    def name_of(self, t: Any) -> str | None:
        """The parameter ``t`` is, if any."""
        return next((n for n, p in self.known if t is p), None)

    def owner(self, t: Any) -> tuple[str, Rows | str] | None:
        """``(parameter name, rows)`` when ``t`` is a parameter (``rows=None``) or a known view of one."""
        if not isinstance(t, Tensor):
            return None
        name = self.name_of(t)
        if name is not None:
            return name, None
        return next((o for v, o in self.views if t is v), None)

    def slices(self, func, args) -> bool:
        """Whether this call slices a parameter directly (``w.chunk(3)``, ``w[:8]``, ...)."""
        return func in _SLICING and bool(args) and self.name_of(args[0]) is not None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            bound = attention.bind(args, kwargs)
            reason = attention.unsupported(bound)
            self.attention(bound)
            if reason is None:
                with self:
                    return attention.multi_head_attention(*args, **kwargs)
            return self.other(func, args, kwargs, reason)
        if func in _SIGNATURES or func in _MATMULS:
            bound = _bind(func, args, kwargs)
            owner = self.owner(bound["weight"]) if func in _SIGNATURES or _dense_product(bound) else None
            if owner is not None and func in _MATMULS:
                bound["transposed"] = owner[1] is None
            if owner is not None and (owner[1] is None or (func is F.linear and owner[1] not in ("other", T))
                                      or (func in _MATMULS and owner[1] == T)):
                return self.layer(func, args, kwargs, bound, (owner[0], None if owner[1] == T else owner[1]),
                                  _use(func, owner))
        return self.other(func, args, kwargs, None)

    def layer(self, func, args, kwargs, bound, owner, use):  # pragma: no cover - abstract
        raise NotImplementedError

    def transposed(self, func, args, kwargs, out) -> bool:
        """Remember ``out`` as a parameter's transposed view (:func:`_transposes`); whether it is one."""
        name = self.name_of(args[0]) if args else None
        if name is None or not _transposes(func, args, kwargs):
            return False
        self.views.append((out, (name, T)))
        return True

    def attention(self, bound: dict[str, Any]) -> None:
        """Sees each ``F.multi_head_attention_forward`` call's arguments (the trace checks its batch dim)."""

    def other(self, func, args, kwargs, reason):
        return func(*args, **kwargs)


class _TraceMode(_LayerMode):
    """Records tracked calls, and every other use of a parameter with the reason it cannot be tracked."""

    def __init__(self, params: dict[str, Tensor], expand: dict[int, tuple[int, ...]] | None = None):
        super().__init__(params)
        self.params = params
        self.storages = {ptr: n for n, p in params.items() if (ptr := _storage(p)) is not None}
        self.calls: list[tuple[LayerCall, str, str | None, Rows]] = []
        self.probes: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self.seen: list[Tensor] = []  # each call's input (its output's shape is in the probes)
        self.queries: list[Tensor] = []  # each F.multi_head_attention_forward call's query
        self.expand = expand or {}  # call index → the shape its (broadcast) output is given
        self.uses: dict[tuple[str, Rows | str], str] = {}  # each weight's first use (the others are tied layers)
        self.other_uses: dict[str, str] = {}
        self.slicings: list[tuple[str, tuple[Rows, ...]]] = []

    def attention(self, bound: dict[str, Any]) -> None:
        self.queries.append(bound["query"])

    def owner(self, t: Any) -> tuple[str, Rows | str] | None:
        """Also any view of a parameter, found by its storage."""
        found = super().owner(t)
        if found is not None or not isinstance(t, Tensor):
            return found
        name = self.storages.get(_storage(t))
        return None if name is None else (name, _row_slice(self.params[name], t))

    def used(self, name: str, reason: str) -> None:
        self.other_uses.setdefault(name, reason)

    def layer(self, func, args, kwargs, bound, owner, use):
        weight_name, rows = owner
        layer = _layer_name(weight_name, rows)
        if self.uses.setdefault(owner, use) != use:  # a tied weight (a token embedding shared with the LM head)
            layer = f"{layer}:{use}"
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        call = _make_call(func, layer, bound)
        for leaf in optree.tree_leaves((args, kwargs), none_is_leaf=True):
            seen = self.owner(leaf)
            if seen is not None and leaf is not weight and leaf is not bias:
                self.used(seen[0], f"passed to {call.kind} layer {layer!r} as something other than its weight or bias")
        if func is F.embedding:
            for option in ("max_norm", "scale_grad_by_freq", "sparse"):
                if bound[option]:
                    self.used(weight_name, f"embedding with {option} is not supported")
        elif x.is_floating_point() and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"layer {layer!r}: input dtype {x.dtype} does not match weight dtype {weight.dtype}")
        try:
            recorded, out = _evaluate(func, args, kwargs, bound, call)
        except RuntimeError as err:
            raise ValueError(
                f"layer {layer!r} ({call.kind}, weight {tuple(weight.shape)}) cannot take input of shape "
                f"{tuple(x.shape)}: {err}"
            ) from err
        bias_owner = self.owner(bias)
        if bias is not None and (bias_owner is None or bias_owner[1] != rows):
            if bias_owner is not None:
                self.used(bias_owner[0], f"bias of {layer!r} does not match the rows of its weight")
            bias_owner = None
        k = len(self.calls)
        self.calls.append((call, weight_name, bias_owner and bias_owner[0], rows))
        self.probes.append((out.shape, out.dtype, out.device))
        self.seen.append(x)
        return out.expand(self.expand[k]) if k in self.expand else out

    def other(self, func, args, kwargs, reason):
        if getattr(func, "__name__", "") == "__get__":  # attribute reads: metadata is no use; views are followed
            out = func(*args, **kwargs)
            if not isinstance(out, Tensor):
                return out
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:
            args, kwargs = args[:4], {**kwargs, **dict(zip(_SDPA_OPTIONS, args[4:])), "dropout_p": 0.0}
        if func in _METADATA and args and self.owner(args[0]) is not None:  # reads only its dtype, device or shape
            return func(*args, **kwargs)
        if args and self.name_of(args[0]) is not None and _transposes(func, args, kwargs):  # followed to its use
            out = func(*args, **kwargs)
            self.transposed(func, args, kwargs, out)
            return out
        slicing = self.slices(func, args)
        for leaf in optree.tree_leaves((args, kwargs), none_is_leaf=True):
            seen = self.owner(leaf)
            if seen is None or (slicing and leaf is args[0]):
                continue
            self.used(seen[0], reason or f"used outside a tracked layer call (by {getattr(func, '__name__', func)})")
        out = func(*args, **kwargs)
        if slicing:  # a slice must be a view; an indexed copy is a use we cannot follow
            name, views = self.name_of(args[0]), optree.tree_leaves(out)
            if any(not isinstance(t, Tensor) or _row_slice(args[0], t) == "other" for t in views):
                self.used(name, f"sliced by {getattr(func, '__name__', func)} into something other than rows")
            else:
                self.slicings.append((name, tuple(_row_slice(args[0], t) for t in views)))
        return out


_PLANS: "weakref.WeakKeyDictionary[Any, dict[tuple, Plan]]" = weakref.WeakKeyDictionary()


def _signature(params: dict[str, Tensor], inputs: Any, io: ModelIO) -> tuple:
    """The cache key of a plan: everything but the inputs' batch dims, so that a new batch size reuses the
    plan (and a compiled step finds it without tracing the model again)."""
    leaves = optree.tree_leaves(inputs, none_is_leaf=True)
    dims = batch_leaves(inputs, io.batch_dims)
    shapes = tuple((tuple(s for i, s in enumerate(t.shape) if i != d), t.dtype, t.device)
                   if isinstance(t, Tensor) else repr(t) for t, d in zip(leaves, dims))
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    reading = () if io.output is None and io.batch_dims == 0 else (io.output, repr(io.batch_dims))
    return shapes, tuple((n, tuple(p.shape), p.dtype) for n, p in params.items()), autocast, reading


def trace(model: Model, params: PyTree, inputs: Any, *, output: Any = None, batch_dims: Any = 0) -> Plan:
    """Run ``model`` (no grad, on copies of its buffers) to find its tracked layers and where each layer's
    input holds the examples (on the batch and on the batch doubled: :mod:`kfac_func.batching`); cached per
    model and input signature. ``output`` and ``batch_dims``: see :mod:`kfac_func.calls`."""
    return _trace(model_io(model, output, batch_dims), *flatten(params), inputs)


def _run(io: ModelIO, params: dict[str, Tensor], spec: Spec, inputs: Any,
         expand: dict[int, tuple[int, ...]] | None = None) -> tuple[_TraceMode, Tensor]:
    mode = _TraceMode(params, expand)
    with torch.no_grad(), mode:
        out = flat_call(io, spec, params, inputs)[0]
    return mode, out


def _trace(io: ModelIO, params: dict[str, Tensor], spec: Spec, inputs: Any) -> Plan:
    key = _signature(params, inputs, io)
    try:
        cache = _PLANS.setdefault(io.model, {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    if key in cache:
        return cache[key]
    with torch.random.fork_rng(devices=[]):  # the model's random ops leave the caller's RNG as it was
        return cache.setdefault(key, _traced(io, params, spec, inputs))


def _traced(io: ModelIO, params: dict[str, Tensor], spec: Spec, inputs: Any) -> Plan:
    n = batch_size(inputs, io.batch_dims)
    first, out = _run(io, params, spec, inputs)
    if io.batch_dims is None:  # one example: every call's rows are its positions
        layouts = [_layout(call, WHOLE) for call, *_ in first.calls]
        return dataclasses.replace(_make_plan(params, first, out.dim(), layouts), output_layout=WHOLE)
    try:
        second, out2 = _run(io, params, spec, doubled(inputs, io.batch_dims))
    except Exception as err:
        raise ValueError(
            f"kfac_func finds which dim of each layer's input holds the examples by running the model once more on "
            f"the batch concatenated with itself along batch_dims={io.batch_dims!r} ({2 * n} examples); that call "
            f"failed ({type(err).__name__}: {err}). Pass batch_dims= with the examples' dim of each input (None for "
            "an input shared by all examples, e.g. a mask)"
        ) from err
    if [c[0] for c in first.calls] != [c[0] for c in second.calls]:
        raise ValueError(f"the model's tracked layer calls differ between a batch of {n} and of {2 * n} examples; "
                         "kfac_func needs the same layer calls for every batch size")
    output_layout = infer(out, out2, n, out.shape)
    if isinstance(output_layout, str) or output_layout.dim is None:
        raise ValueError(f"the model output (shape {tuple(out.shape)}) {output_layout if isinstance(output_layout, str) else 'does not depend on the batch'}: "
                         "kfac_func needs an output whose rows are the examples' (check batch_dims)")
    for q1, q2 in zip(first.queries, second.queries):  # F.multi_head_attention_forward's query is (L, N, E)
        lay = infer(q1, q2, n, q1.shape)
        if isinstance(lay, Layout) and lay.dim not in (1, None):
            raise ValueError(
                f"nn.MultiheadAttention takes dim 1 of its (L, N, E) input as the batch (batch_first=False), but the "
                f"examples of batch_dims={io.batch_dims!r} are at dim {lay.dim} there: for a sequence-first model "
                "pass batch_dims=1 (the (T, N) inputs' batch dim), or build it with batch_first=True"
            )
    if not traced(out) and not _independent(out, out2, output_layout, n) \
            and torch.equal(out, _run(io, params, spec, inputs)[1]):
        # (only a deterministic model is judged, its values read on the host: not under vmap or compilation)
        raise ValueError(
            f"the model's output on the batch concatenated with itself along batch_dims={io.batch_dims!r} is not its "
            "output on the batch twice, so the examples of that dim interact: it is not the examples' dim. A "
            "sequence-first model needs batch_dims=1 (the dim of its (T, N) inputs that holds the examples); a "
            "model whose examples interact by design (a graph's nodes) is one example: batch_dims=None"
        )
    layouts = [_layout(call, infer(x1, x2, n, probe[0])) for (call, *_), x1, x2, probe in
               zip(first.calls, first.seen, second.seen, first.probes)]
    broadcast = {k: batched_shape(first.probes[k][0], lay, n) for k, lay in enumerate(layouts)
                 if isinstance(lay, Layout) and lay.shared}
    if broadcast:  # the batch must pass through such an output as broadcasting passes it
        try:
            ok = _run(io, params, spec, inputs, broadcast)[1].shape == out.shape
        except Exception:
            ok = False
        if not ok:
            for k in broadcast:
                layouts[k] = ("its input has no batch dim (it is shared by all examples) and its output does not "
                              "broadcast against the batch as x + f(...) does, so the examples' gradients cannot be "
                              "told apart")
    return dataclasses.replace(_make_plan(params, first, out.dim(), layouts), output_layout=output_layout)


def _independent(out: Tensor, doubled_out: Tensor, layout: Layout, n: int) -> bool:
    """Whether the output on the doubled batch is the output on the batch, twice: examples that do not interact
    (BatchNorm's statistics of a duplicated batch are the batch's). Positions taken for examples interact wherever
    the model mixes positions (attention, recurrence): the second copy sees the first."""
    once, twice = batch_first(out, layout, n), batch_first(doubled_out, layout, 2 * n)
    halves = (twice[:n], twice[n:])  # each compared alone: no copy of the doubled output is made
    if not (once.is_floating_point() and twice.is_floating_point()):
        return all(torch.equal(half, once) for half in halves)
    tol = max(1e-4, 16 * torch.finfo(once.dtype).eps)  # a bigger batch may round differently
    scale = float(once.abs().max()) if once.numel() else 1.0
    return all(bool(torch.allclose(half, once, rtol=tol, atol=tol * scale, equal_nan=True)) for half in halves)


def _layout(call: LayerCall, lay: Layout | str) -> Layout | str:
    """``lay``, or why a call of this kind cannot take it."""
    if isinstance(lay, str) or lay.plain or call.kind in (LINEAR, EMBEDDING):
        return lay
    if call.kind == "layer_norm" and not lay.shared:
        return lay
    return f"a {call.kind} layer needs its input's dim 0 to hold the examples, one row each (found {lay})"


def _tied(specs: list[LayerSpec]) -> bool:
    """Whether the layers of ``specs``, which share their weight, are the uses of a tied weight: one layer per
    use of the whole parameter."""
    return len(specs) > 1 and all(s.rows is None for s in specs) and len({s.use for s in specs}) == len(specs)


def _make_plan(params: dict[str, Tensor], mode: _TraceMode, output_dims: int, layouts: list[Layout | str]) -> Plan:
    reasons = dict(mode.other_uses)
    specs: dict[str, LayerSpec] = {}
    roles: dict[str, set[tuple[str, str]]] = {}
    for (call, weight, bias, rows), lay in zip(mode.calls, layouts):
        if isinstance(lay, str):
            for n in (weight, bias):
                if n is not None:
                    reasons.setdefault(n, f"layer {call.layer!r}: {lay}")
        spec = LayerSpec(call.layer, call.kind, weight, bias, call.groups, rows, call.transposed)
        first = specs.setdefault(call.layer, spec)
        if first != spec:
            for n in (weight, bias, first.bias):
                if n is not None:
                    reasons.setdefault(n, f"used by calls of {call.layer!r} with different structures")
        roles.setdefault(weight, set()).add((call.layer, "weight"))
        if bias is not None:
            roles.setdefault(bias, set()).add((call.layer, "bias"))
    for name, r in roles.items():
        kinds = {role for _, role in r}
        if kinds == {"weight"} and _tied([specs[layer] for layer, _ in r]):
            continue
        rows = sorted(specs[layer].rows or (0, params[name].shape[0]) for layer, _ in r)
        overlap = any(a[1] > b[0] for a, b in zip(rows, rows[1:]))
        if len(kinds) > 1 or overlap:
            reasons.setdefault(name, "shared by several layers or roles: " + ", ".join(sorted(f"{l} ({k})" for l, k in r)))
    layers = {}
    for name, s in specs.items():
        bad = [n for n in (s.weight, s.bias) if n is not None and n in reasons]
        if not bad:
            layers[name] = s
            continue
        for n in (s.weight, s.bias):
            if n is not None:
                reasons.setdefault(n, f"belongs to layer {name!r}, whose {bad[0]!r} is untracked")
    keep = [i for i, (call, *_) in enumerate(mode.calls) if call.layer in layers]
    owned = {n for s in layers.values() for n in (s.weight, s.bias) if n is not None}
    untracked = tuple(n for n in params if n not in owned)
    return Plan(
        layers=layers,
        calls=tuple(mode.calls[i][0] for i in keep),
        untracked=untracked,
        probes=tuple(mode.probes[i] for i in keep),
        layouts=tuple(layouts[i] for i in keep),
        reasons={n: reasons.get(n, NOT_USED) for n in untracked},
        output_dims=output_dims,
        slicings=tuple(s for s in mode.slicings if s[0] in owned),
    )


class _CaptureMode(_LayerMode):
    """Records tracked-call inputs and adds the probes to their outputs."""

    def __init__(self, plan: Plan, params: dict[str, Tensor], probes: tuple[Tensor, ...]):
        super().__init__(params)
        self.plan, self.probes = plan, probes
        self.layer_of = {(s.weight, s.rows, s.use): name for name, s in plan.layers.items()}
        self.inputs: list[Tensor] = []
        self.slicing = 0

    def other(self, func, args, kwargs, reason):
        out = func(*args, **kwargs)
        if self.transposed(func, args, kwargs, out):
            return out
        if self.slices(func, args):  # under torch.func transforms views cannot be inspected: the trace's rows
            name, rows = self.plan.slicings[self.slicing]
            self.slicing += 1
            self.views.extend((t, (name, r)) for t, r in zip(optree.tree_leaves(out), rows))
        return out

    def layer(self, func, args, kwargs, bound, owner, use):
        layer = self.layer_of.get((*owner, use))
        if layer is None:
            return func(*args, **kwargs)
        k = len(self.inputs)
        call = self.plan.calls[k] if k < len(self.plan.calls) else None
        if call is None or call.layer != layer:
            raise RuntimeError(
                f"layer {layer!r} was called out of the traced order (call {k}); the model's layer "
                "calls must not depend on the data"
            )
        recorded, out = _evaluate(func, args, kwargs, bound, call)
        self.inputs.append(recorded)
        return self.recorded(k, out)

    def recorded(self, k: int, out: Tensor) -> Tensor:
        """The output of tracked call ``k``, with its probe added (the vjp with respect to it is ``g``)."""
        return out + self.probes[k]


@phase("forward/backward")
def capture(
    model: Model,
    params: PyTree,
    inputs: Any,
    targets: Tensor,
    loss: Loss | str,
    *,
    fisher: str | None = "mc",
    mc_samples: int = 1,
    key: Tensor | None = None,
    stats_examples: int | None = None,
    plan: Plan | None = None,
    low_rank: bool = False,
    compact: Mapping[str, bool] | None = None,
    output: Any = None,
    batch_dims: Any = 0,
) -> Capture:
    """Loss, gradients and per-layer ``(a, g)`` from one forward and the backwards of its cotangents.

    ``model`` is an ``nn.Module`` (run through ``functional_call``) or ``f(params, inputs)``, ``params``
    any pytree of tensors; ``fisher`` is ``"mc"`` (``mc_samples`` targets drawn with the random ``key``
    tensor), ``"exact"``, ``"empirical"`` or ``None`` (gradients only). ``stats_examples``: keep
    ``(a, g)`` of the first rows only, a cheaper estimate of the same curvature (``g`` is rescaled by
    ``√(N/m)``); gradients always use the whole batch. ``plan``: the model's :func:`trace` on these
    parameters, when already at hand. ``low_rank``: also return :attr:`Capture.low_rank`. ``compact``: the layers
    whose ``(a, g)`` only the Kronecker factors read, each mapped to its convention (``True``: reduce), captured
    in the cheapest form those factors need (:func:`layer_statistics`) — not for consumers of the per-position
    statistics (E-KFAC's scaling, the two-level coarse matrix, the Fisher quadratic forms).
    ``inputs`` may be :class:`~kfac_func.calls.Args` (several arguments); ``output`` picks the tensor the loss
    reads and ``batch_dims`` says where the inputs' examples are (:mod:`kfac_func.calls`). Pure: no input is
    modified.
    """
    loss = as_loss(loss)
    model = model_io(model, output, batch_dims)
    params, structure = flatten(params)
    if plan is None:
        plan = _trace(model, params, structure, inputs)
    else:
        require_names({*plan.tracked, *plan.untracked}, structure.names, "the plan")
    tracked = {n: params[n] for n in plan.tracked}
    free = {n: params[n] for n in plan.untracked}
    n = batch_size(inputs, model.batch_dims)  # the examples (each layer's are found by the trace)
    probes = tuple(torch.zeros((), dtype=dtype, device=device).expand(batched_shape(shape, lay, n))
                   for (shape, dtype, device), lay in zip(plan.probes, plan.layouts))

    def forward(free: dict[str, Tensor], probes: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        merged = {n: tracked[n] if n in tracked else free[n] for n in params}
        mode = _CaptureMode(plan, tracked, probes)
        with mode:
            out, buffers = flat_call(model, structure, merged, inputs)
        if len(mode.inputs) != len(plan.calls):
            hint = ("; under torch.compile a weight transposed by the .T property is not seen (its attribute read does "
                    "not reach the layer mode): write W.t() or F.linear(x, W)") if torch.compiler.is_compiling() else ""
            raise RuntimeError(f"the model made {len(mode.inputs)} tracked layer calls, traced {len(plan.calls)}{hint}")
        return out, (tuple(mode.inputs), buffers)

    out, vjp_fn, (inputs_seen, buffers) = vjp(forward, free, probes, has_aux=True)
    # the loss on the output with its examples first (the exact Fisher's columns then never couple two rows of
    # one example), its cotangents back in the output's layout
    value, true_ct, curv_ct, scale = cotangents(*batch_first_loss(loss, out, targets, plan.output_layout, n), fisher,
                                                mc_samples, key)
    true_ct = unbatch_first(true_ct, plan.output_layout)
    curv_ct = None if curv_ct is None else unbatch_first(curv_ct, plan.output_layout, 1)
    if curv_ct is None or fisher == "empirical":
        free_grads, probe_grads = vjp_fn(true_ct)
        probe_grads = tuple((p, None) for p in probe_grads)  # per call: (true, curvature vectors)
    else:
        if 1 + len(curv_ct) <= LOOP_COTANGENTS:  # a loop of backwards: no batching-rule copies (conv, pooling)
            outs = [vjp_fn(c) for c in (true_ct, *curv_ct)]
            free_grads = outs[0][0]
            # per call (true, curvature (V, ...)): one vector is a view, several are stacked
            stack = lambda ps: ps[0].unsqueeze(0) if len(ps) == 1 else torch.stack(ps)  # noqa: E731
            probe_grads = tuple((ps[0], stack(ps[1:])) for ps in zip(*(o[1] for o in outs)))
            outs = None  # the backward's raw outputs: only the flushed copies below are kept
        else:
            free_grads, probe_grads = vmap(vjp_fn)(torch.cat([true_ct.unsqueeze(0), curv_ct]))
            free_grads = optree.tree_map(lambda t: t[0], free_grads)
            probe_grads = tuple((p[0], p[1:]) for p in probe_grads)
    # the forward's saved activations and the output's cotangents are done with: freed before the copies below
    vjp_fn = out = true_ct = curv_ct = None
    # products of small normal numbers in the backward can underflow: no subnormals into the matmuls; flushed a
    # tensor at a time, each raw one dropped as its copy is made (a vocabulary-wide output's are 206 MB each)
    free_grads = flush_tree(free_grads)
    probe_grads = list(probe_grads)
    for i in range(len(probe_grads)):
        true_g, curv_g = probe_grads[i]
        probe_grads[i] = None
        true_g = flush(true_g)
        curv_g = None if curv_g is None else flush(curv_g)
        probe_grads[i], true_g, curv_g = (true_g, curv_g), None, None  # no local keeps the last pair past the loop
    # every call's input and output gradients batch-first, examples at dim 0
    inputs_seen = plan.inputs_first(n, inputs_seen)
    probe_grads = tuple(zip(plan.grads_first(n, [t for t, _ in probe_grads], lead=0),
                            plan.grads_first(n, [c for _, c in probe_grads])))

    grads = dict(free_grads)
    calls = collections.Counter(call.layer for call in plan.calls)
    factored: dict[str, tuple[Tensor, Tensor]] = {}
    patches: list[Tensor | None] = []  # a dense layer's homogeneous inputs of the whole batch, when built here
    tied, uses = plan.tied, {}
    for call, x, (true_g, _) in zip(plan.calls, inputs_seen, probe_grads):
        spec = plan.layers[call.layer]
        has_bias = spec.bias is not None
        whole = None  # (N, 1, 1, d_a)
        if low_rank and call.kind == LINEAR and spec.rows is None and calls[call.layer] == 1 and x.dim() == 2:
            whole = input_patches(call, x, has_bias, params[spec.weight].dtype)
            factored[call.layer] = (output_grads(call, true_g.unsqueeze(0), x, has_bias).reshape(x.shape[0], -1),
                                    whole.reshape(x.shape[0], -1))
        patches.append(whole)
        call_grads = parameter_grads(call, x, true_g, params[spec.weight], has_bias)
        if call.layer in tied:
            share = weight_matrix(spec, *call_grads)
            uses[call.layer] = uses[call.layer] + share if call.layer in uses else share
        for name, grad in zip((spec.weight, spec.bias), call_grads):
            if name is None:
                continue
            if spec.rows is not None:  # a row slice: its rows of the whole parameter
                grad = params[name].new_zeros(params[name].shape).slice_scatter(grad, 0, *spec.rows)
            grads[name] = grads[name] + grad if name in grads else grad
    for name in grads:  # sums of tiny gradients can cancel into subnormals; one parameter's copy at a time
        grads[name] = flush(grads[name])
    if fisher is None:
        return Capture(value, structure.unflatten(grads), {}, {}, buffers, factored, uses)
    # the curvature vectors' output gradients (the empirical Fisher's: the true one rescaled by 1/√R)
    curvature = [true_g.unsqueeze(0) / scale**0.5 if fisher == "empirical" else curv_g for true_g, curv_g in probe_grads]
    a, g = layer_statistics(plan, params, inputs_seen, curvature, stats_examples, patches, compact)
    return Capture(value, structure.unflatten(grads), a, g, buffers, factored, uses)


def layer_statistics(plan: Plan, params: dict[str, Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor],
                     examples: int | None = None, patches: Sequence[Tensor | None] | None = None,
                     compact: Mapping[str, bool] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per layer ``(a, g)`` of :class:`Capture` from each tracked call's recorded input and the output
    gradients ``(V, N, *out)`` of the curvature vectors. ``examples``: keep the first rows only, with ``g``
    rescaled by ``√(N/m)`` so that factors from ``m`` rows estimate the full-batch curvature. ``patches``:
    per call, the whole batch's homogeneous inputs when already built (``None`` where not). ``compact``: layers
    whose statistics only the Kronecker factors read, mapped to their convention, in the form those need:

    * reduce (``True``): pooled over positions, ``a`` the mean ``â`` over all positions of all calls,
      ``(N, B, 1, d_a)`` (an embedding's: its token counts over ``S``), ``g`` the sum ``ĝ``, ``(V, N, B, 1, d_g)``;
    * expand (``False``) for an embedding, whose ``A`` is diagonal: ``a`` the square root of each example's token
      counts, ``(N, 1, 1, vocab)`` (its Gram's diagonal is the one-hot rows'), ``g`` per position as usual."""
    a: dict[str, list[Tensor]] = {name: [] for name in plan.layers}
    g: dict[str, list[Tensor]] = {name: [] for name in plan.layers}
    positions: dict[str, list[int]] = {name: [] for name in plan.layers}
    compact = compact or {}
    pooled = {name for name, reduce in compact.items() if reduce}
    for k, (call, x, gs) in enumerate(zip(plan.calls, inputs, grads)):
        spec = plan.layers[call.layer]
        has_bias = spec.bias is not None
        n = x.shape[0]
        m = n if examples is None else min(examples, n)
        whole = patches[k] if patches is not None and m == n else None
        gs = output_grads(call, gs[:, :m] * (n / m) ** 0.5 if m != n else gs[:, :m], x[:m], has_bias)
        dtype = params[spec.weight].dtype
        if call.layer in pooled:
            positions[call.layer].append(gs.shape[3])
            # a dense layer's whole-batch inputs have one position: their mean
            a[call.layer].append(whole if whole is not None else input_patch_means(call, x[:m], has_bias, dtype))
            g[call.layer].append(gs.sum(3, keepdim=True))
        elif call.kind == EMBEDDING and call.layer in compact:
            a[call.layer].append(token_counts(call, x[:m], dtype).sqrt())
            g[call.layer].append(gs)
        else:
            a[call.layer].append(whole if whole is not None else input_patches(call, x[:m], has_bias, dtype))
            g[call.layer].append(gs)
    out_a, out_g = {}, {}
    for name in plan.layers:
        if name in pooled and len(a[name]) > 1:  # the calls' means weighted by their positions; their sums add
            total = sum(positions[name])
            out_a[name] = sum(part * (s / total) for part, s in zip(a[name], positions[name]))
            out_g[name] = sum(g[name][1:], g[name][0])
        else:
            out_a[name] = torch.cat(a[name], 2) if len(a[name]) > 1 else a[name][0]
            out_g[name] = torch.cat(g[name], 3) if len(g[name]) > 1 else g[name][0]
    return out_a, out_g
