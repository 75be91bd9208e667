"""The reduce convention's statistics captured pooled over positions, against the per-position capture.

    python benchmarks/bench_pooled.py [--repeats 15] [--json benchmarks/results/pooled.json]

A CNN classifier (an ``(N, C)`` output) gets the reduce convention under ``reduce="auto"``: ``A`` comes from
the mean ``â`` of each layer's inputs over positions. When only the factors read the statistics (K-FAC with
the GGN quadratic model: the defaults), the optimizer captures them pooled (``capture(..., compact=...)``: a
convolution's patches averaged over positions straight from strided windows of its input, one spatial dim at
a time), not per position (the ``N·S`` patch rows built, then averaged: what a hand-written K-FAC-reduce
does, and what E-KFAC and two-level K-FAC still need). Interleaved in one run, medians of ``--repeats``:
the statistics capture (MC Fisher) plus the reduce factors, per position and pooled, and a capture of the
gradients alone for scale, on the Fashion-MNIST CNN of ``convergence.py`` (batch 256), the CNN of
``bench_step.py`` (batch 128) and the example ResNet (batch 128). Both captures give the same factors
(``tests/test_layers.py``).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
from bench_step import cnn as step_cnn
from bench_step import interleaved, machine
from convergence import cnn as convergence_cnn
from torch import nn

import kfac_func as kf
from kfac_func.models import resnet

MODELS: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, ...]]] = {  # model, batch, input shape
    "Fashion-MNIST CNN (convergence.py)": (convergence_cnn, 256, (784,)),
    "CNN 2 conv + linear (bench_step.py)": (step_cnn, 128, (1, 28, 28)),
    "ResNet (kfac_func.models)": (lambda: resnet(28, 10), 128, (784,)),
}


def bench(make: Callable[[], nn.Module], batch: int, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Milliseconds per call of the three captures (each followed by what reads it)."""
    torch.manual_seed(0)
    model = make()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    plan = kf.trace(model, params, x)
    reduce = kf.default_reduce(plan)
    key = kf.random.key(0)

    def statistics(compact: dict[str, bool]) -> Callable[[], None]:
        return lambda: kf.kronecker_factors(kf.capture(model, params, x, y, "cross_entropy", key=key, plan=plan,
                                                       compact=compact), reduce=reduce)

    t = interleaved({
        "gradients only": lambda: kf.capture(model, params, x, y, "cross_entropy", fisher=None, plan=plan),
        "per position": statistics({}),
        "pooled": statistics({n: True for n, r in reduce.items() if r}),
    }, repeats)
    return {k: 1e3 * v for k, v in t.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"{machine()}; medians of {args.repeats} interleaved rounds, milliseconds")
    print("| model | batch | gradients only | statistics per position | statistics pooled | pooled / per position |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, (make, batch, shape) in MODELS.items():
        ms = bench(make, batch, shape, args.repeats)
        rows.append({"model": name, "batch": batch, **ms})
        print(f"| {name} | {batch} | {ms['gradients only']:.1f} | {ms['per position']:.1f} | {ms['pooled']:.1f} "
              f"| {ms['pooled'] / ms['per position']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
