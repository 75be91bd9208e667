"""Random models and models without forward-mode AD in the default step.

Every evaluation of the model in a step — the gradient's forward, the quadratic model's ``jvp`` and the
reduction ratio's forward — runs with torch's RNG forked and seeded from the step's key: dropout and noise
draw the same numbers in each, the caller's RNG is left as it was, and a step is a function of its state.
An ``nn.LSTM`` (no forward-mode AD on the CPU in float32) gets its quadratic forms in reverse mode, equal to
the forward-mode ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_func as kf
from kfac_func import random
from kfac_func.quadratic import ggn_quadratic_forms, ggn_vector_product

DT = torch.float64


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` outside any ``torch.func`` wrapper (``jvp``, ``vjp``, ``vmap`` with ``randomness="same"``)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.detach().clone()


class RecordedDropout(nn.Module):
    """Inverted dropout with a mask from ``torch.rand_like``, recorded at every call."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand_like(x) >= self.p).to(x.dtype)
        self.masks.append(_plain(mask))
        return x * mask / (1 - self.p)


class FixedMask(nn.Module):
    """The deterministic twin of :class:`RecordedDropout`: a constant mask."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1 - self.p)


class VAE(nn.Module):
    """An autoencoder with the reparametrisation ``z = μ + σ·ε``, ``ε = randn_like(μ)``."""

    def __init__(self, d: int = 8, latent: int = 3):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(d, 2 * latent), nn.Linear(latent, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, log_var = self.encoder(x).chunk(2, -1)
        return self.decoder(torch.tanh(mu + (0.5 * log_var).exp() * torch.randn_like(mu)))


class SequenceClassifier(nn.Module):
    """``nn.LSTM`` → last hidden state → ``nn.Linear``."""

    def __init__(self, d: int = 3, hidden: int = 8, classes: int = 4):
        super().__init__()
        self.rnn, self.head = nn.LSTM(d, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[1][0][-1])


def _mlp(middle: nn.Module, dtype: torch.dtype = DT) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), middle, nn.Linear(10, 3)).to(dtype)


def _batch(n: int = 16, dtype: torch.dtype = DT, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _directions(model: nn.Module, k: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
            for _ in range(k)]


def test_dropout_mlp_trains_with_the_default_step_and_leaves_the_global_rng():
    """``nn.Dropout(0.5)`` in the default step: finite losses, and torch's global RNG as it was after each
    step (from the second: the first also traces the model, :func:`kfac_func.capture.trace`)."""
    model = _mlp(nn.Dropout(0.5), torch.float32)
    opt = kf.KFAC(model, loss="cross_entropy")
    losses = []
    for step in range(5):
        x, y = _batch(32, torch.float32, seed=step)
        before = torch.get_rng_state()
        losses.append(float(opt.step(x, y)))
        assert step == 0 or torch.equal(torch.get_rng_state(), before)
        assert opt.info is not None and not opt.info.rejected
    assert all(torch.isfinite(torch.tensor(losses)))


def test_every_evaluation_of_a_step_draws_the_gradient_mask():
    """The masks of the capture's forward, the quadratic model's ``jvp`` (one per direction: Δ and the previous
    update) and the reduction ratio's forward (step 0 adapts the damping) are one; the next step draws another;
    a step is a function of its state."""
    drop = RecordedDropout(0.5)
    model = _mlp(drop)
    opt = kf.kfac(model, loss="cross_entropy")
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = _batch()
    state = opt.init(params, x)
    drop.masks.clear()
    before = torch.get_rng_state()
    new, new_state, info = opt.step(params, state, x, y)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(drop.masks) == 4 and torch.isfinite(info.rho)  # capture, two jvps, reduction ratio
    assert all(torch.equal(m, drop.masks[0]) for m in drop.masks)
    first = drop.masks[0]
    drop.masks.clear()
    opt.step(new, new_state, x, y)
    assert len(drop.masks) == 3 and all(torch.equal(m, drop.masks[0]) for m in drop.masks)
    assert not torch.equal(drop.masks[0], first)
    torch.manual_seed(123)  # the global RNG plays no part
    again, _, _ = opt.step(params, state, x, y)
    assert all(torch.equal(again[n], new[n]) for n in new)


def test_quadratic_forms_equal_those_of_the_deterministic_twin():
    """With a seed, the forms and ``C v`` of the dropout network are exactly those of the same network with
    the mask its forward draws with that seed held as a constant (forward and reverse mode)."""
    p, seed = 0.5, 12345
    drop = RecordedDropout(p)
    model = _mlp(drop)
    params = {n: q.detach() for n, q in model.named_parameters()}
    x, y = _batch()
    with random.seeded(seed):
        model(x)
    twin = nn.Sequential(model[0], model[1], FixedMask(drop.masks[-1], p), model[3])
    dirs = _directions(model)
    for mode in ("forward", "reverse"):
        got = ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs, seed=seed, mode=mode)
        want = ggn_quadratic_forms(twin, params, x, y, "cross_entropy", dirs, mode=mode)
        assert torch.equal(got, want)
        got_v = ggn_vector_product(model, params, x, y, "cross_entropy", dirs[0], seed=seed, mode=mode)
        want_v = ggn_vector_product(twin, params, x, y, "cross_entropy", dirs[0], mode=mode)
        assert all(torch.equal(got_v[n], want_v[n]) for n in want_v)
    other = ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs, seed=seed + 1)
    assert not torch.equal(other, want)


def test_vae_with_randn_like_trains_with_the_default_step():
    """``torch.randn_like`` in the forward (mse against the input): finite losses that go down."""
    torch.manual_seed(0)
    model = VAE()
    opt = kf.KFAC(model, loss="mse")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    losses = [float(opt.step(x, x))]
    before = torch.get_rng_state()
    losses += [float(opt.step(x, x)) for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore:.*belong to no supported layer")  # the LSTM's weights: a gradient step
def test_lstm_classifier_trains_with_the_default_step():
    """An ``nn.LSTM`` (float32: no forward-mode AD on the CPU) trains with the default step; its forms
    come from reverse mode, which the automatic choice takes after forward mode fails."""
    torch.manual_seed(0)
    model = SequenceClassifier()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, 3, generator=g), torch.randint(0, 4, (16,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}
    dirs = [{n: torch.randn(p.shape, generator=g) for n, p in params.items()} for _ in range(2)]
    with pytest.raises(NotImplementedError, match="forward AD"):
        ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs, mode="forward")
    assert torch.equal(ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs),
                       ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs, mode="reverse"))
    opt = kf.KFAC(model, loss="cross_entropy")
    losses = [float(opt.step(x, y)) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("examples", [None, 5])
def test_reverse_mode_equals_forward_mode(examples):
    """Reverse-mode forms and ``C v`` equal the forward-mode ones to float64 rounding: an MLP, and a float64
    LSTM classifier (which has forward-mode AD)."""
    torch.manual_seed(0)
    lstm = SequenceClassifier().to(DT)
    g = torch.Generator().manual_seed(3)
    seq = torch.randn(12, 5, 3, generator=g, dtype=DT), torch.randint(0, 4, (12,), generator=g)
    for model, (x, y) in ((_mlp(nn.Identity()), _batch()), (lstm, seq)):
        params = {n: p.detach() for n, p in model.named_parameters()}
        dirs = _directions(model, 3)
        forward = ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs, examples, mode="forward")
        reverse = ggn_quadratic_forms(model, params, x, y, "cross_entropy", dirs, examples, mode="reverse")
        torch.testing.assert_close(reverse, forward, rtol=1e-12, atol=1e-14)
        cv = ggn_vector_product(model, params, x, y, "cross_entropy", dirs[0], mode="forward")
        cv_reverse = ggn_vector_product(model, params, x, y, "cross_entropy", dirs[0], mode="reverse")
        for n in cv:
            torch.testing.assert_close(cv_reverse[n], cv[n], rtol=1e-12, atol=1e-14)


def test_other_errors_are_not_taken_for_a_missing_forward_mode():
    """Only a missing forward-mode formula selects reverse mode; any other error propagates."""
    x, y = _batch()
    weight = torch.randn(3, 6, dtype=DT)

    def broken(params, inputs):
        raise NotImplementedError("something else")

    with pytest.raises(NotImplementedError, match="something else"):
        ggn_quadratic_forms(broken, {"w": weight}, x, y, "cross_entropy", [{"w": weight}])
    with pytest.raises(ValueError, match="mode"):
        ggn_quadratic_forms(lambda p, v: v @ p["w"].T, {"w": weight}, x, y, "cross_entropy", [{"w": weight}],
                            mode="backward")
