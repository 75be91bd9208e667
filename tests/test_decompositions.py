"""``decomposition_dtype=None`` ("auto"): float32 decompositions where the damped solve's float32 error bound is
within ``FLOAT32_TOLERANCE``, float64 where it is not, float64 factors always in float64."""

from __future__ import annotations

import torch

import kfac_func as kf
from kfac_func.factors import FLOAT32_TOLERANCE


def _factor(d: int, scale: float, seed: int) -> torch.Tensor:
    x = torch.randn(4 * d, d, generator=torch.Generator().manual_seed(seed))
    return (scale * x.T @ x / (4 * d)).unsqueeze(0)


def _factors(scale_a: float) -> dict[str, kf.KroneckerFactors]:
    return {"well": kf.KroneckerFactors(_factor(12, 1.0, 0), _factor(6, 1.0, 1)),
            "ill": kf.KroneckerFactors(_factor(12, scale_a, 2), _factor(6, 1.0, 3))}


def test_auto_eigendecompositions_fall_back_to_float64_per_layer():
    damping = 1e-2
    eps = torch.finfo(torch.float32).eps
    scale = 10 * FLOAT32_TOLERANCE * damping / eps  # ‖A‖‖G‖/λ · ε₃₂ ≫ the tolerance
    factors = _factors(scale)
    auto = kf.eigendecompose(factors, None, damping)
    f32, f64 = kf.eigendecompose(factors, torch.float32), kf.eigendecompose(factors, torch.float64)
    for got, want in zip(auto["well"], f32["well"]):
        assert torch.equal(got, want)
    for got, want in zip(auto["ill"], f64["ill"]):
        assert torch.equal(got, want)
    assert all(t.dtype == torch.float32 for e in auto.values() for t in e)
    # without a damping there is no bound: float64, as for float64 factors
    assert all(torch.equal(a, b) for a, b in zip(kf.eigendecompose(factors, None)["well"], f64["well"]))
    double = {n: kf.KroneckerFactors(f.A.double(), f.G.double()) for n, f in factors.items()}
    want = kf.eigendecompose(double, torch.float64)
    got = kf.eigendecompose(double, None, damping)
    assert all(torch.equal(a, b) for n in got for a, b in zip(got[n], want[n]))


def test_auto_inverses_fall_back_to_float64_per_factor():
    damping = 1.0
    factors = _factors(1e8)  # π = 1e4: λ_A = 1e4 and λ_G = 1e-4, both bounds above the tolerance
    auto = kf.inverse_factors(factors, damping, None)
    f32, f64 = kf.inverse_factors(factors, damping, torch.float32), kf.inverse_factors(factors, damping, torch.float64)
    lam_a, _ = kf.factors.pi_damping(factors["ill"].A.diagonal(dim1=1, dim2=2), factors["ill"].G.diagonal(dim1=1, dim2=2),
                                     damping)
    assert float(torch.finfo(torch.float32).eps * factors["ill"].A.diagonal().sum() / lam_a) > FLOAT32_TOLERANCE
    for part in ("A_inv", "G_inv"):
        assert torch.equal(getattr(auto["ill"], part), getattr(f64["ill"], part))
        assert torch.equal(getattr(auto["well"], part), getattr(f32["well"], part))
        torch.testing.assert_close(getattr(auto["well"], part), getattr(f64["well"], part), rtol=1e-5, atol=1e-6)
