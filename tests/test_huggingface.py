"""Hugging Face ``transformers`` models built from small configs (no download) train through every route as
written: keyword inputs with an attention mask, ``ModelOutput`` out, ``Conv1D`` dense layers, ``(1, T)``
position ids, the tied LM head (reported as tied). Needs the ``hf`` extra (``.ci/setup`` installs it)."""

from __future__ import annotations

import copy

import pytest
import torch

import kfac_func as kf
from oracles import Layer, assert_close, captured_block, ggn_block, params_of

transformers = pytest.importorskip("transformers")

V, N, T = 23, 8, 6
LAST = kf.Loss("cross_entropy", class_dim=-1)
FIXED = dict(**kf.FIXED_STEP, lr=0.05, damping=0.1, inverse_period=1)


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, T), generator=gen)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[0, -2:] = 0  # one padded sequence
    return ids, mask


def _models():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager"))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=T, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=T, num_labels=3, pad_token_id=0))
    return {"gpt2": gpt2.double(), "llama": llama.double(), "bert": bert.double()}


def test_gpt2_blocks_are_the_exact_ggn_and_the_tie_is_named():
    """GPT-2's ``wpe`` on ``(1, T)`` ids and its LayerNorms: the captured blocks are the exact GGN's; its tied
    token embedding is two layers, one per use."""
    model = _models()["gpt2"]
    model.eval()
    params = params_of(model)
    ids, mask = _batch(0)
    inputs = kf.Args(input_ids=ids, attention_mask=mask)
    table = kf.describe(model, inputs)
    assert not table.fallbacks
    assert "transformer.wte:linear" in str(table)  # the tied LM head: a layer of its own on the shared weight
    cap = kf.capture(model, params, inputs, ids, LAST, fisher="exact")
    torch_layout = lambda p, v: torch.func.functional_call(  # noqa: E731
        model, p, (), {"input_ids": v, "attention_mask": mask}).logits.transpose(1, 2)
    for name, layer in {"transformer.wpe": Layer("transformer.wpe.weight", kind="embedding"),
                        "transformer.ln_f": Layer("transformer.ln_f.weight", "transformer.ln_f.bias", kind="norm")
                        }.items():
        oracle = ggn_block(torch_layout, params, ids, ids, "cross_entropy", "mean", layer)
        assert_close(captured_block(cap.a[name], cap.g[name]), oracle)


def _eval_loss(model, ids, mask, y) -> float:
    """The loss with dropout off (the routes train with it on, as the configs set it)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.train(training)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_models_train_through_every_route(name):
    """Each route, dropout on (the configs' default), lowers the loss of the batch it trains on."""
    model = _models()[name]
    model.train()
    classify = name == "bert"
    loss = "cross_entropy" if classify else LAST
    ids, mask = _batch(1)
    y = torch.arange(N) % 3 if classify else ids
    inputs = kf.Args(input_ids=ids, attention_mask=mask)
    start = _eval_loss(model, ids, mask, y)
    trained = {}
    functional = copy.deepcopy(model)
    opt = kf.KFAC(functional, loss=loss)  # the defaults; the ModelOutput's logits are read
    for _ in range(4):
        opt.step(inputs, y)
    trained["step"] = functional
    for fisher in ("mc", "empirical"):
        loop = copy.deepcopy(model)
        opt = kf.KFAC(loop, loss=loss, fisher=fisher, **FIXED)
        for _ in range(4):
            opt.zero_grad()
            out = loop(input_ids=ids, attention_mask=mask)
            if fisher == "mc":
                opt.curvature_backward(out.logits)
            logits = out.logits.reshape(-1, out.logits.shape[-1])
            torch.nn.functional.cross_entropy(logits, y.reshape(-1)).backward()
            opt.step()
        trained[fisher] = loop
    pre = copy.deepcopy(model)
    precond = kf.Preconditioner(pre, loss=loss, damping=0.1)
    adamw = torch.optim.AdamW(pre.parameters(), lr=1e-2)
    for _ in range(4):
        adamw.zero_grad()
        out = pre(input_ids=ids, attention_mask=mask)
        precond.curvature_backward(out.logits)
        torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)).backward()
        precond.step()
        adamw.step()
    trained["preconditioner"] = pre
    for route, m in trained.items():
        assert _eval_loss(m, ids, mask, y) < start, route
