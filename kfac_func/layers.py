"""Per-layer-kind rules: how a layer's inputs and output gradients become K-FAC quantities.

Every tracked layer is brought into one canonical form so that everything downstream (factors,
per-example gradients, preconditioning) is written once:

* ``a``: ``(N, B, S, d_a)`` — the homogeneous inputs ``ā = [a; 1]`` (the ones column only when the
  layer has a bias), ``B`` independent blocks (the groups of a grouped convolution, 1 otherwise) and
  ``S`` positions per example (conv output pixels, sequence positions, repeated calls of a shared
  weight);
* ``g``: ``(V, N, B, S, d_g)`` — output gradients for ``V`` curvature vectors;
* the weight matrix ``W̄ = [W, b]`` as ``(B, d_g, d_a)``, row-major like PyTorch, so that ``vec(W̄)``
  carries the Kronecker order ``G ⊗ A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LINEAR = "linear"
CONV2D = "conv2d"


@dataclass(frozen=True)
class LayerSpec:
    """Static description of a tracked layer: which parameters it owns and its block structure."""

    name: str
    kind: str
    weight: str
    bias: str | None
    groups: int = 1


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


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def conv2d_call(layer: str, kernel, stride, padding, dilation, groups: int) -> LayerCall:
    """Normalise ``torch.conv2d``'s geometry arguments into a :class:`LayerCall`."""
    pad = padding if isinstance(padding, str) else _pair(padding)
    return LayerCall(layer, CONV2D, _pair(tuple(kernel)), _pair(stride), pad, _pair(dilation), int(groups))


def _explicit_padding(call: LayerCall, a: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Resolve ``'valid'``/``'same'`` padding (torch pads the odd extra on the right/bottom) into ``F.pad``."""
    if not isinstance(call.padding, str):
        return a, call.padding
    pads = [0, 0, 0, 0]
    if call.padding == "same":
        for i, (k, d) in enumerate(zip(call.kernel, call.dilation)):
            total = d * (k - 1)
            pads[2 * (1 - i)], pads[2 * (1 - i) + 1] = total // 2, total - total // 2
    return F.pad(a, pads), (0, 0)


def _check_input(call: LayerCall, a: Tensor) -> None:
    if call.kind == LINEAR and a.dim() < 2:
        raise ValueError(f"layer {call.layer!r}: input of shape {tuple(a.shape)} has no batch dimension")
    if call.kind == CONV2D and a.dim() != 4:
        raise ValueError(f"layer {call.layer!r}: conv2d input must be (N, C, H, W), got shape {tuple(a.shape)}")


def input_patches(call: LayerCall, a: Tensor, bias: bool) -> Tensor:
    """Layer input of one call → ``(N, B, S, d_a)``, with the ones column when ``bias``.

    Convolution patches come from a strided view of the (padded) input and one copy into place — not
    ``F.unfold``, which is many times slower on CPU."""
    _check_input(call, a)
    if call.kind == LINEAR:
        rows = a.reshape(a.shape[0], 1, -1, a.shape[-1])
        if not bias:
            return rows
        out = rows.new_empty(rows.shape[:-1] + (rows.shape[-1] + 1,))
        out[..., :-1] = rows
    else:
        a, (ph, pw) = _explicit_padding(call, a)
        if ph or pw:
            a = F.pad(a, (pw, pw, ph, ph))
        (kh, kw), (dh, dw), (sh, sw) = call.kernel, call.dilation, call.stride
        windows = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        n, c, h, w = windows.shape[:4]
        per_group = c // call.groups
        d = per_group * kh * kw
        out = a.new_empty((n, call.groups, h * w, d + int(bias)))
        # (N, C, H', W', kh, kw) → (N, B, H'·W', C/B·kh·kw), channel-major like the weight's rows: one copy
        out[..., :d].view(n, call.groups, h, w, per_group, kh, kw).copy_(
            windows.reshape(n, call.groups, per_group, h, w, kh, kw).permute(0, 1, 3, 4, 2, 5, 6)
        )
    if bias:
        out[..., -1] = 1
    return out


def parameter_grads(call: LayerCall, a: Tensor, g: Tensor, weight: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """``(∂L/∂W, ∂L/∂b)`` of one call from its input ``a`` and output gradient ``g`` (no vector dim): the
    same kernels autograd would run (a matmul; the native convolution weight backward)."""
    _check_input(call, a)
    if call.kind == LINEAR:
        g2 = g.reshape(-1, g.shape[-1])
        return g2.T @ a.reshape(-1, a.shape[-1]), (g2.sum(0) if bias else None)
    a, padding = _explicit_padding(call, a)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        g, a, weight, [weight.shape[0]] if bias else None, list(call.stride), list(padding),
        list(call.dilation), False, [0, 0], call.groups, [False, True, bias],
    )
    return grad_w, grad_b


def output_grads(call: LayerCall, g: Tensor) -> Tensor:
    """Output gradients ``(V, N, *out)`` of one call → ``(V, N, B, S, d_g)``."""
    if call.kind == LINEAR:
        return g.reshape(g.shape[0], g.shape[1], 1, -1, g.shape[-1])
    v, n, c, h, w = g.shape
    return g.reshape(v, n, call.groups, c // call.groups, h * w).transpose(3, 4)


def weight_matrix(spec: LayerSpec, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W, b]`` (or its gradient) as ``(B, d_g, d_a)``."""
    out = weight.reshape(spec.groups, weight.shape[0] // spec.groups, -1)
    if bias is not None:
        out = torch.cat([out, bias.reshape(spec.groups, -1, 1)], dim=-1)
    return out


def split_weight_matrix(spec: LayerSpec, mat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`weight_matrix`: ``(B, d_g, d_a)`` → ``{weight_name: ..., bias_name: ...}``."""
    weight = params[spec.weight]
    if spec.bias is None:
        return {spec.weight: mat.reshape(weight.shape)}
    return {spec.weight: mat[..., :-1].reshape(weight.shape), spec.bias: mat[..., -1].reshape(-1)}
