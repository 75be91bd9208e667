"""How close K-FAC, E-KFAC and two-level K-FAC — and K-FAC with block-diagonal, diagonal or identity factor sides
(the size policy for wide layers) — come to the exact damped natural gradient.

    python benchmarks/bench_quality.py [--seeds 5] [--quick]

For a small tanh MLP and a small CNN, on one batch with the exact (type-2) Fisher ``C`` over all tracked
parameters (cross-layer blocks included; built from the captured per-example gradients, which the test
suite proves equal to ``torch.func`` oracles), the target is ``d* = (C + λI)⁻¹∇``. Every method uses the
same batch (no moving averages) and the same ``λ``. Reported: the median over seeds of the relative
error ``‖d − d*‖ / ‖d*‖`` and of the cosine between ``d`` and ``d*``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import kfac_func as kf
from kfac_func.layers import weight_matrix

DAMPINGS = (1e-3, 1e-2, 1e-1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(54, 4)
    )


def methods(cap, plan, factors):
    """name → (factors, extra precondition kwargs)."""
    eigen = kf.eigendecompose(factors)
    ekfac = kf.ekfac_factors(eigen, kf.ekfac_scaling(cap, eigen))
    out = {"K-FAC (eigen damping)": (eigen, {}), "K-FAC (factored damping)": (eigen, {"mode": "factored"}),
           "E-KFAC": (ekfac, {})}
    # the size policy's held sides (kfac_func.layout), every layer alike: what each choice gives up
    held = {"K-FAC, sides in 2 blocks": lambda f: {"A": -(-f.A.shape[-1] // 2), "G": -(-f.G.shape[-1] // 2)},
            "K-FAC, diagonal G": lambda f: {"G": "diagonal"},
            "K-FAC, diagonal A and G": lambda f: {"A": "diagonal", "G": "diagonal"},
            "K-FAC, identity A (only G)": lambda f: {"A": "identity"}}
    for name, sides in held.items():
        out[name] = (kf.eigendecompose(kf.kronecker_factors(cap, factor_sides={n: sides(f) for n, f in factors.items()})),
                     {})
    spaces = {"nicolaides": kf.nicolaides_space(factors), "spectral": kf.spectral_space(eigen, 1)}
    for space_name, space in spaces.items():
        for mode in ("exact", "kronecker"):
            correction = kf.CoarseCorrection(space, kf.coarse_matrix(cap, space, mode))
            for combination in ("additive", "adef2", "bnn"):
                if mode == "kronecker" and combination != "additive":
                    continue  # the surrogate pairs with the paper's additive form
                out[f"two-level {combination}, {space_name}, {mode} C₀"] = (
                    eigen, {"coarse": correction, "combination": combination, "capture": cap}
                )
    return out


def flat(plan, tree):
    return torch.cat([
        weight_matrix(s, tree[s.weight], tree[s.bias] if s.bias else None).reshape(-1) for s in plan.layers.values()
    ])


def evaluate(make, shape, n: int, seed: int) -> dict[tuple[str, float], tuple[float, float]]:
    torch.manual_seed(seed)
    model = make().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn((n,) + shape, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, y, "cross_entropy", fisher="exact")
    rows = torch.cat([torch.einsum("vnbso,nbsi->vnboi", cap.g[k], cap.a[k]).flatten(2) for k in plan.layers], dim=-1)
    rows = rows.reshape(-1, rows.shape[-1])
    C = rows.T @ rows
    grad = flat(plan, cap.grads)
    factors = kf.kronecker_factors(cap)
    out = {}
    for lam in DAMPINGS:
        target = torch.linalg.solve(C + lam * torch.eye(len(C), dtype=C.dtype), grad)
        for name, (f, kw) in methods(cap, plan, factors).items():
            d = flat(plan, kf.precondition(params, cap.grads, f, layers=plan.layers, damping=lam, **kw))
            out[(name, lam)] = (
                float((d - target).norm() / target.norm()),
                float(torch.nn.functional.cosine_similarity(d, target, dim=0)),
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one seed (a smoke run)")
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    cases = [("MLP 12-16-16-4, N=32", mlp, (12,), 32), ("CNN 2 conv + linear, 8×8, N=16", cnn, (1, 8, 8), 16)]
    for title, make, shape, n in cases:
        runs = [evaluate(make, shape, n, seed) for seed in range(seeds)]
        print(f"\n{title}: median over {seeds} seeds of rel. error ‖d − d*‖/‖d*‖ (cosine), d* = (C + λI)⁻¹∇\n")
        print("| method | " + " | ".join(f"λ = {lam:g}" for lam in DAMPINGS) + " |")
        print("|---|" + "---|" * len(DAMPINGS))
        for name in {k[0]: None for k in runs[0]}:
            cells = []
            for lam in DAMPINGS:
                err = statistics.median(r[(name, lam)][0] for r in runs)
                cos = statistics.median(r[(name, lam)][1] for r in runs)
                cells.append(f"{err:.3f} ({cos:.3f})")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
