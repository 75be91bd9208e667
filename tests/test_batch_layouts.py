"""Where the examples are in each layer's input, found from the dataflow: flattened rows, sequence-first inputs
and inputs shared by the whole batch give the statistics of their batch-first twin — exactly, and with the
sizes chosen so that a guess from sizes (batch == sequence length) would be wrong — and the captured ``(a, g)``
rebuild the dense float64 oracle's exact curvature blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf
import kfac_func.quadratic as quadratic
from kfac_func.calls import ModelIO
from oracles import DT, Layer, assert_close, captured_block, ggn_block, params_of

N = T = 4  # batch == sequence length: a layout guessed from sizes is wrong here
D, V = 5, 6


def _same_capture(model, twin, x, x_twin, y, y_twin, loss, loss_twin, fisher="exact", **options):
    """The captures of ``model`` and its batch-first ``twin`` (same parameters) hold the same numbers."""
    params = params_of(model)
    key = kf.random.key(3)
    got = kf.capture(model, params, x, y, loss, fisher=fisher, key=key, **options)
    ref = kf.capture(twin, params, x_twin, y_twin, loss_twin, fisher=fisher, key=key)
    assert set(got.a) == set(ref.a) and got.a
    for name in ref.a:
        assert_close(got.a[name], ref.a[name], atol=1e-13, rtol=1e-11)
        assert_close(got.g[name], ref.g[name], atol=1e-13, rtol=1e-11)
    for name in ref.grads:
        assert_close(got.grads[name], ref.grads[name], atol=1e-13, rtol=1e-11)
    assert_close(got.loss, ref.loss)
    return got, ref


class Mixer(nn.Module):
    """Linear → LayerNorm → a causal running mean over positions (examples' rows interact) → linear head;
    ``layout``: ``"batch"`` (N, T, D), ``"sequence"`` (T, N, D), or ``"rows"`` (the linears on ``view(-1, D)``
    rows, logits ``(N·T, V)`` as a language model's loss takes them)."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout = layout
        self.fc = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        seq = 0 if self.layout == "sequence" else 1
        h = self.fc(x.reshape(-1, D)).reshape(x.shape) if self.layout == "rows" else self.fc(x)
        h = torch.tanh(self.ln(h))
        counts = torch.arange(1, h.shape[seq] + 1, dtype=h.dtype).reshape((-1, 1, 1) if seq == 0 else (-1, 1))
        h = h.cumsum(seq) / counts
        if self.layout == "rows":
            return self.head(h.reshape(-1, D))
        return self.head(h)


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_sequence_first_and_flattened_rows_equal_the_batch_first_twin(fisher):
    torch.manual_seed(0)
    twin = Mixer("batch").to(DT)
    x = torch.randn(N, T, D, dtype=DT)
    y = torch.randint(0, V, (N, T))
    last = kf.Loss("cross_entropy", class_dim=-1)
    for layout in ("sequence", "rows"):
        model = copy.deepcopy(twin)
        model.layout = layout
        if layout == "sequence":
            _same_capture(model, twin, x.transpose(0, 1), x, y.T, y, last, last, fisher, batch_dims=1)
        else:
            _same_capture(model, twin, x, x, y.reshape(-1), y, "cross_entropy", last, fisher)


def test_flattened_rows_rebuild_the_exact_blocks_and_default_to_expand():
    """``(N·T, V)`` logits: the exact Fisher's columns are per row, so the captured blocks are the exact GGN's
    (an ``(N, ·)`` grouping of one column across all rows of an example would add cross-row terms); the
    per-token loss makes ``reduce="auto"`` choose expand."""
    torch.manual_seed(1)
    model = Mixer("rows").to(DT)
    params = params_of(model)
    x = torch.randn(N, T, D, dtype=DT)
    y = torch.randint(0, V, (N * T,))
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    for name in ("fc", "head"):
        oracle = ggn_block(model, params, x, y, "cross_entropy", "mean", Layer(f"{name}.weight", f"{name}.bias"))
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)
        assert cap.a[name].shape[:3] == (N, 1, T)  # examples first, their rows as positions
    plan = kf.trace(model, params, x)
    assert not any(kf.default_reduce(plan).values())


def test_sequence_first_attention_needs_its_batch_dim():
    """``nn.TransformerEncoderLayer`` as torch's tutorials build it (sequence-first): with ``batch_dims=1`` its
    statistics equal those of the ``batch_first=True`` twin when T == N; without, an error names the fix."""
    torch.manual_seed(2)
    kwargs = dict(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, dtype=DT)
    first = nn.TransformerEncoderLayer(**kwargs)
    twin = nn.TransformerEncoderLayer(**kwargs, batch_first=True)
    twin.load_state_dict(first.state_dict())
    x = torch.randn(N, T, 4, dtype=DT)
    y = torch.randn(N, T, 4, dtype=DT)
    _same_capture(first, twin, x.transpose(0, 1), x, y.transpose(0, 1), y, "mse", "mse", batch_dims=1)
    with pytest.raises(ValueError, match="pass batch_dims=1"):
        kf.trace(first, params_of(first), x.transpose(0, 1))


class Positions(nn.Module):
    """Token embeddings plus position embeddings of ``arange(T)`` (``ids="flat"``), of ``(1, T)`` ids
    (``"row"``, as Hugging Face models) or of ids expanded to the batch by hand (``"batch"``, the twin), and a
    linear layer on position features with no batch dim; then a linear head per position."""

    def __init__(self, ids: str):
        super().__init__()
        self.ids = ids
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.pos_fc = nn.Linear(3, D)
        self.head = nn.Linear(D, V)
        self.register_buffer("features", torch.randn(T, 3))

    def forward(self, idx):
        n, t = idx.shape
        pos = torch.arange(t)
        features = self.features
        if self.ids == "row":
            pos, features = pos.unsqueeze(0), features.unsqueeze(0)
        elif self.ids == "batch":
            pos, features = pos.expand(n, t), features.expand(n, t, 3)
        h = self.tok(idx) + self.pos(pos) + self.pos_fc(features)
        return self.head(torch.tanh(h).cumsum(1))


@pytest.mark.parametrize("ids", ["flat", "row"])
def test_inputs_shared_by_the_batch_equal_their_expanded_twin_and_the_exact_blocks(ids):
    """A layer whose input has no batch dim gets each example's own output gradient: its factors equal those of
    the twin whose input is expanded to the batch by hand, and its captured ``(a, g)`` rebuild the exact GGN
    block (gradients summed over the batch first would not: their outer products mix examples)."""
    torch.manual_seed(3)
    twin = Positions("batch").to(DT)
    model = copy.deepcopy(twin)
    model.ids = ids
    x = torch.randint(0, V, (N, T))
    y = torch.randint(0, V, (N, T))
    last = kf.Loss("cross_entropy", class_dim=-1)
    plan = kf.trace(model, params_of(model), x)
    assert {c.layer: lay.dim for c, lay in zip(plan.calls, plan.layouts)} == {"tok": 0, "pos": None, "pos_fc": None,
                                                                              "head": 0}
    cap, _ = _same_capture(model, twin, x, x, y, y, last, last)
    params = params_of(model)
    model_fn = lambda p, v: torch.func.functional_call(model, p, (v,)).transpose(1, 2)  # noqa: E731
    for name, layer in (("pos", Layer("pos.weight", kind="embedding")), ("pos_fc", Layer("pos_fc.weight", "pos_fc.bias"))):
        oracle = ggn_block(model_fn, params, x, y, "cross_entropy", "mean", layer)
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)


def test_shared_input_recorded_in_the_ordinary_loop_equals_the_functional_step():
    """The same broadcast position embedding through ``loss.backward(); opt.step()`` (MC Fisher with
    ``curvature_backward`` on the flattened logits): the steps equal ``step(x, y)``'s."""
    torch.manual_seed(4)
    model = Positions("flat").to(DT)
    twin = copy.deepcopy(model)
    options = dict(loss="cross_entropy", **kf.FIXED_STEP, lr=0.1, inverse_period=1)
    flat = lambda out: out.reshape(-1, V)  # noqa: E731
    opt = kf.KFAC(model, **options)
    ref = kf.KFAC(twin, output=flat, **options)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randint(0, V, (N, T), generator=gen), torch.randint(0, V, (N, T), generator=gen)
        opt.zero_grad()
        logits = model(x)
        opt.curvature_backward(flat(logits))
        F.cross_entropy(flat(logits), y.reshape(-1)).backward()
        opt.step()
        ref.step(x, y.reshape(-1))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, atol=1e-12, rtol=1e-10)


def test_a_shared_input_whose_output_does_not_broadcast_is_reported():
    """A layer on batch-free inputs whose output is reshaped before it meets the batch (as a relative-position
    bias is) cannot be given the batch: it is untracked, with the reason, never mis-handled."""

    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.rel = nn.Embedding(7, 2)
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            rel = torch.arange(T).unsqueeze(0) - torch.arange(T).unsqueeze(1) + T - 1
            bias = self.rel(rel).permute(2, 0, 1)  # (heads, T, T)
            return self.fc(x) + bias.sum(0).sum(-1, keepdim=True)

    model = Bias().to(DT)
    table = kf.describe(model, torch.randn(N, T, D, dtype=DT))
    assert "rel.weight" in table.fallbacks
    assert "output does not broadcast against the batch" in table.fallbacks["rel.weight"]


def test_quadratic_model_from_the_first_examples_in_any_layout():
    """``quadratic_fraction``'s sub-batch is the first examples wherever the inputs and the output hold them:
    the GGN forms of the sequence-first and the flattened-rows model equal the batch-first twin's."""
    torch.manual_seed(5)
    twin = Mixer("batch").to(DT)
    params = params_of(twin)
    x = torch.randn(N, T, D, dtype=DT)
    y = torch.randint(0, V, (N, T))
    gen = torch.Generator().manual_seed(0)
    directions = [{n: torch.randn(p.shape, generator=gen, dtype=DT) for n, p in params.items()} for _ in range(2)]
    last = kf.Loss("cross_entropy", class_dim=-1)
    ref = quadratic.ggn_quadratic_forms(twin, params, x, y, last, directions, examples=2)
    whole = quadratic.ggn_quadratic_forms(twin, params, x, y, last, directions)
    assert not torch.allclose(ref, whole)  # the sub-batch is a different estimate
    seq, rows = copy.deepcopy(twin), copy.deepcopy(twin)
    seq.layout, rows.layout = "sequence", "rows"
    got = quadratic.ggn_quadratic_forms(ModelIO(seq, batch_dims=1), params, x.transpose(0, 1), y.T, last,
                                           directions, examples=2)
    assert_close(got, ref)
    got = quadratic.ggn_quadratic_forms(rows, params, x, y.reshape(-1), "cross_entropy", directions, examples=2)
    assert_close(got, ref)
