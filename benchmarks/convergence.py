"""Real-data convergence: the MNIST deep autoencoder and CNN classifiers on Fashion-MNIST / MNIST.

    python benchmarks/convergence.py autoencoder [--out benchmarks/results/autoencoder] [--quick] [--full] [--seeds 3]
    python benchmarks/convergence.py classifier --dataset fashion-mnist [--out ...] [--quick] [--full] [--seeds 3]

* ``autoencoder``: Martens & Grosse's 784-1000-500-250-30 encoder, mirrored, tanh hidden units, a linear
  code layer and a sigmoid output with Bernoulli cross-entropy (reported per image, i.e. summed over
  pixels). K-FAC with the quadratic-model step and Levenberg–Marquardt damping, E-KFAC and two-level
  K-FAC (same adaptive step) against SGD-momentum and Adam, each first-order method with a small
  learning-rate sweep (``FIRST_ORDER_LRS``). Reports training loss against steps and against wall time
  (evaluated on a fixed subset of the training set; evaluation time is not counted), and for each method
  the steps and seconds it needs to reach the best final loss of any first-order run.
* ``classifier``: a two-conv CNN; test accuracy against wall time for the same methods.

The default sizes fit 2 CPU cores (minutes per run); ``--full`` runs the paper-size budgets on a GPU if
one is present. ``--seeds K`` repeats every run with K seeds (initialisation and batch order): the target is
the best first-order configuration's median final value, and each configuration reports the median over
seeds of its final value and of its steps and seconds to the target, with the range over seeds (a seed that
never reaches the target counts as not reaching it; the median is over the seeds that do, and says how
many). Results go to ``--out`` as ``results.json`` plus PNG plots (every seed drawn); progress bars show
each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kfac_func as kf
from kfac_func.data import load

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

FIRST_ORDER_LRS = {"SGD-momentum": (0.01, 0.03, 0.1), "Adam": (1e-4, 3e-4, 1e-3)}


def autoencoder() -> nn.Module:
    sizes = [784, 1000, 500, 250, 30]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    rev = sizes[::-1]
    for i, (a, b) in enumerate(zip(rev, rev[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(rev) - 2 else [])
    return nn.Sequential(*layers)  # logits of the 784 pixels


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1568, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def second_order(method: str, loss: str, damping: float) -> Callable[[nn.Module], kf.KFAC]:
    common = dict(loss=loss, adaptive="lr_momentum", damping=damping, damping_adaptation=True, inverse_period=10)
    if method == "E-KFAC":
        return lambda m: kf.EKFAC(m, **{**common, "inverse_period": 20})
    if method == "two-level K-FAC":
        return lambda m: kf.KFAC(m, **common, damping_mode="factored", method="two_level")
    return lambda m: kf.KFAC(m, **common, damping_mode="factored")


def run(name: str, make_model, make_opt, is_kfac: bool, data, loss_name: str, steps: int, batch: int,
        eval_every: int, evaluate: Callable[[nn.Module], float], device, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = make_opt(model)
    x_all, y_all = data
    gen = torch.Generator().manual_seed(seed + 1)
    curve, elapsed = [], 0.0
    bar = tqdm(range(steps + 1), desc=f"{name:>28}", leave=False) if tqdm else range(steps + 1)
    for step in bar:
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "seconds": elapsed, "value": evaluate(model)})
            if tqdm:
                bar.set_postfix(value=f"{curve[-1]['value']:.4g}", refresh=False)
        if step == steps:
            break
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        start = time.perf_counter()
        if is_kfac:
            opt.step(x, y)
        else:
            opt.zero_grad()
            out = model(x)
            loss = F.binary_cross_entropy_with_logits(out, y) if loss_name == "bce_with_logits" else F.cross_entropy(out, y)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    return {"method": name, "seed": seed, "curve": curve}


def experiment(kind: str, args) -> dict:
    device = torch.device("cuda" if args.full and torch.cuda.is_available() else "cpu")
    if kind == "autoencoder":
        split = load("mnist")
        data = (split.x_train, split.x_train)
        subset = split.x_train[:5000].to(device)

        def evaluate(model):
            with torch.no_grad():
                return float(F.binary_cross_entropy_with_logits(model(subset), subset, reduction="sum")) / len(subset)

        loss, make_model, damping = "bce_with_logits", autoencoder, 1.0
        steps1, steps2, batch = (20000, 4000, 1000) if args.full else (1500, 300, 512)
        better = min
    else:
        split = load(args.dataset)
        data = (split.x_train, split.y_train)
        x_test, y_test = split.x_test[:2000].to(device), split.y_test[:2000].to(device)

        def evaluate(model):
            with torch.no_grad():
                return float((model(x_test).argmax(1) == y_test).float().mean())

        loss, make_model, damping = "cross_entropy", cnn, 1.0
        steps1, steps2, batch = (10000, 2000, 512) if args.full else (600, 150, 256)
        better = max
    if args.quick:
        steps1, steps2, batch = 20, 6, 64
    eval_every1, eval_every2 = max(1, steps1 // 30), max(1, steps2 // 30)
    runs = []
    for opt_name, lrs in FIRST_ORDER_LRS.items():
        for lr in lrs[: 1 if args.quick else None]:
            factory = (lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)) if opt_name == "SGD-momentum" \
                else (lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr))
            runs += [run(f"{opt_name} lr={lr:g}", make_model, factory, False, data, loss, steps1, batch, eval_every1,
                         evaluate, device, seed) for seed in range(args.seeds)]
    for method in ("K-FAC", "E-KFAC", "two-level K-FAC"):
        runs += [run(method, make_model, second_order(method, loss, damping), True, data, loss, steps2, batch,
                     eval_every2, evaluate, device, seed) for seed in range(args.seeds)]
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    final = {m: statistics.median(r["curve"][-1]["value"] for r in rs) for m, rs in by_method.items()}
    target = better(v for m, v in final.items() if m.startswith(("SGD", "Adam")))
    summary = []
    for method, rs in by_method.items():
        hits = [next((c for c in r["curve"] if (c["value"] <= target if better is min else c["value"] >= target)),
                     None) for r in rs]
        reached = [h for h in hits if h is not None]
        summary.append({
            "method": method, "final": final[method], "seeds": len(rs), "reached": len(reached),
            "steps_to_target": statistics.median(h["step"] for h in reached) if reached else None,
            "seconds_to_target": statistics.median(h["seconds"] for h in reached) if reached else None,
            "steps_range": _range(reached, "step"), "seconds_range": _range(reached, "seconds"),
            "seconds_total": statistics.median(r["curve"][-1]["seconds"] for r in rs),
        })
    return {"kind": kind, "dataset": "mnist" if kind == "autoencoder" else args.dataset, "device": str(device),
            "batch": batch, "seeds": args.seeds, "target": target, "runs": runs, "summary": summary}


def _range(hits: list[dict], key: str) -> list[float] | None:
    """``[min, max]`` of ``key`` over the seeds' hits (``None`` when no seed reached the target)."""
    return [min(h[key] for h in hits), max(h[key] for h in hits)] if hits else None


def table(result: dict) -> str:
    what = "training loss (per image)" if result["kind"] == "autoencoder" else "test accuracy"
    seeds = result.get("seeds", 1)
    lines = [f"{result['kind']} on {result['dataset']}, batch {result['batch']}, {seeds} seed(s), medians (range): "
             f"target = best first-order median final {what} = {result['target']:.4g}", "",
             f"| method | final {what} | seeds reaching the target | steps to target | seconds to target | "
             "total seconds |", "|---|---|---|---|---|---|"]
    for s in result["summary"]:
        reached = f"{s.get('reached', int(s['steps_to_target'] is not None))}/{s.get('seeds', 1)}"
        steps, secs = "—", "—"
        if s["steps_to_target"] is not None:
            steps, secs = f"{s['steps_to_target']:g}", f"{s['seconds_to_target']:.1f}"
            if s.get("steps_range") and seeds > 1:
                steps += " ({:g}–{:g})".format(*s["steps_range"])
                secs += " ({:.1f}–{:.1f})".format(*s["seconds_range"])
        lines.append(f"| {s['method']} | {s['final']:.4g} | {reached} | {steps} | {secs} | {s['seconds_total']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors: dict[str, str] = {}
    for r in result["runs"]:
        style = "-" if r["method"] in ("K-FAC", "E-KFAC", "two-level K-FAC") else ":"
        first = r["method"] not in colors
        colors.setdefault(r["method"], f"C{len(colors) % 10}")
        steps = [c["step"] for c in r["curve"]]
        secs = [c["seconds"] for c in r["curve"]]
        vals = [c["value"] for c in r["curve"]]
        kw = dict(color=colors[r["method"]], label=r["method"] if first else None, alpha=1.0 if first else 0.45)
        axes[0].plot(steps, vals, style, **kw)
        axes[1].plot(secs, vals, style, **kw)
    ylabel = "training loss per image" if result["kind"] == "autoencoder" else "test accuracy"
    for ax, xlabel in zip(axes, ("steps", "wall time (s, evaluation excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.axhline(result["target"], color="grey", lw=0.8)
        if result["kind"] == "autoencoder":
            ax.set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{result['kind']} on {result['dataset']} ({result['device']}, batch {result['batch']})")
    fig.tight_layout()
    fig.savefig(out / f"{result['kind']}_{result['dataset']}.png", dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("autoencoder", "classifier"))
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="fashion-mnist")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and the PNG plots")
    parser.add_argument("--quick", action="store_true", help="a few steps of each run (a smoke test)")
    parser.add_argument("--full", action="store_true", help="paper-size budgets, on a GPU if present")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration (medians and ranges)")
    args = parser.parse_args(argv)
    result = experiment(args.kind, args)
    print(table(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.kind}_{result['dataset']}.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out)
    return result


if __name__ == "__main__":
    main()
