r"""K-FAC equals the exact curvature block wherever it is exact (DESIGN.md §4), checked against the
``torch.func`` oracles of :mod:`oracles` in float64; plus MC convergence and damped preconditioning
against dense solves with the explicit Kronecker matrices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfac_func as kf
from kfac_func.layers import LayerSpec, split_weight_matrix, weight_matrix
from oracles import (
    GroupedNet,
    KINDS,
    REDUCTIONS,
    assert_close,
    seeds,
    budget,
    DT,
    Layer,
    captured_block,
    dense_eigen_solve,
    dense_factored_solve,
    empirical_fisher_block,
    from_wbar,
    ggn_block,
    ggn_block_total_hessian,
    kfac_dense,
    layer_vector,
    linear_layers,
    loss_grads,
    make_target,
    mlp,
    params_of,
    rel_err,
    to_wbar,
    torch_loss,
)



def _factors_dense(factors, name):
    f = factors[name]
    return kfac_dense(f.A, f.G)


# ----------------------------------------------------------------------------------------------------
# the parameter layout (the one place the oracles share a convention with the library)
# ----------------------------------------------------------------------------------------------------


def test_weight_matrix_layout_hand_built():
    # linear: W (2, 3), b (2,) -> [[W00 W01 W02 b0], [W10 W11 W12 b1]]
    W = torch.arange(6.0).reshape(2, 3)
    b = torch.tensor([10.0, 11.0])
    expected = torch.tensor([[[0.0, 1, 2, 10], [3, 4, 5, 11]]])
    spec = LayerSpec("fc", "linear", "fc.weight", "fc.bias", 1)
    assert torch.equal(weight_matrix(spec, W, b), expected)
    assert torch.equal(to_wbar(W, b), expected)
    # grouped conv: 4 output channels, 2 groups, 1 input channel per group, kernel 1x2
    Wc = torch.arange(8.0).reshape(4, 1, 1, 2)
    bc = torch.tensor([100.0, 101, 102, 103])
    expected_c = torch.tensor([[[0.0, 1, 100], [2, 3, 101]], [[4, 5, 102], [6, 7, 103]]])
    spec_c = LayerSpec("conv", "conv2d", "conv.weight", "conv.bias", 2)
    assert torch.equal(weight_matrix(spec_c, Wc, bc), expected_c)
    assert torch.equal(to_wbar(Wc, bc, 2), expected_c)
    assert torch.equal(weight_matrix(spec_c, Wc, None), expected_c[..., :2])
    # the inverses
    Wr, br = from_wbar(expected_c.reshape(-1), Wc.shape, True, 2)
    assert torch.equal(Wr, Wc) and torch.equal(br, bc)
    split = split_weight_matrix(spec_c, expected_c, {"conv.weight": Wc, "conv.bias": bc})
    assert torch.equal(split["conv.weight"], Wc) and torch.equal(split["conv.bias"], bc)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_oracle_ggn_two_ways(kind, reduction):
    """The per-example oracle ``R Σ Jₙᵀ Hₙ Jₙ`` equals ``Jᵀ ∇²L J`` with torch's reduced loss."""
    model = mlp([3, 4, 3], True, "tanh", 0)
    params = params_of(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    y = make_target(kind, (5, 3), gen, ignore_frac=0.4)
    for layer in linear_layers(model).values():
        a = ggn_block(model, params, x, y, kind, reduction, layer)
        b = ggn_block_total_hessian(model, params, x, y, kind, reduction, layer)
        assert_close(a, b)
        assert a.norm() > 1e-3


# ----------------------------------------------------------------------------------------------------
# 1. one example: K-FAC is exact for any network and loss
# ----------------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    depth=st.integers(2, 3),
    width=st.integers(2, 5),
    d_in=st.integers(1, 4),
    d_out=st.integers(2, 4),
    bias=st.booleans(),
    act=st.sampled_from(["tanh", "relu"]),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "empirical"]),
)
@settings(max_examples=budget(12))
def test_single_example_kfac_is_exact(seed, depth, width, d_in, d_out, bias, act, kind, reduction, fisher):
    model = mlp([d_in] + [width] * (depth - 1) + [d_out], bias, act, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, d_in, generator=gen, dtype=DT)
    y = make_target(kind, (1, d_out), gen)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    factors = kf.kronecker_factors(cap)
    layers = linear_layers(model)
    assert set(factors) == set(layers)
    for name, layer in layers.items():
        oracle = (ggn_block if fisher == "exact" else empirical_fisher_block)(
            model, params, x, y, kind, reduction, layer
        )
        assert_close(_factors_dense(factors, name), oracle)


# ----------------------------------------------------------------------------------------------------
# 2. deep linear network + MSE, N > 1: K-FAC (type-2) = exact GGN block; not the empirical Fisher
# ----------------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    n=st.integers(2, 6),
    bias=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_deep_linear_mse_kfac_is_exact(seed, sizes, n, bias, reduction):
    model = mlp(sizes, bias, None, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=gen, dtype=DT)
    y = torch.randn(n, sizes[-1], generator=gen, dtype=DT)
    factors = kf.kronecker_factors(kf.capture(model, params, x, y, kf.Loss("mse", reduction), fisher="exact"))
    for name, layer in linear_layers(model).items():
        assert_close(_factors_dense(factors, name), ggn_block(model, params, x, y, "mse", reduction, layer))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_oracles_have_power(reduction):
    """Where K-FAC is *not* exact the same comparison fails by a wide margin: empirical K-FAC vs the
    empirical Fisher on a deep linear net (residuals depend on n), type-2 K-FAC vs the GGN on a
    nonlinear net with N > 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen, dtype=DT)
    y = torch.randn(6, 2, generator=gen, dtype=DT)
    loss = kf.Loss("mse", reduction)

    lin = mlp([3, 4, 2], True, None, 0)
    p = params_of(lin)
    emp = kf.kronecker_factors(kf.capture(lin, p, x, y, loss, fisher="empirical"))
    exact = kf.kronecker_factors(kf.capture(lin, p, x, y, loss, fisher="exact"))
    for name, layer in linear_layers(lin).items():
        assert rel_err(_factors_dense(emp, name), empirical_fisher_block(lin, p, x, y, "mse", reduction, layer)) > 0.05
        assert rel_err(_factors_dense(exact, name), ggn_block(lin, p, x, y, "mse", reduction, layer)) < 1e-10

    net = mlp([3, 4, 2], True, "tanh", 0)
    p = params_of(net)
    exact = kf.kronecker_factors(kf.capture(net, p, x, y, loss, fisher="exact"))
    first = linear_layers(net)["0"]
    assert rel_err(_factors_dense(exact, "0"), ggn_block(net, p, x, y, "mse", reduction, first)) > 1e-3


# ----------------------------------------------------------------------------------------------------
# 3. weight sharing
# ----------------------------------------------------------------------------------------------------


class PerPositionCalls(nn.Module):
    """The same deep linear net called once per position (tied weights: several calls per layer)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.stack([self.inner(x[:, t]) for t in range(x.shape[1])], dim=1)


@given(
    seed=seeds,
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    n=st.integers(1, 3),
    t=st.integers(2, 4),
    bias=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_positionwise_deep_linear_expand_is_exact(seed, sizes, n, t, bias, reduction):
    model = mlp(sizes, bias, None, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, sizes[0], generator=gen, dtype=DT)
    y = torch.randn(n, t, sizes[-1], generator=gen, dtype=DT)
    loss = kf.Loss("mse", reduction)
    cap = kf.capture(model, params, x, y, loss, fisher="exact")
    assert all(a.shape[2] == t for a in cap.a.values())
    factors = kf.kronecker_factors(cap)
    # the same weights called once per position give the same factors (S counts every call)
    looped = PerPositionCalls(model)
    lp = {f"inner.{k}": v for k, v in params.items()}
    factors_loop = kf.kronecker_factors(kf.capture(looped, lp, x, y, loss, fisher="exact"))
    for name, layer in linear_layers(model).items():
        oracle = ggn_block(model, params, x, y, "mse", reduction, layer)
        assert_close(_factors_dense(factors, name), oracle)
        assert_close(_factors_dense(factors_loop, f"inner.{name}"), oracle)


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from([0, 1, (1, 0), "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (2, 1)]))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect"]))
    h, w = draw(st.integers(5, 6)), draw(st.integers(5, 6))
    return dict(groups=groups, cin=cin, cout=cout, kernel=(kh, kw), dilation=dil, padding=padding,
                stride=stride, padding_mode=mode, hw=(h, w))


@given(cfg=conv_configs(), seed=seeds, n=st.integers(1, 2), bias=st.booleans(), reduction=st.sampled_from(REDUCTIONS))
@settings(max_examples=budget(12))
def test_single_conv_per_pixel_mse_expand_is_exact(cfg, seed, n, bias, reduction):
    torch.manual_seed(seed)
    model = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                      dilation=cfg["dilation"], groups=cfg["groups"], bias=bias,
                      padding_mode=cfg["padding_mode"]).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg["cin"], *cfg["hw"], generator=gen, dtype=DT)
    out = model(x)
    y = torch.randn(out.shape, generator=gen, dtype=DT)
    plan = kf.trace(model, params, x)
    (name,) = plan.layers
    assert plan.layers[name].groups == cfg["groups"]
    cap = kf.capture(model, params, x, y, kf.Loss("mse", reduction), fisher="exact")
    assert cap.a[name].shape[2] == out.shape[2] * out.shape[3]
    factors = kf.kronecker_factors(cap)
    layer = Layer("weight", "bias" if bias else None, cfg["groups"])
    assert_close(_factors_dense(factors, name), ggn_block(model, params, x, y, "mse", reduction, layer))


class TwoResolutions(nn.Module):
    """One conv weight applied to an image and to its 2x-subsampled copy (two calls, different S)."""

    def __init__(self, groups, bias):
        super().__init__()
        self.conv = nn.Conv2d(2 * groups, 2 * groups, 2, padding=1, dilation=(1, 2), groups=groups, bias=bias)

    def forward(self, x):
        return torch.cat([self.conv(x).flatten(1), self.conv(x[:, :, ::2, ::2]).flatten(1)], dim=1)


@given(seed=seeds, groups=st.integers(1, 2), bias=st.booleans(), reduction=st.sampled_from(REDUCTIONS))
def test_shared_conv_at_two_resolutions_expand_is_exact(seed, groups, bias, reduction):
    torch.manual_seed(seed)
    model = TwoResolutions(groups, bias).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2 * groups, 5, 6, generator=gen, dtype=DT)
    out = model(x)
    y = torch.randn(out.shape, generator=gen, dtype=DT)
    cap = kf.capture(model, params, x, y, kf.Loss("mse", reduction), fisher="exact")
    assert cap.a["conv"].shape[2] == out.shape[1] // (2 * groups)  # S counts both calls
    factors = kf.kronecker_factors(cap)
    oracle = ggn_block(model, params, x, y, "mse", reduction, linear_layers(model)["conv"])
    assert_close(_factors_dense(factors, "conv"), oracle)
    assert_close(captured_block(cap.a["conv"], cap.g["conv"]), oracle)


class PoolNet(nn.Module):
    """x (N, T, d) → position-wise linear layers → mean over T → linear head."""

    def __init__(self, d, h, c, bias, pre_layers):
        super().__init__()
        sizes = [d] + [h] * pre_layers
        self.pre = nn.Sequential(*[nn.Linear(i, o, bias=bias) for i, o in zip(sizes[:-1], sizes[1:])])
        self.head = nn.Linear(h, c, bias=bias)

    def forward(self, x):
        return self.head(self.pre(x).mean(1))


@given(
    seed=seeds,
    d=st.integers(1, 3),
    h=st.integers(1, 3),
    c=st.integers(1, 3),
    pre_layers=st.integers(1, 2),
    n=st.integers(1, 3),
    t=st.integers(2, 4),
    bias=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_pooled_deep_linear_reduce_is_exact(seed, d, h, c, pre_layers, n, t, bias, reduction):
    torch.manual_seed(seed)
    model = PoolNet(d, h, c, bias, pre_layers).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=gen, dtype=DT)
    y = torch.randn(n, c, generator=gen, dtype=DT)
    cap = kf.capture(model, params, x, y, kf.Loss("mse", reduction), fisher="exact")
    factors = kf.kronecker_factors(cap, reduce=True)
    for name, layer in linear_layers(model).items():
        assert_close(_factors_dense(factors, name), ggn_block(model, params, x, y, "mse", reduction, layer))


def test_pooled_expand_is_not_exact():
    """Power check for the reduce test: expand differs from the GGN before the pooling."""
    torch.manual_seed(0)
    model = PoolNet(3, 3, 2, True, 1).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, generator=gen, dtype=DT)
    y = torch.randn(3, 2, generator=gen, dtype=DT)
    cap = kf.capture(model, params, x, y, kf.Loss("mse"), fisher="exact")
    layer = linear_layers(model)["pre.0"]
    oracle = ggn_block(model, params, x, y, "mse", "mean", layer)
    assert rel_err(_factors_dense(kf.kronecker_factors(cap), "pre.0"), oracle) > 0.1
    assert rel_err(_factors_dense(kf.kronecker_factors(cap, reduce=True), "pre.0"), oracle) < 1e-10


# ----------------------------------------------------------------------------------------------------
# 4. captured (a, g) rebuild the exact block of a nonlinear CNN; captured grads = torch.func.grad
# ----------------------------------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self, bias, stride, dilation, classes, shared):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=stride, padding=1, dilation=dilation, groups=2, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, 2, padding="same", groups=2, bias=bias)
        self.shared = shared
        self.fc = nn.LazyLinear(classes, bias=bias)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        if self.shared:  # the same conv weight a second time
            h = torch.tanh(self.conv2(h))
        return self.fc(h.flatten(1))


@given(
    seed=seeds,
    n=st.integers(1, 3),
    bias=st.booleans(),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    shared=st.booleans(),
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(REDUCTIONS),
    fisher=st.sampled_from(["exact", "exact", "empirical"]),
)
@settings(max_examples=budget(10))
def test_captured_a_g_rebuild_exact_block_cnn(seed, n, bias, stride, dilation, shared, kind, reduction, fisher):
    torch.manual_seed(seed)
    model = CNN(bias, stride, dilation, 3, shared)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=gen, dtype=DT)
    model(x.float())  # materialise the lazy layer
    model = model.to(DT)
    params = params_of(model)
    y = make_target(kind, (n, 3), gen, ignore_frac=0.3 if n > 1 else 0.0)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    layers = linear_layers(model)
    assert set(cap.a) == set(layers)
    for name, layer in layers.items():
        oracle = (ggn_block if fisher == "exact" else empirical_fisher_block)(
            model, params, x, y, kind, reduction, layer
        )
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)
    expected = loss_grads(model, params, x, y, kind, reduction)
    assert set(cap.grads) == set(expected)
    for k in expected:
        assert_close(cap.grads[k], expected[k], atol=1e-12, rtol=1e-10)
    assert_close(cap.loss, torch_loss(kind, reduction)(model(x), y))


class SegNet(nn.Module):
    """Fully convolutional: per-pixel outputs (N, C, H, W) for per-pixel losses."""

    def __init__(self, bias, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=bias)
        self.conv2 = nn.Conv2d(4, classes, 3, padding="same", dilation=2, bias=bias)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


@given(seed=seeds, n=st.integers(1, 2), bias=st.booleans(), kind=st.sampled_from(KINDS),
       reduction=st.sampled_from(REDUCTIONS), fisher=st.sampled_from(["exact", "empirical"]))
@settings(max_examples=budget(6))
def test_captured_a_g_rebuild_exact_block_per_pixel_losses(seed, n, bias, kind, reduction, fisher):
    """Outputs with spatial dims: cross-entropy over (N, C, H, W) with ignored pixels, per-pixel
    MSE/BCE; the loss Hessian couples classes, not pixels."""
    torch.manual_seed(seed)
    model = SegNet(bias, 3).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 3, generator=gen, dtype=DT)
    y = make_target(kind, (n, 3, 4, 3), gen, ignore_frac=0.3)
    cap = kf.capture(model, params, x, y, kf.Loss(kind, reduction), fisher=fisher)
    for name, layer in linear_layers(model).items():
        oracle = (ggn_block if fisher == "exact" else empirical_fisher_block)(
            model, params, x, y, kind, reduction, layer
        )
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)
    expected = loss_grads(model, params, x, y, kind, reduction)
    for k in expected:
        assert_close(cap.grads[k], expected[k], atol=1e-12, rtol=1e-10)


class Untracked(nn.Module):
    """Tracked layers (two linears and a LayerNorm) next to an untracked elementwise scale, and a weight tied
    between a linear call and a matmul (a layer per use)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.tied = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.fc1(x))) * self.scale
        h = torch.tanh(self.tied(h)) @ self.tied.weight
        return self.out(h)


@pytest.mark.parametrize("fisher", [None, "exact", "empirical", "mc"])
def test_untracked_parameters_gradients_and_blocks(fisher):
    torch.manual_seed(0)
    model = Untracked().to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    y = make_target("cross_entropy", (5, 3), gen)
    plan = kf.trace(model, params, x)
    assert set(plan.layers) == {"fc1", "norm", "tied", "tied:matmul", "out"} and plan.tied == {"tied", "tied:matmul"}
    assert plan.untracked == ("scale",) and "by mul" in plan.reasons["scale"]
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher=fisher, key=kf.random.key(0))
    expected = loss_grads(model, params, x, y, "cross_entropy", "mean")
    assert set(cap.grads) == set(expected)
    for k in expected:
        assert_close(cap.grads[k], expected[k], atol=1e-12, rtol=1e-10)
    if fisher in ("exact", "empirical"):
        for name in ("fc1", "out"):
            layer = linear_layers(model)[name]
            oracle = (ggn_block if fisher == "exact" else empirical_fisher_block)(
                model, params, x, y, "cross_entropy", "mean", layer
            )
            assert_close(captured_block(cap.a[name], cap.g[name]), oracle)


# ----------------------------------------------------------------------------------------------------
# 5. MC factors converge to the type-2 factors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mc_factors_converge_to_exact(kind, reduction):
    r"""``G_mc = (1/M) Σₘ Xₘ`` with i.i.d. ``Xₘ`` (one sampled target per term) whose mean is the type-2
    ``G``. Its error is ``O(1/√M)``: ``E‖G_mc − G‖²_F = E‖X − G‖²_F / M =: SE²``, and ``SE`` is
    estimated from the samples themselves. ``‖G_mc − G‖_F`` is a sum of many squared, roughly Gaussian
    entries whose expectation is ``SE²``, so exceeding ``5·SE`` has negligible probability (and with
    a fixed generator the test is deterministic). The bound must also be tight: ``5·SE`` below 10%
    of ``‖G‖`` (M = 4000), and ``1.2·G`` must violate it."""
    M = 4000
    model = mlp([3, 4, 3], True, "tanh", 0)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    y = make_target(kind, (4, 3), gen)
    loss = kf.Loss(kind, reduction)
    exact = kf.kronecker_factors(kf.capture(model, params, x, y, loss, fisher="exact"))
    cap = kf.capture(model, params, x, y, loss, fisher="mc", mc_samples=M, key=kf.random.key(1))
    mc = kf.kronecker_factors(cap)
    for name in exact:
        assert_close(mc[name].A, exact[name].A)
        g = cap.g[name]
        assert g.shape[0] == M
        X = M * torch.einsum("mnbso,mnbsp->mbop", g, g)  # one term per sample
        assert_close(X.mean(0), mc[name].G)
        se = math.sqrt(float(((X - X.mean(0)) ** 2).sum()) / (M * (M - 1)))
        err = float((mc[name].G - exact[name].G).norm())
        assert se < 0.02 * float(exact[name].G.norm())
        assert err < 5 * se, (name, err, se)
        assert float((mc[name].G - 1.2 * exact[name].G).norm()) > 5 * se


# ----------------------------------------------------------------------------------------------------
# 6. damped preconditioning = dense solve with the explicit Kronecker matrix
# ----------------------------------------------------------------------------------------------------


@given(seed=seeds, bias=st.booleans(), damping=st.sampled_from([1e-3, 0.1, 2.0]), kind=st.sampled_from(KINDS))
@settings(max_examples=budget(8))
def test_precondition_equals_dense_solve(seed, bias, damping, kind):
    torch.manual_seed(seed)
    model = GroupedNet(bias).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 4, 4, generator=gen, dtype=DT)
    y = make_target(kind, (3, 3), gen)
    plan = kf.trace(model, params, x)
    assert plan.untracked == ("scale",)
    assert plan.layers["conv"].groups == 2
    cap = kf.capture(model, params, x, y, kind, fisher="exact")
    factors = kf.kronecker_factors(cap)
    eigen = kf.eigendecompose(factors)
    results = {
        "eigen": [kf.precondition(params, cap.grads, f, layers=plan.layers, damping=damping, mode="eigen")
                  for f in (factors, eigen)],
        "factored": [kf.precondition(params, cap.grads, f, layers=plan.layers, damping=damping, mode="factored")
                     for f in (factors, eigen)]
        + [kf.precondition(params, cap.grads, kf.inverse_factors(factors, damping), layers=plan.layers,
                           damping=None, mode="factored")],
    }
    layers = linear_layers(model)
    for mode, outs in results.items():
        solve = dense_eigen_solve if mode == "eigen" else dense_factored_solve
        for out in outs:
            assert set(out) == set(params)
            assert torch.equal(out["scale"], cap.grads["scale"])  # untracked: passed through
            for name, layer in layers.items():
                f = factors[name]
                expected = solve(f.A, f.G, layer_vector(cap.grads, layer), damping)
                assert_close(layer_vector(out, layer), expected, atol=1e-9, rtol=1e-7)
    # the two damping modes are different operators (the comparison above can tell them apart)
    e, fa = results["eigen"][0], results["factored"][0]
    assert rel_err(layer_vector(e, layers["fc"]), layer_vector(fa, layers["fc"])) > 1e-4


@given(seed=seeds, groups=st.integers(1, 3), d_a=st.integers(1, 4), d_g=st.integers(1, 4),
       damping=st.sampled_from([0.0, 1e-2, 1.0]), mode=st.sampled_from(["eigen", "factored"]),
       as_tensor=st.booleans(), form=st.sampled_from(["kronecker", "eigen", "inverse"]))
def test_precondition_random_spd_factors(seed, groups, d_a, d_g, damping, mode, as_tensor, form):
    """Full-rank random factors (damping 0 allowed: then both modes are the exact inverse)."""
    gen = torch.Generator().manual_seed(seed)
    Xa = torch.randn(groups, d_a, d_a + 2, generator=gen, dtype=DT)
    Xg = torch.randn(groups, d_g, d_g + 2, generator=gen, dtype=DT)
    A = Xa @ Xa.mT + 0.1 * torch.eye(d_a, dtype=DT)
    G = 3.0 * (Xg @ Xg.mT + 0.1 * torch.eye(d_g, dtype=DT))
    W = torch.randn(groups * d_g, d_a - 1 if d_a > 1 else d_a, generator=gen, dtype=DT)
    has_bias = d_a > 1
    b = torch.randn(groups * d_g, generator=gen, dtype=DT) if has_bias else None
    params = {"w": W, **({"b": b} if has_bias else {}), "other": torch.randn(2, generator=gen, dtype=DT)}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    spec = LayerSpec("lay", "linear", "w", "b" if has_bias else None, groups)
    layer = Layer("w", "b" if has_bias else None, groups)
    factors = {"lay": kf.KroneckerFactors(A, G)}
    lam = torch.tensor(damping, dtype=DT) if as_tensor else damping
    if form == "eigen":
        factors = kf.eigendecompose(factors)
    if form == "inverse" and damping == 0.0:  # Cholesky inverses need damping > 0: refused by name
        with pytest.raises(ValueError, match="damping must be a finite number > 0, got 0.0"):
            kf.inverse_factors(factors, lam)
        return
    if form == "inverse":  # damping lives in the inverses; factored mode only
        mode = "factored"
        factors, lam = kf.inverse_factors(factors, lam), None
    out = kf.precondition(params, grads, factors, layers={"lay": spec}, damping=lam, mode=mode)
    solve = dense_eigen_solve if mode == "eigen" else dense_factored_solve
    expected = solve(A, G, layer_vector(grads, layer), damping)
    assert_close(layer_vector(out, layer), expected, atol=1e-9, rtol=1e-7)
    assert torch.equal(out["other"], grads["other"])
