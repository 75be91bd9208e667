r"""``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) rewritten batch-first out of
``F.linear`` and plain matmul/softmax attention, so that the capture sees its projections (and the
backward over many curvature vectors, batched with ``vmap``, has batching rules for every op).

torch's own implementation runs sequence-first and flattens ``(L·N, E)`` before the output projection,
so the rows of a layer input would not be examples. This version transposes to ``(N, L, E)`` once and
calls ``F.linear`` on batch-first tensors. The packed in-projection weight is sliced before use exactly as
torch does (one call with the whole weight for self-attention, ``split``/``chunk`` row slices when
query, key and value differ): the capture attributes each slice to its own layer
(``"in_proj[0:E]"``, ...). The result equals torch's up to floating-point rounding.

Options without a batch-first equivalent here (``add_bias_kv``, ``add_zero_attn``, ``static_k/v``) are
reported by :func:`unsupported`; the capture then runs torch's implementation and the parameters stay
untracked (with that reason).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import bind_arguments

_NAMES = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
    "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
    "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "static_k", "static_v", "average_attn_weights", "is_causal",
)
_DEFAULTS = dict(training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
                 static_k=None, static_v=None, average_attn_weights=True, is_causal=False)


def bind(args: tuple, kwargs: dict) -> dict:
    """``F.multi_head_attention_forward``'s arguments by name."""
    return bind_arguments(_NAMES, _DEFAULTS, args, kwargs)


def unsupported(b: dict) -> str | None:
    """Why this call cannot be rewritten (``None`` when it can)."""
    for option in ("bias_k", "static_k", "static_v"):
        if b[option] is not None:
            return f"nn.MultiheadAttention with {option.replace('bias_k', 'add_bias_kv')} is not supported"
    if b["add_zero_attn"]:
        return "nn.MultiheadAttention with add_zero_attn is not supported"
    return None


def _mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean (True = masked) or additive mask → additive float mask."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def multi_head_attention(*args, **kwargs) -> tuple[Tensor, Tensor | None]:
    """Same signature and result as ``F.multi_head_attention_forward`` (sequence-first in and out)."""
    b = bind(args, kwargs)
    query, key, value = b["query"], b["key"], b["value"]
    batched = query.dim() == 3
    # batch-first, keeping the identities torch's packed projection relies on
    moved: dict[int, Tensor] = {}
    q, k, v = (moved.setdefault(id(t), t.transpose(0, 1) if batched else t.unsqueeze(0)) for t in (query, key, value))
    n, length, embed = q.shape
    heads = b["num_heads"]
    if embed != b["embed_dim_to_check"] or embed % heads:
        raise ValueError(f"multi-head attention: embed dim {embed} does not match {b['embed_dim_to_check']} "
                         f"or is not divisible by {heads} heads")
    w, bias = b["in_proj_weight"], b["in_proj_bias"]
    bq = bk = bv = None
    if b["use_separate_proj_weight"]:
        if bias is not None:
            bq, bk, bv = bias.chunk(3)
        qp, kp, vp = (F.linear(x, wx, bx) for x, wx, bx in
                      ((q, b["q_proj_weight"], bq), (k, b["k_proj_weight"], bk), (v, b["v_proj_weight"], bv)))
    elif q is k and k is v:
        qp, kp, vp = F.linear(q, w, bias).chunk(3, -1)
    elif k is v:
        w_q, w_kv = w.split([embed, 2 * embed])
        b_q, b_kv = bias.split([embed, 2 * embed]) if bias is not None else (None, None)
        qp = F.linear(q, w_q, b_q)
        kp, vp = F.linear(k, w_kv, b_kv).chunk(2, -1)
    else:
        ws = w.chunk(3)
        bs = bias.chunk(3) if bias is not None else (None,) * 3
        qp, kp, vp = (F.linear(x, wx, bx) for x, wx, bx in zip((q, k, v), ws, bs))
    source = kp.shape[1]
    split = lambda t, s: t.reshape(n, s, heads, embed // heads).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(qp, length), split(kp, source), split(vp, source)

    mask = _mask(b["attn_mask"], qh.dtype)
    if mask is not None:
        mask = mask.reshape(n, heads, length, source) if mask.dim() == 3 else mask
    padding = _mask(b["key_padding_mask"], qh.dtype)
    if padding is not None:
        padding = padding.reshape(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    if b["is_causal"] and mask is None:
        mask = _mask(torch.ones(length, source, dtype=torch.bool, device=qh.device).triu(1), qh.dtype)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(embed // heads)
    weights = (scores if mask is None else scores + mask).softmax(-1)
    if b["training"] and b["dropout_p"] > 0:  # torch returns the weights after dropout too
        weights = F.dropout(weights, b["dropout_p"])
    attended = weights @ vh
    out = F.linear(attended.transpose(1, 2).reshape(n, length, embed), b["out_proj_weight"], b["out_proj_bias"])
    if not b["need_weights"]:
        return (out.transpose(0, 1) if batched else out.squeeze(0)), None
    if b["average_attn_weights"]:
        weights = weights.mean(1)
    return (out.transpose(0, 1) if batched else out.squeeze(0)), (weights if batched else weights.squeeze(0))
