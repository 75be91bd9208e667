"""kfac_func: K-FAC, E-KFAC and two-level K-FAC as functional transforms on ``torch.func``."""

__version__ = "0.1.0"  # the package's version: pyproject.toml reads it from here

from . import checkpoint, distributed, random, tree
from .calls import Args
from .averaging import MovingAverage, all_finite, averaged, init_average, update_average
from .capture import Capture, Plan, as_function, capture, trace
from .decay import cosine_decay
from .describe import Registration, describe
from .ekfac import EKFACFactors, ekfac_factors, ekfac_scaling
from .factors import (
    EigenFactors,
    InverseFactors,
    KroneckerFactors,
    default_reduce,
    eigendecompose,
    inverse_factors,
    kronecker_factors,
)
from .layers import LayerSpec
from .losses import Loss
from .optim import EKFAC, KFAC
from .optimizer import FIXED_STEP, Hyper, KFACState, Optimizer, Schedule, StepInfo, kfac
from .precondition import precondition
from .preconditioner import Preconditioner
from .two_level import (
    CoarseCorrection,
    CoarseSpace,
    coarse_matrix,
    curvature_product,
    nicolaides_space,
    spectral_space,
)

__all__ = [
    "Args",
    "Capture",
    "CoarseCorrection",
    "CoarseSpace",
    "EigenFactors",
    "Hyper",
    "EKFAC",
    "EKFACFactors",
    "InverseFactors",
    "KFAC",
    "KFACState",
    "FIXED_STEP",
    "KroneckerFactors",
    "LayerSpec",
    "Loss",
    "MovingAverage",
    "Optimizer",
    "Plan",
    "Preconditioner",
    "Registration",
    "Schedule",
    "StepInfo",
    "all_finite",
    "as_function",
    "averaged",
    "capture",
    "checkpoint",
    "coarse_matrix",
    "cosine_decay",
    "curvature_product",
    "default_reduce",
    "describe",
    "distributed",
    "eigendecompose",
    "ekfac_factors",
    "ekfac_scaling",
    "init_average",
    "inverse_factors",
    "kfac",
    "kronecker_factors",
    "nicolaides_space",
    "precondition",
    "random",
    "spectral_space",
    "trace",
    "tree",
    "update_average",
]
