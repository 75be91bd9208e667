r"""Independent float64 oracles, built only with ``torch.func`` (``jacrev``, ``hessian``, ``grad``,
``vmap``, ``functional_call``) and torch's own loss functions.

Nothing here uses ``kfac_func``'s math. The layout of a layer's parameters is the one documented in
DESIGN.md §3: ``W̄ = [W, b]`` as ``(B, d_g, d_a)`` (``B`` = conv groups), flattened row-major; the
reorder is re-implemented here (:func:`to_wbar` / :func:`from_wbar`) and checked against the library's
``weight_matrix`` on a hand-built example in the tests.

Conventions (DESIGN.md §3): ``L = R Σₙ ℓₙ`` with ``ℓₙ`` the sum-reduced loss of example ``n``;
``R = 1/N`` for cross-entropy mean with class indices (counting non-ignored targets), ``1/numel`` for
MSE/BCE mean and for cross-entropy mean with class probabilities (``1/(N·positions)``), ``1`` for sum.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from kfac_func import FIXED_STEP


DT = torch.float64


# ----------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------


def torch_loss(kind: str, reduction: str = "mean", ignore_index: int = -100):
    """The loss exactly as torch defines it, as ``fn(out, target)``."""

    def fn(out: Tensor, target: Tensor) -> Tensor:
        if kind == "cross_entropy":
            return F.cross_entropy(out, target, reduction=reduction, ignore_index=ignore_index)
        if kind == "mse":
            return F.mse_loss(out, target, reduction=reduction)
        if kind == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(out, target, reduction=reduction)
        raise ValueError(kind)

    return fn


def reduction_scale(kind: str, reduction: str, out: Tensor, target: Tensor, ignore_index: int = -100) -> float:
    """``R`` such that torch's reduced loss equals ``R Σₙ ℓₙ``."""
    if reduction == "sum":
        return 1.0
    if kind == "cross_entropy":
        if target.is_floating_point():
            return 1.0 / (out.numel() // out.shape[1])
        return 1.0 / int((target != ignore_index).sum())
    return 1.0 / out.numel()


def example_loss(kind: str, ignore_index: int = -100):
    """``ℓₙ(out_n, target_n)``: the sum-reduced loss of one example (inputs without the batch dim)."""
    f = torch_loss(kind, "sum", ignore_index)
    return lambda o, t: f(o.unsqueeze(0), t.unsqueeze(0))


def example_hessians(kind: str, out: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """``(N, K, K)``: Hessian of ``ℓₙ`` w.r.t. example ``n``'s (flattened) output."""
    n = out.shape[0]
    k = out[0].numel()
    return vmap(hessian(example_loss(kind, ignore_index)))(out, target).reshape(n, k, k)


# ----------------------------------------------------------------------------------------------------
# parameter layout
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """Which parameters form one K-FAC layer (given by the test, not taken from the library), and how
    they are laid out as ``θ``: ``"dense"`` (``W̄ = [W, b]`` per group, row-major), ``"embedding"``
    (``θ = vec(Wᵀ)``: rows are embedding dims, columns tokens) or ``"norm"`` (``θ = [γ; β]``); ``rows``
    restricts the layer to a row slice of its parameters (a packed projection)."""

    weight: str
    bias: str | None = None
    groups: int = 1
    kind: str = "dense"
    rows: tuple[int, int] | None = None


def to_wbar(W: Tensor, b: Tensor | None, groups: int = 1) -> Tensor:
    """``[W, b]`` as ``(B, d_g, d_a)``: rows are output units (of group ``b``), columns the flattened
    inputs of that group (``C_in/B · kh · kw`` for a conv), then the bias."""
    m = W.reshape(groups, W.shape[0] // groups, -1)
    if b is not None:
        m = torch.cat([m, b.reshape(groups, -1, 1)], dim=-1)
    return m


def from_wbar(theta: Tensor, w_shape: torch.Size, has_bias: bool, groups: int) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`to_wbar` for a flat vector ``theta``."""
    m = theta.reshape(groups, w_shape[0] // groups, -1)
    if has_bias:
        return m[..., :-1].reshape(w_shape), m[..., -1].reshape(-1)
    return m.reshape(w_shape), None


def layer_vector(tree: dict[str, Tensor], layer: Layer) -> Tensor:
    """A layer's parameters (or gradients) as the flat vector ``θ``."""
    W, b = tree[layer.weight], tree[layer.bias] if layer.bias else None
    if layer.rows is not None:
        W, b = W[layer.rows[0] : layer.rows[1]], (b[layer.rows[0] : layer.rows[1]] if b is not None else None)
    if layer.kind == "embedding":
        return W.T.reshape(-1)
    if layer.kind == "norm":
        return torch.cat([W.reshape(-1)] + ([b.reshape(-1)] if b is not None else []))
    return to_wbar(W, b, layer.groups).reshape(-1)


def _substitute(params: dict[str, Tensor], layer: Layer):
    full = params[layer.weight]
    r0, r1 = layer.rows or (0, full.shape[0])
    w_shape = (r1 - r0,) + tuple(full.shape[1:])

    def place(name: str, part: Tensor) -> Tensor:  # the rows of the whole parameter
        whole = params[name]
        return torch.cat([whole[:r0], part, whole[r1:]]) if layer.rows is not None else part

    def sub(theta: Tensor) -> dict[str, Tensor]:
        if layer.kind == "embedding":
            W, b = theta.reshape(w_shape[1], w_shape[0]).T, None
        elif layer.kind == "norm":
            k = math.prod(w_shape)
            W, b = theta[:k].reshape(w_shape), (theta[k:].reshape(w_shape) if layer.bias is not None else None)
        else:
            W, b = from_wbar(theta, torch.Size(w_shape), layer.bias is not None, layer.groups)
        p = dict(params)
        p[layer.weight] = place(layer.weight, W)
        if layer.bias is not None:
            p[layer.bias] = place(layer.bias, b)
        return p

    return sub


def as_fn(model):
    if isinstance(model, nn.Module):
        return lambda p, x: functional_call(model, p, (x,))
    return model


# ----------------------------------------------------------------------------------------------------
# curvature blocks
# ----------------------------------------------------------------------------------------------------


def output_jacobian(model, params, x, layer: Layer) -> Tensor:
    """``(N, K, P)``: Jacobian of each example's output w.r.t. ``vec(W̄)`` of ``layer``."""
    f, sub = as_fn(model), _substitute(params, layer)
    theta = layer_vector(params, layer)
    J = jacrev(lambda th: f(sub(th), x))(theta)
    return J.reshape(J.shape[0], -1, theta.numel())


def ggn_block(model, params, x, target, kind, reduction, layer: Layer, ignore_index: int = -100) -> Tensor:
    """Exact (type-2) Fisher = GGN block ``R Σₙ Jₙᵀ Hₙ Jₙ`` of one layer, ``Hₙ = ∇²ℓₙ``."""
    out = as_fn(model)(params, x)
    J = output_jacobian(model, params, x, layer)
    H = example_hessians(kind, out, target, ignore_index)
    R = reduction_scale(kind, reduction, out, target, ignore_index)
    return R * torch.einsum("nkp,nkl,nlq->pq", J, H, J)


def ggn_block_total_hessian(model, params, x, target, kind, reduction, layer: Layer, ignore_index: int = -100):
    """The same GGN block a second way: ``Jᵀ (∇²_out L) J`` with torch's *reduced* loss ``L``
    (checks the oracle's ``R`` and per-example Hessians against each other)."""
    f = as_fn(model)
    out = f(params, x)
    J = output_jacobian(model, params, x, layer).reshape(-1, layer_vector(params, layer).numel())
    loss = torch_loss(kind, reduction, ignore_index)
    H = hessian(lambda o: loss(o, target))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def per_example_grads(model, params, x, target, kind, layer: Layer, ignore_index: int = -100) -> Tensor:
    """``(N, P)``: ``∇_{vec W̄} ℓₙ`` via ``vmap(grad)``, each example run through the model alone."""
    f, sub = as_fn(model), _substitute(params, layer)
    theta = layer_vector(params, layer)
    ell = example_loss(kind, ignore_index)

    def loss_n(th, xn, tn):
        return ell(f(sub(th), xn.unsqueeze(0))[0], tn)

    return vmap(grad(loss_n), in_dims=(None, 0, 0))(theta, x, target)


def empirical_fisher_block(model, params, x, target, kind, reduction, layer: Layer, ignore_index: int = -100):
    """Empirical Fisher block ``R Σₙ ∇ℓₙ ∇ℓₙᵀ`` (true targets)."""
    out = as_fn(model)(params, x)
    R = reduction_scale(kind, reduction, out, target, ignore_index)
    G = per_example_grads(model, params, x, target, kind, layer, ignore_index)
    return R * G.T @ G


def loss_grads(model, params, x, target, kind, reduction, ignore_index: int = -100) -> dict[str, Tensor]:
    """``∂L/∂params`` of torch's loss via ``torch.func.grad``."""
    f, loss = as_fn(model), torch_loss(kind, reduction, ignore_index)
    return grad(lambda p: loss(f(p, x), target))(params)


# ----------------------------------------------------------------------------------------------------
# dense matrices from library outputs (plain linear algebra, written independently)
# ----------------------------------------------------------------------------------------------------


def kfac_dense(A: Tensor, G: Tensor) -> Tensor:
    """``blockdiag_b (G_b ⊗ A_b)`` for ``A: (B, d_a, d_a)`` (or a diagonal ``(B, d_a)``), ``G: (B, d_g, d_g)``."""
    if A.dim() == 2:
        A = torch.diag_embed(A)
    return torch.block_diag(*[torch.kron(G[b], A[b]) for b in range(A.shape[0])])


def captured_block(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_{v,n} vec(Σₛ g āᵀ) vec(Σₛ g āᵀ)ᵀ`` from ``a: (N, B, S, d_a)``, ``g: (V, N, B, S, d_g)``."""
    V, N = g.shape[:2]
    M = torch.zeros(V, N, g.shape[2], g.shape[4], a.shape[3], dtype=a.dtype)
    for s in range(a.shape[2]):  # explicit loop over positions, deliberately unlike an einsum
        M = M + g[:, :, :, s, :, None] * a[None, :, :, s, None, :]
    M = M.reshape(V * N, -1)
    return M.T @ M


def pi_dampings(A: Tensor, G: Tensor, damping: float) -> tuple[list[float], list[float]]:
    """Per block ``λ_A = π√λ``, ``λ_G = √λ/π`` with ``π² = (tr A/dim A)/(tr G/dim G)``."""
    lam_a, lam_g = [], []
    for b in range(A.shape[0]):
        ta, tg = torch.trace(A[b]) / A.shape[-1], torch.trace(G[b]) / G.shape[-1]
        pi = float((ta / tg).sqrt()) if ta > 0 and tg > 0 else 1.0
        lam_a.append(pi * damping**0.5)
        lam_g.append(damping**0.5 / pi)
    return lam_a, lam_g


def dense_eigen_solve(A: Tensor, G: Tensor, vec_grad: Tensor, damping: float) -> Tensor:
    """``(blockdiag(G⊗A) + λI)⁻¹ vec Γ`` by a dense solve."""
    K = kfac_dense(A, G)
    return torch.linalg.solve(K + damping * torch.eye(K.shape[0], dtype=K.dtype), vec_grad)


def dense_factored_solve(A: Tensor, G: Tensor, vec_grad: Tensor, damping: float) -> Tensor:
    """``blockdiag((G + λ_G I) ⊗ (A + λ_A I))⁻¹ vec Γ`` by a dense solve."""
    lam_a, lam_g = pi_dampings(A, G, damping)
    eye_a, eye_g = torch.eye(A.shape[-1], dtype=A.dtype), torch.eye(G.shape[-1], dtype=G.dtype)
    K = torch.block_diag(
        *[torch.kron(G[b] + lam_g[b] * eye_g, A[b] + lam_a[b] * eye_a) for b in range(A.shape[0])]
    )
    return torch.linalg.solve(K, vec_grad)


# ----------------------------------------------------------------------------------------------------
# helpers shared by the tests
# ----------------------------------------------------------------------------------------------------


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def linear_layers(module: nn.Module) -> dict[str, Layer]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` of ``module`` as a :class:`Layer`, keyed by module name."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            groups = m.groups if isinstance(m, nn.Conv2d) else 1
            out[name] = Layer(f"{name}.weight", f"{name}.bias" if m.bias is not None else None, groups)
    return out


def make_target(kind: str, out_shape, gen: torch.Generator, ignore_frac: float = 0.0, ignore_index: int = -100):
    """Targets for ``kind``: class indices (``out_shape`` without dim 1) for cross-entropy, Gaussian for
    MSE, uniform ``[0, 1]`` for BCE."""
    if kind == "cross_entropy":
        shape = (out_shape[0],) + tuple(out_shape[2:])
        t = torch.randint(0, out_shape[1], shape, generator=gen)
        if ignore_frac > 0:
            mask = torch.rand(shape, generator=gen) < ignore_frac
            mask.view(-1)[0] = False  # keep at least one target
            t = torch.where(mask, torch.full_like(t, ignore_index), t)
        return t
    if kind == "mse":
        return torch.randn(out_shape, generator=gen, dtype=DT)
    return torch.rand(out_shape, generator=gen, dtype=DT)


def mlp(sizes, bias: bool, act: str | None, seed: int) -> nn.Module:
    """``Linear → act → ... → Linear`` in float64 (``act=None``: a deep linear network)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(d_in, d_out, bias=bias))
        if act is not None and i < len(sizes) - 2:
            mods.append(nn.Tanh() if act == "tanh" else nn.ReLU())
    return nn.Sequential(*mods).to(DT)


def budget(n: int) -> int:
    """Hypothesis example count, scaled by ``KFAC_TEST_SCALE`` (default 1) for a longer local search."""
    return n * int(os.environ.get("KFAC_TEST_SCALE", "1"))


def rel_err(x: Tensor, y: Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------------
# several layers at once (E-KFAC and two-level tests): the full curvature over all tracked layers,
# cross-layer blocks included; explicit coarse restrictions; dense E-KFAC
# ----------------------------------------------------------------------------------------------------


def full_vector(tree: dict[str, Tensor], layers: list[Layer]) -> Tensor:
    """The tracked parameters (or gradients) of ``layers``, concatenated layer by layer."""
    return torch.cat([layer_vector(tree, layer) for layer in layers])


def _substitute_layers(params: dict[str, Tensor], layers: list[Layer]):
    sizes = [layer_vector(params, layer).numel() for layer in layers]

    def sub(theta: Tensor) -> dict[str, Tensor]:
        p = dict(params)
        for layer, th in zip(layers, theta.split(sizes)):
            W, b = from_wbar(th, params[layer.weight].shape, layer.bias is not None, layer.groups)
            p[layer.weight] = W
            if layer.bias is not None:
                p[layer.bias] = b
        return p

    return sub


def ggn_full(model, params, x, target, kind, reduction, layers: list[Layer], ignore_index: int = -100) -> Tensor:
    """Exact GGN ``R Σₙ Jₙᵀ Hₙ Jₙ`` over the concatenated parameters of ``layers`` (cross-layer blocks
    included)."""
    f, sub = as_fn(model), _substitute_layers(params, layers)
    theta = full_vector(params, layers)
    out = f(params, x)
    J = jacrev(lambda th: f(sub(th), x))(theta).reshape(out.shape[0], -1, theta.numel())
    H = example_hessians(kind, out, target, ignore_index)
    R = reduction_scale(kind, reduction, out, target, ignore_index)
    return R * torch.einsum("nkp,nkl,nlq->pq", J, H, J)


def empirical_fisher_full(model, params, x, target, kind, reduction, layers: list[Layer], ignore_index: int = -100):
    """Empirical Fisher ``R Σₙ ∇ℓₙ ∇ℓₙᵀ`` over the concatenated parameters of ``layers``."""
    f, sub = as_fn(model), _substitute_layers(params, layers)
    theta = full_vector(params, layers)
    ell = example_loss(kind, ignore_index)

    def loss_n(th, xn, tn):
        return ell(f(sub(th), xn.unsqueeze(0))[0], tn)

    Gr = vmap(grad(loss_n), in_dims=(None, 0, 0))(theta, x, target)
    R = reduction_scale(kind, reduction, f(params, x), target, ignore_index)
    return R * Gr.T @ Gr


def captured_vectors(a: Tensor, g: Tensor) -> Tensor:
    """``(V·N, P)``: the rows ``vec(Σₛ g āᵀ)`` from ``a: (N, B, S, d_a)``, ``g: (V, N, B, S, d_g)``."""
    V, N = g.shape[:2]
    M = torch.zeros(V, N, g.shape[2], g.shape[4], a.shape[3], dtype=a.dtype)
    for s in range(a.shape[2]):
        M = M + g[:, :, :, s, :, None] * a[None, :, :, s, None, :]
    return M.reshape(V * N, -1)


def captured_full(a: dict[str, Tensor], g: dict[str, Tensor], names: list[str]) -> Tensor:
    """The curvature of a capture over the concatenated layers ``names``, cross-layer blocks included."""
    M = torch.cat([captured_vectors(a[n], g[n]) for n in names], dim=1)
    return M.T @ M


def coarse_rows(UG: Tensor, UA: Tensor) -> Tensor:
    """``(k, B·d_g·d_a)``: row ``j`` is ``Σ_b e_b ⊗ UG[j, b] ⊗ UA[j, b]`` (explicit Kronecker products)."""
    k, B = UG.shape[:2]
    rows = []
    for j in range(k):
        r = torch.zeros(0, dtype=UG.dtype)
        for b in range(B):
            e = torch.zeros(B, dtype=UG.dtype)
            e[b] = 1.0
            term = torch.kron(e, torch.kron(UG[j, b], UA[j, b]))
            r = term if r.numel() == 0 else r + term
        rows.append(r)
    return torch.stack(rows)


def dense_restriction(UG: dict[str, Tensor], UA: dict[str, Tensor], names: list[str]) -> Tensor:
    """``R₀`` (``K × P``): each layer's coarse rows placed on its columns, layers in the order ``names``."""
    return torch.block_diag(*[coarse_rows(UG[n], UA[n]) for n in names])


def ekfac_dense(QA: Tensor, QG: Tensor, scale: Tensor) -> Tensor:
    """``blockdiag_b (Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ``."""
    blocks = []
    for b in range(QA.shape[0]):
        Q = torch.kron(QG[b], QA[b])
        blocks.append(Q @ torch.diag(scale[b].reshape(-1)) @ Q.T)
    return torch.block_diag(*blocks)


def random_orthogonal(blocks: int, d: int, gen: torch.Generator) -> Tensor:
    """``(blocks, d, d)`` random orthogonal matrices (QR of Gaussians)."""
    q, r = torch.linalg.qr(torch.randn(blocks, d, d, generator=gen, dtype=DT))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


# shared by the test modules
KINDS = ["cross_entropy", "mse", "bce_with_logits"]
REDUCTIONS = ["mean", "sum"]
seeds = st.integers(0, 2**16)


def assert_close(actual, expected, atol=1e-10, rtol=1e-8):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


class GroupedNet(nn.Module):
    """Grouped conv (B = 2) → relu → flatten → an untracked elementwise scale → linear."""

    def __init__(self, bias):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 2, groups=2, bias=bias)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 36))
        self.fc = nn.Linear(36, 3, bias=bias)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1) * self.scale)


# the quadratic model on the whole batch, λ fixed, eigen damping, statistics every step: the adaptive step's oracles
EXACT_MODEL = dict(quadratic_fraction=1.0, damping_adaptation=False, damping_mode="eigen", factor_period=1)


def fixed_step(**options) -> dict:
    """:data:`FIXED_STEP` with ``options`` in place of any of its own."""
    return {**FIXED_STEP, **options}


def exact_model(**options) -> dict:
    """:data:`EXACT_MODEL` with ``options`` in place of any of its own."""
    return {**EXACT_MODEL, **options}
