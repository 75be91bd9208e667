"""``decomposition_dtype=None`` ("auto", :mod:`kfac_func.precision`): a wide float32 factor is decomposed in
float32 where the damped solve's float32 error bound is within ``FLOAT32_TOLERANCE``, in float64 where it is
not; narrow factors and float64 factors always in float64."""

from __future__ import annotations

import pytest
import torch

import kfac_func as kf
from kfac_func.precision import ALWAYS_FLOAT64_DIM, EPS32, FLOAT32_TOLERANCE

WIDE, NARROW = ALWAYS_FLOAT64_DIM + 12, 6


def _factor(d: int, scale: float, seed: int) -> torch.Tensor:
    x = torch.randn(2 * d, d, generator=torch.Generator().manual_seed(seed))
    return (scale * x.T @ x / (2 * d)).unsqueeze(0)


def _factors(scale_a: float) -> dict[str, kf.KroneckerFactors]:
    return {"well": kf.KroneckerFactors(_factor(WIDE, 1.0, 0), _factor(NARROW, 1.0, 1)),
            "ill": kf.KroneckerFactors(_factor(WIDE, scale_a, 2), _factor(NARROW, 1.0, 3))}


def _same(x, y) -> bool:
    return all(torch.equal(a, b) for a, b in zip(x, y))


def test_auto_eigendecompositions_fall_back_to_float64_per_layer():
    damping = 1e-2
    factors = _factors(100 * FLOAT32_TOLERANCE * damping / EPS32)  # ε₃₂‖A‖‖G‖/λ ≫ the tolerance
    auto = kf.eigendecompose(factors, None, damping)
    f32, f64 = kf.eigendecompose(factors, torch.float32), kf.eigendecompose(factors, torch.float64)
    assert torch.equal(auto["well"].QA, f32["well"].QA) and torch.equal(auto["well"].dA, f32["well"].dA)
    assert torch.equal(auto["well"].QG, f64["well"].QG)  # narrow: float64
    assert _same(auto["ill"], f64["ill"])
    assert all(t.dtype == torch.float32 for e in auto.values() for t in e)
    assert _same(kf.eigendecompose(factors, None)["well"], f64["well"])  # no damping, no bound: float64
    double = {n: kf.KroneckerFactors(f.A.double(), f.G.double()) for n, f in factors.items()}
    want, got = kf.eigendecompose(double, torch.float64), kf.eigendecompose(double, None, damping)
    assert all(_same(got[n], want[n]) for n in got)


def test_auto_inverses_fall_back_to_float64_per_factor():
    damping = 1.0
    factors = _factors(1e8)  # π = 1e4: λ_A = 1e4 (bound ε₃₂ tr A/λ_A above the tolerance)
    auto = kf.inverse_factors(factors, damping, None)
    f32, f64 = kf.inverse_factors(factors, damping, torch.float32), kf.inverse_factors(factors, damping, torch.float64)
    assert torch.equal(auto["ill"].A_inv, f64["ill"].A_inv)
    assert torch.equal(auto["well"].A_inv, f32["well"].A_inv)
    assert torch.equal(auto["well"].G_inv, f64["well"].G_inv)  # narrow: float64
    torch.testing.assert_close(auto["well"].A_inv, f64["well"].A_inv, rtol=1e-5, atol=1e-6)


def test_blocks_wider_than_the_float64_limit_decompose_in_float32_when_well_conditioned():
    """A block-diagonal side (:mod:`kfac_func.sides`) follows the same rule with its block width: two blocks of
    150 (> ALWAYS_FLOAT64_DIM) go float32 when the bound allows, float64 when not."""
    from kfac_func import sides

    d, block, damping = 300, 150, 1e-2
    assert block > ALWAYS_FLOAT64_DIM
    x = torch.randn(2 * d, d, generator=torch.Generator().manual_seed(4)).unsqueeze(0)
    for scale, want in ((1.0, torch.float32), (100 * FLOAT32_TOLERANCE * damping / EPS32, torch.float64)):
        blocked = sides.gram(x * scale**0.5, "blocks", block) / (2 * d)
        factors = {"l": kf.KroneckerFactors(blocked, _factor(NARROW, 1.0, 1))}
        auto, ref = kf.eigendecompose(factors, None, damping)["l"], kf.eigendecompose(factors, want)["l"]
        assert auto.QA.shape == (1, d, block) and _same(auto[:2], ref[:2])  # the blocked A (G is narrow: float64)
        auto, ref = kf.inverse_factors(factors, damping, None)["l"], kf.inverse_factors(factors, damping, want)["l"]
        assert torch.equal(auto.A_inv, ref.A_inv)


def test_a_float32_eigh_that_fails_to_converge_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 ``eigh`` can fail to converge on a factor with many equal eigenvalues (the 785-wide
    ``A`` of an MNIST autoencoder after one batch of 64, on one thread): that side is decomposed in float64
    instead of stopping training; a failure in float64 still raises."""
    from kfac_func import sides

    eigh = torch.linalg.eigh

    def flaky(m, *args, **kwargs):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return eigh(m, *args, **kwargs)

    factors = _factors(1.0)
    blocked = {"l": kf.KroneckerFactors(sides.gram(torch.randn(1, 40, 30), "blocks", 12), _factor(NARROW, 1.0, 1))}
    want = [kf.eigendecompose(f, torch.float64) for f in (factors, blocked)]
    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    for f, ref in zip((factors, blocked), want):
        got = kf.eigendecompose(f, torch.float32)
        assert all(_same(got[n], ref[n]) for n in ref)
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: flaky(m.float()))
    with pytest.raises(torch.linalg.LinAlgError):
        kf.eigendecompose(factors, torch.float64)
