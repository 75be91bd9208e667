"""kfac_func: K-FAC, E-KFAC and two-level K-FAC as functional transforms on ``torch.func``."""

from .averaging import MovingAverage, all_finite, averaged, init_average, update_average
from .capture import Capture, Plan, as_function, capture, trace
from .factors import EigenFactors, InverseFactors, KroneckerFactors, eigendecompose, inverse_factors, kronecker_factors
from .layers import LayerSpec
from .losses import Loss
from .optim import KFAC
from .precondition import precondition

__all__ = [
    "Capture",
    "EigenFactors",
    "InverseFactors",
    "KFAC",
    "KroneckerFactors",
    "LayerSpec",
    "Loss",
    "Plan",
    "as_function",
    "MovingAverage",
    "all_finite",
    "averaged",
    "capture",
    "eigendecompose",
    "init_average",
    "inverse_factors",
    "kronecker_factors",
    "precondition",
    "trace",
    "update_average",
]
