"""Where the time of a step goes: a stacked bar per configuration, from one profiled 10-step period.

    python benchmarks/bench_split.py [--quick] [--out benchmarks/results/step_split]

Each configuration (model, batch, method) runs one warm-up period, then ``--repeats`` periods of ``PERIOD``
steps (one decomposition each, so its cost is amortised exactly) under ``torch.profiler``; each phase is
the median over those periods. The step's phases are the
``kfac::<phase>`` ranges that ``kfac_func.phases`` opens around the stage functions (and ``hook_kfac.py``
around the same stages of the hook baseline): forward/backward (loss, gradients and the curvature
backward), statistics (Kronecker factors, E-KFAC scalings, coarse matrices and their moving averages),
decompositions, preconditioning, update; "other" is the rest of the step. Milliseconds per step
(profiler overhead included, the same for every bar); writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Callable

import torch
from bench_step import PERIOD, cnn, machine, mlp
from hook_kfac import HookKFAC
from torch import nn

import kfac_func as kf
from kfac_func.phases import PHASES, PREFIX

CONFIGS: dict[str, dict] = {
    "kfac eigen": dict(damping_mode="eigen"),
    "kfac factored": dict(damping_mode="factored", damping=1e-2),
    "ekfac": dict(method="ekfac"),
    "two-level": dict(method="two_level"),
    "hook eigen": dict(damping_mode="eigen", damping=1e-3),
    "hook factored": dict(damping_mode="factored", damping=1e-2),
}


def split(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, name: str, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per step of each phase (and ``other``, ``total``): the median over ``repeats`` profiled
    periods (a busy machine stalls some periods)."""
    torch.manual_seed(0)
    model = make()
    kw = dict(lr=0.0, inverse_period=PERIOD, kl_clip=None, **CONFIGS[name])
    if name.startswith("hook"):
        opt = HookKFAC(copy.deepcopy(model), **kw)
    else:
        opt = kf.KFAC(model, reduce=False, **{**kf.FIXED_STEP, **kw})
    for _ in range(PERIOD):  # warm-up; the profiled period starts at a decomposition step
        opt.step(x, y)
    periods = []
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(PERIOD):
                with torch.profiler.record_function(PREFIX + "step"):
                    opt.step(x, y)
        totals = {e.key[len(PREFIX):]: e.cpu_time_total / 1e3 / PERIOD for e in prof.key_averages()
                  if e.key.startswith(PREFIX)}
        ms = {p: totals.get(p, 0.0) for p in PHASES}
        periods.append({**ms, "other": totals["step"] - sum(ms.values()), "total": totals["step"]})
    return {k: statistics.median(p[k] for p in periods) for k in periods[0]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows}, key=[r["case"] for r in rows].index)
    fig, axes = plt.subplots(1, len(cases), figsize=(max(9, 5 * len(cases)), 3.9), squeeze=False)
    colours = dict(zip((*PHASES, "other"), plt.get_cmap("tab10").colors))
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        left = [0.0] * len(mine)
        for p in (*PHASES, "other"):
            widths = [r["ms"][p] for r in mine]
            ax.barh([r["config"] for r in mine], widths, left=left, color=colours[p], label=p)
            left = [a + b for a, b in zip(left, widths)]
        ax.invert_yaxis()
        ax.set_title(case)
        ax.set_xlabel("ms per step (decompositions amortised)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny batches, one period (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="profiled periods per configuration (median)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_split"))
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    cases = [("MLP 784-512-256-10, batch 256", mlp, 256, (784,)), ("MLP, batch 2048", mlp, 2048, (784,)),
             ("CNN, batch 128", cnn, 128, (1, 28, 28))]
    if args.quick:
        cases = [("MLP, batch 32", mlp, 32, (784,)), ("CNN, batch 8", cnn, 8, (1, 28, 28))]
    rows = []
    for case, make, n, shape in cases:
        x, y = torch.randn((n,) + shape, generator=g), torch.randint(0, 10, (n,), generator=g)
        for name in CONFIGS:
            ms = split(make, x, y, name, 1 if args.quick else args.repeats)
            rows.append({"case": case, "config": name, "ms": ms})
            print(f"{case:32s} {name:14s} " + " ".join(f"{k} {v:6.2f}" for k, v in ms.items()), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
