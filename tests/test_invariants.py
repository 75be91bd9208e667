r"""Invariants of capture / kronecker_factors that hold for any network (DESIGN.md §4):
mean = sum scaled by R; a batch split and merged = the whole batch; ``vmap`` over an ensemble = a loop;
a plain ``f(params, x)`` = the equivalent ``nn.Module``; >2-D outputs = flattened outputs."""

from __future__ import annotations

import sys

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import vmap

import kfac_func as kf
from oracles import DT, budget, loss_grads, make_target, mlp, params_of, reduction_scale

KINDS = ["cross_entropy", "mse", "bce_with_logits"]
FISHERS = ["exact", "empirical", "mc"]
seeds = st.integers(0, 2**16)


def assert_close(actual, expected, atol=1e-11, rtol=1e-9):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def assert_trees_close(actual, expected, **kw):
    assert optree.tree_structure(actual) == optree.tree_structure(expected)
    for x, y in zip(optree.tree_leaves(actual), optree.tree_leaves(expected)):
        assert_close(x, y, **kw)


class ConvNet(nn.Module):
    """Grouped, strided conv (S > 1, B = 2) → tanh → flatten → linear."""

    def __init__(self, bias=True, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2, stride=2, padding=1, groups=2, bias=bias)
        self.fc = nn.Linear(4 * 3 * 3, classes, bias=bias)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def conv_net(seed, bias=True):
    torch.manual_seed(seed)
    return ConvNet(bias).to(DT)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def capture(model, params, x, y, kind, reduction, fisher, seed=123, ignore_index=-100, **kw):
    loss = kf.Loss(kind, reduction, ignore_index, class_dim=1 if kind == "cross_entropy" else None)  # (N, C, ...)
    return kf.capture(model, params, x, y, loss, fisher=fisher,
                      mc_samples=kw.pop("mc_samples", 3), key=kf.random.key(seed), **kw)


# ----------------------------------------------------------------------------------------------------
# mean = R · sum
# ----------------------------------------------------------------------------------------------------


@given(seed=seeds, n=st.integers(2, 5), kind=st.sampled_from(KINDS), fisher=st.sampled_from(FISHERS),
       reduce=st.booleans())
@settings(max_examples=budget(10))
def test_mean_is_scaled_sum(seed, n, kind, fisher, reduce):
    """G and the gradients scale by R (1/N for cross-entropy — counting non-ignored targets — and
    1/numel for MSE/BCE); A is identical. MC draws the same targets for both (same seed)."""
    model = conv_net(seed)
    params = params_of(model)
    g = gen(seed)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=DT)
    y = make_target(kind, (n, 3), g, ignore_frac=0.3)
    if kind == "cross_entropy":
        y[1] = 1  # at least two counted targets, so R != 1
    mean = capture(model, params, x, y, kind, "mean", fisher)
    total = capture(model, params, x, y, kind, "sum", fisher)
    R = reduction_scale(kind, "mean", model(x), y)
    assert R < 1.0
    assert_close(mean.loss, R * total.loss)
    assert_trees_close(mean.grads, optree.tree_map(lambda t: R * t, total.grads))
    fm, fs = kf.kronecker_factors(mean, reduce=reduce), kf.kronecker_factors(total, reduce=reduce)
    for name in fs:
        assert_close(fm[name].A, fs[name].A)
        assert_close(fm[name].G, R * fs[name].G)
        assert fs[name].G.norm() > 0


# ----------------------------------------------------------------------------------------------------
# a batch split in two and merged = the whole batch
# ----------------------------------------------------------------------------------------------------


@given(seed=seeds, n=st.integers(2, 6), split=st.integers(1, 5), kind=st.sampled_from(KINDS),
       reduction=st.sampled_from(["mean", "sum"]), fisher=st.sampled_from(["exact", "empirical"]),
       reduce=st.booleans())
@settings(max_examples=budget(10))
def test_split_batch_merges_to_whole(seed, n, split, kind, reduction, fisher, reduce):
    r"""With ``Gᵢ = Rᵢ Σ_{n∈i} Xₙ`` and ``G = R Σₙ Xₙ``: ``G = R (G₁/R₁ + G₂/R₂)`` (for sums ``G₁ + G₂``;
    for means the weighted average with the number of reduced terms as weights). ``A`` is an average
    over the ``N·S`` rows: ``A = (N₁ A₁ + N₂ A₂)/N``. Gradients and loss merge like ``G``."""
    k = min(split, n - 1)
    model = conv_net(seed)
    params = params_of(model)
    g = gen(seed)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=DT)
    y = make_target(kind, (n, 3), g, ignore_frac=0.3)
    if kind == "cross_entropy":  # both halves need a non-ignored target for a finite mean
        y[0] = 0
        y[k] = 1
    parts = [(x, y), (x[:k], y[:k]), (x[k:], y[k:])]
    caps = [capture(model, params, xi, yi, kind, reduction, fisher) for xi, yi in parts]
    R = [reduction_scale(kind, reduction, model(xi), yi) for xi, yi in parts]
    facs = [kf.kronecker_factors(c, reduce=reduce) for c in caps]
    for name in facs[0]:
        assert_close(facs[0][name].A, (k * facs[1][name].A + (n - k) * facs[2][name].A) / n)
        assert_close(facs[0][name].G, R[0] * (facs[1][name].G / R[1] + facs[2][name].G / R[2]))
    for p in params:
        assert_close(caps[0].grads[p], R[0] * (caps[1].grads[p] / R[1] + caps[2].grads[p] / R[2]))
    assert_close(caps[0].loss, R[0] * (caps[1].loss / R[1] + caps[2].loss / R[2]))


@given(seed=seeds, n=st.integers(2, 6), k=st.integers(1, 6), kind=st.sampled_from(KINDS),
       reduction=st.sampled_from(["mean", "sum"]), fisher=st.sampled_from(FISHERS), reduce=st.booleans())
@settings(max_examples=budget(8))
def test_stats_examples_is_rescaled_subbatch(seed, n, k, kind, reduction, fisher, reduce):
    r"""``capture(..., stats_examples=k)`` keeps ``(a, g)`` of the first ``k`` rows with ``g`` rescaled by
    ``√(N/k)``; loss and gradients stay those of the whole batch. So its factors are the first ``k``
    rows' factors of the whole-batch capture with ``G`` times ``N/k`` (every fisher type: the MC
    samples are drawn for the whole batch either way), and — for the deterministic types — a
    ``k``-example capture's factors with ``G`` times ``(R N)/(R_k k)``."""
    k = min(k, n)
    model = conv_net(seed)
    params = params_of(model)
    g = gen(seed)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=DT)
    y = make_target(kind, (n, 3), g)
    whole = capture(model, params, x, y, kind, reduction, fisher)
    est = capture(model, params, x, y, kind, reduction, fisher, stats_examples=k)
    assert_close(est.loss, whole.loss)
    assert_trees_close(est.grads, whole.grads)
    assert all(t.shape[0] == k for t in est.a.values())
    f_est = kf.kronecker_factors(est, reduce=reduce)
    rows = whole._replace(a={m: t[:k] for m, t in whole.a.items()}, g={m: t[:, :k] for m, t in whole.g.items()})
    f_rows = kf.kronecker_factors(rows, reduce=reduce)
    for name in f_rows:
        assert_close(f_est[name].A, f_rows[name].A)
        assert_close(f_est[name].G, f_rows[name].G * n / k)
    if fisher != "mc":
        R = reduction_scale(kind, reduction, model(x), y)
        R_k = reduction_scale(kind, reduction, model(x[:k]), y[:k])
        f_sub = kf.kronecker_factors(capture(model, params, x[:k], y[:k], kind, reduction, fisher), reduce=reduce)
        for name in f_sub:
            assert_close(f_est[name].A, f_sub[name].A)
            assert_close(f_est[name].G, f_sub[name].G * (R * n) / (R_k * k))


# ----------------------------------------------------------------------------------------------------
# vmap over an ensemble = a loop
# ----------------------------------------------------------------------------------------------------


def _functional_conv_net(p, x):
    h = F.conv2d(x, p["conv.weight"], p["conv.bias"], stride=2, padding=1, groups=2)
    return F.linear(torch.tanh(h).flatten(1), p["fc.weight"], p["fc.bias"])


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("as_module", [True, False])
def test_vmap_over_ensemble_equals_loop(fisher, kind, as_module):
    E, n = 3, 4
    model = conv_net(0)
    members = [params_of(conv_net(s)) for s in range(E)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    f = model if as_module else _functional_conv_net
    g = gen(0)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=DT)
    y = make_target(kind, (n, 3), g, ignore_frac=0.3)
    loss = kf.Loss(kind)

    def run(p):
        cap = kf.capture(f, p, x, y, loss, fisher=fisher)
        return cap, kf.kronecker_factors(cap), kf.kronecker_factors(cap, reduce=True)

    batched = vmap(run)(stacked)
    for e, p in enumerate(members):
        single = run(p)
        assert_trees_close(optree.tree_map(lambda t: t[e], batched), single)

    # each member with its own data as well
    xs = torch.randn((E,) + tuple(x.shape), generator=g, dtype=DT)
    ys = torch.stack([make_target(kind, (n, 3), g) for _ in range(E)])

    def run_xy(p, xx, yy):
        cap = kf.capture(f, p, xx, yy, loss, fisher=fisher)
        return cap, kf.kronecker_factors(cap)

    batched_xy = vmap(run_xy)(stacked, xs, ys)
    for e, p in enumerate(members):
        assert_trees_close(optree.tree_map(lambda t: t[e], batched_xy), run_xy(p, xs[e], ys[e]))
    # the members differ, so the comparison is not vacuous
    assert (batched[1]["conv"].G[0] - batched[1]["conv"].G[1]).norm() > 1e-6


# ----------------------------------------------------------------------------------------------------
# a plain f(params, x) = the equivalent nn.Module
# ----------------------------------------------------------------------------------------------------


def _functional_renamed(p, x):
    h = torch.conv2d(x, p["c_w"], p["c_b"], 2, 1, 1, 2)  # positional geometry arguments
    return F.linear(torch.tanh(h).flatten(1), weight=p["fc_w"], bias=p["fc_b"])


@given(seed=seeds, n=st.integers(1, 4), kind=st.sampled_from(KINDS), fisher=st.sampled_from(FISHERS + [None]))
@settings(max_examples=budget(8))
def test_function_equals_module(seed, n, kind, fisher):
    model = conv_net(seed)
    params = params_of(model)
    names = {"conv.weight": "c_w", "conv.bias": "c_b", "fc.weight": "fc_w", "fc.bias": "fc_b"}
    fparams = {names[k]: v for k, v in params.items()}
    g = gen(seed)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=DT)
    y = make_target(kind, (n, 3), g)
    cm = capture(model, params, x, y, kind, "mean", fisher)
    cf = capture(_functional_renamed, fparams, x, y, kind, "mean", fisher)
    layer_names = {"conv": "c_w", "fc": "fc_w"}
    assert set(kf.trace(_functional_renamed, fparams, x).layers) == set(layer_names.values())
    assert_close(cm.loss, cf.loss)
    for k, v in names.items():
        assert_close(cm.grads[k], cf.grads[v])
    expected = loss_grads(model, params, x, y, kind, "mean")
    for k in params:
        assert_close(cm.grads[k], expected[k])
    if fisher is None:
        assert cm.g == {} and cf.g == {}
        return
    fm, ff = kf.kronecker_factors(cm), kf.kronecker_factors(cf)
    for m, fn in layer_names.items():
        assert_close(cm.a[m], cf.a[fn])
        assert_close(cm.g[m], cf.g[fn])
        assert_close(fm[m].A, ff[fn].A)
        assert_close(fm[m].G, ff[fn].G)


# ----------------------------------------------------------------------------------------------------
# >2-D outputs = flattened outputs
# ----------------------------------------------------------------------------------------------------


@given(seed=seeds, n=st.integers(1, 3), t=st.integers(1, 4), c=st.integers(1, 3),
       kind=st.sampled_from(["mse", "bce_with_logits"]), reduction=st.sampled_from(["mean", "sum"]),
       fisher=st.sampled_from(FISHERS), reduce=st.booleans())
@settings(max_examples=budget(10))
def test_3d_outputs_equal_flattened(seed, n, t, c, kind, reduction, fisher, reduce):
    """MSE/BCE on ``(N, T, C)`` outputs = the same on ``(N, T·C)`` (every fisher type; MC draws the
    same numbers in the same order)."""
    model = mlp([2, 3, c], True, "tanh", seed)
    params = params_of(model)
    g = gen(seed)
    x = torch.randn(n, t, 2, generator=g, dtype=DT)
    y = make_target(kind, (n, t, c), g)

    def flat(p, xx):
        return torch.func.functional_call(model, p, (xx,)).reshape(xx.shape[0], -1)

    c3 = capture(model, params, x, y, kind, reduction, fisher)
    c2 = capture(flat, params, x, y.reshape(n, -1), kind, reduction, fisher)
    assert_close(c3.loss, c2.loss)
    assert_trees_close(c3.grads, c2.grads)
    assert_trees_close(c3.g, c2.g)
    assert_trees_close(kf.kronecker_factors(c3, reduce=reduce), kf.kronecker_factors(c2, reduce=reduce))


@given(seed=seeds, n=st.integers(1, 3), t=st.integers(1, 4), c=st.integers(2, 4),
       reduction=st.sampled_from(["mean", "sum"]), fisher=st.sampled_from(["exact", "empirical"]))
@settings(max_examples=budget(8))
def test_cross_entropy_positions_equal_flattened_batch(seed, n, t, c, reduction, fisher):
    """Position-wise net + cross-entropy on ``(N, C, T)`` outputs = the same on ``(N·T, C)`` (the
    positions become examples; expand factors average over ``N·T`` rows either way)."""
    model = mlp([2, 3, c], True, "tanh", seed)
    params = params_of(model)
    g = gen(seed)
    x = torch.randn(n, t, 2, generator=g, dtype=DT)
    y = torch.randint(0, c, (n, t), generator=g)
    if n * t > 1:
        y[0, 0] = -100  # one ignored position

    def per_position(p, xx):
        return torch.func.functional_call(model, p, (xx,)).transpose(1, 2)  # (N, C, T)

    cp = capture(per_position, params, x, y, "cross_entropy", reduction, fisher)
    cb = capture(model, params, x.reshape(n * t, 2), y.reshape(-1), "cross_entropy", reduction, fisher)
    assert_close(cp.loss, cb.loss)
    assert_trees_close(cp.grads, cb.grads)
    assert_trees_close(kf.kronecker_factors(cp), kf.kronecker_factors(cb))


# ----------------------------------------------------------------------------------------------------
# the cotangents' backwards as a loop = as one vmap
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_looped_backward_equals_vmapped_backward(fisher, monkeypatch):
    """Few cotangents run as a loop of vjps, many as one vmap (``LOOP_COTANGENTS``): the same capture."""
    model = conv_net(0)
    params = params_of(model)
    x = torch.randn(4, 2, 4, 4, generator=gen(0), dtype=DT)
    y = make_target("cross_entropy", (4, 3), gen(1))
    looped = capture(model, params, x, y, "cross_entropy", "mean", fisher)
    monkeypatch.setattr(sys.modules["kfac_func.capture"], "LOOP_COTANGENTS", 0)  # the function shadows the module
    vmapped = capture(model, params, x, y, "cross_entropy", "mean", fisher)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10), looped, vmapped)
