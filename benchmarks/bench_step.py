"""Step cost of kfac_func against its floor: the dense operations K-FAC needs, timed alone.

    python benchmarks/bench_step.py [--repeats 15] [--quick] [--compile] [--json results.json]

For each model and batch size, in one run and interleaved (round-robin, so machine noise hits every
candidate alike), it times

* ``grad``: a plain autograd step (forward, backward, SGD-momentum update), for scale;
* ``curvature``: ``kfac_func.capture`` (MC Fisher) + ``kronecker_factors``: loss, gradients, new factors;
* ``kfac[eigen]`` / ``kfac[factored]``: full ``kfac_func.KFAC`` steps with factors every step and
  decompositions every 10 steps (eigendecompositions, or Cholesky inverses with π-damping), timed over
  whole 10-step periods so the decomposition cost is amortised exactly; ``kfac[eigen, float64
  decompositions]``: the same with ``decomposition_dtype=torch.float64`` forced (the default chooses
  float32 where it is as accurate, :mod:`kfac_func.precision`);
* ``ekfac`` (scalings every step) and ``two_level`` (additive, Nicolaides coarse space, exact coarse
  matrix): the same periods; the hook baseline has no such method, so their ``× hook`` column compares
  them with the hook-based K-FAC *eigen* step they extend (not equal work: E-KFAC adds the scaling
  matmuls, two-level the coarse correction), and their floor is the eigen floor plus, for E-KFAC, the
  scaling matmuls;
* the knobs that lower the floor: statistics from a quarter of the batch, factors every 5 steps;
* ``hook baseline``: for the ``kfac[eigen]`` and ``kfac[factored]`` rows, the same steps (same config, same
  10-step periods) of :class:`hook_kfac.HookKFAC`, the hook-based eager K-FAC a PyTorch user writes by hand;

with ``--compile``, the pure step ``kf.kfac(model).step`` eager against ``torch.compile`` (inductor):
milliseconds per step and the compile time (MLP at batch 256, the CNN); and **the floor** of each: eager
PyTorch doing only the dense work — forward, the true backward and the output-gradient backward of the
sampled targets, the covariance matmuls (with the conv patch unfold), the preconditioning matmuls (4 per
layer in the eigenbasis, 2 with cached inverses), the decompositions divided by their period, the factors'
moving average and the parameter update (momentum, axpy). For the
``kfac[eigen]`` and ``kfac[factored]`` rows the floor reported is the faster of this dense floor and the hook
baseline (``dense_floor_ms`` and ``hook_ms`` in the JSON). Ratios are medians of the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from hook_kfac import HookKFAC
from torch import nn

import kfac_func as kf

PERIOD = 10  # inverse period of the full steps


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(512, 10),
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


# ---------------------------------------------------------------- the floor: eager dense work only


class Floor:
    """The dense operations of a K-FAC step on ``model``, written directly in eager PyTorch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.params = list(model.parameters())
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.gen = torch.Generator().manual_seed(0)
        _, inputs, gs = self.forward_backward(sampled=True)
        self.captured = (inputs, [g.detach() for g in gs])
        with torch.no_grad():
            self.factors = self.covariances(inputs, gs, fraction=1.0)
        self.eig = [(torch.linalg.eigh(A.double()), torch.linalg.eigh(G.double())) for A, G in self.factors]
        self.eig = [(qa.float(), da.float(), qg.float(), dg.float()) for (da, qa), (dg, qg) in self.eig]
        self.inv = [tuple(self.cholesky_inverse(M) for M in f) for f in self.factors]
        self.average = [tuple(M.clone() for M in f) for f in self.factors]
        self.grads = [self.matrix(m) for m in self.layers]

    def matrix(self, m: nn.Module) -> torch.Tensor:
        return torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1), m.bias.detach()[:, None]], 1)

    def forward_backward(self, sampled: bool):
        inputs, outputs = [], []
        h = self.x
        for m in self.model:
            if m in self.layers:
                inputs.append(h.detach())
                h = m(h)
                outputs.append(h)
            else:
                h = m(h)
        loss = F.cross_entropy(h, self.y)
        grads = torch.autograd.grad(loss, self.params, retain_graph=sampled)
        if not sampled:
            return grads, None, None
        p = h.detach().softmax(1)
        ct = (p - F.one_hot(torch.multinomial(p, 1, generator=self.gen)[:, 0], p.shape[1])) / len(p) ** 0.5
        return grads, inputs, torch.autograd.grad(h, outputs, grad_outputs=ct)

    @staticmethod
    def rows(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's homogeneous inputs and output gradients as rows (one per example and position)."""
        if isinstance(m, nn.Conv2d):  # patches by a strided view (F.unfold is far slower on CPU)
            (kh, kw), (ph, pw) = m.kernel_size, m.padding
            windows = F.pad(a, (pw, pw, ph, ph)).unfold(2, kh, m.stride[0]).unfold(3, kw, m.stride[1])
            a = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, a.shape[1] * kh * kw)
            g = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
        return torch.cat([a, a.new_ones(a.shape[0], 1)], 1), g

    def covariances(self, inputs, gs, fraction: float):
        out = []
        for m, a, g in zip(self.layers, inputs, gs):
            k = max(1, int(fraction * a.shape[0]))
            a, g = self.rows(m, a[:k], g[:k])
            out.append((a.T @ a / a.shape[0], g.T @ g))
        return out

    def update(self, grads):
        with torch.no_grad():
            for p, g, v in zip(self.params, grads, self.momentum):
                v.mul_(0.9).add_(g)
                p.sub_(v, alpha=0.0)  # lr 0: the same work, parameters stay put

    # the pieces, each timed alone
    def grad_step(self):
        self.update(self.forward_backward(sampled=False)[0])

    def curvature(self, fraction: float = 1.0):
        grads, inputs, gs = self.forward_backward(sampled=True)
        with torch.no_grad():
            self.covariances(inputs, gs, fraction)
        return grads

    def precondition_eigen(self):
        for (qa, da, qg, dg), grad in zip(self.eig, self.grads):
            qg @ ((qg.T @ grad @ qa) / (dg[:, None] * da[None] + 1e-3)) @ qa.T

    def precondition_inverse(self):
        for (a_inv, g_inv), grad in zip(self.inv, self.grads):
            g_inv @ grad @ a_inv

    def ekfac_scaling(self):
        """E-KFAC's per-step scaling from the captured ``(a, g)``: ``Σₙ (Σₛ (Q_Gᵀgₙₛ)(Q_Aᵀāₙₛ)ᵀ)²`` per layer
        (one matmul of squares for a dense layer)."""
        n = len(self.x)
        with torch.no_grad():
            for (qa, _, qg, _), m, a, g in zip(self.eig, self.layers, *self.captured):
                a, g = self.rows(m, a, g)
                if isinstance(m, nn.Conv2d):
                    ((g @ qg).reshape(n, -1, g.shape[1]).mT @ (a @ qa).reshape(n, -1, a.shape[1])).square().sum(0)
                else:
                    (g @ qg).square().T @ (a @ qa).square()

    def eigh(self):
        for A, G in self.factors:
            torch.linalg.eigh(A.double()), torch.linalg.eigh(G.double())

    @staticmethod
    def cholesky_inverse(M: torch.Tensor) -> torch.Tensor:
        M = M.double() + 1e-2 * torch.eye(len(M), dtype=torch.float64)
        return torch.cholesky_inverse(torch.linalg.cholesky(M)).float()

    def cholesky(self):
        for A, G in self.factors:
            self.cholesky_inverse(A), self.cholesky_inverse(G)

    def moving_average_and_update(self):
        """The per-step elementwise work of a K-FAC step: factor moving average, momentum and axpy."""
        for (A, G), (mA, mG) in zip(self.factors, self.average):
            mA.lerp_(A, 0.05), mG.lerp_(G, 0.05)
        self.update([p.detach() for p in self.params])


# ---------------------------------------------------------------- timing


def interleaved(candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call, candidates run round-robin ``repeats`` times after ``warmup`` calls."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench(name: str, make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int,
          warmup: int = 2) -> list[dict]:
    torch.manual_seed(0)
    model = make()
    # the floor and the SGD step run on their own copy: the KFACs below put their recording hooks (the
    # loss.backward(); opt.step() flow) on `model`, which would record every forward of those
    plain = copy.deepcopy(model)
    floor = Floor(plain, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    key = kf.random.key(0)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.0, momentum=0.9)

    def grad_step():
        sgd.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        sgd.step()

    def curvature():
        kf.kronecker_factors(kf.capture(model, params, x, y, "cross_entropy", fisher="mc", key=key))

    def kfac_period(**kw):
        # expand factors (not the optimizer's reduce="auto"): the floor and the peers compute expand
        opt = kf.KFAC(model, **{**kf.FIXED_STEP, "lr": 0.0, "inverse_period": PERIOD, "kl_clip": None, "reduce": False,
                                **kw})
        opt.step(x, y)  # builds the state; the timed period starts at a decomposition step

        def run():
            for _ in range(PERIOD):
                opt.step(x, y)

        return run

    def hook_period(**kw):
        opt = HookKFAC(copy.deepcopy(model), lr=0.0, inverse_period=PERIOD, kl_clip=None, **kw)  # hooks on a copy
        opt.step(x, y)  # as above: the timed period starts at a decomposition step

        def run():
            for _ in range(PERIOD):
                opt.step(x, y)

        return run

    configs = {
        "kfac[eigen]": dict(damping_mode="eigen"),
        "kfac[eigen, float64 decompositions]": dict(damping_mode="eigen", decomposition_dtype=torch.float64),
        "kfac[factored]": dict(damping_mode="factored", damping=1e-2),
        "kfac[factored, stats 1/4]": dict(damping_mode="factored", damping=1e-2, stats_fraction=0.25),
        "kfac[factored, factors every 5]": dict(damping_mode="factored", damping=1e-2, factor_period=5),
        "ekfac": dict(method="ekfac"),
        "two_level": dict(method="two_level"),
    }
    candidates: dict[str, Callable[[], None]] = {"grad": grad_step, "curvature": curvature}
    candidates.update({k: kfac_period(**v) for k, v in configs.items()})
    hooked = {"kfac[eigen]": {"damping_mode": "eigen", "damping": 1e-3},  # kfac_func's default damping
              "kfac[factored]": {"damping_mode": "factored", "damping": 1e-2}}
    candidates.update({f"hook:{k}": hook_period(**v) for k, v in hooked.items()})
    candidates.update({
        "floor:grad": floor.grad_step,
        "floor:curvature": floor.curvature,
        "floor:curvature 1/4": lambda: floor.curvature(0.25),
        "floor:precond eigen": floor.precondition_eigen,
        "floor:precond inverse": floor.precondition_inverse,
        "floor:eigh": floor.eigh,
        "floor:ekfac scaling": floor.ekfac_scaling,
        "floor:cholesky": floor.cholesky,
        "floor:average+update": floor.moving_average_and_update,
    })
    t = interleaved(candidates, repeats, warmup)
    per = {k: t[k] / PERIOD for k in configs}  # seconds per step, decomposition amortised
    step = t["floor:average+update"]
    inverse = t["floor:precond inverse"] + t["floor:cholesky"] / PERIOD + step
    eigen = t["floor:curvature"] + t["floor:precond eigen"] + t["floor:eigh"] / PERIOD + step
    floors = {
        "grad": t["floor:grad"],
        "curvature": t["floor:curvature"],
        "kfac[eigen]": eigen,
        "kfac[eigen, float64 decompositions]": eigen,
        "ekfac": eigen + t["floor:ekfac scaling"],
        "two_level": eigen,
        "kfac[factored]": t["floor:curvature"] + inverse,
        "kfac[factored, stats 1/4]": t["floor:curvature 1/4"] + inverse,
        "kfac[factored, factors every 5]": (t["floor:curvature"] + 4 * t["floor:grad"]) / 5 + inverse,
    }
    hook = {k: t[f"hook:{k}"] / PERIOD for k in hooked}
    for k in ("kfac[eigen, float64 decompositions]", "ekfac", "two_level"):  # against the hook's eigen step
        hook[k] = hook["kfac[eigen]"]
    measured = {"grad": t["grad"], "curvature": t["curvature"], **per}
    rows = []
    for step, sec in measured.items():
        # the hook baseline bounds a step doing its work (not E-KFAC's or two-level's extra work)
        floor = floors[step] if step in ("ekfac", "two_level") else min(floors[step], hook.get(step, floors[step]))
        rows.append({
            "model": name, "batch": int(x.shape[0]), "step": step, "ms": 1e3 * sec, "x_grad": sec / t["grad"],
            "hook_ms": 1e3 * hook[step] if step in hook else None, "x_hook": sec / hook[step] if step in hook else None,
            "dense_floor_ms": 1e3 * floors[step], "floor_ms": 1e3 * floor, "x_floor": sec / floor,
        })
    return rows


def compiled(name: str, make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int,
             fisher: str = "mc") -> dict:
    """The pure step ``kf.kfac(model).step`` eager against ``torch.compile(step)`` (inductor), over whole
    10-step periods (one decomposition each), interleaved; the compile time is the first period's wall
    time (both graphs, with and without a refresh, are built there) minus a compiled period's median."""
    torch.manual_seed(0)
    model = make()
    params = {n: p.detach() for n, p in model.named_parameters()}
    opt = kf.kfac(model, **kf.FIXED_STEP, lr=0.0, inverse_period=PERIOD, kl_clip=None, reduce=False, fisher=fisher)
    torch._dynamo.reset()
    torch._inductor.config.force_disable_caches = True  # time a cold compile, not a cache hit from an earlier run
    steps = {"eager": opt.step, "compiled": torch.compile(opt.step)}
    states = {k: opt.init(params, x) for k in steps}

    def period(kind: str) -> Callable[[], None]:
        def run():
            for _ in range(PERIOD):
                _, states[kind], _ = steps[kind](params, states[kind], x, y)
        return run

    start = time.perf_counter()
    period("compiled")()
    first = time.perf_counter() - start
    t = interleaved({k: period(k) for k in steps}, repeats)
    return {"model": name, "batch": int(x.shape[0]), "fisher": fisher, "eager_ms": 1e3 * t["eager"] / PERIOD,
            "compiled_ms": 1e3 * t["compiled"] / PERIOD, "speedup": t["eager"] / t["compiled"],
            "compile_s": first - t["compiled"]}


def compile_table(rows: list[dict]) -> str:
    lines = ["| model | batch | Fisher | eager ms/step | compiled ms/step | eager / compiled | compile time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['fisher']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                     f"{r['speedup']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    header = ("| model | batch | step | median ms | × grad step | hook baseline ms | × hook baseline | "
              "floor ms (min of dense, hook) | × floor |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['step']} | {r['ms']:.2f} | {r['x_grad']:.2f} | {fmt(r['hook_ms'])} | "
            f"{fmt(r['x_hook'])} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, 1 warmup (a smoke run)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--compile", action="store_true",
                        help="also time the pure step compiled with torch.compile (inductor) against eager")
    args = parser.parse_args(argv)
    g, warmup = torch.Generator().manual_seed(0), 2
    if args.quick:
        cases = [("MLP 784-512-256-10", mlp, 32, (784,)), ("CNN 2 conv + linear", cnn, 8, (1, 28, 28))]
        args.repeats, warmup = 2, 1
    else:
        cases = [
            ("MLP 784-512-256-10", mlp, 256, (784,)),
            ("MLP 784-512-256-10", mlp, 2048, (784,)),
            ("CNN 2 conv + linear", cnn, 128, (1, 28, 28)),
        ]
    print(f"machine: {machine()}")
    rows = []
    for name, make, n, shape in cases:
        x, y = torch.randn((n,) + shape, generator=g), torch.randint(0, 10, (n,), generator=g)
        rows += bench(name, make, x, y, args.repeats, warmup)
    print(table(rows))
    compile_rows = []
    if args.compile:
        for name, make, n, shape in cases[::2] if not args.quick else cases:  # MLP at the first batch, CNN
            x, y = torch.randn((n,) + shape, generator=g), torch.randint(0, 10, (n,), generator=g)
            compile_rows.append(compiled(name, make, x, y, args.repeats))
        print(compile_table(compile_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows, "compiled": compile_rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
