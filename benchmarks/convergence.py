"""Real-data convergence: steps and wall time to the best first-order result, every optimizer tuned alike.

    python benchmarks/convergence.py all --seeds 3 --out benchmarks/results   # both tasks: about 2 h on 2 CPU cores
    python benchmarks/convergence.py all --quick --out /tmp/smoke             # a smoke run of the same code: 1 min
    python benchmarks/convergence.py all --plot-only --out benchmarks/results # redraw tables and plots from JSON
    python benchmarks/convergence.py autoencoder | classifier [--dataset mnist] [--seeds K] [--out DIR] [--full]
    python benchmarks/convergence.py ablation --out benchmarks/results        # the recipe's choices: 13 min

* ``autoencoder``: Martens & Grosse's 784-1000-500-250-30 encoder, mirrored, tanh hidden units, a linear
  code layer and a sigmoid output with Bernoulli cross-entropy, on MNIST. The metric is the training loss
  per image (summed over pixels) on a fixed 5 000-image subset of the training set.
* ``classifier``: a two-conv CNN on Fashion-MNIST (``--dataset mnist`` for MNIST). The metric is the test
  accuracy on 2 000 test images; the training loss on 2 000 training images is recorded and plotted too.
* ``all``: the autoencoder and the Fashion-MNIST classifier, one after the other.
* ``ablation``: K-FAC's recipe on the autoencoder with one choice changed at a time (:data:`ABLATION`), against
  the target stored in ``--out``'s autoencoder results.

**Tuning, the same for every optimizer**: three trials each, on one grid point per trial. SGD-momentum
(0.9) and Adam over their learning rate (:data:`FIRST_ORDER`); K-FAC (with the quadratic model's GGN from the
whole batch, the default, and from a quarter of it), E-KFAC and two-level K-FAC over the initial damping
``λ₀`` (:data:`DAMPINGS`): the :func:`second_order` recipe, the library's defaults, picks their learning
rate and momentum by the quadratic model each step and adapts ``λ`` by Levenberg–Marquardt. Every configuration runs
with ``--seeds K`` seeds (initialisation and batch order); all see the same batches for the same seed.

**The target** is the best first-order configuration's median final metric. Each configuration reports
its median final metric, how many seeds reach the target, and the medians (with ranges) over the seeds
that do of the steps and seconds to it. Each optimizer is then represented by its best trial: most seeds
reaching the target, then least median time to it, then the best final metric; the headline compares the
second-order ones' time to the target with the first-order winner's. Wall time counts the steps only
(evaluation excluded). Results go to ``--out`` as JSON and PNG plots (the median curve of each optimizer's
best trial with the range over seeds, against steps and against wall time, the target as a line);
progress bars show each run. The default budgets fit 2 CPU cores and give the second-order methods at
most the first-order ones' wall time (autoencoder: 1 500 and 200 steps; CNN: 600 and 200, about 23 s
each); ``--full`` runs paper-size budgets on a GPU if one is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac_func as kf
from kfac_func.data import load

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

FIRST_ORDER = {"SGD-momentum": (0.01, 0.03, 0.1), "Adam": (1e-4, 3e-4, 1e-3)}
SECOND_ORDER = ("K-FAC", "K-FAC ¼-batch model", "K-FAC ¼-batch model, growing batch", "E-KFAC", "two-level K-FAC")
GROWTH = (1 / 4, 2)  # "growing batch": from ¼ of the task's batch to twice it, geometrically over the budget
DAMPINGS = (1e-4, 1e-3, 1e-2)  # λ₀ trials: the library's default damping and a decade either side
TASKS = {"autoencoder": "mnist", "classifier": "fashion-mnist"}  # what ``all`` runs
ABLATION = {  # the recipe's choices, one changed at a time (``ablation``)
    "the recipe (the library's defaults)": {},
    "quadratic model from 1/4 of the batch": {"quadratic_fraction": 0.25},
    "a growing batch": {},  # 128 → 1 024 over the 200 steps (:func:`growing_batch`)
    "eigen damping": {"damping_mode": "eigen"},
    "statistics every step": {"factor_period": 1},
    "statistics from 1/4 of the batch": {"stats_fraction": 0.25},
    "decompositions every 5 steps": {"inverse_period": 5},
    "decompositions every 50 steps": {"inverse_period": 50},
    "float64 decompositions": {"decomposition_dtype": torch.float64},
    "Fisher quadratic model": {"quadratic_curvature": "fisher"},
    "fixed α = 0.01, μ = 0.9 and KL clip instead of the quadratic model": {"adaptive": None,
                                                                          "damping_adaptation": False},
    "the previous defaults (fixed α, μ, KL clip; eigen damping; statistics every step)": {
        "adaptive": None, "damping_adaptation": False, "damping_mode": "eigen", "factor_period": 1},
}


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


def second_order(method: str, loss: str, damping: float, **changes) -> Callable[[nn.Module], kf.KFAC]:
    """The recipe: the library's defaults from ``λ₀ = damping`` — the quadratic-model step (``α``, ``μ`` each
    step from the exact GGN), Levenberg–Marquardt damping, factored damping (cached inverses), statistics
    every 5 steps, decompositions every 10. "K-FAC ¼-batch model": the GGN of the quadratic model from the
    first quarter of the batch (``quadratic_fraction=0.25``); E-KFAC (eigen damping): eigendecompositions every
    20 steps, its scaling every 5. ``changes``: options that replace the recipe's (the ablation)."""
    options: dict = dict(loss=loss, damping=damping)
    if method.startswith("K-FAC ¼-batch model"):
        options.update(quadratic_fraction=0.25)
    elif method == "E-KFAC":
        options.update(method="ekfac", inverse_period=20, scale_period=5)
    elif method == "two-level K-FAC":
        options.update(method="two_level")
    options.update(changes)
    return lambda m: kf.KFAC(m, **options)


def first_order(name: str, lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    if name == "SGD-momentum":
        return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr)


def growing_batch(batch: int, steps: int) -> list[int]:
    """Martens & Grosse's batch size schedule (§13): geometric growth, here from ``GROWTH[0]·batch`` at the
    first step to ``GROWTH[1]·batch`` at the last."""
    low, high = (round(f * batch) for f in GROWTH)
    return [round(low * (high / low) ** (s / max(1, steps - 1))) for s in range(steps)]


def run(name: str, family: str, make_model, make_opt, is_kfac: bool, data, loss_fn, steps: int, batch: int | list[int],
        eval_every: int, evaluate: Callable[[nn.Module], dict], device, seed: int = 0) -> dict:
    """Train one configuration (``batch``: the size, or one per step); the curve holds the metrics every
    ``eval_every`` steps and the seconds of the steps so far (evaluation excluded)."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = make_opt(model)
    x_all, y_all = data
    gen = torch.Generator().manual_seed(seed + 1)
    curve, elapsed = [], 0.0
    bar = tqdm(range(steps + 1), desc=f"{name:>28} seed {seed}", leave=False) if tqdm else range(steps + 1)
    for step in bar:
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "seconds": elapsed, **evaluate(model)})
            if tqdm:
                bar.set_postfix(value=f"{curve[-1]['value']:.4g}", refresh=False)
        if step == steps:
            break
        idx = torch.randint(0, len(x_all), (batch if isinstance(batch, int) else batch[step],), generator=gen)
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        start = time.perf_counter()
        if is_kfac:
            opt.step(x, y)
        else:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    return {"method": name, "family": family, "seed": seed, "curve": curve}


class Task(NamedTuple):
    """A task at the budgets of ``args``: data, model, loss, metric (``better`` of two values) and sizes."""

    data: tuple[Tensor, Tensor]
    evaluate: Callable[[nn.Module], dict]
    make_model: Callable[[], nn.Module]
    loss_name: str
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    better: Callable
    steps1: int  # first-order steps
    steps2: int  # second-order steps
    batch: int
    device: torch.device

    def run(self, name: str, family: str, make_opt, is_kfac: bool, seed: int) -> dict:
        steps = self.steps2 if is_kfac else self.steps1
        batch = growing_batch(self.batch, steps) if family.endswith("growing batch") else self.batch
        return run(name, family, self.make_model, make_opt, is_kfac, self.data, self.loss_fn, steps, batch,
                   max(1, steps // 30), self.evaluate, self.device, seed)


def task(kind: str, dataset: str, args) -> Task:
    device = torch.device("cuda" if args.full and torch.cuda.is_available() else "cpu")
    split = load(dataset)
    if kind == "autoencoder":
        subset = split.x_train[:5000].to(device)
        loss_fn = F.binary_cross_entropy_with_logits

        def evaluate(model) -> dict:
            with torch.no_grad():
                return {"value": float(loss_fn(model(subset), subset, reduction="sum")) / len(subset)}

        sizes = (20000, 4000, 1000) if args.full else (1500, 200, 512)
        t = Task((split.x_train, split.x_train), evaluate, autoencoder, "bce_with_logits", loss_fn, min, *sizes, device)
    else:
        x_test, y_test = split.x_test[:2000].to(device), split.y_test[:2000].to(device)
        x_fit, y_fit = split.x_train[:2000].to(device), split.y_train[:2000].to(device)
        loss_fn = F.cross_entropy

        def evaluate(model) -> dict:
            with torch.no_grad():
                return {"value": float((model(x_test).argmax(1) == y_test).float().mean()),
                        "train_loss": float(loss_fn(model(x_fit), y_fit))}

        sizes = (10000, 2000, 512) if args.full else (600, 200, 256)
        t = Task((split.x_train, split.y_train), evaluate, cnn, "cross_entropy", loss_fn, max, *sizes, device)
    return t._replace(steps1=20, steps2=6, batch=64) if args.quick else t


def experiment(kind: str, dataset: str, args) -> dict:
    """Every optimizer's three trials, each with ``args.seeds`` seeds."""
    t = task(kind, dataset, args)
    trials = 1 if args.quick else None
    configs = [(f"{name} lr={lr:g}", name, first_order(name, lr), False)
               for name, lrs in FIRST_ORDER.items() for lr in lrs[:trials]]
    dampings = DAMPINGS[1:2] if args.quick else DAMPINGS  # the library's default λ for a smoke run
    configs += [(f"{method} λ₀={damping:g}", method, second_order(method, t.loss_name, damping), True)
                for method in SECOND_ORDER for damping in dampings]
    runs = [t.run(*config, seed) for config in configs for seed in range(args.seeds)]
    return summarise({"kind": kind, "dataset": dataset, "device": str(t.device), "batch": t.batch,
                      "seeds": args.seeds, "better": t.better.__name__, "runs": runs})


def ablation(kind: str, dataset: str, args, target: float) -> dict:
    """K-FAC's recipe at the library's default ``λ₀`` with one option changed at a time (:data:`ABLATION`),
    against the ``target`` of the task's comparison."""
    t = task(kind, dataset, args)
    runs = [t.run(name, name, second_order("K-FAC", t.loss_name, DAMPINGS[1], **changes), True, seed)
            for name, changes in ABLATION.items() for seed in range(args.seeds)]
    rows = [summary_row(name, [r for r in runs if r["method"] == name], target, t.better) for name in ABLATION]
    return {"kind": kind, "dataset": dataset, "device": str(t.device), "batch": t.batch, "seeds": args.seeds,
            "target": target, "runs": runs, "summary": rows}


def summarise(result: dict) -> dict:
    """Add the target, each configuration's summary and each optimizer's best trial to ``result``."""
    better = min if result["better"] == "min" else max
    by_method: dict[str, list[dict]] = {}
    for r in result["runs"]:
        by_method.setdefault(r["method"], []).append(r)
    target = better(_final(rs) for rs in by_method.values() if rs[0]["family"] in FIRST_ORDER)
    summary = [summary_row(method, rs, target, better) for method, rs in by_method.items()]
    sign = 1 if better is min else -1
    best: dict[str, dict] = {}
    for s in sorted(summary, key=lambda s: (-s["reached"], s["seconds_to_target"] or float("inf"), sign * s["final"])):
        best.setdefault(s["family"], s)
    return {**result, "target": target, "summary": summary, "best": {f: s["method"] for f, s in best.items()}}


def summary_row(method: str, runs: list[dict], target: float, better: Callable) -> dict:
    """One configuration over its seeds: the median final metric, the seeds reaching ``target`` and the
    medians (with ranges) of their steps and seconds to it."""
    hits = [next((c for c in r["curve"] if (c["value"] <= target if better is min else c["value"] >= target)), None)
            for r in runs]
    reached = [h for h in hits if h is not None]
    return {
        "method": method, "family": runs[0]["family"], "final": _final(runs),
        "seeds": len(runs), "reached": len(reached),
        "steps_to_target": statistics.median(h["step"] for h in reached) if reached else None,
        "seconds_to_target": statistics.median(h["seconds"] for h in reached) if reached else None,
        "steps_range": _range(reached, "step"), "seconds_range": _range(reached, "seconds"),
        "seconds_total": statistics.median(r["curve"][-1]["seconds"] for r in runs),
    }


def _final(runs: list[dict]) -> float:
    """The median over seeds of the final metric."""
    return statistics.median(r["curve"][-1]["value"] for r in runs)


def _range(hits: list[dict], key: str) -> list[float] | None:
    """``[min, max]`` of ``key`` over the seeds' hits (``None`` when no seed reached the target)."""
    return [min(h[key] for h in hits), max(h[key] for h in hits)] if hits else None


def _metric(result: dict) -> str:
    return "training loss (per image)" if result["kind"] == "autoencoder" else "test accuracy"


def table(result: dict) -> str:
    """The configurations' table, then each optimizer's best trial against the first-order winner."""
    what, seeds = _metric(result), result["seeds"]
    if "best" not in result:  # an ablation
        return ablation_table(result)
    lines = [f"{result['kind']} on {result['dataset']}, batch {result['batch']}, {seeds} seed(s), medians (range): "
             f"target = best first-order median final {what} = {result['target']:.4g}", "",
             f"| configuration | final {what} | seeds reaching the target | steps to target | seconds to target | "
             "total seconds |", "|---|---|---|---|---|---|"]
    rows = {s["method"]: s for s in result["summary"]}
    for s in result["summary"]:
        steps, secs = "—", "—"
        if s["steps_to_target"] is not None:
            steps, secs = f"{s['steps_to_target']:g}", f"{s['seconds_to_target']:.1f}"
            if seeds > 1:
                steps += " ({:g}–{:g})".format(*s["steps_range"])
                secs += " ({:.1f}–{:.1f})".format(*s["seconds_range"])
        name = f"**{s['method']}**" if result["best"].get(s["family"]) == s["method"] else s["method"]
        lines.append(f"| {name} | {s['final']:.4g} | {s['reached']}/{s['seeds']} | {steps} | {secs} | "
                     f"{s['seconds_total']:.1f} |")
    winner = min((rows[m] for f, m in result["best"].items() if f in FIRST_ORDER),
                 key=lambda s: s["seconds_to_target"] or float("inf"))
    lines += ["", f"Best trials (bold) against the first-order winner, {winner['method']} "
              f"({winner['steps_to_target']:g} steps, {winner['seconds_to_target']:.1f} s):", ""]
    for family, method in result["best"].items():
        s = rows[method]
        if family in FIRST_ORDER or s["seconds_to_target"] is None:
            continue
        lines.append(f"* {method}: {winner['steps_to_target'] / s['steps_to_target']:.1f}× fewer steps, "
                     f"{s['seconds_to_target'] / winner['seconds_to_target']:.2f}× the wall time")
    return "\n".join(lines)


def ablation_table(result: dict) -> str:
    lines = [f"K-FAC on the {result['kind']} ({result['dataset']}, batch {result['batch']}, {result['seeds']} "
             f"seed(s), λ₀ = {DAMPINGS[1]:g}): one choice of the recipe changed at a time; target "
             f"{result['target']:.4g}", "", "| change | final | seeds reaching the target | steps to target | "
             "seconds to target | ms per step |", "|---|---|---|---|---|---|"]
    for s in result["summary"]:
        steps = f"{s['steps_to_target']:g}" if s["steps_to_target"] is not None else "—"
        secs = f"{s['seconds_to_target']:.1f}" if s["seconds_to_target"] is not None else "—"
        per_step = 1e3 * s["seconds_total"] / result["runs"][0]["curve"][-1]["step"]
        lines.append(f"| {s['method']} | {s['final']:.4g} | {s['reached']}/{s['seeds']} | {steps} | {secs} | "
                     f"{per_step:.0f} |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """Each optimizer's best trial: the median over seeds (the range shaded) against steps and wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("value", _metric(result))] + ([("train_loss", "training loss")] if result["kind"] == "classifier" else [])
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), squeeze=False)
    families = list(FIRST_ORDER) + list(SECOND_ORDER)
    for family in (f for f in families if f in result["best"]):
        method = result["best"][family]
        rs, color = [r for r in result["runs"] if r["method"] == method], f"C{families.index(family)}"
        style = "-" if family in SECOND_ORDER else "--"
        xs = {"steps": [c["step"] for c in rs[0]["curve"]],
              "seconds": [statistics.median(c) for c in zip(*([p["seconds"] for p in r["curve"]] for r in rs))]}
        for (key, ylabel), ax_row in zip(rows, axes):
            values = list(zip(*([p[key] for p in r["curve"]] for r in rs)))
            for ax, x in zip(ax_row, xs.values()):
                ax.plot(x, [statistics.median(v) for v in values], style, color=color, label=method)
                if len(rs) > 1:
                    ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
                ax.set_ylabel(ylabel)
    for (key, _), ax_row in zip(rows, axes):
        for ax, xlabel in zip(ax_row, ("steps", "wall time (s, evaluation excluded)")):
            ax.set_xlabel(xlabel)
            if key == "value":
                ax.axhline(result["target"], color="grey", lw=0.8, ls=":", label="target")
            if result["kind"] == "autoencoder" or key == "train_loss":
                ax.set_yscale("log")
            if key == "value" and result["kind"] == "classifier":
                ax.set_ylim(max(0.0, result["target"] - 0.15), min(1.0, result["target"] + 0.05))
    axes[0][1].legend(fontsize=8)
    fig.suptitle(f"{result['kind']} on {result['dataset']}: each optimizer's best of 3 trials, median of "
                 f"{result['seeds']} seed(s) (range shaded); {result['device']}, batch {result['batch']}")
    fig.tight_layout()
    fig.savefig(out / f"{result['kind']}_{result['dataset']}.png", dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("all", "autoencoder", "classifier", "ablation"))
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="fashion-mnist",
                        help="the classifier's data set")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON results and the PNG plots")
    parser.add_argument("--quick", action="store_true", help="a few steps of one trial per optimizer (a smoke run)")
    parser.add_argument("--full", action="store_true", help="paper-size budgets, on a GPU if present")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per configuration (medians and ranges)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the tables and plots from --out's JSON")
    args = parser.parse_args(argv)
    if (args.plot_only or args.kind == "ablation") and args.out is None:
        parser.error("--plot-only and ablation read the JSON results in --out")
    if args.kind == "ablation":  # on the autoencoder, against the target of its stored comparison
        path = args.out / "ablation_mnist.json"
        if args.plot_only:
            result = json.loads(path.read_text())
        else:
            target = json.loads((args.out / "autoencoder_mnist.json").read_text())["target"]
            result = ablation("autoencoder", "mnist", args, target)
            path.write_text(json.dumps(result, indent=1))
        print(table(result))
        return [result]
    tasks = TASKS.items() if args.kind == "all" else [(args.kind, "mnist" if args.kind == "autoencoder" else args.dataset)]
    results = []
    for kind, dataset in tasks:
        path = args.out / f"{kind}_{dataset}.json" if args.out is not None else None
        result = summarise(json.loads(path.read_text())) if args.plot_only else experiment(kind, dataset, args)
        print(table(result), end="\n\n")
        if path is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            plot(result, args.out)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
