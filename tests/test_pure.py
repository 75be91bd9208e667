"""The pure optimizer ``kfac(model).init/step``: a hand-written reference of the orchestration (refresh
periods, moving averages, KL clip, momentum, weight decay, key splitting) over several steps; nested
pytrees equal flat dicts; ``torch.compile`` equals eager for every Fisher type with refreshes inside the
compiled run; ``vmap`` over an ensemble equals the loop (an MLP; a CNN with pooled statistics); the reduce
layers' pooled statistics give the per-position capture's factors; a NaN batch changes nothing; ``KFAC`` is
the pure step."""

from __future__ import annotations

import gc
import math
import warnings
from unittest import mock

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.func import vmap

import kfac_func as kf
import oracles as O
from kfac_func import random
from kfac_func.models import CharTransformer

DT = torch.float64


def mlp(params, x):
    h = torch.tanh(F.linear(x, params["l1"]["w"], params["l1"]["b"]))
    return F.linear(h, params["l2"]["w"], params["l2"]["b"])


def nested_params(seed: int = 0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.5 * torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"l1": {"w": r(8, 5), "b": r(8)}, "l2": {"w": r(3, 8), "b": r(3)}}


def batches(steps: int, n: int = 12, seed: int = 1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def run(opt, params, data):
    state = opt.init(params, data[0][0])
    infos = []
    for x, y in data:
        params, state, info = opt.step(params, state, x, y)
        infos.append(info)
    return params, state, infos


def flat(tree):
    return kf.tree.flatten(tree)[0]


# held sides (:mod:`kfac_func.layout`): l1's G (8) in blocks of 3 (3, 3, 2) and a diagonal A; l2's A (9) in blocks
# of 4 (4, 4, 1) and an identity G
SIDES = {"l1": {"G": 3, "A": "diagonal"}, "l2": {"A": 4, "G": "identity"}}  # layers named by their weight's path less ".w"


@pytest.mark.parametrize("fisher, mode, factor_period, sides", [
    ("exact", "eigen", 1, None), ("mc", "eigen", 1, None), ("mc", "factored", 2, None), ("exact", "factored", 1, None),
    ("exact", "eigen", 1, SIDES), ("mc", "factored", 2, SIDES)])
def test_steps_equal_a_hand_written_reference(fisher, mode, factor_period, sides):
    """Five steps of K-FAC (decompositions every 2 steps — eigen, or π-damped Cholesky inverses —, factors
    every ``factor_period`` steps, EMA 0.8 with bias correction, KL clip, momentum, weight decay) against
    the stages composed by hand, with the key split as documented: ``key, sample = split(key)`` each step
    (statistics or not)."""
    lr, mom, wd, lam, beta, kl, period = 0.3, 0.7, 1e-2, 0.05, 0.8, 1e-3, 2
    opt = kf.kfac(mlp, lr=lr, momentum=mom, weight_decay=wd, damping=lam, ema_decay=beta, kl_clip=kl,
                  inverse_period=period, fisher=fisher, seed=7, factor_sides=sides,
                  **O.fixed_step(damping_mode=mode, factor_period=factor_period))
    params, data = nested_params(), batches(5)
    got, state, infos = run(opt, params, data)

    p = flat(params)
    key = random.key(7)
    avg = None
    velocity = {n: torch.zeros_like(t) for n, t in p.items()}
    weight = 0.0
    for t, (x, y) in enumerate(data):
        key, sample = random.split(key)
        tree = kf.tree.flatten(params)[1].unflatten(p)
        stats = t % factor_period == 0
        cap = kf.capture(mlp, tree, x, y, "cross_entropy", fisher=fisher if stats else None, key=sample)
        if stats:
            batch = kf.kronecker_factors(cap, reduce=True, factor_sides=sides)  # (N, C) output: reduce (= expand)
            if avg is None:
                avg = {n: kf.KroneckerFactors(*(0 * f for f in batch[n])) for n in batch}
            avg = {n: kf.KroneckerFactors(*(beta * m + (1 - beta) * f for m, f in zip(avg[n], batch[n])))
                   for n in batch}
            weight = beta * weight + (1 - beta)
        if t % period == 0:
            mean = {n: kf.KroneckerFactors(*(m / weight for m in avg[n])) for n in avg}
            factors = kf.eigendecompose(mean) if mode == "eigen" else kf.inverse_factors(mean, lam)
        plan = kf.trace(mlp, tree, x)
        grads = flat(cap.grads)
        delta = kf.precondition(p, grads, factors, layers=plan.layers, damping=lam if mode == "eigen" else None,
                                mode=mode)
        vg = abs(sum(lr**2 * (delta[n] * grads[n]).sum() for n in p))
        nu = min(1.0, math.sqrt(kl / vg))
        for n in p:
            velocity[n] = mom * velocity[n] + (nu * delta[n] + wd * p[n])
            p[n] = p[n] - lr * velocity[n]
        assert float(infos[t].alpha) == pytest.approx(lr * nu, rel=1e-12)
    for n, v in flat(got).items():
        torch.testing.assert_close(v, p[n], rtol=1e-11, atol=1e-13)
    assert int(state.step) == 5 and torch.equal(state.key, key)
    assert optree.tree_structure(got) == optree.tree_structure(params)


# the fixed step per method (eigen damping, statistics every step), and the adaptive step with the quadratic model
# on the whole batch, eigen damping and statistics every step (L-M every 2 steps, rejection)
METHODS = {
    "kfac-eigen": O.fixed_step(),
    "kfac-factored": O.fixed_step(damping_mode="factored"),
    "ekfac": O.fixed_step(method="ekfac"),
    "two-level-bnn": O.fixed_step(method="two_level", combination="bnn"),
    "adaptive": O.exact_model(adaptive="lr_momentum", damping_adaptation=True, damping_interval=2, reject_steps=True),
}


def conv_net(params, x):
    h = torch.tanh(F.conv2d(x, params["conv"]["w"], params["conv"]["b"], stride=2, padding=1, dilation=2))
    return F.linear(h.flatten(1), params["head"]["w"], params["head"]["b"])


def conv_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    return {"conv": {"w": r(4, 2, 3, 3), "b": r(4)}, "head": {"w": r(3, 36), "b": r(3)}}


def conv_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("options, pooled", [
    ({}, True), (dict(method="ekfac"), False), (dict(method="two_level"), False),
    (dict(quadratic_curvature="fisher"), False)])
def test_reduce_layers_capture_pooled_statistics(options, pooled):
    """With only the factors reading the statistics (K-FAC, the GGN quadratic model), the reduce layers (an
    ``(N, C)`` output) capture them pooled over positions; E-KFAC's scaling, the coarse matrix and the Fisher
    quadratic forms read them per position. Either way the first step's factors are the batch's reduce
    factors from the per-position capture."""
    params, (x, y) = conv_params(), conv_batch()
    opt = kf.kfac(conv_net, fisher="exact", **options)
    state = opt.init(params, x)
    plan = kf.trace(conv_net, params, x)
    assert opt.compact(plan, opt.schedule(state)) == ({n: True for n in plan.layers} if pooled else {})
    _, state, _ = opt.step(params, state, x, y)
    want = kf.kronecker_factors(kf.capture(conv_net, params, x, y, "cross_entropy", fisher="exact"), reduce=True)
    got = kf.averaged(state.factors)
    for name in plan.layers:
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(METHODS))
def test_nested_pytrees_equal_flat_dicts(name):
    """The same function on nested, tuple and flat parameters: identical results, structure kept."""
    kwargs = {"inverse_period": 2, "fisher": "mc", **METHODS[name]}
    data = batches(3)

    def tuple_mlp(params, x):
        (w1, b1), (w2, b2) = params
        return mlp({"l1": {"w": w1, "b": b1}, "l2": {"w": w2, "b": b2}}, x)

    def flat_mlp(params, x):
        layer = lambda i: {"w": params[f"l{i}.w"], "b": params[f"l{i}.b"]}  # noqa: E731
        return mlp({"l1": layer(1), "l2": layer(2)}, x)

    nested = nested_params()
    got_nested, _, _ = run(kf.kfac(mlp, **kwargs), nested, data)
    got_flat, _, _ = run(kf.kfac(flat_mlp, **kwargs), flat(nested), data)
    tup = ((nested["l1"]["w"], nested["l1"]["b"]), (nested["l2"]["w"], nested["l2"]["b"]))
    got_tuple, _, _ = run(kf.kfac(tuple_mlp, **kwargs), tup, data)
    assert optree.tree_structure(got_nested) == optree.tree_structure(nested)
    assert optree.tree_structure(got_tuple) == optree.tree_structure(tup)
    for n, v in flat(got_nested).items():
        assert torch.equal(v, got_flat[n])
    (w1, b1), (w2, b2) = got_tuple
    for a, b in zip((w1, b1, w2, b2), (got_flat["l1.w"], got_flat["l1.b"], got_flat["l2.w"], got_flat["l2.b"])):
        assert torch.equal(a, b)


def test_compiled_step_equals_eager():
    """``torch.compile(step)`` over six steps (decompositions at steps 0, 2, 4: refreshes inside the
    compiled run; a new batch size at steps 4 and 5; MC samples from the state's key) equals the eager run, in
    one graph per schedule and shape kind: (refresh or not) × (first shape, dynamic batch) = 4 graphs at most.
    The exact and empirical Fisher compile in :func:`test_update_compiles_with_fullgraph`."""
    opt = kf.kfac(mlp, fisher="mc", inverse_period=2, seed=3, **O.fixed_step())  # statistics every step
    params = nested_params()
    data = batches(4) + batches(2, n=7, seed=5)
    want, want_state, _ = run(opt, params, data)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(opt.step, backend="aot_eager")
    state = opt.init(params, data[0][0])
    got = params
    for x, y in data:
        got, state, info = step(got, state, x, y)
        assert bool(info.finite)
    assert counters["stats"]["unique_graphs"] == 4
    for a, b in zip(optree.tree_leaves((got, state)), optree.tree_leaves((want, want_state))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# the schedules of three steps with inverse_period=2: the fixed step (statistics every step) is refreshed or not
# (2 graphs); the defaults (statistics and L-M every 5 steps) run step 0 with a refresh, statistics and L-M,
# step 1 with none of them, step 2 with a refresh only (3 graphs). Each Fisher type, dense and held sides.
@pytest.mark.parametrize("sides, options, graphs", [
    (None, {**O.FIXED_STEP, "fisher": "exact"}, 2),
    (SIDES, {"fisher": "empirical", "step_scale": kf.cosine_decay(2)}, 3),
], ids=["dense-fixed-step-exact", "held-defaults-empirical-annealed"])
def test_update_compiles_with_fullgraph(sides, options, graphs):
    """``update`` with the host schedule is one graph per schedule: fullgraph=True works (every Fisher type;
    dense and held sides; the fixed step and the defaults, annealed by a step scale read from the state)."""
    opt = kf.kfac(mlp, inverse_period=2, seed=3, factor_sides=sides, **options)
    params, data = nested_params(), batches(3)
    want, _, _ = run(opt, params, data)
    torch._dynamo.reset()
    update = torch.compile(opt.update, backend="aot_eager", fullgraph=True)
    state = opt.init(params, data[0][0])
    got = params
    counters.clear()
    for x, y in data:
        got, state, _ = update(got, state, x, y, opt.schedule(state))
    assert counters["stats"]["unique_graphs"] == graphs  # one per schedule
    for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sides", [None, SIDES])
def test_vmap_over_an_ensemble_equals_the_loop(sides):
    """``vmap(step)`` over three stacked members, each with its own key (MC Fisher), equals stepping
    each member alone; the members draw different samples (dense and held sides; the steps annealed)."""
    opt = kf.kfac(mlp, inverse_period=2, factor_sides=sides, step_scale=kf.cosine_decay(3))
    members = [nested_params(seed) for seed in range(3)]
    data = batches(3)
    states = [opt.init(p, data[0][0], key=random.key(10 + i)) for i, p in enumerate(members)]
    stack = lambda trees: optree.tree_map(lambda *t: torch.stack(t), *trees)  # noqa: E731
    params, state = stack(members), stack(states)
    step = vmap(opt.step, in_dims=(0, 0, None, None))
    loops = list(zip(members, states))
    for x, y in data:
        params, state, info = step(params, state, x, y)
        loops = [opt.step(p, s, x, y)[:2] for p, s in loops]
    for i, (p, s) in enumerate(loops):
        for a, b in zip(optree.tree_leaves((p, s)), optree.tree_leaves((params, state))):
            torch.testing.assert_close(a, b[i], rtol=1e-10, atol=1e-12)
    # the same parameters with different keys: different MC factors
    same = stack([members[0]] * 2)
    one = stack([opt.init(members[0], data[0][0], key=random.key(k)) for k in (1, 2)])
    _, out, _ = vmap(opt.step, in_dims=(0, 0, None, None))(same, one, *data[0])
    assert not torch.equal(out.factors.value["l1"].G[0], out.factors.value["l1"].G[1])


def test_vmap_over_a_conv_ensemble_equals_the_loop():
    """The defaults (pooled statistics of the conv: strided windows averaged under ``vmap``) over two stacked
    members equal stepping each alone."""
    opt = kf.kfac(conv_net)
    members = [conv_params(seed) for seed in range(2)]
    x, y = conv_batch()
    stack = lambda trees: optree.tree_map(lambda *t: torch.stack(t), *trees)  # noqa: E731
    params, state = stack(members), stack([opt.init(p, x) for p in members])
    loops = [(p, opt.init(p, x)) for p in members]
    for _ in range(2):
        params, state, _ = vmap(opt.step, in_dims=(0, 0, None, None))(params, state, x, y)
        loops = [opt.step(p, s, x, y)[:2] for p, s in loops]
    for i, (p, s) in enumerate(loops):
        for a, b in zip(optree.tree_leaves((p, s)), optree.tree_leaves((params, state))):
            torch.testing.assert_close(a, b[i], rtol=1e-10, atol=1e-12)


# the NaN batch reaches the statistics and a refresh (statistics every step, decompositions every step): in the
# fixed step, and in the defaults' quadratic-model step with L-M at that step too
NAN_STEPS = {"fixed-step": O.fixed_step(), "adaptive": dict(factor_period=1, damping_interval=1)}


@pytest.mark.parametrize("step_options", list(NAN_STEPS))
@pytest.mark.parametrize("mode", ["eager", "compile", "vmap"])
def test_a_nan_batch_changes_nothing(mode, step_options):
    """A NaN input leaves parameters and every state tensor (key included) as they were; ``info``
    says so."""
    opt = kf.kfac(mlp, inverse_period=1, **NAN_STEPS[step_options])
    params, data = nested_params(), batches(2)
    _, state, _ = run(opt, params, data[:1])
    x, y = data[1]
    bad = x.clone()
    bad[3, 1] = float("nan")
    step = opt.step
    if mode == "compile":
        torch._dynamo.reset()
        step = torch.compile(opt.step, backend="aot_eager")
    if mode == "vmap":
        ps, ss = optree.tree_map(lambda t: t.unsqueeze(0), (params, state))
        new, new_state, info = vmap(opt.step, in_dims=(0, 0, None, None))(ps, ss, bad, y)
        new, new_state, info = optree.tree_map(lambda t: t[0], (new, new_state, info))
    else:
        new, new_state, info = step(params, state, bad, y)
    assert not bool(info.finite) and bool(info.rejected)
    for a, b in zip(optree.tree_leaves((new, new_state)), optree.tree_leaves((params, state))):
        assert torch.equal(a, b)


def test_kfac_wrapper_is_the_pure_step():
    """``KFAC(module)`` and the pure step on the module's parameters give identical parameters and
    state (E-KFAC with weight decay and momentum, several steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = dict(method="ekfac", weight_decay=1e-2, inverse_period=2, lr=0.1)
    opt = kf.KFAC(model, **kwargs)
    data = batches(4)
    for x, y in data:
        opt.step(x, y)
    got, state, _ = run(kf.kfac(model, **kwargs), params, data)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), got[n])
    for a, b in zip(optree.tree_leaves(state), optree.tree_leaves(opt.kfac_state)):
        assert torch.equal(a, b)


def test_a_module_moved_to_meta_runs_the_same_steps():
    """The pure step reads only the ``params`` it is given: a module moved to the meta device after its
    parameters are taken (which frees the module's own copy, as torch.func's ensembling recipe does) gives
    bit-identical parameters and state over steps with statistics, a refresh and ``ρ``."""
    torch.manual_seed(0)
    model = CharTransformer(11, 6, dim=8, heads=2, layers=1).to(DT)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    data = [(torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g)) for _ in range(3)]
    kwargs = dict(loss="cross_entropy", factor_period=2, inverse_period=2, damping_interval=1)
    want, want_state, want_infos = run(kf.kfac(model, **kwargs), params, data)
    got, state, infos = run(kf.kfac(model.to("meta"), **kwargs), params, data)
    assert all(p.is_meta for p in model.parameters())
    assert not any(bool(i.rho.isnan()) for i in infos)  # ρ was evaluated on the meta module's function
    for a, b in zip(optree.tree_leaves((got, state)), optree.tree_leaves((want, want_state))):
        assert torch.equal(a, b)


def test_the_state_is_tensors_only():
    for kwargs in METHODS.values():
        state = kf.kfac(mlp, **kwargs).init(nested_params(), batches(1)[0][0])
        assert all(isinstance(t, torch.Tensor) for t in optree.tree_leaves(state, none_is_leaf=True))


def test_random_draws_are_uniform_and_keyed():
    """The counter-based generator: moments and class frequencies within 5 standard errors, the same
    key gives the same draws, split keys give different ones."""
    k1, k2 = random.split(random.key(0))
    u = random.uniform(k1, (200_000,), DT)
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * (1 / 180 / n) ** 0.5
    assert 0 < float(u.min()) and float(u.max()) < 1
    z = random.normal(k2, (200_000,), DT)
    assert abs(float(z.mean())) < 5 / n**0.5 and abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)
    draws = random.categorical(k1, p.expand(50_000, 4), 2).flatten()
    freq = torch.bincount(draws, minlength=4).to(DT) / draws.numel()
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / draws.numel()).sqrt())
    # the cumulative sums taken a chunk of rows at a time draw the same classes; a non-finite entry counts as ½
    rows = torch.rand(20, 4, dtype=DT)
    whole = random.categorical(k2, rows, 3)
    with mock.patch.object(random, "CATEGORICAL_ENTRIES", 4 * 7):  # chunks of 7 rows
        assert torch.equal(random.categorical(k2, rows, 3), whole)
    rows[5] = torch.tensor([0.0, float("inf"), 1.0, 0.0])
    assert set(random.categorical(k2, rows, 400)[:, 5].tolist()) == {1, 2}
    assert torch.equal(random.uniform(k1, (5,)), random.uniform(k1, (5,)))
    assert not torch.equal(random.uniform(k1, (5,)), random.uniform(k2, (5,)))
    # each index's draw is a function of (key, index): a longer draw starts with the shorter one
    assert torch.equal(random.uniform(k1, (3,), DT), random.uniform(k1, (6,), DT)[:3])


def test_compiled_kfac_wrapper_equals_eager():
    """``torch.compile(opt.step)`` of the ``torch.optim`` wrapper trains exactly like the eager wrapper (the
    defaults: statistics, a refresh and Levenberg–Marquardt, then a step with none of them)."""
    data = batches(2)

    def train(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        opt = kf.KFAC(model, inverse_period=2)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        losses = [step(x, y) for x, y in data]
        return losses, list(model.parameters())

    torch._dynamo.reset()
    (want_loss, want), (got_loss, got) = train(False), train(True)
    for a, b in zip(want_loss + want, got_loss + got):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def test_kfac_wrapper_takes_a_nested_pytree():
    """``KFAC(f, nested_params)`` trains the leaves in place exactly as the pure step does."""
    params = optree.tree_map(lambda t: t.clone().requires_grad_(), nested_params())
    opt = kf.KFAC(mlp, params, inverse_period=2)
    data = batches(3)
    for x, y in data:
        opt.step(x, y)
    want, _, _ = run(kf.kfac(mlp, inverse_period=2), nested_params(), data)
    for a, b in zip(optree.tree_leaves(params), optree.tree_leaves(want)):
        assert torch.equal(a.detach(), b)


def test_compiling_a_vmapped_step_says_it_ran_eagerly():
    """``torch.compile(vmap(opt.step))`` (the JAX habit) cannot compile — the schedule is read on the host — and
    runs eagerly: it says so, naming the pattern that compiles — ``torch.compile(vmap(opt.update), fullgraph=True)``
    with the schedule passed, which equals the eager ensemble; an eager ``vmap(opt.step)`` says nothing."""
    opt = kf.kfac(mlp, **O.fixed_step())
    members = [nested_params(seed) for seed in range(2)]
    x, y = batches(1)[0]
    stack = lambda trees: optree.tree_map(lambda *t: torch.stack(t), *trees)  # noqa: E731
    params, state = stack(members), stack([opt.init(p, x) for p in members])
    step = vmap(opt.step, in_dims=(0, 0, None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = step(params, state, x, y)
    torch._dynamo.reset()
    # earlier tests' dead models leave the weakly keyed plan cache now: not while dynamo builds its guards on it
    gc.collect()
    with pytest.warns(UserWarning, match=r"could not compile vmap\(opt.step\).*torch.func.vmap\(opt.update\)"):
        got = torch.compile(step, backend="aot_eager")(params, state, x, y)
    for a, b in zip(optree.tree_leaves(got[:2]), optree.tree_leaves(want[:2])):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    update = torch.compile(vmap(opt.update, in_dims=(0, 0, None, None, None)), backend="aot_eager", fullgraph=True)
    got = update(params, state, x, y, opt.schedule(opt.init(members[0], x)))  # the pattern that compiles
    for a, b in zip(optree.tree_leaves(got[:2]), optree.tree_leaves(want[:2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
