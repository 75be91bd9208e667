"""Data sets available offline. ``digits``: scikit-learn's bundled 8×8 digits (1 797 images)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Split(NamedTuple):
    """Train and test tensors: inputs ``(N, features)`` in [0, 1], integer class labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's digits (no download), scaled to [0, 1], split at random with ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'kfac_func[demo]'") from err
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train], x[test], y[test])
