r"""Layer coverage beyond linear and conv2d, each kind against the float64 ``torch.func`` oracles of
:mod:`oracles` where K-FAC is exact:

* conv1d / conv3d: a single conv with a per-pixel MSE loss (expand) for any stride, padding, dilation
  and groups;
* embeddings: one token per example (``N = 1``, any net and loss), and a position-wise linear net on
  token sequences with MSE (expand, ``N > 1``); ``A`` is diagonal and never dense; ``padding_idx``;
* LayerNorm / GroupNorm / BatchNorm (eval): the full block of ``[γ; β]`` is exact for any batch;
  BatchNorm in training mode: exact gradients, running statistics moved once per optimizer step;
* attention: the batch-first rewrite equals torch's ``F.multi_head_attention_forward``; the packed
  in-projection is attributed per row slice (self-attention: one layer; cross-attention: two or three)
  and the captured ``(a, g)`` rebuild the exact block of each slice;
* expand / reduce per layer and Eschenhagen et al.'s defaults; the registration table; bfloat16
  activations; a batch-first violation is a clear error; the example ResNet and transformer train.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

import kfac_func as kf
from kfac_func.attention import multi_head_attention
from kfac_func.data import load_text
from kfac_func.models import CharTransformer, resnet
from oracles import (
    DT,
    KINDS,
    REDUCTIONS,
    Layer,
    assert_close,
    budget,
    captured_block,
    dense_eigen_solve,
    dense_factored_solve,
    empirical_fisher_block,
    fixed_step,
    ggn_block,
    kfac_dense,
    layer_vector,
    loss_grads,
    make_target,
    params_of,
    seeds,
)


def _dense(factors, name):
    return kfac_dense(factors[name].A, factors[name].G)


def _grads_match(cap, model, params, x, y, kind, reduction="mean"):
    expected = loss_grads(model, params, x, y, kind, reduction)
    for k in expected:
        assert_close(cap.grads[k], expected[k], atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# conv1d / conv3d
# ----------------------------------------------------------------------------------------------------


@st.composite
def conv_nd(draw, dims: int):
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    high = 3 if dims == 1 else 2
    kernel = tuple(draw(st.integers(1, high)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2]))
    size = tuple(draw(st.integers(5, 7) if dims == 1 else st.integers(4, 5)) for _ in range(dims))
    return dict(groups=groups, cin=cin, cout=cout, kernel=kernel, dilation=dilation, padding=padding, stride=stride,
                size=size)


@pytest.mark.parametrize("dims", [1, 3])
@given(data=st.data(), seed=seeds, n=st.integers(1, 2), bias=st.booleans(), reduction=st.sampled_from(REDUCTIONS))
@settings(max_examples=budget(8))
def test_single_conv_nd_per_pixel_mse_expand_is_exact(dims, data, seed, n, bias, reduction):
    cfg = data.draw(conv_nd(dims))
    torch.manual_seed(seed)
    conv = (nn.Conv1d if dims == 1 else nn.Conv3d)(
        cfg["cin"], cfg["cout"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], groups=cfg["groups"], bias=bias,
    ).to(DT)
    params = params_of(conv)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg["cin"], *cfg["size"], generator=gen, dtype=DT)
    y = torch.randn(conv(x).shape, generator=gen, dtype=DT)
    plan = kf.trace(conv, params, x)
    (name,) = plan.layers
    assert plan.layers[name].kind == f"conv{dims}d" and plan.layers[name].groups == cfg["groups"]
    cap = kf.capture(conv, params, x, y, kf.Loss("mse", reduction), fisher="exact")
    assert cap.a[name].shape[2] == y[0, 0].numel()  # S = output positions
    oracle = ggn_block(conv, params, x, y, "mse", reduction, Layer("weight", "bias" if bias else None, cfg["groups"]))
    assert_close(_dense(kf.kronecker_factors(cap), name), oracle)
    _grads_match(cap, conv, params, x, y, "mse", reduction)


class ConvPool(nn.Module):
    """A conv, its output averaged over positions, a linear head. ``shared``: the conv runs a second time, on
    the zero-padded input (more positions), and the two pooled outputs add."""

    def __init__(self, conv: nn.Module, classes: int, shared: bool):
        super().__init__()
        self.conv, self.head, self.shared = conv, nn.Linear(conv.out_channels, classes), shared

    def forward(self, x):
        dims = tuple(range(2, x.dim()))
        h = self.conv(x).mean(dims)
        if self.shared:
            h = h + self.conv(F.pad(x, (1,) * 2 * len(dims))).mean(dims)
        return self.head(h)


@pytest.mark.parametrize("shared", [False, True])
@given(cfg=st.sampled_from([1, 2, 3]).flatmap(conv_nd), seed=seeds, n=st.integers(1, 3), bias=st.booleans(),
       examples=st.sampled_from([None, 1, 2]))
@example(cfg=dict(groups=2, cin=2, cout=4, kernel=(2, 2), dilation=(2, 1), padding=1, stride=2, size=(5, 4)),
         seed=0, n=3, bias=True, examples=2)
@example(cfg=dict(groups=1, cin=2, cout=2, kernel=(3,), dilation=(2,), padding="same", stride=1, size=(7,)),
         seed=1, n=3, bias=True, examples=None)
@example(cfg=dict(groups=1, cin=1, cout=1, kernel=(3,), dilation=(2,), padding=0, stride=1, size=(5,)),
         seed=0, n=1, bias=False, examples=None)  # one output position
@settings(max_examples=budget(8))
def test_pooled_statistics_are_the_reduce_convention(shared, cfg, seed, n, bias, examples):
    """``capture(..., compact=...)`` with reduce layers takes a layer's ``(a, g)`` pooled over positions without building a
    convolution's patches: the reduce factors equal those of the per-position capture (any conv, a conv
    called twice with different numbers of positions, statistics from the first rows), and — one ungrouped
    conv before a linear pooling and head, MSE — the exact GGN blocks (Eschenhagen et al.'s exact case)."""
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(cfg["kernel"]) - 1](
        cfg["cin"], cfg["cout"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], groups=cfg["groups"], bias=bias)
    model = ConvPool(conv, 2, shared).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg["cin"], *cfg["size"], generator=gen, dtype=DT)
    y = torch.randn(n, 2, generator=gen, dtype=DT)
    layers = set(kf.trace(model, params, x).layers)
    caps = [kf.capture(model, params, x, y, "mse", fisher="exact", stats_examples=examples,
                       compact=dict.fromkeys(pooled, True)) for pooled in ((), layers)]
    assert all(a.shape[2] == 1 for a in caps[1].a.values())
    positions = conv(x).shape[2:].numel()  # kept per position; a shared conv's second call adds its own
    assert caps[0].a["conv"].shape[2] > positions if shared else caps[0].a["conv"].shape[2] == positions
    full, pooled = (kf.kronecker_factors(cap, reduce=True) for cap in caps)
    for name in layers:
        for got, want in zip(pooled[name], full[name]):
            assert_close(got, want, atol=1e-12, rtol=1e-10)
    if not shared and examples is None and cfg["groups"] == 1:
        for name, layer in {"conv": Layer("conv.weight", "conv.bias" if bias else None, cfg["groups"]),
                            "head": Layer("head.weight", "head.bias")}.items():
            assert_close(_dense(pooled, name), ggn_block(model, params, x, y, "mse", "mean", layer))


# ----------------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------------


class TokenNet(nn.Module):
    """Embedding → (tanh) → linear; indices ``(N, *)`` → outputs ``(N, *, C)``, or ``(N, C, L)`` when
    ``channels_first`` (the layout of a per-position cross-entropy)."""

    def __init__(self, vocab, dim, classes, act, padding_idx=0, channels_first=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, classes)
        self.act, self.channels_first = act, channels_first

    def forward(self, idx):
        h = self.emb(idx)
        out = self.out(torch.tanh(h) if self.act else h)
        return out.transpose(1, 2) if self.channels_first else out


EMB = Layer("emb.weight", kind="embedding")
OUT = Layer("out.weight", "out.bias")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@given(seed=seeds, vocab=st.integers(2, 6), dim=st.integers(1, 3), classes=st.integers(2, 3))
@settings(max_examples=budget(5))
def test_embedding_single_token_is_exact(kind, fisher, seed, vocab, dim, classes):
    torch.manual_seed(seed)
    model = TokenNet(vocab, dim, classes, act=True).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (1,), generator=gen)  # one example, one token, not the padding index
    y = make_target(kind, (1, classes), gen)
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, y, kf.Loss(kind), fisher=fisher)
    factors = kf.kronecker_factors(cap, layers=plan.layers)
    assert factors["emb"].A.shape == (1, vocab)  # diagonal, kept as a vector
    block = ggn_block if fisher == "exact" else empirical_fisher_block
    for name, layer in (("emb", EMB), ("out", OUT)):
        assert_close(_dense(factors, name), block(model, params, x, y, kind, "mean", layer))
    _grads_match(cap, model, params, x, y, kind)


def _token_regression(seed, n, length, vocab):
    """A deep-linear ``TokenNet`` with MSE targets per position: model, parameters, ids (the padding index
    included), targets and the trace."""
    torch.manual_seed(seed)
    model = TokenNet(vocab, 3, 2, act=False).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=gen)
    y = torch.randn(n, length, 2, generator=gen, dtype=DT)
    return model, params, x, y, kf.trace(model, params, x)


@given(seed=seeds, n=st.integers(1, 3), length=st.integers(1, 4), vocab=st.integers(2, 6),
       reduction=st.sampled_from(REDUCTIONS))
@settings(max_examples=budget(10))
def test_embedding_sequence_deep_linear_expand_is_exact(seed, n, length, vocab, reduction):
    """No nonlinearity and MSE per position: ``G`` is the same for every token, so expand is exact."""
    model, params, x, y, plan = _token_regression(seed, n, length, vocab)
    cap = kf.capture(model, params, x, y, kf.Loss("mse", reduction), fisher="exact")
    factors = kf.kronecker_factors(cap, layers=plan.layers)
    for name, layer in (("emb", EMB), ("out", OUT)):
        assert_close(_dense(factors, name), ggn_block(model, params, x, y, "mse", reduction, layer))
    assert float(factors["emb"].A[0, 0]) == 0  # padding_idx: no statistics
    assert torch.equal(cap.grads["emb.weight"][0], torch.zeros(3, dtype=DT))  # nor gradient
    _grads_match(cap, model, params, x, y, "mse", reduction)


@pytest.mark.parametrize("reduce", [False, True])
@given(seed=seeds, n=st.integers(1, 3), length=st.integers(1, 5), vocab=st.integers(2, 6), examples=st.sampled_from([None, 1]))
@example(seed=0, n=3, length=5, vocab=3, examples=None)  # tokens repeat within and across examples
@settings(max_examples=budget(8))
def test_embedding_statistics_from_token_counts(reduce, seed, n, length, vocab, examples):
    """When only the factors read the statistics (``compact``), an embedding's are its token counts — ``√counts``
    per example for expand, ``counts / S`` for reduce, one position, no ``N·S × vocab`` one-hot rows — and give
    exactly the factors of the per-position capture (the padding index included, statistics from the first rows);
    the deep-linear expand case is also the exact GGN block."""
    model, params, x, y, plan = _token_regression(seed, n, length, vocab)
    full, compact = (kf.capture(model, params, x, y, "mse", fisher="exact", stats_examples=examples, compact=c)
                     for c in ({}, dict.fromkeys(plan.layers, reduce)))
    m = n if examples is None else examples
    assert compact.a["emb"].shape == (m, 1, 1, vocab) and full.a["emb"].shape == (m, 1, length, vocab)
    counts = F.one_hot(x[:m], vocab).sum(1).to(DT)
    counts[:, 0] = 0
    want_a = counts / length if reduce else counts.sqrt()
    assert_close(compact.a["emb"].reshape(m, vocab), want_a)
    got, want = (kf.kronecker_factors(cap, reduce=reduce, layers=plan.layers) for cap in (compact, full))
    for name in plan.layers:
        for a, b in zip(got[name], want[name]):
            assert_close(a, b, atol=1e-13, rtol=1e-12)
    if not reduce and examples is None:
        assert_close(_dense(got, "emb"), ggn_block(model, params, x, y, "mse", "mean", EMB))


def test_embedding_preconditioning_keeps_a_diagonal():
    """Eigen, factored and cached-inverse preconditioning with a diagonal ``A`` equal dense solves with
    ``diag(A)``; no vocabulary × vocabulary tensor appears in any factor."""
    torch.manual_seed(0)
    vocab = 7
    model = TokenNet(vocab, 3, 4, act=True, channels_first=True).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (5, 4), generator=gen)
    y = torch.randint(0, 4, (5, 4), generator=gen)
    plan = kf.trace(model, params, x)
    ce = kf.Loss("cross_entropy", class_dim=1)  # (N, C, T) logits with C == T: the layout is named
    cap = kf.capture(model, params, x, y, ce, fisher="mc", key=kf.random.key(0))
    factors = kf.kronecker_factors(cap, layers=plan.layers)
    eigen = kf.eigendecompose(factors)
    inverse = kf.inverse_factors(factors, 0.1)
    assert eigen["emb"].QA is None and inverse["emb"].A_inv.shape == (1, vocab)
    vec = layer_vector(cap.grads, EMB)
    A, G = factors["emb"]
    for mode, fs, damping, dense in (("eigen", eigen, 0.1, dense_eigen_solve), ("factored", eigen, 0.1, dense_factored_solve),
                                     ("factored", inverse, None, dense_factored_solve)):
        out = kf.precondition(params, cap.grads, fs, layers=plan.layers, damping=damping, mode=mode)
        assert_close(layer_vector(out, EMB), dense(torch.diag_embed(A), G, vec, 0.1))
    twin = copy.deepcopy(model)
    opt = kf.KFAC(model, loss=ce, method="ekfac", damping=0.1)  # E-KFAC and the optimizer state with Q_A = None
    opt.step(x, y)
    assert opt.kfac_state.eigen["emb"].QA.numel() == 0  # the identity, stored as an empty tensor
    resumed = kf.KFAC(twin, loss=ce, method="ekfac", damping=0.1)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(opt.state_dict())
    opt.step(x, y)
    resumed.step(x, y)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    spectral = kf.KFAC(model, loss=ce, method="two_level", coarse_space="spectral", coarse_vectors=2, damping=0.1)
    spectral.step(x, y)
    assert spectral.kfac_state.space.UA["emb"].shape == (2, 1, vocab)
    assert all(p.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# norm layers
# ----------------------------------------------------------------------------------------------------


class NormNet(nn.Module):
    """``(N, T, 3)`` → linear → norm → tanh → linear → ``(N, T·C)``; the norm acts on the features (layer
    norm) or on them as channels ``(N, 4, T)`` (group and batch norm)."""

    def __init__(self, norm: str, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.norm = {"layer": nn.LayerNorm(4), "group": nn.GroupNorm(2, 4), "batch": nn.BatchNorm1d(4)}[norm]
        self.out = nn.Linear(4, classes)
        self.channels = norm != "layer"

    def forward(self, x):
        h = self.fc(x)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2) if self.channels else self.norm(h)
        return self.out(torch.tanh(h)).flatten(1)


def _norm_net(norm: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = NormNet(norm).to(DT)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
        if norm == "batch":
            model.norm.running_mean.normal_()
            model.norm.running_var.uniform_(0.5, 2.0)
            model.eval()
    return model


@pytest.mark.parametrize("norm", ["layer", "group", "batch"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@given(seed=seeds, n=st.integers(1, 4), kind=st.sampled_from(KINDS))
@settings(max_examples=budget(5))
def test_norm_affine_block_is_exact_for_any_batch(norm, fisher, seed, n, kind):
    model = _norm_net(norm, seed)
    params = params_of(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=gen, dtype=DT)
    y = make_target(kind, (n, 6), gen)
    plan = kf.trace(model, params, x)
    assert plan.layers["norm"].kind == f"{norm}_norm" and not plan.untracked
    cap = kf.capture(model, params, x, y, kf.Loss(kind), fisher=fisher)
    factors = kf.kronecker_factors(cap)
    assert factors["norm"].A.shape == (1, 1, 1) and factors["norm"].G.shape == (1, 8, 8)
    block = ggn_block if fisher == "exact" else empirical_fisher_block
    assert_close(_dense(factors, "norm"), block(model, params, x, y, kind, "mean", Layer("norm.weight", "norm.bias", kind="norm")))
    _grads_match(cap, model, params, x, y, kind)


def test_batchnorm_training_mode_gradients_and_running_statistics():
    """Training-mode BatchNorm: gradients equal autograd's; the pure functions leave the module's buffers
    alone and the optimizer moves them exactly as one plain forward does (once per step)."""
    torch.manual_seed(0)
    model = resnet(6, 3, width=4).to(DT)
    x, y = torch.randn(8, 36, dtype=DT), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    loss = F.cross_entropy(reference(x), y)  # one forward in training mode: the buffers move once
    loss.backward()
    before = {n: b.clone() for n, b in model.named_buffers()}
    params = params_of(model)
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="mc", key=kf.random.key(0))
    for n, p in reference.named_parameters():
        assert_close(cap.grads[n], p.grad, atol=1e-12, rtol=1e-9)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n])  # capture is pure
        assert torch.equal(cap.buffers[n], dict(reference.named_buffers())[n])
    opt = kf.KFAC(model, lr=0.01, adaptive="lr_momentum", damping_adaptation=True, damping_interval=1)
    opt.step(x, y)  # the quadratic model and ρ re-run the model: still one update of the statistics
    for n, b in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[n], b), n


# ----------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------


class _Rewrite(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.multi_head_attention_forward:
            return multi_head_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["self", "kv", "qkv", "separate"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_rewrite_matches_torch(variant, batch_first, need_weights):
    torch.manual_seed(0)
    kdim = 3 if variant == "separate" else None
    mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).to(DT)
    n, lq, lk = 2, 3, 5
    shape = (lambda length, d: (n, length, d)) if batch_first else (lambda length, d: (length, n, d))
    q = torch.randn(shape(lq, 4), dtype=DT)
    k = q if variant == "self" else torch.randn(shape(lq if variant == "self" else lk, kdim or 4), dtype=DT)
    v = k if variant in ("self", "kv") else torch.randn(k.shape[:-1] + (kdim or 4,), dtype=DT)
    source = k.shape[1 if batch_first else 0]
    masks = dict(key_padding_mask=torch.zeros(n, source, dtype=DT).index_fill(1, torch.tensor([source - 1]), float("-inf")),
                 attn_mask=torch.randn(lq, source, dtype=DT))
    for kwargs in ({}, masks, {**masks, "average_attn_weights": False}):
        expected = mha(q, k, v, need_weights=need_weights, **kwargs)
        with _Rewrite():
            got = mha(q, k, v, need_weights=need_weights, **kwargs)
        assert_close(got[0], expected[0])
        assert (got[1] is None) == (expected[1] is None)
        if got[1] is not None:
            assert_close(got[1], expected[1])
    q1, k1, v1 = (t[0] if batch_first else t[:, 0] for t in (q, k, v))
    with _Rewrite():
        got = mha(q1, k1, v1, need_weights=need_weights)
    assert_close(got[0], mha(q1, k1, v1, need_weights=need_weights)[0])


class Attention(nn.Module):
    """Attention whose key/value inputs are the query itself (``self``), one other tensor (``kv``) or two
    (``qkv``): torch slices the packed in-projection weight differently in each case."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        k = x if self.variant == "self" else torch.tanh(x)
        v = k if self.variant in ("self", "kv") else x.flip(1)
        return self.attn(x, k, v, need_weights=False)[0].flatten(1)


@pytest.mark.parametrize("variant, rows", [("self", [None]), ("kv", [(0, 4), (4, 12)]),
                                           ("qkv", [(0, 4), (4, 8), (8, 12)])])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_packed_projection_slices_are_attributed_exactly(variant, rows, fisher):
    torch.manual_seed(0)
    model = Attention(variant).to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=gen, dtype=DT)
    y = torch.randn(3, 20, generator=gen, dtype=DT)
    plan = kf.trace(model, params, x)
    names = {r: "attn.in_proj" if r is None else f"attn.in_proj[{r[0]}:{r[1]}]" for r in rows}
    assert set(plan.layers) == set(names.values()) | {"attn.out_proj"} and not plan.untracked
    cap = kf.capture(model, params, x, y, "mse", fisher=fisher)
    block = ggn_block if fisher == "exact" else empirical_fisher_block
    for r, name in names.items():
        layer = Layer("attn.in_proj_weight", "attn.in_proj_bias", rows=r)
        assert_close(captured_block(cap.a[name], cap.g[name]), block(model, params, x, y, "mse", "mean", layer))
    out = Layer("attn.out_proj.weight", "attn.out_proj.bias")
    assert_close(captured_block(cap.a["attn.out_proj"], cap.g["attn.out_proj"]),
                 block(model, params, x, y, "mse", "mean", out))
    _grads_match(cap, model, params, x, y, "mse")
    # preconditioning writes each slice's rows of the packed parameter
    factors = kf.kronecker_factors(cap)
    delta = kf.precondition(params, cap.grads, factors, layers=plan.layers, damping=0.1)
    for r, name in names.items():
        layer = Layer("attn.in_proj_weight", "attn.in_proj_bias", rows=r)
        A, G = factors[name]
        assert_close(layer_vector(delta, layer), dense_eigen_solve(A, G, layer_vector(cap.grads, layer), 0.1))


def test_slices_that_cannot_be_attributed_are_reported():
    """Row slices of a functional model's weight are layers; a column slice, overlapping row slices, an
    unsupported attention option: untracked, each with its reason; gradients stay exact."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=DT)

    def rows(p, x):
        wq, wk = p["w"].chunk(2)
        return F.linear(x, wq, p["b"][:2]) * F.linear(x, wk, p["b"][2:])

    params = {"w": torch.randn(4, 3, dtype=DT), "b": torch.randn(4, dtype=DT)}
    plan = kf.trace(rows, params, x)
    assert set(plan.layers) == {"w[0:2]", "w[2:4]"} and plan.layers["w[0:2]"].bias == "b"
    columns = lambda p, x: F.linear(x[:, :2], p["w"][:, :2])  # noqa: E731
    assert "other view" in kf.trace(columns, params, x).reasons["w"] or "w" in kf.trace(columns, params, x).untracked
    overlap = lambda p, x: F.linear(x, p["w"][:3]) + F.linear(x, p["w"][1:])  # noqa: E731
    assert "shared" in kf.trace(overlap, params, x).reasons["w"]
    model = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True).to(DT)
    xs, ys = torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    f = lambda p, x: torch.func.functional_call(model, p, (x, x, x))[0]  # noqa: E731
    p = params_of(model)
    plan = kf.trace(f, p, xs)
    assert "add_bias_kv" in plan.reasons["in_proj_weight"] and "bias_k" in plan.untracked
    cap = kf.capture(f, p, xs, ys, "mse", fisher="exact")
    expected = torch.func.grad(lambda q: F.mse_loss(f(q, xs), ys))(p)
    for k in p:
        assert_close(cap.grads[k], expected[k], atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# expand / reduce per layer, the registration table, bfloat16, batch-first
# ----------------------------------------------------------------------------------------------------


def test_reduce_per_layer_and_eschenhagen_defaults():
    torch.manual_seed(0)
    seq = TokenNet(5, 3, 4, act=True, channels_first=True)  # per-position loss: expand
    x = torch.randint(0, 5, (3, 4))
    assert kf.default_reduce(kf.trace(seq, params_of(seq), x)) == {"emb": False, "out": False}
    pooled = nn.Sequential(nn.Conv1d(2, 3, 2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 2))
    xp = torch.randn(3, 2, 5)
    plan = kf.trace(pooled, params_of(pooled), xp)
    assert kf.default_reduce(plan) == {"0": True, "3": True}
    cap = kf.capture(pooled, params_of(pooled), xp, torch.randint(0, 2, (3,)), "cross_entropy", fisher="exact")
    mixed = kf.kronecker_factors(cap, reduce={"0": True})
    reduced, expanded = kf.kronecker_factors(cap, reduce=True), kf.kronecker_factors(cap)
    assert torch.equal(mixed["0"].A, reduced["0"].A) and not torch.allclose(mixed["0"].A, expanded["0"].A)
    assert torch.equal(mixed["3"].A, expanded["3"].A)
    with pytest.raises(ValueError, match="reduce"):
        kf.KFAC(pooled, reduce="sometimes")
    with pytest.raises(ValueError, match=r"unknown layers \['conv'\]"):
        kf.kronecker_factors(cap, reduce={"conv": True})


def test_registration_tables_of_the_example_models():
    torch.manual_seed(0)
    net = resnet(8, 10)
    table = kf.describe(net, torch.randn(2, 64))
    assert not table.fallbacks and all(e.layer for e in table.entries)
    kinds = {e.kind for e in table.entries}
    assert kinds == {"conv2d", "batch_norm", "linear"}
    assert "20 of 20 parameters tracked" in str(table)
    lm = CharTransformer(10, 8)
    table = kf.describe(lm, torch.randint(0, 10, (2, 8)))
    assert not table.fallbacks
    by_name = {e.parameter: e for e in table.entries}
    assert by_name["token.weight"].block == "G 32×32 ⊗ diagonal A 10"
    assert by_name["blocks.0.self_attn.in_proj_weight"].layer == "blocks.0.self_attn.in_proj"
    assert by_name["blocks.1.norm2.bias"].kind == "layer_norm"
    odd = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
    f = lambda p, x: torch.func.functional_call(odd, p, (x, x, x))[0]  # noqa: E731
    table = kf.describe(f, torch.randn(2, 3, 4), params_of(odd))
    assert set(table.fallbacks) == {"in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj.weight",
                                    "out_proj.bias"}
    assert "identity fallback: nn.MultiheadAttention with add_bias_kv" in str(table)


@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_bfloat16_activations_give_float32_factors(model_kind):
    torch.manual_seed(0)
    if model_kind == "mlp":
        model, x = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)), torch.randn(16, 6)
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
        x = torch.randn(16, 2, 5, 5)
    y = torch.randint(0, 3, (16,))
    params = params_of(model)
    full = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
        factors = kf.kronecker_factors(cap)
        assert cap.loss.isfinite()
    reference = kf.kronecker_factors(full)
    for name, f in factors.items():
        assert f.A.dtype == f.G.dtype == torch.float32
        for got, want in zip(f, reference[name]):
            assert (got - want).norm() <= 0.05 * want.norm()
    assert all(g.dtype == torch.float32 for g in cap.grads.values())
    got, want = (torch.cat([c.grads[n].reshape(-1) for n in params]) for c in (cap, full))
    assert (got - want).norm() <= 0.05 * want.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kf.KFAC(model, lr=0.1).step(x, y)
    assert all(p.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# the example models train end to end
# ----------------------------------------------------------------------------------------------------


# the fixed step (lr, KL clip) with factored damping, statistics every step; the defaults (the quadratic model's
# forward-mode products run through the transformer's scaled_dot_product_attention)
@pytest.mark.parametrize("options", [fixed_step(lr=0.1, damping=0.1, damping_mode="factored", kl_clip=1e-2), {}],
                         ids=["fixed-step", "defaults"])
def test_resnet_and_transformer_train_with_the_optimizer(options):
    torch.manual_seed(0)
    split, alphabet = load_text(context=16)
    cases = [
        (resnet(8, 4, width=8), torch.rand(32, 64), torch.randint(0, 4, (32,))),
        (CharTransformer(len(alphabet), 16, dim=16, heads=2, layers=1), split.x_train[:16], split.y_train[:16]),
    ]
    for model, x, y in cases:
        opt = kf.KFAC(model, **options)
        first = float(opt.step(x, y))
        for _ in range(14):
            last = float(opt.step(x, y))
        assert last < 0.7 * first, (type(model).__name__, first, last)


class WideNorms(nn.Module):
    """LayerNorm over two trailing dims and GroupNorm / BatchNorm2d on images: ``γ``, ``β`` span several
    input dims, and the per-example sums run over the others."""

    def __init__(self, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2)
        self.norm = {"layer": nn.LayerNorm((3, 3)), "group": nn.GroupNorm(2, 4), "batch": nn.BatchNorm2d(4)}[norm]
        self.out = nn.Linear(36, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("norm", ["layer", "group", "batch"])
def test_norm_parameters_spanning_several_dims_are_exact(norm):
    torch.manual_seed(0)
    model = WideNorms(norm).to(DT).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=DT)
    y = make_target("cross_entropy", (3, 3), gen)
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    layer = Layer("norm.weight", "norm.bias", kind="norm")
    factors = kf.kronecker_factors(cap)
    assert_close(_dense(factors, "norm"), ggn_block(model, params, x, y, "cross_entropy", "mean", layer))
    _grads_match(cap, model, params, x, y, "cross_entropy")
    plan = kf.trace(model, params, x)
    delta = kf.precondition(params, cap.grads, factors, layers=plan.layers, damping=0.1)
    assert delta["norm.bias"].shape == params["norm.bias"].shape
    A, G = factors["norm"]
    assert_close(layer_vector(delta, layer), dense_eigen_solve(A, G, layer_vector(cap.grads, layer), 0.1))


class SDPABlock(nn.Module):
    """A causal attention block written with ``Linear``s and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int = 4, heads: int = 2):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        n, length, dim = x.shape
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(n, length, dim)).flatten(1)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_sdpa_block_written_with_linears_is_captured_exactly(fisher):
    torch.manual_seed(0)
    model = SDPABlock().to(DT)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 4, generator=gen, dtype=DT), torch.randn(3, 20, generator=gen, dtype=DT)
    plan = kf.trace(model, params, x)
    assert set(plan.layers) == {"qkv", "out"} and not plan.untracked
    cap = kf.capture(model, params, x, y, "mse", fisher=fisher)
    block = ggn_block if fisher == "exact" else empirical_fisher_block
    for name in plan.layers:
        layer = Layer(f"{name}.weight", f"{name}.bias")
        assert_close(captured_block(cap.a[name], cap.g[name]), block(model, params, x, y, "mse", "mean", layer))
    _grads_match(cap, model, params, x, y, "mse")
