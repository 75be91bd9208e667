"""K-FAC on a GPT-2-shaped transformer: optimizer state, peak memory and step time against Adam.

    python benchmarks/bench_wide.py [--quick] [--steps 40] [--configs factored eigen factored-5-20] [--max-factor-dim N]
        [--factor-sides '{"head": {"G": "diagonal"}}'] [--json benchmarks/results/wide.json] [--plot PATH]
    python benchmarks/bench_wide.py --split --configs factored   # where one step's time goes

The model is ``kfac_func.models.CharTransformer`` with GPT-2's vocabulary (50257), width (768) and heads
(12), 2 layers, context 128, batch 8 (``--quick``: vocab 2048, dim 128, 4 heads, context 32). Data: token
sequences of a fixed random sparse bigram Markov chain (each token has 4 successors, drawn Zipf-like from
the vocabulary, with probabilities 8:4:2:1), so the per-position cross entropy falls from ln(vocab) within
tens of steps towards the chain's entropy; the same batches for every optimizer.

Each optimizer runs ``--steps`` steps in its own subprocess (the script re-invokes itself with ``--only``),
since the peak RSS (``ru_maxrss``) is a process-lifetime peak. Reported: the optimizer state in bytes (K-FAC:
every leaf of the pure optimizer's state; Adam: ``exp_avg`` + ``exp_avg_sq``) and its ratio to the
parameters; peak RSS; K-FAC's first step (step 0: factors and the first decompositions) and its amortised
step (mean over whole inverse periods from step ``inverse_period`` on, refresh steps included); Adam's
median step after one warm-up step; the loss per step. The size policy (``--max-factor-dim``,
``--factor-sides``) is passed to ``kfac_func.kfac`` only when given. Goals: state ≤ 3× the parameters,
amortised step ≤ 3× Adam's (AdamW's step costs the same), peak RSS ≤ 2× Adam's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F

import kfac_func as kf
from kfac_func.models import CharTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import machine

from kfac_func.phases import PHASES, PREFIX

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"vocab": 50257, "dim": 768, "heads": 12, "layers": 2, "context": 128, "batch": 8}
QUICK = {"vocab": 2048, "dim": 128, "heads": 4, "layers": 2, "context": 32, "batch": 8, "steps": 20}
# K-FAC's configurations: the library's defaults (the quadratic-model step; ``--kfac-lr`` and ``--damping`` do not
# apply), and the fixed step with eigen damping, factored damping, and factored damping with the statistics every
# 5 steps and decompositions every 20 (the usual trade on large models)
CONFIGS = {"defaults": {}, "eigen": kf.FIXED_STEP, "factored": {**kf.FIXED_STEP, "damping_mode": "factored"},
           "factored-5-20": {**kf.FIXED_STEP, "damping_mode": "factored", "factor_period": 5, "inverse_period": 20}}
SUCCESSOR_P = torch.tensor([8.0, 4.0, 2.0, 1.0]) / 15  # a token's successors' probabilities


class BigramChain:
    """A fixed random sparse Markov chain over ``vocab`` tokens: successors and starts drawn Zipf-like."""

    def __init__(self, vocab: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        ranks = torch.randperm(vocab, generator=self.gen)
        self.zipf = 1.0 / (ranks + 1.0)  # token i's weight, its rank in a random order
        k = len(SUCCESSOR_P)
        self.successors = torch.multinomial(self.zipf, vocab * k, replacement=True, generator=self.gen).view(vocab, k)

    def batch(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``length + 1`` tokens as inputs ``(n, length)`` and next-token targets."""
        tokens = [torch.multinomial(self.zipf, n, replacement=True, generator=self.gen)]
        for _ in range(length):
            pick = torch.multinomial(SUCCESSOR_P.expand(n, -1), 1, generator=self.gen)[:, 0]
            tokens.append(self.successors[tokens[-1], pick])
        seq = torch.stack(tokens, 1)
        return seq[:, :-1], seq[:, 1:]


def fixed(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """The options of K-FAC configuration ``config``: a fixed step's with ``--kfac-lr`` and ``--damping``."""
    options = CONFIGS[config]
    return {"lr": args.kfac_lr, "damping": args.damping, **options} if options else {}


def nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def split(args: argparse.Namespace) -> None:
    """Where one K-FAC step of the first configuration goes (not a refresh step; ``kfac_func.phases`` ranges under
    ``torch.profiler``), beside a plain forward and backward of the same batch, the medians of 3."""
    torch.manual_seed(args.seed)
    model = CharTransformer(args.vocab, args.context, dim=args.dim, heads=args.heads, layers=args.layers)
    x, y = BigramChain(args.vocab, args.seed).batch(args.batch, args.context)
    opt = kf.kfac(model, loss="cross_entropy", **fixed(args, args.configs[0]))
    params = {n: p.detach() for n, p in model.named_parameters()}
    state = opt.init(params, x)
    params, state, _ = opt.step(params, state, x, y)  # step 0: the first decompositions
    rows = []
    for _ in range(3):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        plain = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function(PREFIX + "step"):
                params, state, _ = opt.step(params, state, x, y)
        seconds = {e.key[len(PREFIX):]: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith(PREFIX)}
        rows.append({"plain forward/backward": plain, **{p: seconds.get(p, 0.0) for p in PHASES},
                     "K-FAC step": seconds["step"]})
    print(f"K-FAC {args.configs[0]}, one step that is not a refresh (seconds, median of 3):")
    for key in rows[0]:
        print(f"  {key:24s} {statistics.median(r[key] for r in rows):7.2f}")


def run(args: argparse.Namespace, which: str) -> dict:
    """``args.steps`` steps of one optimizer (``adam`` or ``kfac-<damping_mode>``) in this process."""
    torch.manual_seed(args.seed)
    model = CharTransformer(args.vocab, args.context, dim=args.dim, heads=args.heads, layers=args.layers)
    chain = BigramChain(args.vocab, args.seed)
    param_bytes = nbytes(list(model.parameters()))
    times: list[float] = []
    losses: list[float] = []
    out: dict[str, Any] = {"optimizer": which, "param_bytes": param_bytes}
    if which == "adam":
        adam = torch.optim.Adam(model.parameters(), lr=args.adam_lr)
        for _ in range(args.steps):
            x, y = chain.batch(args.batch, args.context)
            start = time.perf_counter()
            adam.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            adam.step()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
        state = [s[k] for s in adam.state.values() for k in ("exp_avg", "exp_avg_sq")]
        out |= {"state_bytes": nbytes(state), "first_s": times[0], "amortised_s": statistics.median(times[1:])}
    else:
        sizes = {k: v for k, v in (("max_factor_dim", args.max_factor_dim), ("factor_sides", args.factor_sides))
                 if v is not None}
        opt = kf.kfac(model, loss="cross_entropy", **fixed(args, which.removeprefix("kfac-")), **sizes)
        params = {n: p.detach() for n, p in model.named_parameters()}
        # init traces shapes only; drawing no batch keeps the batches the same as Adam's
        state = opt.init(params, torch.zeros(args.batch, args.context, dtype=torch.long))
        model.to("meta")  # the pure step reads only ``params``: the module's own copy is freed, as a user's would be
        for _ in range(args.steps):
            x, y = chain.batch(args.batch, args.context)
            start = time.perf_counter()
            params, state, info = opt.step(params, state, x, y)
            times.append(time.perf_counter() - start)
            losses.append(info.loss.item())
            del info  # its gradient and direction (two parameter-sized trees) are not kept into the next step
        period = opt.options.inverse_period
        periods = [times[i:i + period] for i in range(period, len(times) - period + 1, period)]
        layers = {name: nbytes([state.factors.value[name], state.eigen.get(name), state.inverses.get(name)])
                  for name in state.factors.value}
        out |= {"state_bytes": nbytes(state), "velocity_bytes": nbytes(state.velocity), "layer_bytes": layers,
                "first_s": times[0], "inverse_period": period, "periods": len(periods),
                "amortised_s": statistics.median(sum(p) / period for p in periods) if periods else math.nan,
                "size_options": sizes}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out |= {"losses": losses, "step_s": times, "peak_rss_bytes": peak}
    return out


def table(rows: list[dict]) -> str:
    adam = next((r["amortised_s"] for r in rows if r["optimizer"] == "adam"), math.nan)
    lines = [("| optimizer | state MB | × params | peak RSS GB | first step s | amortised step s | × Adam | "
              "final loss |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["state_bytes"] / r["param_bytes"]
        lines.append(f"| {r['optimizer']} | {r['state_bytes'] / 2**20:.1f} | {ratio:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['first_s']:.3f} | {r['amortised_s']:.3f} | "
                     f"{r['amortised_s'] / adam:.2f} | {r['losses'][-1]:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        wall = [sum(r["step_s"][:i]) for i in range(len(r["step_s"]))]  # loss i is of the parameters after i steps
        by_step.plot(range(len(r["losses"])), r["losses"], label=r["optimizer"])
        by_time.plot(wall, r["losses"], label=r["optimizer"])
    by_step.set(xlabel="step", ylabel="training loss (per position)", title=title)
    by_time.set(xlabel="wall time (s, optimizer steps only)", ylabel="training loss (per position)")
    by_step.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in FULL.items():
        parser.add_argument(f"--{k}", type=int, default=None, help=f"default {v} ({QUICK[k]} with --quick)")
    parser.add_argument("--steps", type=int, default=None, help=f"default 40 ({QUICK['steps']} with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (a smoke run)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="K-FAC configurations to run (see CONFIGS)")
    parser.add_argument("--kfac-lr", type=float, default=1e-2)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--max-factor-dim", type=int, default=None, help="passed to kfac_func.kfac when given")
    parser.add_argument("--factor-sides", type=json.loads, default=None,
                        help="JSON {layer: {'A'|'G': 'dense'|'diagonal'|'identity'|int}}, passed when given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/results/wide[_quick].png")
    parser.add_argument("--split", action="store_true",
                        help="only the time split of one step of the first --configs, beside a plain forward/backward")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one optimizer, JSON on stdout
    args = parser.parse_args(argv)
    for k, v in (QUICK if args.quick else {**FULL, "steps": 40}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run(args, args.only)))
        return []
    if args.split:
        print(f"machine: {machine()}")
        split(args)
        return []

    shared = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              (*FULL, "steps", "kfac_lr", "damping", "adam_lr", "seed", "threads")]
    shared += [f"--max-factor-dim={args.max_factor_dim}"] if args.max_factor_dim is not None else []
    shared += [f"--factor-sides={json.dumps(args.factor_sides)}"] if args.factor_sides is not None else []
    print(f"machine: {machine()}")
    print(f"model: CharTransformer vocab {args.vocab}, dim {args.dim}, heads {args.heads}, layers {args.layers}, "
          f"context {args.context}; batch {args.batch}; {args.steps} steps; ln(vocab) = {math.log(args.vocab):.2f}, "
          f"chain entropy = {-(SUCCESSOR_P * SUCCESSOR_P.log()).sum():.2f}")
    rows = []
    for which in ["adam"] + [f"kfac-{m}" for m in args.configs]:
        command = [sys.executable, __file__, *shared, f"--only={which}"]
        done = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            print(f"{which}: failed (exit {done.returncode})")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{which}: {r['param_bytes'] / 2**20:.1f} MB of parameters, losses "
              + " ".join(f"{v:.2f}" for v in r["losses"]))
        for name, b in sorted(r.get("layer_bytes", {}).items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {name}: {b / 2**20:.1f} MB of factors and decompositions")
    print("goal: K-FAC state ≤ 3× the parameters, amortised K-FAC step ≤ 3× Adam's, peak RSS ≤ 2× Adam's")
    print(table(rows))
    title = f"vocab {args.vocab}, dim {args.dim}, {args.layers} layers, batch {args.batch}×{args.context}"
    plot(rows, args.plot or RESULTS / ("wide_quick.png" if args.quick else "wide.png"), title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "plot"},
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
