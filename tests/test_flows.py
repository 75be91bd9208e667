r"""The ``torch.optim`` flows — ``loss.backward(); opt.step()`` and ``opt.step(closure)`` — and
:class:`kfac_func.Preconditioner` feeding SGD and AdamW.

The reference is the functional step ``opt.step(inputs, targets)``, itself checked against hand-written
references and dense oracles (``test_pure.py``, ``test_exact_blocks.py``): where the mathematics is the same
(same batch, same gradient, same statistics, same MC key) the parameters must agree to rounding after several
steps with refreshes, weight decay, momentum and the KL clip. The preconditioner's first output is checked
against an oracle built directly from :func:`kfac_func.capture`, :func:`kfac_func.kronecker_factors`,
:func:`kfac_func.eigendecompose` and :func:`kfac_func.precondition`.
"""

from __future__ import annotations

import copy
import math

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf
import oracles as O

DT = torch.float64
STEPS = 4
# the fixed step (lr, momentum, KL clip; eigen damping, statistics every step), the same algorithm in every flow
COMMON = O.fixed_step(loss="cross_entropy", lr=0.1, weight_decay=1e-3, inverse_period=2, kl_clip=1e-2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _cnn() -> nn.Module:  # conv, BatchNorm (buffers move in the user's forward), linear
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(48, 3)).to(DT)


def _data(model: nn.Module, n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (6,) if isinstance(model[0], nn.Linear) else (2, 4, 4)
    return torch.randn((n,) + shape, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _close(a: nn.Module, b: nn.Module, start: nn.Module) -> None:
    for (name, p), q, p0 in zip(a.state_dict().items(), b.state_dict().values(), start.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(a.parameters(), start.parameters()))  # it moved


def _backward_step(opt: kf.KFAC, model: nn.Module, x, y, fisher: str) -> None:
    opt.zero_grad()
    out = model(x)
    if fisher != "empirical":
        opt.curvature_backward(out)
    F.cross_entropy(out, y).backward()
    assert opt.step() is None


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn-batchnorm"])
@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("method", ["kfac", "ekfac", "two_level", "factored", "sparse-statistics"])
def test_backward_and_closure_flows_equal_the_functional_step(make, fisher, method):
    """``sparse-statistics``: factors every 2nd step (no recording, no curvature backward on the others)
    from half of the rows."""
    model = make()
    x, y = _data(model)
    extra = {"factored": {"damping_mode": "factored", "damping": 1e-2},
             "sparse-statistics": {"factor_period": 2, "stats_fraction": 0.5}}.get(method, {"method": method})
    options = dict(COMMON, fisher=fisher, **extra)
    runs = {kind: copy.deepcopy(model) for kind in ("functional", "backward", "closure")}
    opts = {kind: kf.KFAC(m, **options) for kind, m in runs.items()}
    for _ in range(STEPS):
        loss = opts["functional"].step(x, y)
        _backward_step(opts["backward"], runs["backward"], x, y, fisher)

        def closure(m=runs["closure"], o=opts["closure"]):
            o.zero_grad()
            value = F.cross_entropy(m(x), y)
            value.backward()
            return value

        torch.testing.assert_close(opts["closure"].step(closure), loss)
    _close(runs["backward"], runs["functional"], model)
    _close(runs["closure"], runs["functional"], model)
    for kind in ("backward", "closure"):
        torch.testing.assert_close(opts[kind].kfac_state.key, opts["functional"].kfac_state.key, rtol=0, atol=0)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_gradient_accumulation_over_micro_batches_is_one_batch(fisher):
    """Two micro-batches with ``loss / 2`` each, then ``step()``: the functional step on the whole batch
    (exact and empirical Fisher draw no samples, so the statistics are the same rows)."""
    model = _mlp()
    x, y = _data(model)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ref, opt = kf.KFAC(a, fisher=fisher, **COMMON), kf.KFAC(b, fisher=fisher, **COMMON)
    for _ in range(STEPS):
        ref.step(x, y)
        opt.zero_grad()
        for part in (slice(0, 8), slice(8, 16)):
            out = b(x[part])
            if fisher != "empirical":
                opt.curvature_backward(out)
            (F.cross_entropy(out, y[part]) / 2).backward()
        opt.step()
    _close(b, a, model)


def test_the_gradient_is_p_grad_as_the_user_left_it():
    """Halving every ``p.grad`` before ``step()`` (as a clip would) halves the update exactly: lr fixed, no
    momentum, no KL clip, and the statistics (recorded in the forward and backward) are unchanged."""
    model = _mlp()
    x, y = _data(model)
    runs = [copy.deepcopy(model) for _ in range(2)]
    for m, factor in zip(runs, (1.0, 0.5)):
        opt = kf.KFAC(m, loss="cross_entropy", fisher="empirical", lr=0.1, momentum=0.0, kl_clip=None)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        for p in m.parameters():
            p.grad.mul_(factor)
        opt.step()
    for p0, full, half in zip(model.parameters(), *(m.parameters() for m in runs)):
        torch.testing.assert_close(half - p0, 0.5 * (full - p0), rtol=1e-10, atol=1e-14)
        assert (full - p0).abs().max() > 0


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_grad_scaler_flow_equals_the_unscaled_one(fisher):
    """``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` (CPU GradScaler, scale 2¹⁰):
    ``p.grad`` is unscaled by the scaler, the empirical Fisher's output gradients by ``grad_scaler=``."""
    model = _mlp()
    x, y = _data(model)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref = kf.KFAC(a, fisher=fisher, **COMMON)
    opt = kf.KFAC(b, fisher=fisher, grad_scaler=scaler, **COMMON)
    for _ in range(STEPS):
        _backward_step(ref, a, x, y, fisher)
        opt.zero_grad()
        out = b(x)
        if fisher != "empirical":
            opt.curvature_backward(out)
        scaler.scale(F.cross_entropy(out, y)).backward()
        scaler.step(opt)
        scaler.update()
    _close(b, a, model)


def _preconditioned_oracle(model: nn.Module, x, y, damping: float) -> dict[str, torch.Tensor]:
    """``(G ⊗ A + λI)⁻¹ ∇`` per layer with the batch's own empirical-Fisher factors (the first step's
    bias-corrected average is the batch's factors)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="empirical")
    factors = kf.eigendecompose(kf.kronecker_factors(cap, reduce=kf.default_reduce(kf.trace(model, params, x))))
    return kf.precondition(params, cap.grads, factors, layers=kf.trace(model, params, x).layers, damping=damping)


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_preconditioner_replaces_grads_by_the_oracle_and_feeds_adamw(make):
    """The oracle's factors come from the per-position capture; the flow's, for the CNN's reduce layers, are
    captured pooled over positions."""
    model = make()
    x, y = _data(model)
    want = _preconditioned_oracle(model, x, y, damping=1e-3)
    # the oracle's eigen damping, statistics every step
    precond = kf.Preconditioner(model, loss="cross_entropy", fisher="empirical", damping=1e-3, damping_mode="eigen",
                                factor_period=1,
                                kl_clip=None)  # the unclipped direction
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        precond.step()
        if step == 0:
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-12, msg=n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_preconditioner_with_sgd_is_kfac():
    """Preconditioner (KL clip at SGD's lr) + SGD with momentum takes exactly KFAC's steps."""
    model = _mlp()
    x, y = _data(model)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ref = kf.KFAC(a, loss="cross_entropy", **O.fixed_step(lr=0.1, momentum=0.9, kl_clip=1e-2, inverse_period=2))
    precond = kf.Preconditioner(b, loss="cross_entropy", kl_clip=1e-2, lr=lambda: sgd.param_groups[0]["lr"],
                                inverse_period=2,
                                damping_mode="eigen", factor_period=1)  # FIXED_STEP's (SGD owns the step)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        ref.step(x, y)
        sgd.zero_grad()
        out = b(x)
        precond.curvature_backward(out)
        F.cross_entropy(out, y).backward()
        precond.step()
        sgd.step()
    _close(b, a, model)


def test_flow_errors_are_clear_and_change_nothing():
    model = _mlp()
    x, y = _data(model)
    opt = kf.KFAC(model, loss="cross_entropy")
    with pytest.raises(ValueError, match="no forward of the model was recorded"):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"curvature_backward\(output\)"):
        opt.step()  # fisher="mc" without its backward
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert int(opt.kfac_state.step) == 0
    with pytest.raises(ValueError, match="needs step\\(inputs, targets\\)"):
        adaptive = kf.KFAC(model, loss="cross_entropy", fisher="empirical", adaptive="lr")
        F.cross_entropy(model(x), y).backward()
        adaptive.step()
    with pytest.raises(TypeError, match="function model"):
        kf.KFAC(lambda p, v: v @ p["w"], {"w": torch.zeros(6, 3, requires_grad=True)}).step()
    for own in (dict(momentum=0.9), dict(step_scale=kf.cosine_decay(10))):
        with pytest.raises(TypeError, match=f"{next(iter(own))}.*owns the step"):
            kf.Preconditioner(model, loss="cross_entropy", **own)
    with pytest.raises(ValueError, match="computed by the model's last forward with gradients on"):
        opt.curvature_backward(torch.zeros(16, 3, requires_grad=True))
    model(x)
    with pytest.raises(ValueError, match="does not depend on the model's last forward"):
        opt.curvature_backward(torch.zeros(16, 3, requires_grad=True) * 2)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_forward_without_backward_is_not_statistics(fisher):
    """An evaluation forward with gradients on (no backward, no curvature backward) before the training forward
    contributes nothing: the step equals the one without it."""
    model = _mlp()
    x, y = _data(model)
    held_out = _data(model, seed=5)[0]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ref, opt = kf.KFAC(a, fisher=fisher, **COMMON), kf.KFAC(b, fisher=fisher, **COMMON)
    for _ in range(3):
        _backward_step(ref, a, x, y, fisher)
        b(held_out).sum()  # evaluated with gradients on, never backpropagated
        _backward_step(opt, b, x, y, fisher)
    _close(b, a, model)


def test_copies_under_the_recorded_flow():
    """``deepcopy(model)`` alone copies no optimizer and is not recorded by it (its hooks do nothing); the pair
    copy ``deepcopy((model, opt))`` records its own model and continues exactly as the original."""
    model = _mlp()
    x, y = _data(model)
    opt = kf.KFAC(model, fisher="mc", **COMMON)
    _backward_step(opt, model, x, y, "mc")
    alone = copy.deepcopy(model)
    F.cross_entropy(alone(x), y).backward()
    assert opt._recorder.records == []
    pair_model, pair_opt = copy.deepcopy((model, opt))
    for _ in range(3):
        _backward_step(opt, model, x, y, "mc")
        _backward_step(pair_opt, pair_model, x, y, "mc")
    for p, q in zip(model.parameters(), pair_model.parameters()):
        assert torch.equal(p, q)


def test_functional_calls_of_the_model_are_not_recorded():
    """Another optimizer's functional step on the same model (``functional_call`` swaps its parameters) is not
    the user's forward: nothing is recorded, so the recorded flow's step is unchanged by it."""
    model = _mlp()
    x, y = _data(model)
    twin = copy.deepcopy(model)
    opt, ref = kf.KFAC(model, fisher="empirical", **COMMON), kf.KFAC(twin, fisher="empirical", **COMMON)
    other = kf.KFAC(model, fisher="empirical", **COMMON)  # a second optimizer of the same model
    other.step(x, y)  # runs the model functionally while opt's hooks are on it
    assert opt._recorder.records == [] and opt._recorder.plan is None  # not even traced (no layer mode entered)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)
    _backward_step(opt, model, x, y, "empirical")
    _backward_step(ref, twin, x, y, "empirical")
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_forward_with_several_arguments_is_recorded():
    """A model called with a keyword argument and returning a tuple is recorded as written: its steps equal
    ``step(kf.Args(x, scale=2.0), y)``'s on the same batches and key."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3).to(DT)

        def forward(self, x, scale=1.0):
            out = self.lin(x) * scale
            return out, out.sum()

    torch.manual_seed(0)
    model = Two()
    twin = copy.deepcopy(model)
    opt = kf.KFAC(model, fisher="empirical", **COMMON)
    ref = kf.KFAC(twin, fisher="empirical", **COMMON)
    for seed in range(2):
        x, y = _data(_mlp(), seed=seed)
        opt.zero_grad()
        F.cross_entropy(model(x, scale=2.0)[0], y).backward()
        opt.step()
        ref.step(kf.Args(x, scale=2.0), y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_the_gradient_flows_take_the_fixed_step_of_the_defaults():
    """``KFAC(model)``'s defaults (the quadratic-model step with Levenberg–Marquardt damping, factored damping,
    statistics every 5 steps) by flow: ``loss.backward(); opt.step()`` cannot evaluate the model again, so it takes
    the fixed step (lr, momentum, KL clip) of otherwise the same defaults — ``step(x, y)`` of
    ``KFAC(adaptive=None, damping_adaptation=False)`` to rounding (the flows' gradients differ in the last bits),
    and bit for bit the same flow with those options given — across the statistics at step 5 and the
    decomposition refresh at step 10 that reads them; ``step(x, y)`` takes the pure ``kf.kfac`` defaults' step,
    whose ``α`` and ``μ`` come from the quadratic model; asking the gradient flow for the quadratic model is an
    error."""
    model = _mlp()
    batches = [_data(model, seed=s) for s in range(11)]
    fixed_options = {"adaptive": None, "damping_adaptation": False}
    runs = {kind: copy.deepcopy(model) for kind in ("defaults", "functional", "explicit")}
    opts = {"defaults": kf.KFAC(runs["defaults"], loss="cross_entropy"), "functional": kf.KFAC(runs["functional"], loss="cross_entropy",
                                                                                   **fixed_options),
            "explicit": kf.KFAC(runs["explicit"], loss="cross_entropy", **fixed_options)}
    for x, y in batches:
        _backward_step(opts["defaults"], runs["defaults"], x, y, "mc")  # the default loss (cross-entropy), MC Fisher
        _backward_step(opts["explicit"], runs["explicit"], x, y, "mc")
        opts["functional"].step(x, y)
        info = opts["defaults"].info
        assert info.alpha <= 1e-2 and (info.mu, info.damping) == (0.9, 1e-3)  # lr (or less: the KL clip), fixed λ
    assert int(opts["defaults"].kfac_state.step) == 11
    _close(runs["defaults"], runs["functional"], model)
    for (name, p), q in zip(runs["defaults"].named_parameters(), runs["explicit"].parameters()):
        assert torch.equal(p, q), name

    functional = copy.deepcopy(model)
    opt = kf.KFAC(functional, loss="cross_entropy")
    pure = kf.kfac(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = pure.init(params, batches[0][0])
    for t, (x, y) in enumerate(batches[:6]):
        loss = opt.step(x, y)
        params, state, info = pure.step(params, state, x, y)
        assert torch.equal(loss, info.loss)
        assert (opt.info.alpha, opt.info.mu, opt.info.damping) == (float(info.alpha), float(info.mu),
                                                                     float(info.damping))
        assert opt.info.alpha != 1e-2 and opt.info.mu != 0.9  # the quadratic model's, not lr and momentum
        assert (opt.info.rho is None) == (t % 5 != 0)  # Levenberg–Marquardt's ρ at steps 0 and 5
    for n, p in functional.named_parameters():
        assert torch.equal(p.detach(), params[n]), n

    adaptive = kf.KFAC(copy.deepcopy(model), loss="cross_entropy", adaptive="lr_momentum")
    with pytest.raises(ValueError, match=r"needs step\(inputs, targets\)"):
        _backward_step(adaptive, adaptive.model, *batches[0], "mc")


def test_a_forward_the_trace_cannot_take_runs_and_the_step_says_why():
    """A model hard-wired to one batch size cannot run on the doubled batch the trace uses to find the examples:
    the user's forward and backward run as usual, the step raises with that reason and changes nothing."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3).to(DT)

        def forward(self, x):
            return self.lin(x.view(16, 6))

    model = Fixed()
    x, y = _data(_mlp())
    opt = kf.KFAC(model, loss="cross_entropy", fisher="empirical")
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="could not be recorded: ValueError: kfac_func finds which dim"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entry for entry, NaN where NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.where(a.isnan(), 0.0, a), torch.where(b.isnan(), 0.0, b))


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("flow", ["backward", "closure", "preconditioner"])
def test_a_non_finite_gradient_with_a_finite_loss_changes_nothing(flow, bad):
    """A finite loss and finite statistics (the user's forward, the Fisher's backward and ``loss.backward()``),
    but one non-finite entry of ``p.grad``: the step is skipped with a warning, and the parameters, every tensor
    of the K-FAC state and (Preconditioner) every ``p.grad`` are as they were."""
    model = _mlp()
    batches = [_data(model, seed=s) for s in (1, 2)]
    if flow == "preconditioner":
        precond = kf.Preconditioner(model, loss="cross_entropy", fisher="mc", damping_mode="eigen", factor_period=1,
                                    inverse_period=2)
        opt, step = precond.optimizer, precond.step
    else:
        opt = kf.KFAC(model, fisher="mc", **COMMON)  # momentum, weight decay, statistics every step
        step = opt.step

    def forward_backward(x, y, poison: float | None) -> torch.Tensor:
        opt.zero_grad()
        out = model(x)
        if flow != "closure":  # the closure's Fisher backward runs by itself
            opt.curvature_backward(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if poison is not None:
            with torch.no_grad():
                model[2].weight.grad[1, 2] = poison
        return loss

    def take(x, y, poison: float | None = None) -> torch.Tensor:
        if flow == "closure":
            return opt.step(lambda: forward_backward(x, y, poison))
        loss = forward_backward(x, y, poison)
        step()
        return loss

    take(*batches[0])  # a state with a velocity, a key and factors
    params = [p.detach().clone() for p in model.parameters()]
    state = optree.tree_map(torch.clone, opt.kfac_state)
    if flow == "closure":
        grads = None
        with pytest.warns(UserWarning, match="non-finite"):
            assert math.isfinite(take(*batches[1], poison=bad).item())
    else:
        assert math.isfinite(forward_backward(*batches[1], poison=bad).item())
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.warns(UserWarning, match="non-finite"):
            step()
    assert all(_same(p.detach(), q) for p, q in zip(model.parameters(), params))
    if flow == "preconditioner":
        assert all(_same(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert optree.tree_structure(opt.kfac_state) == optree.tree_structure(state)
    for path, a, b in zip(*optree.tree_flatten_with_path(opt.kfac_state)[:2], optree.tree_leaves(state)):
        assert _same(a, b), path


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_recorded_forward_left_without_a_step_is_superseded_by_step_inputs_targets(fisher):
    """A recorded forward and backward (and the Fisher's backward) of one batch left without ``step()``, then
    ``step(x, y)`` and a recorded step on other batches: each step's parameters equal those of the same two steps
    on a fresh optimizer (the left-over rows enter no statistics), and so does the whole state. A refresh every step:
    the recorded step's own statistics move its parameters."""
    model = _mlp()
    (x0, y0), (x1, y1), (x2, y2) = (_data(model, seed=s) for s in (3, 4, 5))
    runs = {kind: copy.deepcopy(model) for kind in ("mixed", "fresh")}
    opts = {kind: kf.KFAC(m, fisher=fisher, **dict(COMMON, inverse_period=1)) for kind, m in runs.items()}
    out = runs["mixed"](x0)
    if fisher != "empirical":
        opts["mixed"].curvature_backward(out)
    F.cross_entropy(out, y0).backward()
    for x, y, recorded in ((x1, y1, False), (x2, y2, True)):
        for kind, opt in opts.items():
            _backward_step(opt, runs[kind], x, y, fisher) if recorded else opt.step(x, y)
        for (name, p), q in zip(runs["mixed"].named_parameters(), runs["fresh"].parameters()):
            assert torch.equal(p, q), name
        state, fresh = opts["mixed"].kfac_state, opts["fresh"].kfac_state
        assert optree.tree_structure(state) == optree.tree_structure(fresh)
        for path, a, b in zip(*optree.tree_flatten_with_path(state)[:2], optree.tree_leaves(fresh)):
            assert torch.equal(a, b), path
    assert any(not torch.equal(p, q) for p, q in zip(runs["mixed"].parameters(), model.parameters()))
