r"""Two-level K-FAC (DESIGN.md §3–4) against dense float64 linear algebra: the coarse restriction ``R₀`` is
assembled explicitly from the coarse space, the full batch curvature ``C`` (cross-layer blocks included)
comes from the ``torch.func`` oracles (or, for MC, densely from the same capture), and every product,
coarse matrix and combination is compared with its dense formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfac_func as kf
from kfac_func.two_level import coarse_gram, prolong, restrict
from oracles import (
    KINDS,
    REDUCTIONS,
    assert_close,
    seeds,
    DT,
    budget,
    captured_full,
    coarse_rows,
    dense_restriction,
    empirical_fisher_full,
    full_vector,
    ggn_full,
    kfac_dense,
    linear_layers,
    make_target,
    mlp,
    params_of,
    rel_err,
)

SPACES = ["nicolaides", "spectral1", "spectral3", "random"]
# the draws every Setup-based test shares
SETUPS = dict(model_kind=st.sampled_from(["mlp", "cnn"]), seed=seeds, n=st.integers(1, 3), bias=st.booleans(),
              kind=st.sampled_from(KINDS), fisher=st.sampled_from(["exact", "empirical", "mc"]))


class CNN(nn.Module):
    """Grouped conv (B = 2) → relu → conv → tanh → flatten → untracked elementwise scale → linear."""

    def __init__(self, bias):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 2, groups=2, bias=bias)  # 4x4 → 3x3
        self.conv2 = nn.Conv2d(4, 2, 2, bias=bias)  # 3x3 → 2x2
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.fc = nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.flatten(1) * self.scale)


class Setup:
    """One model, batch and capture, with the dense full curvature ``C`` over the tracked layers."""

    def __init__(self, model_kind, seed, n, bias, kind="cross_entropy", reduction="mean", fisher="exact",
                 act="tanh"):
        gen = torch.Generator().manual_seed(seed)
        if model_kind == "mlp":
            self.model = mlp([3, 4, 3, 3], bias, act, seed)
            self.x = torch.randn(n, 3, generator=gen, dtype=DT)
        elif model_kind == "cnn":
            torch.manual_seed(seed)
            self.model = CNN(bias).to(DT)
            self.x = torch.randn(n, 2, 4, 4, generator=gen, dtype=DT)
        else:  # a deep linear network (exact with MSE)
            self.model = mlp(model_kind, bias, None, seed)
            self.x = torch.randn(n, model_kind[0], generator=gen, dtype=DT)
        self.params = params_of(self.model)
        out = self.model(self.x)
        self.y = make_target(kind, out.shape, gen)
        self.plan = kf.trace(self.model, self.params, self.x)
        self.cap = kf.capture(self.model, self.params, self.x, self.y, kf.Loss(kind, reduction), fisher=fisher,
                              mc_samples=2, key=kf.random.key(seed))
        self.names = list(self.plan.layers)
        all_layers = linear_layers(self.model)
        assert set(all_layers) == set(self.names)
        self.layers = [all_layers[name] for name in self.names]
        if fisher == "exact":
            self.C = ggn_full(self.model, self.params, self.x, self.y, kind, reduction, self.layers)
        elif fisher == "empirical":
            self.C = empirical_fisher_full(self.model, self.params, self.x, self.y, kind, reduction, self.layers)
        else:  # MC: the curvature of this very capture, densely
            self.C = captured_full(self.cap.a, self.cap.g, self.names)
        self.factors = kf.kronecker_factors(self.cap)
        self.eigen = kf.eigendecompose(self.factors)
        self.gen = gen

    def space(self, which):
        if which == "nicolaides":
            return kf.nicolaides_space(self.factors)
        if which == "random":  # any Kronecker-form rows: not orthonormal, so R₀R₀ᵀ ≠ I
            gen = torch.Generator().manual_seed(7)
            shapes = {n: (self.factors[n].A.shape[0], self.factors[n].G.shape[-1], self.factors[n].A.shape[-1])
                      for n in self.names}
            return kf.CoarseSpace({n: torch.randn(2, b, o, generator=gen, dtype=DT) for n, (b, o, i) in shapes.items()},
                                  {n: torch.randn(2, b, i, generator=gen, dtype=DT) for n, (b, o, i) in shapes.items()})
        return kf.spectral_space(self.eigen, vectors=int(which.removeprefix("spectral")))

    def R0(self, space):
        return dense_restriction(space.UG, space.UA, self.names)

    def vec(self, layerwise):
        return torch.cat([layerwise[n].reshape(-1) for n in self.names])

    def random_layerwise(self):
        return {n: torch.randn(self.factors[n].A.shape[0], self.factors[n].G.shape[-1], self.factors[n].A.shape[-1],
                               generator=self.gen, dtype=DT) for n in self.names}

    def grad_vec(self, tree=None):
        return full_vector(self.cap.grads if tree is None else tree, self.layers)

    def P_inv(self, damping, ekfac=None):
        """Dense block-diagonal damped inverse: K-FAC ``blockdiag_l (G⊗A + λI)⁻¹``, or with ``ekfac`` factors
        ``blockdiag_l (Q diag(S + λ) Qᵀ)⁻¹``."""
        blocks = []
        for n in self.names:
            if ekfac is None:
                K = kfac_dense(self.factors[n].A, self.factors[n].G) + damping * torch.eye(
                    self.factors[n].A.shape[0] * self.factors[n].A.shape[-1] * self.factors[n].G.shape[-1], dtype=DT)
            else:
                f = ekfac[n]
                Q = torch.block_diag(*[torch.kron(f.QG[b], f.QA[b]) for b in range(f.QA.shape[0])])
                K = Q @ torch.diag((f.scale + damping).reshape(-1)) @ Q.T
            blocks.append(torch.linalg.inv(K))
        return torch.block_diag(*blocks)


def surrogate_oracle(cap, space, names):
    r"""The Kronecker surrogate from explicit cross-layer covariances: per example ``â = mean_s ā``,
    ``ĝ = Σ_s g`` flattened over (block, feature); ``A_ij = 1/N Σₙ âᵢ âⱼᵀ``, ``G_ij = Σₙ,ᵥ ĝᵢ ĝⱼᵀ``;
    ``C₀[p, q] = (u_A,pᵀ A_ij u_A,q)(u_G,pᵀ G_ij u_G,q)`` for coarse row ``p`` of layer ``i``, ``q`` of ``j``."""
    N = next(iter(cap.a.values())).shape[0]
    hat_a = {n: cap.a[n].mean(2).reshape(N, -1) for n in names}
    hat_g = {n: cap.g[n].sum(3).reshape(-1, hat_a[n].shape[0], cap.g[n].shape[2] * cap.g[n].shape[-1])
             for n in names}
    rows = [(n, j) for n in names for j in range(space.UG[n].shape[0])]
    out = torch.zeros(len(rows), len(rows), dtype=DT)
    for p, (li, ji) in enumerate(rows):
        for q, (lj, jj) in enumerate(rows):
            A_ij = hat_a[li].T @ hat_a[lj] / N
            G_ij = sum(hat_g[li][v].T @ hat_g[lj][v] for v in range(hat_g[li].shape[0]))
            ua_i, ua_j = space.UA[li][ji].reshape(-1), space.UA[lj][jj].reshape(-1)
            ug_i, ug_j = space.UG[li][ji].reshape(-1), space.UG[lj][jj].reshape(-1)
            out[p, q] = (ua_i @ A_ij @ ua_j) * (ug_i @ G_ij @ ug_j)
    return out


# ----------------------------------------------------------------------------------------------------
# 6. coarse spaces, R₀, R₀R₀ᵀ, restrict / prolong, and the exact coarse matrix R₀ C R₀ᵀ
# ----------------------------------------------------------------------------------------------------


@given(**SETUPS, reduction=st.sampled_from(REDUCTIONS), which=st.sampled_from(SPACES))
@settings(max_examples=budget(12))
def test_exact_coarse_matrix_is_dense_R0_C_R0T(model_kind, seed, n, bias, kind, reduction, fisher, which):
    s = Setup(model_kind, seed, n, bias, kind, reduction, fisher)
    space = s.space(which)
    R0 = s.R0(space)
    k = {"nicolaides": 1, "spectral1": 1, "spectral3": 3, "random": 2}[which]
    assert R0.shape == (k * len(s.names), s.C.shape[0])
    M = kf.coarse_matrix(s.cap, space)
    assert_close(M, R0 @ s.C @ R0.T)
    assert_close(kf.coarse_matrix(s.cap, space, mode="exact"), M)
    gram = coarse_gram(space)
    assert_close(gram, R0 @ R0.T)
    if which != "random":  # the built-in spaces are orthonormal
        assert_close(gram, torch.eye(R0.shape[0], dtype=DT))
    v = s.random_layerwise()
    assert_close(restrict(space, v), R0 @ s.vec(v))
    y = torch.randn(R0.shape[0], generator=s.gen, dtype=DT)
    p = prolong(space, y)
    assert set(p) == set(s.names)
    assert_close(s.vec(p), R0.T @ y)


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_spaces_are_what_they_claim(model_kind):
    """Nicolaides: the normalised all-ones vector of each layer. Spectral: orthonormal eigenvectors of the
    layer's K-FAC block with its k largest eigenvalues, in decreasing order."""
    s = Setup(model_kind, 1, 3, True)
    nico = s.space("nicolaides")
    for n in s.names:
        row = coarse_rows(nico.UG[n], nico.UA[n])
        assert row.shape[0] == 1
        assert_close(row[0], torch.full_like(row[0], row.shape[1] ** -0.5))
    spec = kf.spectral_space(s.eigen, vectors=3)
    for n in s.names:
        K = kfac_dense(s.factors[n].A, s.factors[n].G)
        rows = coarse_rows(spec.UG[n], spec.UA[n])
        top = torch.linalg.eigvalsh(K).flip(0)[:3]
        assert top[0] > top[-1] > 0
        assert_close(rows @ K @ rows.T, torch.diag(top))
        assert_close(rows @ rows.T, torch.eye(3, dtype=DT))


# ----------------------------------------------------------------------------------------------------
# 7. the Kronecker surrogate; exact for a deep linear net with MSE
# ----------------------------------------------------------------------------------------------------


@given(**SETUPS, reduction=st.sampled_from(REDUCTIONS), which=st.sampled_from(SPACES))
@settings(max_examples=budget(10))
def test_kronecker_coarse_matrix_is_the_surrogate(model_kind, seed, n, bias, kind, reduction, fisher, which):
    s = Setup(model_kind, seed, n, bias, kind, reduction, fisher)
    space = s.space(which)
    assert_close(kf.coarse_matrix(s.cap, space, mode="kronecker"), surrogate_oracle(s.cap, space, s.names))


@given(seed=seeds, sizes=st.lists(st.integers(1, 4), min_size=3, max_size=4), n=st.integers(2, 5),
       bias=st.booleans(), reduction=st.sampled_from(REDUCTIONS), which=st.sampled_from(["nicolaides", "spectral1"]))
@settings(max_examples=budget(10))
def test_deep_linear_mse_both_modes_are_exact(seed, sizes, n, bias, reduction, which):
    s = Setup(sizes, seed, n, bias, "mse", reduction, "exact")
    space = s.space(which)
    expected = s.R0(space) @ s.C @ s.R0(space).T
    assert_close(kf.coarse_matrix(s.cap, space, mode="exact"), expected)
    assert_close(kf.coarse_matrix(s.cap, space, mode="kronecker"), expected)


def test_kronecker_surrogate_is_not_exact_on_a_nonlinear_net():
    """Power check for the previous test: the two modes differ where the surrogate is an approximation."""
    s = Setup("mlp", 0, 4, True, "cross_entropy", "mean", "exact")
    space = s.space("nicolaides")
    exact = kf.coarse_matrix(s.cap, space, mode="exact")
    assert_close(exact, s.R0(space) @ s.C @ s.R0(space).T)
    assert rel_err(kf.coarse_matrix(s.cap, space, mode="kronecker"), exact) > 1e-2


# ----------------------------------------------------------------------------------------------------
# 8. curvature-vector products
# ----------------------------------------------------------------------------------------------------


@given(**SETUPS, reduction=st.sampled_from(REDUCTIONS))
@settings(max_examples=budget(10))
def test_curvature_product_is_dense_C_v(model_kind, seed, n, bias, kind, reduction, fisher):
    s = Setup(model_kind, seed, n, bias, kind, reduction, fisher)
    if fisher != "mc":  # the capture's dense curvature is the oracle's, cross-layer blocks included
        assert_close(captured_full(s.cap.a, s.cap.g, s.names), s.C)
    v = s.random_layerwise()
    Cv = kf.curvature_product(s.cap, v)
    assert set(Cv) == set(s.names)
    for name in s.names:
        assert Cv[name].shape == v[name].shape
    assert_close(s.vec(Cv), s.C @ s.vec(v))


# ----------------------------------------------------------------------------------------------------
# 9. each combination equals its dense formula
# ----------------------------------------------------------------------------------------------------


def dense_combination(s, R0, M, damping, combination, weights=(1.0, 1.0), ekfac=None):
    """``Δ`` of DESIGN.md §3 by dense linear algebra, ``M`` the undamped coarse matrix."""
    g = s.grad_vec()
    P_inv = s.P_inv(damping, ekfac)
    I = torch.eye(s.C.shape[0], dtype=DT)  # noqa: E741
    Ct = s.C + damping * I
    C0 = M + damping * R0 @ R0.T
    Q = R0.T @ torch.linalg.solve(C0, R0)
    if combination == "additive":
        return weights[0] * P_inv @ g + weights[1] * Q @ g
    if combination == "adef2":
        return ((I - Q @ Ct) @ P_inv + Q) @ g
    return ((I - Q @ Ct) @ P_inv @ (I - Ct @ Q) + Q) @ g


@given(**SETUPS, which=st.sampled_from(SPACES), coarse_mode=st.sampled_from(["exact", "kronecker"]),
       combination=st.sampled_from(["additive", "adef2", "bnn"]), damping=st.sampled_from([1e-2, 0.1, 1.0]),
       weights=st.sampled_from([(1.0, 1.0), (0.5, 2.0), (1.0, 0.0), (0.0, 1.0)]),
       method=st.sampled_from([None, "two_level"]), fine=st.sampled_from(["kronecker", "eigen", "ekfac"]))
@settings(max_examples=budget(16))
def test_combination_equals_dense_formula(model_kind, seed, n, bias, kind, fisher, which, coarse_mode, combination,
                                          damping, weights, method, fine):
    """``P`` is damped K-FAC (from raw or decomposed factors) or E-KFAC; ``C`` the same capture's curvature."""
    s = Setup(model_kind, seed, n, bias, kind, "mean", fisher)
    ekfac = kf.ekfac_factors(s.eigen, kf.ekfac_scaling(s.cap, s.eigen)) if fine == "ekfac" else None
    factors = {"kronecker": s.factors, "eigen": s.eigen, "ekfac": ekfac}[fine]
    space = s.space(which)
    R0 = s.R0(space)
    M = kf.coarse_matrix(s.cap, space, mode=coarse_mode)
    M_dense = R0 @ s.C @ R0.T if coarse_mode == "exact" else surrogate_oracle(s.cap, space, s.names)
    extra = dict(weights=weights) if combination == "additive" else {}
    out = kf.precondition(s.params, s.cap.grads, factors, layers=s.plan.layers,
                          damping=damping, mode="eigen", method=method, coarse=kf.CoarseCorrection(space, M),
                          combination=combination, capture=s.cap, **extra)
    assert set(out) == set(s.params)
    for name in s.plan.untracked:
        assert torch.equal(out[name], s.cap.grads[name])
    expected = dense_combination(s, R0, M_dense, damping, combination, weights if extra else (1.0, 1.0), ekfac)
    assert_close(s.grad_vec(out), expected, atol=1e-9, rtol=1e-7)


def test_combinations_are_distinct_and_weights_matter():
    """Power check: the three combinations and two weightings give clearly different updates, and the
    coarse correction changes K-FAC's update."""
    s = Setup("cnn", 2, 3, True, "cross_entropy", "mean", "exact")
    space = s.space("spectral3")
    corr = kf.CoarseCorrection(space, kf.coarse_matrix(s.cap, space))
    run = lambda **kw: s.grad_vec(kf.precondition(s.params, s.cap.grads, s.eigen, layers=s.plan.layers,  # noqa: E731
                                                  damping=0.1, capture=s.cap, **kw))
    outs = {c: run(coarse=corr, combination=c) for c in ("additive", "adef2", "bnn")}
    outs["weighted"] = run(coarse=corr, combination="additive", weights=(0.5, 2.0))
    outs["kfac"] = run()
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert rel_err(outs[a], outs[b]) > 1e-3, (a, b)


# ----------------------------------------------------------------------------------------------------
# 10. a coarse space spanning every tracked parameter: adef2 and bnn are the damped natural gradient
# ----------------------------------------------------------------------------------------------------


def _full_space(s):
    """Every Kronecker eigenvector of every layer (``spectral_space`` per layer, merged in layer order)."""
    ug, ua = {}, {}
    for n in s.names:
        e = s.eigen[n]
        sub = kf.spectral_space({n: e}, vectors=e.dA.shape[0] * e.dG.shape[-1] * e.dA.shape[-1])
        ug[n], ua[n] = sub.UG[n], sub.UA[n]
    return kf.CoarseSpace(ug, ua)


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("damping", [1e-2, 0.5])
def test_full_coarse_space_gives_damped_natural_gradient(model_kind, damping):
    s = Setup(model_kind, 5, 3, True, "cross_entropy", "mean", "exact")
    space = _full_space(s)
    R0 = s.R0(space)
    assert R0.shape == (s.C.shape[0], s.C.shape[0])
    assert_close(coarse_gram(space), torch.eye(R0.shape[0], dtype=DT))
    corr = kf.CoarseCorrection(space, kf.coarse_matrix(s.cap, space))
    g = s.grad_vec()
    natural = torch.linalg.solve(s.C + damping * torch.eye(s.C.shape[0], dtype=DT), g)
    run = lambda c: s.grad_vec(kf.precondition(s.params, s.cap.grads, s.eigen, layers=s.plan.layers,  # noqa: E731
                                               damping=damping, method="two_level", coarse=corr, combination=c,
                                               capture=s.cap))
    assert_close(run("adef2"), natural, atol=1e-9, rtol=1e-7)
    assert_close(run("bnn"), natural, atol=1e-9, rtol=1e-7)
    additive = run("additive")
    assert_close(additive, s.P_inv(damping) @ g + natural, atol=1e-9, rtol=1e-7)  # P⁻¹∇ + C̃⁻¹∇
    assert rel_err(additive, natural) > 0.1


# ----------------------------------------------------------------------------------------------------
# 11. the coarse matrix is rebuilt per batch, never accumulated
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coarse_mode", ["exact", "kronecker"])
def test_coarse_matrix_is_rebuilt_not_accumulated(coarse_mode):
    s = Setup("cnn", 3, 3, True, "cross_entropy", "mean", "exact")
    space = s.space("spectral3")
    first = kf.coarse_matrix(s.cap, space, mode=coarse_mode)
    for _ in range(3):
        assert torch.equal(kf.coarse_matrix(s.cap, space, mode=coarse_mode), first)
    state = kf.init_average(first)
    for _ in range(50):
        state, ok = kf.update_average(state, kf.coarse_matrix(s.cap, space, mode=coarse_mode), 0.95)
        assert bool(ok)
    assert int(state.updates) == 50
    assert_close(kf.averaged(state), first, atol=1e-12, rtol=1e-12)
    assert first.norm() > 1e-6  # (a zero matrix would make the comparison vacuous)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


def test_two_level_validation():
    s = Setup("mlp", 0, 3, True)
    space = s.space("nicolaides")
    corr = kf.CoarseCorrection(space, kf.coarse_matrix(s.cap, space))
    call = lambda **kw: kf.precondition(s.params, s.cap.grads, s.eigen, layers=s.plan.layers,  # noqa: E731
                                        damping=0.1, **kw)
    with pytest.raises(ValueError, match="coarse mode"):
        kf.coarse_matrix(s.cap, space, mode="dense")
    no_curv = kf.capture(s.model, s.params, s.x, s.y, "cross_entropy", fisher=None)
    with pytest.raises(ValueError, match="curvature vectors"):
        kf.coarse_matrix(no_curv, space)
    with pytest.raises(ValueError, match="vectors"):
        kf.spectral_space(s.eigen, vectors=0)
    with pytest.raises(ValueError, match="vectors"):
        kf.spectral_space(s.eigen, vectors=10**4)
    with pytest.raises(ValueError, match="combination"):
        call(coarse=corr, combination="multiplicative", capture=s.cap)
    for combination in ("adef2", "bnn"):
        with pytest.raises(ValueError, match="capture"):
            call(coarse=corr, combination=combination)
    with pytest.raises(ValueError, match="two_level"):
        call(method="two_level")
    with pytest.raises(ValueError, match="two_level"):
        call(method="kfac", coarse=corr)
    call(coarse=corr)  # additive needs no capture


def test_capture_without_curvature_vectors_gets_a_clear_error():
    """KNOWN BUG (fails today): ``adef2``/``bnn`` given a capture made with ``fisher=None`` raise a bare
    ``KeyError`` from ``curvature_product`` (kfac_func/two_level.py:146, ``cap.g[name]`` on an empty dict)
    instead of the clear ``ValueError`` that ``coarse_matrix`` and ``ekfac_scaling`` give for the same input."""
    s = Setup("mlp", 0, 3, True)
    space = s.space("nicolaides")
    corr = kf.CoarseCorrection(space, kf.coarse_matrix(s.cap, space))
    no_curv = kf.capture(s.model, s.params, s.x, s.y, "cross_entropy", fisher=None)
    with pytest.raises(ValueError, match="curvature vectors"):
        kf.curvature_product(no_curv, s.random_layerwise())
    with pytest.raises(ValueError, match="curvature vectors"):
        kf.precondition(s.params, s.cap.grads, s.eigen, layers=s.plan.layers, damping=0.1, coarse=corr,
                        combination="bnn", capture=no_curv)
