r"""Per-layer-kind rules: how a layer's inputs and output gradients become K-FAC quantities.

Every tracked layer is brought into one canonical form so that everything downstream (factors,
per-example gradients, preconditioning) is written once:

* ``a``: ``(N, B, S, d_a)`` — the homogeneous inputs ``ā = [a; 1]`` (the ones column only when the
  layer has a bias), ``B`` independent blocks (the groups of a grouped convolution, 1 otherwise) and
  ``S`` positions per example (conv output pixels, sequence positions, repeated calls of a shared
  weight);
* ``g``: ``(V, N, B, S, d_g)`` — output gradients for ``V`` curvature vectors;
* the weight matrix ``W̄ = [W, b]`` as ``(B, d_g, d_a)``, row-major like PyTorch, so that ``vec(W̄)``
  carries the Kronecker order ``G ⊗ A``.

The kinds:

* ``linear`` (``F.linear``; every dim between the first and the last is a position); also a 2-D parameter
  applied as ``x @ W`` / ``torch.matmul`` / ``torch.mm`` or ``torch.addmm(b, x, W)`` — Hugging Face's
  ``Conv1D`` — whose weight is stored ``(in, out)`` (*transposed*: ``W̄ = [Wᵀ, b]``);
* ``conv1d``/``conv2d``/``conv3d`` (patches honour stride, padding, dilation and groups);
* ``embedding`` (``F.embedding``): a linear layer on one-hot inputs, ``W̄ = weightᵀ`` (``d_a`` = the
  vocabulary); ``a`` is the one-hot matrix (zero for ``padding_idx``), whose factor ``A`` is diagonal
  (token frequencies) and is kept as a vector;
* ``layer_norm``/``group_norm``/``batch_norm``: the affine scale ``γ`` and shift ``β`` acting on the
  normalised input ``x̂``. Their per-example gradient ``ψ = [Σ g ⊙ x̂; Σ g]`` is formed at capture
  (``d_g = |γ| + |β|``) with ``a = 1`` (``d_a = 1``), so that ``G ⊗ A = G = Σ ψψᵀ`` is the exact, full
  curvature block of the norm's parameters.

A weight may be a row slice of a parameter (a packed projection split before use, as in
``nn.MultiheadAttention``): the layer then owns those rows (:attr:`LayerSpec.rows`).
Statistics are computed in at least float32 (bfloat16/float16 activations are upcast); parameter
gradients come back in the parameter's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LINEAR = "linear"
CONVS = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
EMBEDDING = "embedding"
NORMS = ("layer_norm", "group_norm", "batch_norm")
Rows = tuple[int, int] | None


@dataclass(frozen=True)
class LayerSpec:
    """Static description of a tracked layer: which parameters it owns (``rows`` of them when the weight
    is a row slice) and its block structure."""

    name: str
    kind: str
    weight: str
    bias: str | None
    groups: int = 1
    rows: Rows = None
    transposed: bool = False  # a linear weight stored (in, out), applied as x @ W

    @property
    def use(self) -> str:
        """How its calls use the weight: ``"matmul"`` (``x @ W``) or the layer function's name (its kind)."""
        return "matmul" if self.transposed else self.kind

    @property
    def diagonal_a(self) -> bool:
        """Whether the input factor ``A`` is diagonal (kept as a vector ``(B, d_a)``)."""
        return self.kind == EMBEDDING


@dataclass(frozen=True)
class LayerCall:
    """One call of a tracked layer during the forward pass (a shared weight has several)."""

    layer: str
    kind: str
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_idx: int | None = None  # embedding
    vocab: int = 0  # embedding
    param_dims: tuple[int, ...] = ()  # norms: the input dims that γ and β span
    transposed: bool = False  # linear: the weight is (in, out), applied as x @ W


def bind_arguments(names: tuple[str, ...], defaults: dict, args: tuple, kwargs: dict) -> dict:
    """A torch function's arguments by name: ``defaults``, then the positional ``args`` in the order of
    ``names``, then ``kwargs``."""
    bound = {n: defaults.get(n) for n in names}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _tuple(v: int | tuple[int, ...], d: int) -> tuple[int, ...]:
    return (int(v),) * d if isinstance(v, int) else tuple(int(x) for x in v)


def conv_call(layer: str, kernel, stride, padding, dilation, groups: int) -> LayerCall:
    """Normalise ``torch.conv{1,2,3}d``'s geometry arguments into a :class:`LayerCall`."""
    d = len(kernel)
    pad = padding if isinstance(padding, str) else _tuple(padding, d)
    return LayerCall(layer, CONVS[d], tuple(kernel), _tuple(stride, d), pad, _tuple(dilation, d), int(groups))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _explicit_padding(call: LayerCall, a: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Resolve ``'valid'``/``'same'`` padding (torch pads the odd extra on the right) into ``F.pad``."""
    if not isinstance(call.padding, str):
        return a, call.padding
    d = len(call.kernel)
    pads = [0] * (2 * d)
    if call.padding == "same":
        for i, (k, dil) in enumerate(zip(call.kernel, call.dilation)):
            total = dil * (k - 1)
            pads[2 * (d - 1 - i)], pads[2 * (d - 1 - i) + 1] = total // 2, total - total // 2
    return F.pad(a, pads), (0,) * d


def _check_input(call: LayerCall, a: Tensor) -> None:
    if call.kind == LINEAR and a.dim() < 2:
        raise ValueError(f"layer {call.layer!r}: input of shape {tuple(a.shape)} has no batch dimension")
    if call.kind in CONVS.values() and a.dim() != len(call.kernel) + 2:
        raise ValueError(
            f"layer {call.layer!r}: {call.kind} input must have {len(call.kernel) + 2} dims (N, C, ...), "
            f"got shape {tuple(a.shape)}"
        )
    if call.kind == EMBEDDING and a.dim() < 1:
        raise ValueError(f"layer {call.layer!r}: embedding indices of shape {tuple(a.shape)} have no batch dimension")


def _padded(call: LayerCall, a: Tensor) -> Tensor:
    """A convolution's input with its padding applied."""
    a, pads = _explicit_padding(call, a)
    return F.pad(a, [p for pad in reversed(pads) for p in (pad, pad)]) if any(pads) else a


def input_patches(call: LayerCall, a: Tensor, bias: bool, dtype: torch.dtype) -> Tensor:
    """Layer input of one call → ``(N, B, S, d_a)``, with the ones column when ``bias``; ``dtype`` (the
    weight's) sets the dtype of the constructed inputs of norms (ones) and embeddings (one-hot).

    Convolution patches come from a strided view of the (padded) input and one copy into place — not
    ``F.unfold``, which is many times slower on CPU."""
    _check_input(call, a)
    n = a.shape[0]
    if call.kind in NORMS:
        return torch.ones((n, 1, 1, 1), dtype=stat_dtype(dtype), device=a.device)
    if call.kind == EMBEDDING:
        onehot = F.one_hot(a.reshape(n, 1, -1), call.vocab).to(stat_dtype(dtype))
        if call.padding_idx is not None:
            onehot[..., call.padding_idx] = 0
        return onehot
    a = a.to(stat_dtype(a.dtype))
    if call.kind == LINEAR:
        rows = a.reshape(n, 1, -1, a.shape[-1])
        if not bias:
            return rows
        out = rows.new_empty(rows.shape[:-1] + (rows.shape[-1] + 1,))
        out[..., :-1] = rows
    else:
        d = len(call.kernel)
        windows = a = _padded(call, a)
        for i, (k, dil, s) in enumerate(zip(call.kernel, call.dilation, call.stride)):
            windows = windows.unfold(2 + i, dil * (k - 1) + 1, s)
        windows = windows[(...,) + tuple(slice(None, None, dil) for dil in call.dilation)]
        c, outs = windows.shape[1], windows.shape[2 : 2 + d]
        per_group = c // call.groups
        d_in = per_group * math.prod(call.kernel)
        out = a.new_empty((n, call.groups, math.prod(outs), d_in + int(bias)))
        # (N, C, *out, *kernel) → (N, B, Π out, C/B·Π kernel), channel-major like the weight's rows: one copy
        order = (0, 1, *range(3, 3 + d), 2, *range(3 + d, 3 + 2 * d))
        out[..., :d_in].view(n, call.groups, *outs, per_group, *call.kernel).copy_(
            windows.reshape(n, call.groups, per_group, *outs, *call.kernel).permute(order)
        )
    if bias:
        out[..., -1] = 1
    return out


def input_patch_means(call: LayerCall, a: Tensor, bias: bool, dtype: torch.dtype) -> Tensor:
    """The position mean ``â = 1/S Σₛ ā`` of :func:`input_patches`, ``(N, B, 1, d_a)``: all that the reduce
    convention's ``A`` needs. A convolution's is taken one spatial dim at a time from strided windows of the
    padded input (the mean over output positions of each kernel offset), never building the ``S`` patches —
    whose copy costs ``S`` times the memory traffic of this."""
    if call.kind == EMBEDDING:
        return token_counts(call, a, dtype) / a[0].numel()
    if call.kind not in CONVS.values():
        return input_patches(call, a, bias, dtype).mean(2, keepdim=True)
    _check_input(call, a)
    n = a.shape[0]
    a = _padded(call, a.to(stat_dtype(a.dtype)))
    for k, dil, s in zip(call.kernel, call.dilation, call.stride):
        # (N, C, out_i, *later dims, *earlier kernel dims, window) → mean over out_i: kernel dim i goes last
        a = a.unfold(2, dil * (k - 1) + 1, s)[..., ::dil].mean(2)
    means = a.reshape(n, call.groups, 1, -1)  # (N, C, *kernel), channel-major like the weight's rows
    return torch.cat([means, means.new_ones(n, call.groups, 1, 1)], -1) if bias else means


def token_counts(call: LayerCall, a: Tensor, dtype: torch.dtype) -> Tensor:
    """An embedding's one-hot inputs summed over positions, ``(N, 1, 1, vocab)``: each example's count of each
    token (``padding_idx`` excluded), from a per-example bincount (``scatter_add``) — the ``N·S × vocab`` one-hot
    rows are never built."""
    _check_input(call, a)
    n = a.shape[0]
    idx = a.reshape(n, -1)
    ones = torch.ones(idx.shape, dtype=stat_dtype(dtype), device=a.device)
    counts = ones.new_zeros((n, call.vocab)).scatter_add(1, idx, ones)
    if call.padding_idx is not None:
        counts = counts.index_fill(1, torch.tensor([call.padding_idx], device=a.device), 0)
    return counts.reshape(n, 1, 1, call.vocab)


def _norm_grads(call: LayerCall, g: Tensor, xhat: Tensor, bias: bool) -> Tensor:
    """Per-example ``ψ = [Σ g ⊙ x̂; Σ g]`` of a norm layer: ``g`` ``(V, N, *x)`` → ``(V, N, |γ|+|β|)``."""
    dims = [d if d < 0 else 1 + d for d in call.param_dims]  # layer_norm's trailing dims are negative
    last = list(range(g.dim() - len(dims), g.dim()))

    def per_example(t: Tensor) -> Tensor:
        t = t.movedim(dims, last)
        return t.reshape(t.shape[0], t.shape[1], -1, math.prod(t.shape[g.dim() - len(dims) :])).sum(2)

    parts = [per_example(g * xhat.unsqueeze(0))] + ([per_example(g)] if bias else [])
    return torch.cat(parts, -1)


def parameter_grads(call: LayerCall, a: Tensor, g: Tensor, weight: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(∂L/∂W, ∂L/∂b)`` of one call from its input ``a`` and output gradient ``g`` (no vector dim): the
    same kernels autograd would run (a matmul; the native convolution weight backward; an index-add)."""
    _check_input(call, a)
    dtype = stat_dtype(torch.promote_types(a.dtype, g.dtype)) if a.is_floating_point() else stat_dtype(g.dtype)
    g = g.to(dtype)
    if call.kind in NORMS:
        psi = _norm_grads(call, g.unsqueeze(0), a.to(dtype), bias)[0].sum(0)
        w = psi[: weight.numel()].reshape(weight.shape).to(weight.dtype)
        return w, (psi[weight.numel() :].reshape(weight.shape).to(weight.dtype) if bias else None)  # β shaped like γ
    if call.kind == EMBEDDING:
        rows = g.reshape(-1, g.shape[-1])
        idx = a.reshape(-1)
        if call.padding_idx is not None:
            rows = torch.where((idx == call.padding_idx).unsqueeze(-1), 0, rows)
        return rows.new_zeros((call.vocab, rows.shape[-1])).index_add(0, idx, rows).to(weight.dtype), None
    a = a.to(dtype)
    if call.kind == LINEAR:
        g2, a2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        grad_b = g2.sum(0).to(weight.dtype) if bias else None
        return (a2.T @ g2 if call.transposed else g2.T @ a2).to(weight.dtype), grad_b
    a, padding = _explicit_padding(call, a)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, a, weight.to(dtype), [weight.shape[0]] if bias else None, list(call.stride), list(padding),
        list(call.dilation), False, [0] * len(call.kernel), call.groups, [False, True, bias],
    )
    return grad_w.to(weight.dtype), (grad_b.to(weight.dtype) if bias else None)


def output_grads(call: LayerCall, g: Tensor, a: Tensor, bias: bool) -> Tensor:
    """Output gradients ``(V, N, *out)`` of one call (with its input ``a``) → ``(V, N, B, S, d_g)``."""
    g = g.to(stat_dtype(g.dtype))
    v, n = g.shape[:2]
    if call.kind in NORMS:
        return _norm_grads(call, g, a.to(g.dtype), bias).reshape(v, n, 1, 1, -1)
    if call.kind in (LINEAR, EMBEDDING):
        return g.reshape(v, n, 1, -1, g.shape[-1])
    c = g.shape[2]
    return g.reshape(v, n, call.groups, c // call.groups, -1).transpose(3, 4)


def weight_matrix(spec: LayerSpec, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W, b]`` (or its gradient) as ``(B, d_g, d_a)``; ``weight``/``bias`` are the whole parameters."""
    if spec.rows is not None:
        weight = weight[spec.rows[0] : spec.rows[1]]
        bias = bias[spec.rows[0] : spec.rows[1]] if bias is not None else None
    if spec.kind in NORMS:
        parts = [weight.reshape(-1)] + ([bias.reshape(-1)] if bias is not None else [])
        return torch.cat(parts).reshape(1, -1, 1)
    if spec.kind == EMBEDDING or spec.transposed:
        weight = weight.T
    if spec.kind == EMBEDDING:
        return weight.unsqueeze(0)
    out = weight.reshape(spec.groups, weight.shape[0] // spec.groups, -1)
    if bias is not None:
        out = torch.cat([out, bias.reshape(spec.groups, -1, 1)], dim=-1)
    return out


def split_weight_matrix(spec: LayerSpec, mat: Tensor, into: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`weight_matrix`: ``(B, d_g, d_a)`` → ``{weight_name: ..., bias_name: ...}``, whole
    parameters shaped like those in ``into`` (a row-slice layer replaces its rows of them)."""
    weight = into[spec.weight]
    shape = weight.shape if spec.rows is None else (spec.rows[1] - spec.rows[0],) + weight.shape[1:]
    if spec.kind in NORMS:
        flat = mat.reshape(-1)
        n_w = math.prod(shape)
        parts = {spec.weight: flat[:n_w].reshape(shape)}
        if spec.bias is not None:
            parts[spec.bias] = flat[n_w:].reshape(into[spec.bias].shape)
    elif spec.kind == EMBEDDING:
        parts = {spec.weight: mat[0].T}
    elif spec.transposed:
        parts = {spec.weight: mat[0, :, : shape[0]].T}
        if spec.bias is not None:
            parts[spec.bias] = mat[0, :, -1]
    elif spec.bias is None:
        parts = {spec.weight: mat.reshape(shape)}
    else:
        parts = {spec.weight: mat[..., :-1].reshape(shape), spec.bias: mat[..., -1].reshape(-1)}
    if spec.rows is None:
        return parts
    return {name: into[name].slice_scatter(part, 0, spec.rows[0], spec.rows[1]) for name, part in parts.items()}
