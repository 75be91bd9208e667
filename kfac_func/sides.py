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
matrix. The blocks are strided views of the rows they come from: no padded copy of a side or of the rows
it multiplies is ever made (the last ``r × r`` block is taken on its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .subnormal import flush

# a Gram matrix at least this wide, from at least as many rows, is built from its upper block row and
# lower-right block (3/4 of the flops; 15-25% less time measured at d = 400-800 on CPU)
SYMMETRIC_GRAM_DIM = 256
BLOCK_ENTRIES = 2**24  # the most block entries decomposed or inverted in one batched call (128 MB in float64)


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
    """``fn`` on the blocks ``(B, k, s, s)``: shared out (:func:`sharing`), or here a chunk of at most
    :data:`BLOCK_ENTRIES` entries at a time, so that the working copies of a wide side (its blocks in float64,
    their factorisations) stay bounded."""
    share = _share[0]
    if share is not None:
        return share(fn, blocks)
    chunk = max(1, BLOCK_ENTRIES // blocks[:, :1].numel())
    if chunk >= blocks.shape[1]:
        return fn(blocks)
    parts = [fn(blocks[:, i : i + chunk]) for i in range(0, blocks.shape[1], chunk)]
    return tuple(torch.cat(column, 1) for column in zip(*parts))


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


def _split(x: Tensor, s: int, dim: int = -1) -> tuple[Tensor, Tensor | None]:
    """``x`` along ``dim`` (``d`` long) as views, never copies: the ``k = ⌊d/s⌋`` full blocks (``dim`` split into
    ``(k, s)``) and the last ``r = d − k·s`` entries (``None`` when ``s`` divides ``d``)."""
    d = x.shape[dim]
    k = d // s
    full = x.narrow(dim, 0, k * s).unflatten(dim, (k, s))
    return full, (x.narrow(dim, k * s, d - k * s) if k * s < d else None)


def _blocks(m: Tensor) -> tuple[Tensor, Tensor | None]:
    """A blocked side ``(B, d, s)`` as its full blocks ``(B, k, s, s)`` and its last ``r × r`` block (``None``
    when ``s`` divides ``d``), views of ``m``."""
    full, rest = _split(m, m.shape[-1], 1)
    return full, (None if rest is None else rest[..., : rest.shape[1]])


def _rows(full: Tensor, last: Tensor | None) -> Tensor:
    """Per-block results ``(B, k, s, *t)`` and the last block's ``(B, r, *t')`` → ``(B, d, *t)``, ``t'`` zero-padded
    to ``t``: undoes :func:`_blocks` (contiguous, as every state tensor: a compiled step guards on strides)."""
    rows = full.flatten(1, 2)
    if last is None:
        return rows.contiguous()
    pads = [p for t, u in zip(reversed(full.shape[3:]), reversed(last.shape[2:])) for p in (0, t - u)]
    return torch.cat([rows, torch.nn.functional.pad(last, pads)], 1)


def gram(rows: Tensor, kind: str = "dense", block: int = 0) -> Tensor:
    """``Σ x xᵀ`` over the rows ``(B, R, d)`` as a side of ``kind`` (``block``: the block width of
    ``"blocks"``). The dense Gram of ``X = [X₁ X₂]`` (columns split in half) is ``[[X₁ᵀX, ·], [(X₁ᵀX₂)ᵀ,
    X₂ᵀX₂]]``: the mirrored block is not computed twice."""
    if kind in ("diagonal", "identity"):
        diag = rows.square().sum(1)
        return diag.mean(-1, keepdim=True).expand_as(diag).contiguous() if kind == "identity" else diag
    d = rows.shape[-1]
    if kind == "blocks" and block < d:
        full, rest = _split(rows, block)
        parts = full.movedim(-2, 1)  # (B, k, R, s): strided views, one batched product
        return _rows(parts.mT @ parts, None if rest is None else rest.mT @ rest)
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
    full, last = _blocks(m)
    parts, rest = _split(x, m.shape[-1])
    out = (parts.movedim(-2, -3) @ (full.mT if transpose else full)).movedim(-3, -2).flatten(-2)  # (..., k·s)
    return out if last is None else torch.cat([out, rest @ (last.mT if transpose else last)], -1)


def left_multiply(m: Tensor | None, x: Tensor, transpose: bool = False) -> Tensor:
    """``M @ x`` (``Mᵀ @ x`` with ``transpose``) for ``x`` ``(B, d, n)``."""
    if m is None:
        return x
    if m.dim() == 2:
        return m.unsqueeze(-1) * x
    if not is_blocked(m):
        return (m.mT if transpose else m) @ x
    full, last = _blocks(m)
    parts, rest = _split(x, m.shape[-1], -2)
    out = ((full.mT if transpose else full) @ parts).flatten(-3, -2)  # block c: M_c x_c
    return out if last is None else torch.cat([out, (last.mT if transpose else last) @ rest], -2)


def diagonal(m: Tensor) -> Tensor:
    """The diagonal ``(B, d)``."""
    if m.dim() == 2:
        return m
    if is_blocked(m):
        full, last = _blocks(m)
        diag = full.diagonal(dim1=-2, dim2=-1).flatten(1)
        return diag if last is None else torch.cat([diag, last.diagonal(dim1=-2, dim2=-1)], 1)
    return m.diagonal(dim1=-2, dim2=-1)


def column(q: Tensor | None, block: Tensor, index: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """Columns ``index`` of blocks ``block`` (index tensors of one length ``n``) of a basis ``q`` (``None`` or
    a diagonal: the identity of width ``d``), as ``(n, d)`` in ``dtype``."""
    if q is None or q.dim() == 2:
        return torch.nn.functional.one_hot(index, d).to(dtype)
    if not is_blocked(q):
        return q[block, :, index]
    s = q.shape[-1]
    rows = (index - index % s).unsqueeze(1) + torch.arange(s, device=index.device)  # (n, s): the index's block
    inside = rows < d  # the last block's rows stop at d
    values = q[block.unsqueeze(1), rows.clamp_max(d - 1), (index % s).unsqueeze(1)] * inside
    return q.new_zeros(index.shape[0], d + s).scatter_(1, rows, values)[:, :d].to(dtype)


def eigh(m: Tensor, dtype: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """``(Q, λ)`` of a side: ``Q`` of ``m``'s kind (``None`` for a diagonal) and eigenvalues ``(B, d)``
    clamped at 0, computed in ``dtype`` and returned in ``m``'s. The full blocks are decomposed in one batched
    call, the last ``r × r`` block on its own, so the basis is exactly block-diagonal."""
    if m.dim() == 2:
        return None, m.clamp_min(0)
    if not is_blocked(m):
        return _eigh(m, dtype)
    full, last = _blocks(m)
    q, lam = _each_block(lambda b: _eigh(b, dtype), full)
    q_last, lam_last = (None, None) if last is None else _eigh(last, dtype)
    return _rows(q, q_last), _rows(lam, lam_last)


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
    Each block is inverted alone, the last one ``r × r``."""
    if m.dim() == 2:
        return (1 / (m.to(dtype) + shift.to(dtype))).to(m.dtype)
    eye = torch.eye(m.shape[-1], dtype=dtype, device=m.device)
    shift = shift.to(dtype).unsqueeze(-1)
    if not is_blocked(m):
        return torch.cholesky_inverse(torch.linalg.cholesky(m.to(dtype) + shift * eye)).to(m.dtype)
    full, last = _blocks(m)
    inverse = lambda b, shifted: torch.cholesky_inverse(torch.linalg.cholesky(b.to(dtype) + shifted)).to(m.dtype)  # noqa: E731
    inv = _each_block(lambda b: (inverse(b, shift.unsqueeze(-1) * eye),), full)[0]  # shift (B, 1, 1, 1): over the blocks
    r = 0 if last is None else last.shape[-1]
    return _rows(inv, None if last is None else inverse(last, shift * eye[:r, :r]))


def decomposition_cost(m: Tensor) -> int:
    """The flops of decomposing a side, up to a constant: ``B·d·s²`` (``B·d³`` dense, ``B·d`` diagonal)."""
    return m.shape[0] * dim(m) * block_width(m) ** 2


def zeros(kind: str, block: int, batch: int, d: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero side of ``kind`` (``block``: the block width of ``"blocks"``), ``batch`` blocks of width ``d``."""
    shape = {"dense": (batch, d, d), "blocks": (batch, d, block)}.get(kind, (batch, d))
    return like.new_zeros(shape, dtype=dtype)
