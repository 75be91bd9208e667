"""The torch.optim adapter: it composes the pure stages exactly and trains (checkpoints: test_checkpoint.py)."""

from __future__ import annotations

import copy
import pickle
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf
import oracles as O
from kfac_func import demo
from kfac_func.data import load_digits


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _first_capture():
    """A fresh MLP, its first batch, its parameters and the exact-Fisher capture of that batch."""
    model = _mlp()
    x, y = _batches(1)[0]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, x, y, params, kf.capture(model, params, x, y, "cross_entropy", fisher="exact")


def _batches(steps: int, n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def test_first_step_is_the_functional_composition():
    """One step with momentum 0, no KL clip: θ₁ = θ₀ − η · precondition(∇, eig(A, G)) exactly."""
    model, x, y, params, cap = _first_capture()
    plan = kf.trace(model, params, x)
    eig = kf.eigendecompose(kf.kronecker_factors(cap))
    delta = kf.precondition(params, cap.grads, eig, layers=plan.layers, damping=0.1)
    opt = kf.KFAC(model, **O.fixed_step(lr=0.5, momentum=0.0, damping=0.1, fisher="exact", kl_clip=None))
    loss = opt.step(x, y)
    assert torch.equal(loss, cap.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n] - 0.5 * delta[n], rtol=0, atol=1e-6)
        assert torch.equal(p.grad, cap.grads[n])


def test_step_releases_the_last_gradients_before_its_own():
    """``step(x, y)`` drops the previous step's ``p.grad`` before it computes its own (a large model does not
    hold two gradients at once), then writes this step's gradient: after the second step ``p.grad`` is the
    second batch's gradient."""
    model = _mlp()
    opt = kf.KFAC(model, loss="cross_entropy")
    (x0, y0), (x1, y1) = _batches(2)
    opt.step(x0, y0)
    assert all(p.grad is not None for p in model.parameters())
    seen = []
    pure_step = opt._pure.step

    def spy(*args, **kwargs):
        seen.append([p.grad for p in model.parameters()])
        return pure_step(*args, **kwargs)

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = kf.capture(model, params, x1, y1, "cross_entropy", fisher=None).grads
    with mock.patch.object(opt, "_pure", opt._pure._replace(step=spy)):
        opt.step(x1, y1)
    assert seen == [[None] * len(params)]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-6)


def test_trains_digits_below_sgd():
    """Seeded, same batches: K-FAC's final training loss is below SGD-momentum's after 150 steps."""
    data = load_digits(seed=0)
    rows = {name: demo.train(name, data, 150, 128, seed=0, progress=False) for name in ("K-FAC", "SGD-momentum")}
    assert rows["K-FAC"]["train_loss"] < 0.5 * rows["SGD-momentum"]["train_loss"]
    assert rows["K-FAC"]["test_acc"] > 0.9


def test_function_model_matches_module():
    """f(params, x) written with torch.nn.functional follows the same trajectory as the nn.Module."""
    module = _mlp()
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}

    def f(p, x):
        return F.linear(torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])

    opt_m = kf.KFAC(module, lr=0.1, damping=1e-2)
    opt_f = kf.KFAC(f, params, lr=0.1, damping=1e-2)
    for x, y in _batches(4):
        opt_m.step(x, y)
        opt_f.step(x, y)
    for n, p in module.named_parameters():
        torch.testing.assert_close(p, params[n], rtol=1e-5, atol=1e-6)


def test_param_groups_and_lr_scheduler():
    """Per-group lr (0 freezes a group) and torch schedulers drive the step size."""
    model = _mlp()
    first = [model[0].weight, model[0].bias]
    groups = [{"params": first, "lr": 0.0}, {"params": list(model[2].parameters())}]
    opt = kf.KFAC(model, groups, **O.fixed_step(lr=0.1, damping=1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    before = copy.deepcopy(model.state_dict())
    x, y = _batches(1)[0]
    opt.step(x, y)
    sched.step()
    after_one = copy.deepcopy(model.state_dict())
    assert torch.equal(after_one["0.weight"], before["0.weight"])
    assert not torch.equal(after_one["2.weight"], before["2.weight"])
    assert opt.param_groups[1]["lr"] == 0.0
    opt.step(x, y)  # lr 0 everywhere now: nothing moves, but the curvature state advances
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_one[k]), k
    assert int(opt.kfac_state.step) == 2


def test_step_scale_of_the_fixed_step_is_a_learning_rate_schedule():
    """The fixed step with ``step_scale=s`` takes the steps of the same optimizer whose groups' ``lr`` a torch
    scheduler multiplies by ``s(t)``: momentum, weight decay and the KL clip (active on some steps, not on
    others) all see the scaled rate."""
    schedule = kf.cosine_decay(5, floor=0.1)
    options = O.fixed_step(lr=0.3, momentum=0.9, weight_decay=1e-2, damping=1e-2, kl_clip=2e-2)
    scaled_model, lambda_model = _mlp(), _mlp()
    scaled = kf.KFAC(scaled_model, **options, step_scale=schedule)
    by_lambda = kf.KFAC(lambda_model, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(by_lambda, lambda t: float(schedule(torch.tensor(t))))
    clipped = []
    for x, y in _batches(7):
        lr = by_lambda.param_groups[0]["lr"]
        scaled.step(x, y)
        by_lambda.step(x, y)
        sched.step()
        for (n, p), q in zip(scaled_model.named_parameters(), lambda_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=n)
        assert scaled.info.alpha == pytest.approx(by_lambda.info.alpha, rel=1e-6)
        clipped.append(scaled.info.alpha < lr * (1 - 1e-6))
    assert any(clipped) and not all(clipped)


def test_kl_clip_with_zero_gradient_is_finite():
    """Σ Δ·∇ = 0 (zero gradient) must not divide by zero."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(8, 3)
    with torch.no_grad():
        y = model(x)
    opt = kf.KFAC(model, **O.fixed_step(loss="mse", lr=1.0, damping=1e-2, kl_clip=1e-3))
    before = copy.deepcopy(model.state_dict())
    opt.step(x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kl_clip_bounds_the_step():
    """KL clip κ: the applied step is ν η Δ with ν² η² Σ Δ·∇ = κ when the unclipped step is larger."""
    model, x, y, params, cap = _first_capture()
    eig = kf.eigendecompose(kf.kronecker_factors(cap))
    delta = kf.precondition(params, cap.grads, eig, layers=kf.trace(model, params, x).layers, damping=1e-3)
    vg = sum(float((delta[n] * cap.grads[n]).sum()) for n in params)
    lr, kappa = 0.5, 1e-4
    assert lr**2 * vg > kappa  # the clip is active
    opt = kf.KFAC(model, **O.fixed_step(lr=lr, momentum=0.0, damping=1e-3, kl_clip=kappa, fisher="exact"))
    opt.step(x, y)
    nu = (kappa / (lr**2 * vg)) ** 0.5
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n] - lr * nu * delta[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1.0),
        dict(momentum=1.0),
        dict(damping=0.0),
        dict(damping_mode="cholesky"),
        dict(fisher="type3"),
        dict(inverse_period=0),
        dict(ema_decay=1.0),
        dict(kl_clip=0.0),
        dict(stats_fraction=0.0),
        dict(step_scale=0.5),
    ],
)
def test_invalid_hyperparameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        kf.KFAC(_mlp(), **kwargs)


def test_stats_fraction_and_factor_period_still_train():
    """The cheaper-statistics knobs keep the optimizer working (loss decreases on a fixed batch)."""
    model = _mlp()
    x, y = _batches(1, n=64)[0]
    opt = kf.KFAC(model, **O.fixed_step(lr=0.1, damping=1e-2, stats_fraction=0.25, factor_period=3,
                                        damping_mode="factored", kl_clip=1e-2))
    first = opt.step(x, y)
    for _ in range(20):
        last = opt.step(x, y)
    assert last < 0.5 * first


METHOD_CONFIGS = {
    "ekfac": dict(method="ekfac", scale_period=2),
    "two_level_additive": dict(method="two_level", damping_mode="factored"),
    "two_level_bnn_spectral": dict(method="two_level", combination="bnn", coarse_space="spectral", coarse_vectors=2,
                                   coarse_mode="kronecker", fisher="exact"),
}


def test_ekfac_first_step_is_the_functional_composition():
    model, x, y, params, cap = _first_capture()
    eigen = kf.eigendecompose(kf.kronecker_factors(cap))
    factors = kf.ekfac_factors(eigen, kf.ekfac_scaling(cap, eigen))
    delta = kf.precondition(params, cap.grads, factors, layers=kf.trace(model, params, x).layers, damping=0.1)
    opt = kf.EKFAC(model, **O.fixed_step(lr=0.5, momentum=0.0, damping=0.1, fisher="exact", kl_clip=None))
    opt.step(x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n] - 0.5 * delta[n], rtol=0, atol=1e-6)


def test_coarse_matrix_does_not_grow_over_refreshes():
    """The original code accumulated the coarse matrix in place at every inversion. Here, on a fixed batch
    with lr 0 and the exact Fisher, the averaged coarse matrix stays equal to the batch's over 30 steps
    and 10 refreshes."""
    model = _mlp()
    x, y = _batches(1)[0]
    opt = kf.KFAC(model, **O.fixed_step(lr=0.0, damping=1e-2, method="two_level", fisher="exact", inverse_period=3))
    for _ in range(30):
        opt.step(x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    expected = kf.coarse_matrix(cap, opt.kfac_state.space)
    torch.testing.assert_close(kf.averaged(opt.kfac_state.coarse), expected, rtol=1e-5, atol=1e-8)
    assert int(opt.kfac_state.coarse.updates) == 30


def test_two_level_and_ekfac_train():
    """Every method decreases the loss on a fixed batch."""
    x, y = _batches(1, n=64)[0]
    for config in METHOD_CONFIGS.values():
        model = _mlp()
        opt = kf.KFAC(model, **O.fixed_step(lr=0.3, damping=1e-1, kl_clip=1e-1, **config))
        first = opt.step(x, y)
        for _ in range(20):
            last = opt.step(x, y)
        assert last < 0.7 * first, config


def test_method_options_are_validated():
    with pytest.raises(ValueError, match="method"):
        kf.KFAC(_mlp(), method="kfac2")
    with pytest.raises(ValueError, match="E-KFAC adds the damping"):
        kf.KFAC(_mlp(), method="ekfac", damping_mode="factored")
    with pytest.raises(ValueError, match="coarse_vectors"):
        kf.KFAC(_mlp(), method="two_level", coarse_vectors=3)
    with pytest.raises(ValueError, match="combination"):
        kf.KFAC(_mlp(), method="two_level", combination="multiplicative")


def test_deepcopy_and_pickle_continue_exactly():
    """``copy.deepcopy`` / ``pickle`` of the model with its optimizer keep options and K-FAC state: the copy
    continues exactly as the original (torch's Optimizer would keep only its param-group state)."""
    model = _mlp()
    opt = kf.KFAC(model, lr=0.1, damping_mode="factored")
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    opt.step(x, y)
    copies = [copy.deepcopy({"model": model, "opt": opt}), pickle.loads(pickle.dumps({"model": model, "opt": opt}))]
    for _ in range(3):
        opt.step(x, y)
        for c in copies:
            c["opt"].step(x, y)
    for c in copies:
        assert c["opt"].model is c["model"]
        for p, q in zip(model.parameters(), c["model"].parameters()):
            assert torch.equal(p, q)


def test_preconditioner_defaults_are_safe_before_sgd_with_momentum():
    """``Preconditioner`` before ``SGD(lr=0.1, momentum=0.9)`` at a small damping: unclipped, the preconditioned
    gradients make SGD's loss climb; the default KL clip (at SGD's learning rate, or at 1 when not told) keeps it
    training."""

    def train(**options) -> tuple[float, float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
        precond = kf.Preconditioner(model, loss="cross_entropy", damping=1e-2, damping_mode="eigen", **options)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        data, labels = torch.randn(512, 20, generator=g), torch.randint(0, 5, (512,), generator=g)
        losses = []
        for _ in range(60):
            i = torch.randint(0, 512, (64,), generator=g)
            sgd.zero_grad()
            out = model(data[i])
            precond.curvature_backward(out)
            loss = F.cross_entropy(out, labels[i])
            loss.backward()
            precond.step()
            sgd.step()
            losses.append(loss.item())
        return sum(losses[:5]) / 5, sum(losses[-5:]) / 5

    first, last = train(kl_clip=None)
    assert last > first  # the unclipped preconditioner diverges here
    for options in ({}, {"lr": 0.1}):
        first, last = train(**options)
        assert last < first, options
