"""The side algebra (:mod:`kfac_func.sides`): every operation on a block-diagonal or diagonal side equals the
same operation on the dense ``d × d`` matrix it stands for (``torch.block_diag`` / ``torch.diag`` oracles in
float64), for drawn widths, block widths and group counts, uneven last blocks included; and the wide dense
Gram built from its upper block row equals the full product, under ``vmap`` too."""

from __future__ import annotations

import math
from unittest import mock

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kfac_func import sides
from kfac_func.sides import SYMMETRIC_GRAM_DIM

DT = torch.float64


def dense(m: torch.Tensor | None, d: int) -> torch.Tensor:
    """The ``(B, d, d)`` matrix a side stands for."""
    if m is None:
        return torch.eye(d, dtype=DT).unsqueeze(0)
    if m.dim() == 2:
        return torch.diag_embed(m)
    if not sides.is_blocked(m):
        return m
    s = m.shape[-1]
    out = []
    for b in range(m.shape[0]):
        blocks = [m[b, c : c + s, : min(s, d - c)] for c in range(0, d, s)]
        out.append(torch.block_diag(*blocks))
    return torch.stack(out)


def test_symmetric_gram_equals_the_full_product():
    d = SYMMETRIC_GRAM_DIM + 7
    rows = torch.randn(3, 2 * d, d, dtype=DT)
    got = sides.gram(rows)
    torch.testing.assert_close(got, rows.mT @ rows, rtol=1e-12, atol=1e-12)
    h = d // 2
    assert torch.equal(got[:, h:, :h], got[:, :h, h:].mT)  # the mirrored block
    ensemble = torch.randn(2, 1, 2 * d, d, dtype=DT)
    torch.testing.assert_close(torch.func.vmap(sides.gram)(ensemble), torch.stack([sides.gram(t) for t in ensemble]),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(1, 39), st.integers(1, 2), st.integers(1, 30), st.integers(0, 2**31),
       st.booleans())
@example(d=10, block=4, batch=2, rows=3, seed=0, chunked=True)  # uneven last block (10 = 4 + 4 + 2), rank-deficient
@example(d=12, block=4, batch=1, rows=20, seed=1, chunked=False)  # even blocks
@example(d=7, block=1, batch=1, rows=5, seed=2, chunked=True)  # blocks of one
def test_blocked_side_is_the_block_diagonal_matrix(d, block, batch, rows, seed, chunked):
    """Every operation on a blocked side is the block-diagonal matrix's; ``chunked``: the decompositions one
    block per batched call (:data:`~kfac_func.sides.BLOCK_ENTRIES`)."""
    block = min(block, d - 1)  # a block as wide as d is dense
    with mock.patch.object(sides, "BLOCK_ENTRIES", batch * block**2 if chunked else sides.BLOCK_ENTRIES):
        torch.manual_seed(seed)
        x = torch.randn(batch, rows, d, dtype=DT)
        m = sides.gram(x, "blocks", block)
        assert m.shape == (batch, d, block) and sides.is_blocked(m) and sides.dim(m) == d
        full = (x.mT @ x) * dense(torch.ones(batch, d, block, dtype=DT), d)  # the block-diagonal part of XᵀX
        torch.testing.assert_close(dense(m, d), full, rtol=1e-12, atol=1e-12)
        assert torch.equal(sides.diagonal(m), dense(m, d).diagonal(dim1=-2, dim2=-1))
        y = torch.randn(3, batch, 5, d, dtype=DT)  # rows with leading dims that broadcast against B
        for transpose in (False, True):
            ref = full.mT if transpose else full
            torch.testing.assert_close(sides.right_multiply(y, m, transpose), y @ ref, rtol=1e-12, atol=1e-12)
            z = torch.randn(batch, d, 4, dtype=DT)
            torch.testing.assert_close(sides.left_multiply(m, z, transpose), ref @ z, rtol=1e-12, atol=1e-12)
        # the eigendecomposition is block by block: Q is block-diagonal, orthogonal, and reconstructs the matrix
        q, lam = sides.eigh(m, DT)
        assert q.shape == m.shape and lam.shape == (batch, d)
        qd = dense(q, d)
        torch.testing.assert_close(qd @ torch.diag_embed(lam) @ qd.mT, full, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(qd.mT @ qd, torch.eye(d, dtype=DT).expand(batch, d, d), rtol=1e-12, atol=1e-12)
        assert torch.equal(qd * dense(torch.ones_like(m), d), qd)  # nothing outside the blocks
        shift = torch.rand(batch, 1, dtype=DT) + 0.1
        inv = sides.damped_inverse(m, shift, DT)
        torch.testing.assert_close(dense(inv, d), torch.linalg.inv(full + shift.unsqueeze(-1) * torch.eye(d, dtype=DT)),
                                   rtol=1e-10, atol=1e-10)
        assert sides.decomposition_cost(m) == batch * d * block**2
        index = torch.randint(0, d, (4,))
        b = torch.randint(0, batch, (4,))
        torch.testing.assert_close(sides.column(q, b, index, d, DT), qd[b, :, index], rtol=0, atol=0)


def test_diagonal_identity_and_dense_sides():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 6, dtype=DT)
    full = x.mT @ x
    diag = sides.gram(x, "diagonal")
    torch.testing.assert_close(diag, full.diagonal(dim1=-2, dim2=-1))
    ident = sides.gram(x, "identity")  # (tr M / d) in every entry: M ≈ (tr M / d) I
    torch.testing.assert_close(ident, (full.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) / 6).expand(2, 6))
    y = torch.randn(2, 3, 6, dtype=DT)
    for m in (diag, full, None):
        torch.testing.assert_close(sides.right_multiply(y, m), y @ dense(m, 6))
        torch.testing.assert_close(sides.left_multiply(m, y.mT, True), dense(m, 6).mT @ y.mT)
    q, lam = sides.eigh(diag, DT)
    assert q is None and torch.equal(lam, diag)
    shift = torch.full((2, 1), 0.5, dtype=DT)
    torch.testing.assert_close(sides.damped_inverse(diag, shift, DT), 1 / (diag + 0.5))
    assert math.prod(sides.zeros("blocks", 4, 2, 10, x, DT).shape) == 2 * 10 * 4
