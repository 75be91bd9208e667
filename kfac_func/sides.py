r"""One side of a Kronecker factor (``A`` or ``G``, or a decomposition of it) as a tensor whose shape says its kind:

* dense ``(B, d, d)``;
* block-diagonal ``(B, d, s)`` with ``s < d``: ``k = ⌈d/s⌉`` diagonal blocks ``s × s``, stored as their rows
  (block ``c`` is ``m[:, c·s:(c+1)·s]``); the last block, ``r = d − (k−1)s`` wide, is zero beyond its ``r``
  columns, so the stored matrix is exactly the ``d × d`` block-diagonal one, and memory is ``d·s``;
* diagonal ``(B, d)`` (an embedding's one-hot inputs; a ``"diagonal"`` or ``"identity"`` side, the latter
  holding the mean of the diagonal ``tr M / d`` in every entry: ``M ≈ (tr M / d) I``);
* ``None``: the identity (the eigenbasis of a diagonal side).

``B`` is the leading block dim of grouped convolutions. Every function here acts on all four kinds, so
that averaging, decompositions, preconditioning, E-KFAC and the two-level coarse space never look at the
kind: a blocked side multiplies as ``k`` batched ``s × s`` matmuls (``d·s`` instead of ``d²`` per row), is
decomposed block by block and inverted block by block — exactly the dense algebra of the block-diagonal
matrix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .subnormal import flush

# a Gram matrix at least this wide, from at least as many rows, is built from its upper block row and
# lower-right block (3/4 of the flops; 15-25% less time measured at d = 400-800 on CPU)
SYMMETRIC_GRAM_DIM = 256


BlockWork = Callable[[Callable[[Tensor], tuple[Tensor, ...]], Tensor], tuple[Tensor, ...]]
_share: list[BlockWork | None] = [None]  # a plain global (torch.compile reads it; a ContextVar breaks the graph)


@contextlib.contextmanager
def sharing(share: BlockWork) -> Iterator[None]:
    """Within: the batched decompositions of blocks run as ``share(fn, blocks)`` — ``fn`` maps blocks
    ``(B, k, s, s)`` to a tuple of tensors with leading dims ``(B, k)``, and ``share`` returns ``fn``'s result
    for all ``k`` blocks (:meth:`kfac_func.distributed.DataParallel.share_blocks`: each rank computes a
    share and they are gathered)."""
    previous, _share[0] = _share[0], share
    try:
        yield
    finally:
        _share[0] = previous


def _each_block(fn: Callable[[Tensor], tuple[Tensor, ...]], blocks: Tensor) -> tuple[Tensor, ...]:
    share = _share[0]
    return fn(blocks) if share is None else share(fn, blocks)


def is_blocked(m: Tensor | None) -> bool:
    """Whether ``m`` is a block-diagonal side ``(B, d, s)``, ``s < d``."""
    return m is not None and m.dim() == 3 and m.shape[-1] < m.shape[-2]


def dim(m: Tensor) -> int:
    """The side's ``d`` (the matrix it stands for is ``d × d``)."""
    return m.shape[-2] if m.dim() == 3 else m.shape[-1]


def block_width(m: Tensor | None) -> int:
    """Columns per row: ``d`` dense, ``s`` blocked, 1 diagonal, 0 for the identity (the cost of one
    row times ``m`` is ``d ×`` this)."""
    return 0 if m is None else 1 if m.dim() == 2 else m.shape[-1]


def _blocks(m: Tensor) -> Tensor:
    """``(B, d, s)`` → ``(B, k, s, s)``, the last block padded with zero rows."""
    b, d, s = m.shape
    k = math.ceil(d / s)
    return torch.nn.functional.pad(m, (0, 0, 0, k * s - d)).view(b, k, s, s)


def _rows(blocks: Tensor, d: int) -> Tensor:
    """``(B, k, s, s)`` → ``(B, d, s)``: undo :func:`_blocks` (contiguous, as every state tensor: a compiled step
    guards on strides)."""
    b, k, s, _ = blocks.shape
    rows = blocks.reshape(b, k * s, s)
    return rows if k * s == d else rows[:, :d].clone(memory_format=torch.contiguous_format)


def _padded_blocks(x: Tensor, s: int) -> Tensor:
    """Rows ``(..., d)`` → ``(..., k, s)``, zero-padded."""
    d = x.shape[-1]
    k = math.ceil(d / s)
    return torch.nn.functional.pad(x, (0, k * s - d)).unflatten(-1, (k, s))


def gram(rows: Tensor, kind: str = "dense", block: int = 0) -> Tensor:
    """``Σ x xᵀ`` over the rows ``(B, R, d)`` as a side of ``kind`` (``block``: the block width of
    ``"blocks"``). The dense Gram of ``X = [X₁ X₂]`` (columns split in half) is ``[[X₁ᵀX, ·], [(X₁ᵀX₂)ᵀ,
    X₂ᵀX₂]]``: the mirrored block is not computed twice."""
    if kind in ("diagonal", "identity"):
        diag = rows.square().sum(1)
        return diag.mean(-1, keepdim=True).expand_as(diag).contiguous() if kind == "identity" else diag
    d = rows.shape[-1]
    if kind == "blocks" and block < d:
        parts = _padded_blocks(rows, block).movedim(-2, 1)  # (B, k, R, s)
        return _rows(parts.mT @ parts, d)
    if d < SYMMETRIC_GRAM_DIM or rows.shape[1] < d:
        return rows.mT @ rows
    h = d // 2
    top = rows[..., :h].mT @ rows  # (B, h, d): X₁ᵀX
    right = rows[..., h:]
    return torch.cat([top, torch.cat([top[..., h:].mT, right.mT @ right], -1)], -2)


def right_multiply(x: Tensor, m: Tensor | None, transpose: bool = False) -> Tensor:
    """``x @ M`` (``x @ Mᵀ`` with ``transpose``) for rows ``x`` ``(..., d)`` (leading dims broadcast against
    ``B``) and any side ``m``."""
    if m is None:
        return x
    if m.dim() == 2:
        return x * m.unsqueeze(-2)
    if not is_blocked(m):
        return x @ (m.mT if transpose else m)
    d, s = x.shape[-1], m.shape[-1]
    parts = _padded_blocks(x, s).movedim(-2, -3)  # (..., B, k, rows, s)
    blocks = _blocks(m)
    return (parts @ (blocks.mT if transpose else blocks)).movedim(-3, -2).flatten(-2)[..., :d]


def left_multiply(m: Tensor | None, x: Tensor, transpose: bool = False) -> Tensor:
    """``M @ x`` (``Mᵀ @ x`` with ``transpose``) for ``x`` ``(B, d, n)``."""
    if m is None:
        return x
    if m.dim() == 2:
        return m.unsqueeze(-1) * x
    if not is_blocked(m):
        return (m.mT if transpose else m) @ x
    d, s = x.shape[-2], m.shape[-1]
    blocks = _blocks(m)
    rows = torch.nn.functional.pad(x, (0, 0, 0, blocks.shape[1] * s - d)).unflatten(-2, (blocks.shape[1], s))
    return ((blocks.mT if transpose else blocks) @ rows).flatten(-3, -2)[..., :d, :]  # block c: M_c x_c


def diagonal(m: Tensor) -> Tensor:
    """The diagonal ``(B, d)``."""
    if m.dim() == 2:
        return m
    if is_blocked(m):
        return _blocks(m).diagonal(dim1=-2, dim2=-1).flatten(1)[:, : m.shape[-2]]
    return m.diagonal(dim1=-2, dim2=-1)


def column(q: Tensor | None, block: Tensor, index: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """Columns ``index`` of blocks ``block`` (index tensors of one length ``n``) of a basis ``q`` (``None`` or
    a diagonal: the identity of width ``d``), as ``(n, d)`` in ``dtype``."""
    if q is None or q.dim() == 2:
        return torch.nn.functional.one_hot(index, d).to(dtype)
    if not is_blocked(q):
        return q[block, :, index]
    blocks, s = _blocks(q), q.shape[-1]
    out = q.new_zeros(index.shape[0], blocks.shape[1], s)
    out[torch.arange(index.shape[0]), index // s] = blocks[block, index // s, :, index % s]
    return out.flatten(1)[:, :d]


def eigh(m: Tensor, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """``(Q, λ)`` of a side: ``Q`` of ``m``'s kind (``None`` for a diagonal) and eigenvalues ``(B, d)``
    clamped at 0, computed in ``dtype`` and returned in ``m``'s. Blocks are decomposed in one batched
    call; the last block's zero padding is left out of it (its eigenvectors would mix with the block's
    null space), so the basis is exactly block-diagonal."""
    if m.dim() == 2:
        return None, m.clamp_min(0)
    if not is_blocked(m):
        return _eigh(m, dtype)
    d, s = m.shape[-2:]
    blocks = _blocks(m)
    r = d - (blocks.shape[1] - 1) * s  # the last block's width
    q, lam = _each_block(lambda b: _eigh(b, dtype), blocks if r == s else blocks[:, :-1])
    if r < s:
        q_last, lam_last = _eigh(blocks[:, -1, :r, :r], dtype)
        q = torch.cat([q, torch.nn.functional.pad(q_last, (0, s - r, 0, s - r)).unsqueeze(1)], 1)
        lam = torch.cat([lam, torch.nn.functional.pad(lam_last, (0, s - r)).unsqueeze(1)], 1)
    return _rows(q, d), lam.flatten(1)[:, :d].clone(memory_format=torch.contiguous_format)


def _eigh(m: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    try:
        lam, q = torch.linalg.eigh(m.to(dtype))
    except torch.linalg.LinAlgError:
        # LAPACK's float32 solver can fail to converge on a factor with many equal (zero) eigenvalues, e.g.
        # the inputs' A of a wide layer after one small batch: float64 converges on those
        if dtype == torch.float64:
            raise
        lam, q = torch.linalg.eigh(m.to(torch.float64))
    return flush(q.to(m.dtype)), flush(lam.clamp_min(0).to(m.dtype))  # tiny float64 values: subnormal in float32


def damped_inverse(m: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``(M + shift·I)⁻¹`` of a side (``shift`` ``(B, 1)``, at least the Cholesky floor for a matrix) from
    Cholesky factors computed in ``dtype``, returned in ``m``'s dtype and kind; a diagonal's is a vector.
    A block's zero padding gets ``1/shift`` on its diagonal and stays uncoupled: the rows kept are exact."""
    if m.dim() == 2:
        return (1 / (m.to(dtype) + shift.to(dtype))).to(m.dtype)
    eye = torch.eye(m.shape[-1], dtype=dtype, device=m.device)
    shift = shift.to(dtype).unsqueeze(-1)
    if not is_blocked(m):
        return torch.cholesky_inverse(torch.linalg.cholesky(m.to(dtype) + shift * eye)).to(m.dtype)
    shift = shift.unsqueeze(-1)  # (B, 1, 1, 1): over the blocks
    inv = _each_block(lambda b: (torch.cholesky_inverse(torch.linalg.cholesky(b.to(dtype) + shift * eye)).to(m.dtype),),
                      _blocks(m))[0]
    return _rows(inv, m.shape[-2])


def decomposition_cost(m: Tensor) -> int:
    """The flops of decomposing a side, up to a constant: ``B·d·s²`` (``B·d³`` dense, ``B·d`` diagonal)."""
    return m.shape[0] * dim(m) * block_width(m) ** 2


def zeros(kind: str, block: int, batch: int, d: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero side of ``kind`` (``block``: the block width of ``"blocks"``), ``batch`` blocks of width ``d``."""
    shape = {"dense": (batch, d, d), "blocks": (batch, d, block)}.get(kind, (batch, d))
    return like.new_zeros(shape, dtype=dtype)
