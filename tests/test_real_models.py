"""Models as their codebases write them (:mod:`real_models`) train through every route — ``step(x, y)``, the
ordinary loop with ``curvature_backward``, the empirical Fisher, ``Preconditioner`` + AdamW — with their own
calls and outputs, and their captured ``(a, g)`` rebuild the dense float64 oracle's exact curvature blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf
from oracles import DT, Layer, assert_close, captured_block, ggn_block, params_of
from real_models import GCN, GPT, VAE, Conv1DNet, HandAttentionGPT, RNNModel, TransformerModel, vae_loss

V, N, T = 11, 4, 4  # vocabulary, batch, sequence (batch == sequence length: no layout guessed from sizes)
LAST = kf.Loss("cross_entropy", class_dim=-1)
FIXED = dict(**kf.FIXED_STEP, lr=0.05, damping=0.1, inverse_period=1)


def _tokens(seed: int, shape=(N, T)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=gen), torch.randint(0, V, shape, generator=gen)


def _assert_blocks(model_fn, params, x, y, cap, layers: dict[str, Layer]):
    """Each captured block against the exact GGN of ``model_fn`` (batch-first, torch's ``(N, V, T)`` logits)."""
    for name, layer in layers.items():
        oracle = ggn_block(model_fn, params, x, y, "cross_entropy", "mean", layer)
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)


@pytest.mark.parametrize("tie", [False, True])
def test_minimal_gpt_as_written(tie):
    """``wpe(arange(T))`` with no batch dim, ``(logits, loss)`` out, the loss on ``logits.view(-1, V)``, the LM
    head tied to the token embedding or not: the captured blocks are the exact GGN's, and the ordinary loop (MC
    and exact Fisher, ``curvature_backward`` on the flattened logits; the empirical Fisher) takes exactly
    ``step(x, y)``'s steps — the tied weight's shares of the gradient from the loop's hooks included."""
    torch.manual_seed(0)
    model = GPT(vocab_size=V, block_size=T, tie=tie).to(DT)
    params = params_of(model)
    x, y = _tokens(0)
    flat = lambda out: out[0].view(-1, V)  # noqa: E731
    cap = kf.capture(model, params, x, y.view(-1), "cross_entropy", fisher="exact", output=flat)
    batch_first = lambda p, v: torch.func.functional_call(model, p, (v,))[0].transpose(1, 2)  # noqa: E731
    _assert_blocks(batch_first, params, x, y, cap, {
        "transformer.wpe": Layer("transformer.wpe.weight", kind="embedding"),
        "transformer.h.0.attn.c_attn": Layer("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"),
        **({} if tie else {"lm_head": Layer("lm_head.weight")}),
    })
    for fisher in ("mc", "exact", "empirical"):
        loop, ref = copy.deepcopy(model), copy.deepcopy(model)
        opt = kf.KFAC(loop, loss=LAST, fisher=fisher, **FIXED)  # its R counts the (B, T, V) logits' rows
        functional = kf.KFAC(ref, loss="cross_entropy", fisher=fisher, output=flat, **FIXED)
        for seed in range(3):
            x, y = _tokens(seed)
            opt.zero_grad()
            logits, loss = loop(x, y)
            if fisher != "empirical":
                opt.curvature_backward(logits.view(-1, logits.size(-1)))
            loss.backward()
            opt.step()
            functional.step(x, y.view(-1))
        for p, q in zip(loop.parameters(), ref.parameters()):
            assert_close(p, q, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_minimal_gpt_trains_with_the_defaults_and_with_a_preconditioned_adamw(dropout):
    torch.manual_seed(1)
    model = GPT(vocab_size=V, block_size=T, dropout=dropout, tie=False).to(DT)
    twin = copy.deepcopy(model)
    x, y = _tokens(1)
    opt = kf.KFAC(model, loss=LAST, output=0)  # the (B, T, V) logits of (logits, loss), class-last
    first = opt.step(x, y)
    for _ in range(4):
        last = opt.step(x, y)
    assert last < first
    precond = kf.Preconditioner(twin, loss="cross_entropy", damping=0.1)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        adamw.zero_grad()
        logits, loss = twin(x, y)
        precond.curvature_backward(logits.view(-1, V))
        loss.backward()
        precond.step()
        adamw.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hand_written_attention_gpt_as_written():
    """The other minimal GPT layout (attention by hand under a mask buffer named ``bias``, a lambda MLP, targets
    ``-1`` ignored): every parameter is tracked, the captured blocks of the packed ``c_attn``, the MLP and the
    position embedding are the exact GGN's with the ignored targets left out, ``step(x, y)`` returns the model's
    own loss, and with dropout the defaults train."""
    torch.manual_seed(0)
    model = HandAttentionGPT(V, T).to(DT)
    params = params_of(model)
    x, y = _tokens(0)
    y[0, :2] = y[2, 1] = -1
    loss = kf.Loss("cross_entropy", ignore_index=-1, class_dim=-1)
    assert not kf.describe(model, kf.Args(x, y)).fallbacks
    cap = kf.capture(model, params, kf.Args(x, y), y, loss, fisher="exact")
    batch_first = lambda p, v: torch.func.functional_call(model, p, (v,))[0].transpose(1, 2)  # noqa: E731
    h0 = "transformer.h.0"
    for name, layer in {"transformer.wpe": Layer("transformer.wpe.weight", kind="embedding"),
                        f"{h0}.attn.c_attn": Layer(f"{h0}.attn.c_attn.weight", f"{h0}.attn.c_attn.bias"),
                        f"{h0}.mlp.c_fc": Layer(f"{h0}.mlp.c_fc.weight", f"{h0}.mlp.c_fc.bias")}.items():
        oracle = ggn_block(batch_first, params, x, y, "cross_entropy", "mean", layer, ignore_index=-1)
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)
    assert_close(cap.loss, model(x, y)[1])
    trained = HandAttentionGPT(V, T, dropout=0.1).to(DT)
    opt = kf.KFAC(trained, loss=loss)
    losses = [float(opt.step(kf.Args(x, y), y)) for _ in range(6)]
    assert losses[-1] < losses[0]


def test_word_language_model_transformer_sequence_first():
    """PyTorch's ``TransformerModel``: ``(T, N)`` ids, ``nn.TransformerEncoder`` with ``batch_first=False``,
    ``log_softmax`` out ``(T, N, V)`` (cross-entropy of log-probabilities is the same loss). With
    ``batch_dims=1`` its decoder's and attention's blocks are the exact GGN's, and both routes train."""
    torch.manual_seed(2)
    model = TransformerModel(ntoken=V).to(DT)
    model.eval()  # dropout 0; the mask is built in the forward
    params = params_of(model)
    x, y = _tokens(2)
    cap = kf.capture(model, params, x.T, y.T, LAST, fisher="exact", batch_dims=1)
    batch_first = lambda p, v: torch.func.functional_call(model, p, (v.T,)).permute(1, 2, 0)  # noqa: E731
    _assert_blocks(batch_first, params, x, y, cap, {
        "decoder": Layer("decoder.weight", "decoder.bias"),
        "encoder.layers.0.self_attn.in_proj": Layer("encoder.layers.0.self_attn.in_proj_weight",
                                                    "encoder.layers.0.self_attn.in_proj_bias"),
    })
    with pytest.raises(ValueError, match="pass batch_dims=1"):
        kf.KFAC(copy.deepcopy(model), loss=LAST).step(x.T, y.T)
    opt = kf.KFAC(model, loss=LAST, batch_dims=1)
    first = opt.step(x.T, y.T)
    loop = kf.KFAC(twin := copy.deepcopy(model), loss=LAST, batch_dims=1, **FIXED)
    for _ in range(3):
        last = opt.step(x.T, y.T)
        loop.zero_grad()
        out = twin(x.T)
        loop.curvature_backward(out)
        F.nll_loss(out.view(-1, V), y.T.reshape(-1)).backward()
        loop.step()
    assert last < first


def test_lstm_language_model_with_its_hidden_state():
    """PyTorch's ``RNNModel``: ``model(input, hidden)`` sequence-first, ``(decoded.view(-1, V), hidden)`` out
    (rows example-minor); the LSTM's weights are reported and take plain gradient steps, the embedding and
    decoder are K-FAC layers whose blocks are the exact GGN's."""
    torch.manual_seed(3)
    model = RNNModel(ntoken=V).to(DT)
    params = params_of(model)
    x, y = _tokens(3)
    hidden = model.init_hidden(N)
    inputs = kf.Args(x.T, hidden)
    table = kf.describe(model, inputs, batch_dims=1)
    assert set(table.fallbacks) == {n for n, _ in model.rnn.named_parameters(prefix="rnn")}
    plan = kf.trace(model, params, inputs, batch_dims=1)
    assert plan.output_layout == (0, T, False, False, False)  # T·N rows, example-minor
    cap = kf.capture(model, params, inputs, y.T.reshape(-1), "cross_entropy", fisher="exact", batch_dims=1)
    h = model.init_hidden(N)
    batch_first = lambda p, v: torch.func.functional_call(model, p, (v.T, h))[0].view(T, N, V).permute(1, 2, 0)  # noqa: E731
    _assert_blocks(batch_first, params, x, y, cap, {"decoder": Layer("decoder.weight", "decoder.bias"),
                                                    "encoder": Layer("encoder.weight", kind="embedding")})
    opt = kf.KFAC(model, loss="cross_entropy", batch_dims=1, **FIXED)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        output, _ = model(x.T, model.init_hidden(N))
        opt.curvature_backward(output)
        loss = F.nll_loss(output, y.T.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_conv1d_dense_layers_equal_their_linear_twin():
    """Hugging Face's ``Conv1D`` (``addmm`` with an ``(in, out)`` weight) is a dense layer: its statistics and
    gradients equal those of the same network written with ``nn.Linear`` (weights transposed), and the
    preconditioned update is the twin's, transposed."""
    torch.manual_seed(4)
    model = Conv1DNet(vocab=V).to(DT)
    twin = Conv1DNet(vocab=V).to(DT)
    twin.load_state_dict(model.state_dict())
    linears = {}
    for name in ("c_fc", "c_proj"):
        conv = getattr(model, name)
        lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1]).to(DT)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)
        setattr(twin, name, lin)
        linears[name] = lin
    x, y = _tokens(4)
    key = kf.random.key(0)
    cap = kf.capture(model, params_of(model), x, y, LAST, fisher="mc", key=key)
    ref = kf.capture(twin, params_of(twin), x, y, LAST, fisher="mc", key=key)
    for name in ref.a:
        assert_close(cap.a[name], ref.a[name])
        assert_close(cap.g[name], ref.g[name])
    for name in ("c_fc.weight", "c_proj.weight"):
        assert_close(cap.grads[name], ref.grads[name].T)
    assert not kf.describe(model, x).fallbacks
    opt, opt_twin = kf.KFAC(model, loss=LAST, **FIXED), kf.KFAC(twin, loss=LAST, **FIXED)
    for seed in range(2):
        x, y = _tokens(seed)
        opt.step(x, y)
        opt_twin.step(x, y)
    for name in ("c_fc", "c_proj"):
        assert_close(getattr(model, name).weight, linears[name].weight.T, atol=1e-12, rtol=1e-10)


def test_vae_with_its_own_loss_through_the_empirical_fisher():
    """A VAE (``randn_like`` in the forward, ``(recon, mu, logvar)`` out, its own summed loss of three outputs)
    in the ordinary loop with the empirical Fisher: ``loss=`` only says the reduction (a sum: ``R = 1``). On one
    example the factors are the exact empirical Fisher blocks of the user's loss (same noise)."""
    torch.manual_seed(5)
    model = VAE().to(DT)
    x = torch.rand(1, 12, dtype=DT)
    opt = kf.KFAC(model, loss=kf.Loss("mse", reduction="sum"), fisher="empirical", **FIXED)
    rng = torch.get_rng_state()
    opt.zero_grad()
    recon, mu, logvar = model(x)
    vae_loss(recon, x, mu, logvar).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    factors = opt.kfac_state.factors
    for name in ("fc4", "fc1"):
        A, G = kf.averaged(factors)[name]
        block = torch.kron(G[0], A[0])
        vec = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], 1).reshape(-1)
        assert_close(block, torch.outer(vec, vec))  # N = 1: the empirical Fisher block, R = 1
    torch.set_rng_state(rng)
    for _ in range(3):
        opt.zero_grad()
        recon, mu, logvar = model(x)
        vae_loss(recon, x, mu, logvar).backward()
        opt.step()
    assert all(p.isfinite().all() for p in model.parameters())


def test_parameters_without_gradients_are_left_alone_and_metadata_reads_keep_curvature():
    """torch.optim's rule: a parameter whose ``grad`` is ``None`` gets no update and no weight decay (KFAC's
    flows, and Preconditioner before AdamW); a parameter read only for its dtype/device (``new_zeros``) in
    the forward stays a K-FAC layer."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.unused = nn.Linear(5, 3)

        def forward(self, x):
            start = next(self.parameters()).new_zeros(x.shape[0], 3)  # fc.weight read for its dtype only
            return start + self.fc(x)

    torch.manual_seed(6)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model = Net()
    assert set(kf.describe(model, x).fallbacks) == {"unused.weight", "unused.bias"}
    before = copy.deepcopy(model.unused.state_dict())
    decayed = {**FIXED, "weight_decay": 0.1}
    kf.KFAC(model, loss="cross_entropy", **decayed).step(x, y)
    opt = kf.KFAC(model, loss="cross_entropy", fisher="empirical", **decayed)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert model.unused.weight.grad is None
    precond = kf.Preconditioner(model, loss="cross_entropy", fisher="empirical", damping=0.1)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    adamw.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    precond.step()
    assert model.unused.weight.grad is None
    adamw.step()
    for k, v in model.unused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tied_weight_is_preconditioned_as_its_untied_twin_summed():
    """A token embedding tied to the LM head is one layer per use: each use's statistics and share of the
    gradient are those of the same model with the weight untied, each share is preconditioned by its own use's
    factors, and the tied weight's update is the sum — checked against dense solves of each use's damped
    Kronecker block ``(G ⊗ A + λI)⁻¹`` (in the embedding's ``Wᵀ`` layout and the head's ``W``)."""
    torch.manual_seed(7)
    tied = GPT(vocab_size=V, block_size=T, tie=True).to(DT)
    untied = GPT(vocab_size=V, block_size=T, tie=False).to(DT)
    untied.load_state_dict(tied.state_dict())
    with torch.no_grad():
        untied.transformer.wte.weight.copy_(tied.lm_head.weight)
    x, y = _tokens(7)
    key, flat = kf.random.key(1), (lambda out: out[0].view(-1, V))  # noqa: E731
    cap = kf.capture(tied, params_of(tied), x, y.view(-1), "cross_entropy", fisher="mc", key=key, output=flat)
    ref = kf.capture(untied, params_of(untied), x, y.view(-1), "cross_entropy", fisher="mc", key=key, output=flat)
    head, emb = "transformer.wte:linear", "transformer.wte"
    assert set(cap.uses) == {head, emb}
    for mine, theirs in ((emb, emb), (head, "lm_head")):
        assert_close(cap.a[mine], ref.a[theirs])
        assert_close(cap.g[mine], ref.g[theirs])
    assert_close(cap.uses[emb][0].T, ref.grads["transformer.wte.weight"])
    assert_close(cap.uses[head][0], ref.grads["lm_head.weight"])
    plan = kf.trace(tied, params_of(tied), x, output=flat)
    factors = kf.kronecker_factors(cap, layers=plan.layers)
    damping = 0.1
    delta = kf.precondition(params_of(tied), cap.grads, kf.eigendecompose(factors), layers=plan.layers,
                            damping=damping, uses=cap.uses)
    (A_e, G_e), (A_h, G_h) = factors[emb], factors[head]
    eye = lambda n: torch.eye(n, dtype=DT)  # noqa: E731
    d_e = torch.linalg.solve(torch.kron(G_e[0], torch.diag(A_e[0])) + damping * eye(V * 8), cap.uses[emb][0].reshape(-1))
    d_h = torch.linalg.solve(torch.kron(G_h[0], A_h[0]) + damping * eye(V * 8), cap.uses[head][0].reshape(-1))
    assert_close(delta["transformer.wte.weight"], d_e.reshape(8, V).T + d_h.reshape(V, 8))


def test_exact_fisher_in_the_loop_reads_where_the_examples_are():
    """The ordinary loop's exact Fisher on the sequence-first model's output flattened (``out.view(-1, V)``: its
    rows example-minor) takes the functional step's steps; a tensor whose rows cannot be told apart is an error."""
    torch.manual_seed(8)
    model = TransformerModel(ntoken=V).to(DT)
    model.eval()
    loop, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = kf.KFAC(loop, loss=LAST, fisher="exact", batch_dims=1, **FIXED)
    functional = kf.KFAC(ref, loss=LAST, fisher="exact", batch_dims=1, **FIXED)
    for seed in range(2):
        x, y = _tokens(seed)
        opt.zero_grad()
        out = loop(x.T)
        opt.curvature_backward(out.view(-1, V))
        F.nll_loss(out.view(-1, V), y.T.reshape(-1)).backward()
        opt.step()
        functional.step(x.T, y.T)
    for p, q in zip(loop.parameters(), ref.parameters()):
        assert_close(p, q, atol=1e-12, rtol=1e-10)
    out = loop(x.T)
    with pytest.raises(ValueError, match="cannot tell which rows"):
        opt.curvature_backward(out[:-1].reshape(-1, V))


def _graph(nodes=12, features=6, seed=9):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(nodes, features, generator=gen) < 0.4).to(DT)
    adj = (torch.rand(nodes, nodes, generator=gen) < 0.2).to(DT)
    adj = ((adj + adj.T + torch.eye(nodes, dtype=DT)) > 0).to(DT)
    scale = adj.sum(1) ** -0.5
    return x, scale[:, None] * adj * scale[None, :], torch.randint(0, 3, (nodes,), generator=gen)


def test_gcn_on_one_graph():
    """PyTorch's GCN: ``torch.mm(x, kernel)`` layers over a whole graph whose nodes interact through ``adj``, a
    loss on the training nodes only. ``batch_dims=None`` makes the graph one example (its nodes positions): the
    captured blocks are the exact GGN's, and on sparse inputs, as the example builds them, both routes train."""
    torch.manual_seed(9)
    model = GCN(6, 5, 3).to(DT)
    model.eval()
    x, adj, labels = _graph()
    train = torch.arange(8)
    params = params_of(model)
    picked = lambda out: out[train]  # noqa: E731
    cap = kf.capture(model, params, kf.Args(x, adj), labels[train], "cross_entropy", fisher="exact",
                     batch_dims=None, output=picked)
    assert set(cap.a) == {"gc1.kernel", "gc2.kernel"}  # the biases are added outside the products: reported
    on_train = lambda p, v: torch.func.functional_call(model, p, (v, adj))[train]  # noqa: E731
    for name in cap.a:
        # the kernel is stored (in, out): the oracle's (out, in) weight is its transpose
        transposed = lambda p, v, name=name: on_train({**p, f"{name}": p[f"{name}"].T}, v)  # noqa: E731
        oracle = ggn_block(transposed, {**params, name: params[name].T}, x, labels[train], "cross_entropy", "mean",
                           Layer(name))
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)
    model.train()
    sparse = kf.Args(x.to_sparse(), adj.to_sparse())
    for route in ("loop", "step"):
        m = copy.deepcopy(model)
        opt = kf.KFAC(m, loss="cross_entropy", batch_dims=None, **({"output": picked} if route == "step" else FIXED))
        losses = []
        for _ in range(5):
            if route == "step":
                losses.append(opt.step(sparse, labels[train]).item())
                continue
            opt.zero_grad()
            out = m(*sparse.args)
            opt.curvature_backward(out[train])
            loss = F.nll_loss(out[train], labels[train])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], route


def test_dense_layers_written_with_a_transposed_weight():
    """JAX-style functional code writes dense layers as ``x @ W.T + b``, ``torch.matmul(x, W.t())``,
    ``torch.addmm(b, x, W.transpose(0, 1))`` with ``W`` stored ``(out, in)``: each is the ``F.linear`` layer (the
    bias added outside the product is reported), with its statistics, gradients and factors, also under ``vmap``
    over an ensemble."""
    torch.manual_seed(10)
    params = {"w1": torch.randn(6, 4, dtype=DT), "b1": torch.randn(6, dtype=DT), "w2": torch.randn(5, 6, dtype=DT),
              "b2": torch.randn(5, dtype=DT), "w3": torch.randn(3, 5, dtype=DT)}

    def written(p, x):
        h = torch.tanh(x @ p["w1"].T + p["b1"])
        h = torch.tanh(torch.addmm(p["b2"], h, p["w2"].transpose(0, 1)))
        return torch.matmul(h, p["w3"].t())

    def linear(p, x):
        h = torch.tanh(F.linear(x, p["w1"]) + p["b1"])
        h = torch.tanh(F.linear(h, p["w2"], p["b2"]))
        return F.linear(h, p["w3"])

    x, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    plan = kf.trace(written, params, x)
    assert set(plan.layers) == {"w1", "w2", "w3"} and plan.untracked == ("b1",)
    assert not any(s.transposed for s in plan.layers.values())
    key = kf.random.key(2)
    cap = kf.capture(written, params, x, y, "cross_entropy", fisher="mc", key=key)
    ref = kf.capture(linear, params, x, y, "cross_entropy", fisher="mc", key=key)
    for name in ref.a:
        assert_close(cap.a[name], ref.a[name])
        assert_close(cap.g[name], ref.g[name])
    for name in ref.grads:
        assert_close(cap.grads[name], ref.grads[name])
    opt = kf.kfac(written, loss="cross_entropy", **kf.FIXED_STEP)
    stacked = {n: torch.stack([p, p + 0.1]) for n, p in params.items()}
    state = torch.func.vmap(lambda p: opt.init(p, x))(stacked)
    new, _, _ = torch.func.vmap(opt.step, in_dims=(0, 0, None, None))(stacked, state, x, y)
    alone, _, _ = opt.step(params, opt.init(params, x), x, y)
    for name in params:
        assert_close(new[name][0], alone[name])


def test_a_sequence_taken_for_the_batch_is_an_error():
    """The LSTM language model fed sequence-first ``(T, N)`` ids without ``batch_dims=1``: doubling dim 0 doubles
    the sequence, and the second copy's outputs see the first (its examples interact), so the trace refuses it
    and names the fix — never positions taken for examples. A model drawing random numbers is not judged."""
    torch.manual_seed(11)
    model = RNNModel(ntoken=V).to(DT)
    x, _ = _tokens(11)
    inputs = kf.Args(x.T, model.init_hidden(N))
    with pytest.raises(ValueError, match="examples of that dim interact.*batch_dims=1"):
        kf.trace(model, params_of(model), inputs)
    assert kf.trace(model, params_of(model), inputs, batch_dims=1).layers
    assert kf.trace(VAE().to(DT), params_of(VAE().to(DT)), torch.rand(4, 12, dtype=DT)).layers
