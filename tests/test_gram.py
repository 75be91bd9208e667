"""The covariance matmul of a wide factor is built from its upper block row and lower-right block (3/4 of the
flops): it equals the full product, with blocks, and under ``vmap``."""

from __future__ import annotations

import torch

from kfac_func.factors import SYMMETRIC_GRAM_DIM, _gram


def test_symmetric_gram_equals_the_full_product():
    d = SYMMETRIC_GRAM_DIM + 7
    x = torch.randn(2 * d, 3, 2, d, dtype=torch.float64)  # (N, B, S, d): blocks on dim 1
    rows = x.movedim(1, 0).reshape(3, -1, d)
    got = _gram(x, 1)
    torch.testing.assert_close(got, rows.mT @ rows, rtol=1e-12, atol=1e-12)
    h = d // 2
    assert torch.equal(got[:, h:, :h], got[:, :h, h:].mT)  # the mirrored block
    ensemble = torch.randn(2, 2 * d, 1, 1, d, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda t: _gram(t, 1))(ensemble),
                               torch.stack([_gram(t, 1) for t in ensemble]), rtol=1e-12, atol=1e-12)
