r"""The size policy (:mod:`kfac_func.layout`): the documented rule, its overrides and errors; and a layer whose
sides are block-diagonal, diagonal or a multiple of the identity preconditions exactly as the dense float64
solve with that block-diagonal / diagonal / ``(tr M / d) I`` factor — K-FAC with eigen and factored damping,
E-KFAC (its scaling is ``diag(Qᵀ C Q)`` in the block-diagonal basis) and two-level K-FAC — for drawn widths,
block widths and kinds. The dense factors the masks are applied to are those the exact-block tests prove."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracles import (
    captured_block,
    captured_full,
    dense_eigen_solve,
    dense_factored_solve,
    dense_restriction,
    ekfac_dense,
)
from test_sides import dense as dense_side
from torch import nn

import kfac_func as kf
from kfac_func.layers import EMBEDDING, LayerSpec
from kfac_func.layout import MIN_BLOCK, Side, side_layout

DT = torch.float64


# ------------------------------------------------------------------------------------------------ the rule
def test_the_rule_keeps_ordinary_widths_dense_and_blocks_a_vocabulary():
    head, emb = LayerSpec("head", "linear", "head.weight", "head.bias"), LayerSpec("tok", EMBEDDING, "tok.weight", None)
    dims = {"head": (1, 50257, 769), "tok": (1, 768, 50257), "mlp": (1, 3072, 769), "thin": (1, 10, 5000)}
    layout = side_layout(dims, {"head": head, "tok": emb, "mlp": head, "thin": head})
    # G of the head: blocks no wider than the other side (769): k = ⌈50257/769⌉ = 66 blocks of ⌈50257/66⌉ = 762
    assert layout["head"] == (Side("dense", 769), Side("blocks", 762))
    assert layout["tok"] == (Side("diagonal", 1), Side("dense", 768))  # embeddings keep their diagonal A
    assert layout["mlp"] == (Side("dense", 769), Side("blocks", 768))  # 3072 > 2048: 4 blocks of 768 (≤ 769)
    assert layout["thin"] == (Side("diagonal", 1), Side("dense", 10))  # blocks of ≤ 10 < MIN_BLOCK: diagonal
    # at the limit: dense; one above: blocks of the limit (other side wide enough)
    at = side_layout({"l": (1, 64, 64)}, max_factor_dim=64)["l"]
    above = side_layout({"l": (1, 65, 64)}, max_factor_dim=64)["l"]
    assert at == (Side("dense", 64), Side("dense", 64)) and above == (Side("dense", 64), Side("blocks", 33))
    assert side_layout({"l": (1, 100, 5)}, max_factor_dim=MIN_BLOCK)["l"][1] == Side("diagonal", 1)
    assert Side("blocks", 762).describe("G", 50257) == "G 50257 in 66 blocks of ≤762"
    assert Side("blocks", 768).describe("G", 3072) == "G 3072 in 4 blocks of 768"
    assert Side("identity", 1).describe("A", 9) == "identity A 9"


def test_overrides_and_errors():
    spec = {"l": LayerSpec("l", "linear", "w", None), "e": LayerSpec("e", EMBEDDING, "e.w", None)}
    dims = {"l": (1, 100, 40), "e": (1, 8, 1000)}
    got = side_layout(dims, spec, factor_sides={"l": {"A": "identity", "G": 30}, "e": {"A": "identity"}})
    assert got["l"] == (Side("identity", 1), Side("blocks", 25)) and got["e"][0] == Side("identity", 1)
    assert side_layout(dims, spec, factor_sides={"l": {"G": 500}})["l"][1] == Side("dense", 100)
    bad = [({"x": {"A": "dense"}}, "unknown layers \\['x'\\]"), ({"l": {"B": 3}}, "the sides are 'A' and 'G'"),
           ({"l": {"A": "banded"}}, "expected 'dense', 'diagonal', 'identity' or a block width"),
           ({"l": {"A": 0}}, "block width ≥ 1"), ({"e": {"A": "dense"}}, "embedding's input factor is diagonal")]
    for sides, message in bad:
        with pytest.raises(ValueError, match=message):
            side_layout(dims, spec, factor_sides=sides)
    with pytest.raises(ValueError, match="max_factor_dim must be an int ≥ 1"):
        side_layout(dims, spec, max_factor_dim=0)
    with pytest.raises(ValueError, match="invalid max_factor_dim"):
        kf.kfac(nn.Linear(3, 2), max_factor_dim=1.5)


# ------------------------------------------------------------------------------- exactness against dense
def mask(m: torch.Tensor, side: tuple[str, int]) -> torch.Tensor:
    """The dense factor ``m`` ``(B, d, d)`` restricted as ``side`` says."""
    kind, block = side
    d = m.shape[-1]
    if kind == "dense" or kind == "blocks" and block >= d:
        return m
    diag = m.diagonal(dim1=-2, dim2=-1)
    if kind == "diagonal":
        return torch.diag_embed(diag)
    if kind == "identity":
        return torch.diag_embed((diag.sum(-1, keepdim=True) / d).expand_as(diag))
    return m * dense_side(torch.ones(m.shape[0], d, block, dtype=DT), d)


side_choices = st.one_of(st.sampled_from(["dense", "diagonal", "identity"]), st.integers(1, 6))


class Net(nn.Module):
    def __init__(self, d_in, hidden, groups):
        super().__init__()
        self.conv = nn.Conv1d(2 * groups, 2 * groups * 2, 2, groups=groups)  # grouped: B = groups
        self.fc1 = nn.Linear(2 * groups * 2 * (d_in - 1), hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def setup(seed, d_in, hidden, groups, n, overrides):
    torch.manual_seed(seed)
    model = Net(d_in, hidden, groups).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(n, 2 * groups, d_in, dtype=DT), torch.randint(0, 3, (n,))
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    plan = kf.trace(model, params, x)
    sides = overrides
    dense = kf.kronecker_factors(cap, reduce=True, layers=plan.layers, max_factor_dim=10**6)
    held = kf.kronecker_factors(cap, reduce=True, layers=plan.layers, factor_sides=sides)
    dims = {n: (f.A.shape[0], f.G.shape[-1], f.A.shape[-1]) for n, f in dense.items()}
    layout = side_layout(dims, plan.layers, factor_sides=sides)
    masked = {n: (mask(f.A, layout[n][0]), mask(f.G, layout[n][1])) for n, f in dense.items()}
    return model, params, cap, plan, held, masked


def vec_grads(plan, grads):
    return {n: kf.layers.weight_matrix(s, grads[s.weight], grads[s.bias] if s.bias else None)
            for n, s in plan.layers.items()}


draws = {"seed": st.integers(0, 2**16), "d_in": st.integers(2, 5), "hidden": st.integers(2, 9), "groups": st.integers(1, 2),
         "n": st.integers(1, 4), "a_side": side_choices, "g_side": side_choices, "damping": st.sampled_from([1e-3, 0.1, 2.0])}


@settings(max_examples=15, deadline=None)
@given(**draws)
@example(seed=0, d_in=4, hidden=7, groups=2, n=3, a_side=3, g_side=2, damping=0.1)  # uneven blocks, groups
@example(seed=1, d_in=3, hidden=5, groups=1, n=2, a_side="diagonal", g_side="identity", damping=1e-3)
def test_held_sides_precondition_as_the_dense_restricted_solve(seed, d_in, hidden, groups, n, a_side, g_side, damping):
    overrides = {"fc1": {"A": a_side, "G": g_side}, "conv": {"A": a_side}, "fc2": {"G": g_side}}
    _, params, cap, plan, held, masked = setup(seed, d_in, hidden, groups, n, overrides)
    grads = vec_grads(plan, cap.grads)
    eigen = kf.eigendecompose(held)
    inverse = kf.inverse_factors(held, damping)
    by_eigen = vec_grads(plan, kf.precondition(params, cap.grads, eigen, layers=plan.layers, damping=damping))
    by_pi = vec_grads(plan, kf.precondition(params, cap.grads, eigen, layers=plan.layers, damping=damping,
                                            mode="factored"))
    by_inv = vec_grads(plan, kf.precondition(params, cap.grads, inverse, layers=plan.layers, damping=None,
                                             mode="factored"))
    scale = kf.ekfac_scaling(cap, eigen)
    by_ekfac = vec_grads(plan, kf.precondition(params, cap.grads, kf.ekfac_factors(eigen, scale), layers=plan.layers,
                                               damping=damping))
    for name, (A, G) in masked.items():
        g = grads[name].reshape(-1)
        want = dense_eigen_solve(A, G, g, damping)
        torch.testing.assert_close(by_eigen[name].reshape(-1), want, rtol=1e-8, atol=1e-10)
        want = dense_factored_solve(A, G, g, damping)
        torch.testing.assert_close(by_pi[name].reshape(-1), want, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(by_inv[name].reshape(-1), want, rtol=1e-8, atol=1e-10)
        # E-KFAC: the basis is block-diagonal and diagonalises the restricted factors; S = diag(Qᵀ C Q)
        e = eigen[name]
        d_g, d_a = G.shape[-1], A.shape[-1]
        qa, qg = dense_side(e.QA, d_a).expand_as(A).contiguous(), dense_side(e.QG, d_g).expand_as(G).contiguous()
        torch.testing.assert_close(qa @ torch.diag_embed(e.dA) @ qa.mT, A, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(qg @ torch.diag_embed(e.dG) @ qg.mT, G, rtol=1e-8, atol=1e-10)
        C = captured_block(cap.a[name], cap.g[name])
        q = torch.block_diag(*[torch.kron(qg[b], qa[b]) for b in range(A.shape[0])])
        want_scale = (q.T @ C @ q).diagonal().reshape(scale[name].shape)
        torch.testing.assert_close(scale[name], want_scale, rtol=1e-8, atol=1e-12)
        K = ekfac_dense(qa, qg, want_scale)
        want = torch.linalg.solve(K + damping * torch.eye(K.shape[0], dtype=DT), g)
        torch.testing.assert_close(by_ekfac[name].reshape(-1), want, rtol=1e-8, atol=1e-10)


@settings(max_examples=8, deadline=None)
@given(**draws)
@example(seed=2, d_in=4, hidden=8, groups=2, n=3, a_side=3, g_side=3, damping=0.1)
def test_two_level_with_held_sides(seed, d_in, hidden, groups, n, a_side, g_side, damping):
    """Additive two-level K-FAC: ``P⁻¹∇ + R₀ᵀ(R₀CR₀ᵀ + λR₀R₀ᵀ)⁻¹R₀∇`` with ``P`` the restricted K-FAC; the spectral
    space's vectors are eigenvectors of the restricted ``G ⊗ A`` for its largest eigenvalue."""
    overrides = {"fc1": {"A": a_side, "G": g_side}, "conv": {"G": g_side}}
    _, params, cap, plan, held, masked = setup(seed, d_in, hidden, groups, n, overrides)
    eigen = kf.eigendecompose(held)
    names = list(plan.layers)
    grads = vec_grads(plan, cap.grads)
    g = torch.cat([grads[n].reshape(-1) for n in names])
    for space in (kf.nicolaides_space(held), kf.spectral_space(eigen, 1)):
        correction = kf.CoarseCorrection(space, kf.coarse_matrix(cap, space))
        got = vec_grads(plan, kf.precondition(params, cap.grads, eigen, layers=plan.layers, damping=damping,
                                              coarse=correction))
        R0 = dense_restriction(space.UG, space.UA, names)
        C = captured_full(cap.a, cap.g, names)
        c0 = R0 @ C @ R0.T + damping * R0 @ R0.T
        fine = torch.cat([dense_eigen_solve(*masked[n], grads[n].reshape(-1), damping) for n in names])
        want = fine + R0.T @ torch.linalg.solve(c0, R0 @ g)
        torch.testing.assert_close(torch.cat([got[n].reshape(-1) for n in names]), want, rtol=1e-8, atol=1e-10)
    for name, (A, G) in masked.items():  # the spectral vector of each layer: top eigenvector of the restricted G ⊗ A
        K = torch.block_diag(*[torch.kron(G[b], A[b]) for b in range(A.shape[0])])
        r = dense_restriction(space.UG, space.UA, [name])[0]
        top = torch.linalg.eigvalsh(K).max()
        torch.testing.assert_close(K @ r, top * r, rtol=1e-7, atol=1e-9 * max(1.0, float(top)))


# ------------------------------------------------------------------------------------ in the optimizer
def test_a_limit_at_or_above_every_width_changes_nothing():
    """Bit for bit: the default, the limit at the widest side and a huge limit give the same steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [(torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))) for _ in range(3)]
    runs = []
    for options in ({}, {"max_factor_dim": 10}, {"max_factor_dim": 10**9}):
        opt = kf.kfac(model, inverse_period=2, **options)
        p, state = params, opt.init(params, data[0][0])
        for x, y in data:
            p, state, _ = opt.step(p, state, x, y)
        runs.append((p, state))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(kf.tree.optree.tree_leaves(run), kf.tree.optree.tree_leaves(runs[0])))


def test_state_holds_each_side_as_chosen_and_describe_shows_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 40), nn.Flatten(), nn.Linear(80, 300))
    x = torch.randint(0, 300, (4, 2))
    opt = kf.kfac(model, max_factor_dim=64, damping_mode="factored")
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = opt.init(params, x)
    f = state.factors.value
    assert f["0"].A.shape == (1, 300) and f["0"].G.shape == (1, 40, 40)
    # head: G 300 > 64 → blocks of ≤ min(64, 81) = 64: ⌈300/64⌉ = 5 blocks of 60; A 81 > 64 → 2 blocks of 41
    assert f["2"].G.shape == (1, 300, 60) and f["2"].A.shape == (1, 81, 41)
    _, state, info = opt.step(params, state, x, torch.randint(0, 300, (4,)))
    assert bool(info.finite) and state.inverses["2"].G_inv.shape == (1, 300, 60)
    table = kf.describe(model, x, max_factor_dim=64, state=state)
    text = str(table)
    assert "G 300 in 5 blocks of 60" in text and "A 81 in 2 blocks of ≤41" in text and "diagonal A 300" in text
    layer = {e.layer: e for e in table.layers}["2"]
    # bytes of this layer's state: its factors' average and inverses (float32), and the inverses' damping (a scalar)
    assert layer.factor_bytes == 4 * (300 * 60 + 81 * 41) and layer.state_bytes == 2 * layer.factor_bytes + 4
    assert table.state_bytes == sum(t.numel() * t.element_size() for t in kf.tree.optree.tree_leaves(state))
