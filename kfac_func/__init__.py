"""kfac_func: K-FAC, E-KFAC and two-level K-FAC as functional transforms on ``torch.func``."""

from .capture import Capture, Plan, as_function, capture, trace
from .factors import (
    EigenFactors,
    FactorState,
    InverseFactors,
    KroneckerFactors,
    averaged_factors,
    eigendecompose,
    init_factor_state,
    inverse_factors,
    kronecker_factors,
    update_factor_state,
)
from .layers import LayerSpec
from .losses import Loss
from .optim import KFAC
from .precondition import precondition

__all__ = [
    "Capture",
    "EigenFactors",
    "FactorState",
    "InverseFactors",
    "KFAC",
    "KroneckerFactors",
    "LayerSpec",
    "Loss",
    "Plan",
    "as_function",
    "averaged_factors",
    "capture",
    "eigendecompose",
    "init_factor_state",
    "inverse_factors",
    "kronecker_factors",
    "precondition",
    "trace",
    "update_factor_state",
]
