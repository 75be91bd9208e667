"""A hook-based eager K-FAC, written from the algorithm the way a PyTorch user writes it by hand: the baseline
that ``benchmarks/bench_step.py`` times kfac_func against.

    python benchmarks/hook_kfac.py    # self-test against kfac_func (factors, gradients, a few steps)

Forward pre-hooks record each layer's input ``a``; full backward hooks record its output gradient ``g`` during
a sampled-label backward (MC Fisher, one sample) that asks autograd only for the first layer's bias gradient,
so it runs the input-gradient half of a backward; the true-loss ``backward()`` fills ``.grad``. Defaults follow
the 2019 hook-based KFAC-Pytorch optimizer: factors every step, decompositions every 10 steps, damping 1e-3,
moving average 0.95, KL clip 1e-3, momentum 0.9, lr 0.01. Conventions are kfac_func's, so both do the same
math: ``W̄ = [W, b]`` with a ones column in ``a``; conv patches from a strided ``Tensor.unfold`` view (as the
2019 optimizer built them; ``F.unfold`` measured 3-4x slower on CPU), expand (``A`` averaged over
N·positions, ``G = Σ g gᵀ`` over positions and examples, ``/ N`` for the MC Fisher of a mean loss);
bias-corrected moving averages ``F / (1 − βᵗ)``; eigenvalues clamped at 0. Decompositions run in float32
(kfac_func's default is float64). ``damping_mode``: ``"eigen"`` (``Q_G[(Q_Gᵀ ∇ Q_A) / (d_G d_Aᵀ + λ)]Q_Aᵀ``,
four matmuls per layer) or ``"factored"`` (π-damped inverses from Cholesky, two matmuls per layer).
Layers: nn.Linear and nn.Conv2d (groups 1, dilation 1, numeric padding); any other parameter gets plain SGD.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def phase(name: str) -> torch.profiler.record_function:
    """The profiler range of a step phase, named as kfac_func's (``kfac_func.phases``) for ``bench_split.py``."""
    return torch.profiler.record_function("kfac::" + name)

warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to")


class HookKFAC(torch.optim.Optimizer):
    """K-FAC for the nn.Linear / nn.Conv2d layers of ``model`` from module hooks; ``step(x, y)`` with a
    cross-entropy loss does the forward, both backwards and the update."""

    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 damping: float = 1e-3, ema_decay: float = 0.95, kl_clip: float | None = 1e-3,
                 inverse_period: int = 10, damping_mode: str = "eigen", fisher: str = "mc", seed: int = 0):
        if damping_mode not in ("eigen", "factored") or fisher not in ("mc", "empirical"):
            raise ValueError(f"unknown damping_mode {damping_mode!r} or fisher {fisher!r}")
        super().__init__(model.parameters(), {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.model, self.damping, self.decay, self.kl_clip = model, damping, ema_decay, kl_clip
        self.inverse_period, self.mode, self.fisher = inverse_period, damping_mode, fisher
        self.generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.a: dict[nn.Module, Tensor] = {}
        self.g: dict[nn.Module, Tensor] = {}
        self.averages: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # raw sums Σ (1−β) β^(t−k) F_k
        self.decomposed: dict[nn.Module, tuple[Tensor, Tensor, Tensor]] = {}
        self.weight, self.steps, self.recording = 0.0, 0, False  # weight: 1 − βᵗ
        for m in self.layers:
            m.register_forward_pre_hook(self._save_input)
            m.register_full_backward_hook(self._save_grad)

    def _save_input(self, m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if self.recording:
            self.a[m] = inputs[0].detach()

    def _save_grad(self, m: nn.Module, grad_input: tuple, grad_output: tuple[Tensor, ...]) -> None:
        if self.recording:
            self.g[m] = grad_output[0].detach()

    def capture(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward (records ``a``), the sampled-label backward (records ``g``), the true-loss backward (``.grad``)."""
        self.a.clear()
        self.recording = True
        logits = self.model(x)
        labels = y if self.fisher == "empirical" else \
            torch.multinomial(logits.detach().softmax(1), 1, generator=self.generator)[:, 0]
        first = next(iter(self.a))  # the first layer run: the sampled backward goes down to its bias only
        torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), first.bias if first.bias is not None
                            else first.weight, retain_graph=True)
        self.recording = False
        loss = F.cross_entropy(logits, y)
        self.zero_grad()
        loss.backward()
        return loss.detach()

    def batch_factors(self, m: nn.Module) -> tuple[Tensor, Tensor]:
        """This batch's ``A = mean ā āᵀ`` (over examples and positions), ``G = Σ g gᵀ / N``."""
        a, g, n = self.a[m], self.g[m], self.a[m].shape[0]
        if isinstance(m, nn.Conv2d):  # patches from a strided view (F.unfold is 3-4x slower on CPU), copied once
            (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
            windows = F.pad(a, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H', W', kh, kw)
            _, c, h, w = windows.shape[:4]
            rows = a.new_ones(n * h * w, c * kh * kw + (m.bias is not None))  # the ones column: the bias
            rows[:, : c * kh * kw].view(n, h, w, c, kh, kw).copy_(windows.permute(0, 2, 3, 1, 4, 5))
            a, g = rows, g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
        elif m.bias is not None:
            a = torch.cat([a, a.new_ones(n, 1)], 1)
        return a.T @ a / a.shape[0], g.T @ g / n

    def _decompose(self) -> None:
        for m, (sum_a, sum_g) in self.averages.items():
            A, G = sum_a / self.weight, sum_g / self.weight
            if self.mode == "eigen":
                (dA, QA), (dG, QG) = torch.linalg.eigh(A), torch.linalg.eigh(G)
                self.decomposed[m] = (QA, QG, dG.clamp_min(0)[:, None] * dA.clamp_min(0)[None] + self.damping)
            else:  # π-damping: λ_A = π√λ, λ_G = √λ/π with π² = (tr A / dim A) / (tr G / dim G)
                ta, tg = A.trace() / len(A), G.trace() / len(G)
                pi = torch.where((ta > 0) & (tg > 0), (ta / tg).sqrt(), 1.0)
                root = self.damping ** 0.5

                def inverse(M: Tensor, lam: Tensor) -> Tensor:
                    return torch.cholesky_inverse(torch.linalg.cholesky(M + lam * torch.eye(len(M), device=M.device)))

                self.decomposed[m] = (inverse(A, pi * root), inverse(G, root / pi), A.new_empty(0))

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        """One K-FAC step on a batch; returns the loss before the update."""
        with torch.enable_grad(), phase("forward/backward"):
            loss = self.capture(x, y)
        self.weight = self.decay * self.weight + 1 - self.decay
        with phase("statistics"):
            for m in self.layers:
                A, G = self.batch_factors(m)
                if m not in self.averages:
                    self.averages[m] = (torch.zeros_like(A), torch.zeros_like(G))
                self.averages[m][0].lerp_(A, 1 - self.decay), self.averages[m][1].lerp_(G, 1 - self.decay)
        if self.steps % self.inverse_period == 0:
            with phase("decompositions"):
                self._decompose()
        self.steps += 1
        lr = self.param_groups[0]["lr"]
        clip = self.kl_clip is not None and lr > 0
        with phase("preconditioning"):
            deltas, vg = self._precondition(clip)
        with phase("update"):
            self._update(lr, deltas, vg, clip)
        return loss

    def _precondition(self, clip: bool) -> tuple[list[Tensor], Tensor | float]:
        deltas, vg = [], 0.0
        for m in self.layers:
            grad = m.weight.grad.flatten(1)
            if m.bias is not None:
                grad = torch.cat([grad, m.bias.grad[:, None]], 1)
            right, left, denom = self.decomposed[m]  # (Q_A, Q_G, d_G d_Aᵀ + λ) or ((A+λ_A)⁻¹, (G+λ_G)⁻¹, -)
            if self.mode == "eigen":
                delta = left @ ((left.T @ grad @ right) / denom) @ right.T
            else:
                delta = left @ grad @ right
            deltas.append(delta)
            if clip:
                vg = vg + (delta * grad).sum()
        return deltas, vg

    def _update(self, lr: float, deltas: list[Tensor], vg: Tensor | float, clip: bool) -> None:
        if clip:  # ν = min(1, √(κ / (η² Σ Δ·∇)))
            nu = (self.kl_clip / (lr**2 * vg).clamp_min(1e-30)).sqrt().clamp_max(1.0)
            deltas = [delta.mul_(nu) for delta in deltas]
        for m, delta in zip(self.layers, deltas):
            m.weight.grad = delta[:, : m.weight[0].numel()].reshape(m.weight.shape)
            if m.bias is not None:
                m.bias.grad = delta[:, -1].contiguous()
        for group in self.param_groups:  # torch SGD: d = ∇ + wd·θ, v ← μv + d, θ ← θ − ηv
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                p.add_(d, alpha=-group["lr"])


def self_test() -> None:
    """First-step factors and gradients against kfac_func's capture (``A`` does not depend on the labels; ``G``
    with the true labels, the empirical Fisher), then a few steps against ``kf.KFAC`` with the empirical Fisher
    (the same math; decompositions float32 here, float64 there) for both damping modes, with the KL clip,
    momentum and weight decay."""
    import copy

    from bench_step import cnn, mlp

    import kfac_func as kf

    g = torch.Generator().manual_seed(0)
    for name, make, shape in (("MLP", mlp, (784,)), ("CNN", cnn, (1, 28, 28))):
        torch.manual_seed(0)
        model = make()
        x, y = torch.randn((32,) + shape, generator=g), torch.randint(0, 10, (32,), generator=g)
        params = {n: p.detach() for n, p in model.named_parameters()}
        cap = kf.capture(model, params, x, y, "cross_entropy", fisher="empirical")
        ref = kf.kronecker_factors(cap)
        hook = HookKFAC(copy.deepcopy(model), fisher="empirical")
        hook.capture(x, y)
        names = {m: n for n, m in hook.model.named_modules()}
        err = {"A": 0.0, "G": 0.0, "grad": 0.0}
        for m in hook.layers:
            A, G = hook.batch_factors(m)
            rel = lambda u, v: ((u - v).abs().max() / v.abs().max()).item()
            err["A"] = max(err["A"], rel(A, ref[names[m]].A[0]))
            err["G"] = max(err["G"], rel(G, ref[names[m]].G[0]))
            for p, n in ((m.weight, "weight"), (m.bias, "bias")):
                err["grad"] = max(err["grad"], rel(p.grad, cap.grads[f"{names[m]}.{n}"]))
        assert all(e < 1e-5 for e in err.values()), err
        for mode, damping in (("eigen", 1e-3), ("factored", 1e-2)):
            kw = {"lr": 0.01, "weight_decay": 1e-4, "damping": damping, "damping_mode": mode, "inverse_period": 2}
            ours, theirs = HookKFAC(copy.deepcopy(model), fisher="empirical", **kw), copy.deepcopy(model)
            opt = kf.KFAC(theirs, loss="cross_entropy", fisher="empirical", reduce=False, **{**kf.FIXED_STEP, **kw})
            for _ in range(4):
                ours.step(x, y), opt.step(x, y)
            moved = max(((p - q).norm() / (q - p0).norm()).item() for p, q, p0 in
                        zip(ours.model.parameters(), theirs.parameters(), model.parameters()))
            err[f"4 steps {mode}"] = moved
            assert moved < 1e-3, (mode, moved)
        print(f"{name}: max relative error " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()) + ": ok")


if __name__ == "__main__":
    self_test()
