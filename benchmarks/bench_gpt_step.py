"""The GPT's step: K-FAC's amortised step against AdamW's, and where K-FAC's time goes.

    python benchmarks/bench_gpt_step.py [--repeats 7] [--out benchmarks/results/gpt_step]   # about 5 min

The model, batches and optimizers of ``convergence.py gpt``: :class:`kfac_func.models.GPT` (4 layers, width 128,
context 64) on batches of 64 windows of Python source; AdamW with the minimal-GPT recipe (learning rate
3e-3, its schedule, clipping) and K-FAC's configurations of that task (:data:`convergence.GPT_SECOND_ORDER`, the
defaults at ``λ₀ = 1e-3``, the annealed one over the whole run). One *period* is 10 steps, the defaults'
decomposition period: it holds two statistics steps, one decomposition and two Levenberg–Marquardt evaluations,
so its mean is the amortised step.
After a warm-up period, ``--repeats`` rounds each time one period of every optimizer in turn (interleaved: a
busy spell of the machine falls on all alike); reported are the medians of the mean step and of its ratio to
AdamW's within the same round, with their ranges. Then one profiled period per optimizer splits its step into
the ``kfac_func.phases`` ranges (AdamW's into its forward/backward, clipping included, and its update); the
split is drawn as stacked bars. Writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_split import plot
from bench_step import machine
from convergence import (DAMPINGS, GPT_BATCH, GPT_SECOND_ORDER, GPT_SIZE, adamw, gpt_loss, random_windows,
                         second_order, warmup_cosine)

import kfac_func as kf
from kfac_func.data import load_chars
from kfac_func.models import GPT
from kfac_func.phases import PHASES, PREFIX

PERIOD = 10
ADAMW_LR = 3e-3


class AdamW:
    """The minimal-GPT recipe's step, its parts in ``kfac_func.phases`` ranges for the profiler."""

    def __init__(self, model: torch.nn.Module, steps: int):
        self.model, self.opt = model, adamw(model, ADAMW_LR)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(steps))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.profiler.record_function(PREFIX + "forward/backward"):
            self.opt.zero_grad()
            gpt_loss(self.model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        with torch.profiler.record_function(PREFIX + "update"):
            self.opt.step()
            self.schedule.step()


def optimizers(steps: int) -> dict[str, object]:
    made: dict[str, object] = {}
    torch.manual_seed(0)
    made["AdamW"] = AdamW(GPT(**GPT_SIZE), steps)
    loss = kf.Loss("cross_entropy", class_dim=-1)
    for name, options in GPT_SECOND_ORDER.items():  # the steps of convergence.py; the annealed one over ``steps``
        torch.manual_seed(0)
        made[name] = SimpleNamespace(step=second_order(options, loss, DAMPINGS[1])(GPT(**GPT_SIZE), steps))
    return made


def period(opt, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for x, y in batches:
        opt.step(x, y)
    return (time.perf_counter() - start) / len(batches)


def phases(opt, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Milliseconds per step of each phase over one profiled period, and ``other`` and ``total``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            with torch.profiler.record_function(PREFIX + "step"):
                opt.step(x, y)
    totals = {e.key[len(PREFIX):]: e.cpu_time_total / 1e3 / len(batches) for e in prof.key_averages()
              if e.key.startswith(PREFIX)}
    ms = {p: totals.get(p, 0.0) for p in PHASES}
    return {**ms, "other": totals["step"] - sum(ms.values()), "total": totals["step"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of one period each")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpt_step"))
    args = parser.parse_args(argv)
    sample = random_windows(load_chars().train, GPT_SIZE["block_size"])
    gen = torch.Generator().manual_seed(0)
    rounds = args.repeats + 2  # a warm-up period, the timed rounds, the profiled period
    batches = [[sample(GPT_BATCH, gen) for _ in range(PERIOD)] for _ in range(rounds)]
    opts = optimizers(PERIOD * rounds)
    for opt in opts.values():
        period(opt, batches[0])
    seconds: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(1, args.repeats + 1):
        for name, opt in opts.items():
            seconds[name].append(period(opt, batches[r]))
    ratios = {name: [s / a for s, a in zip(times, seconds["AdamW"])] for name, times in seconds.items()}
    split = {name: phases(opt, batches[-1]) for name, opt in opts.items()}
    print(f"machine: {machine()}")
    print(f"GPT {GPT_SIZE}, batch {GPT_BATCH}; the mean step over a period of {PERIOD}, medians of {args.repeats} "
          "interleaved rounds (range)")
    print("| optimizer | ms per step | × AdamW |\n|---|---|---|")
    for name in opts:
        t, q = seconds[name], ratios[name]
        print(f"| {name} | {1e3 * statistics.median(t):.0f} ({1e3 * min(t):.0f}–{1e3 * max(t):.0f}) | "
              f"{statistics.median(q):.2f} ({min(q):.2f}–{max(q):.2f}) |")
    print("one profiled period, ms per step: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in ms.items() if v) for name, ms in split.items()))
    out = Path(args.out)
    result = {"machine": machine(), "model": GPT_SIZE, "batch": GPT_BATCH, "period": PERIOD, "seconds": seconds,
              "ratios": ratios, "split": split}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot([{"case": f"GPT, batch {GPT_BATCH}×{GPT_SIZE['block_size']}", "config": name, "ms": ms}
          for name, ms in split.items()], out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
