"""Step time when the loss goes to zero: a memorised batch against fresh batches.

    python benchmarks/bench_small_loss.py [--steps 100] [--json results.json]

MLP 784-512-256-10, batch 256, MC Fisher, lr 0.01, damping 1e-3, decompositions every 10 steps. For each
method, one run on a single repeated batch (the loss reaches 0: its output gradients become subnormal
floats) and one on fresh random batches; the median step time over the steps after the first period, and
their ratio against the issue's criterion (memorised within 1.2× of fresh). ``kfac_func`` flushes subnormals where they arise (``kfac_func.subnormal``), so the ratio
stays near 1 without ``torch.set_flush_denormal``; ``--no-flush`` shows what the same run costs when the
library's flushing is disabled (monkeypatched to the identity), for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (the machine line)

import kfac_func as kf  # noqa: E402

METHODS = {
    "kfac[eigen]": dict(damping_mode="eigen"),
    "kfac[factored]": dict(damping_mode="factored"),
    "ekfac": dict(method="ekfac"),
    "two_level": dict(method="two_level"),
}


def run(kwargs: dict, memorised: bool, steps: int) -> tuple[float, float]:
    """(median seconds per step after the first period, final loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = kf.KFAC(model, **{**kf.FIXED_STEP, "lr": 0.01, "damping": 1e-3, **kwargs})
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))  # after the model, from seed 0
    g = torch.Generator().manual_seed(1)
    times, loss = [], float("nan")
    for _ in range(steps):
        if not memorised:
            x, y = torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g)
        start = time.perf_counter()
        loss = float(opt.step(x, y))
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:]), loss


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-flush", action="store_true", help="disable kfac_func's subnormal flushing")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.no_flush:
        for name in ("subnormal", "losses", "capture", "averaging", "factors", "optimizer"):
            module = sys.modules[f"kfac_func.{name}"]  # (kf.capture is the function, not the module)
            for attr in ("flush", "flush_tree"):
                if hasattr(module, attr):
                    setattr(module, attr, lambda t: t)
    print(f"machine: {bench_step.machine()}; flushing {'disabled' if args.no_flush else 'on'}")
    rows = []
    print("| method | fresh ms/step | memorised ms/step | memorised / fresh | within 1.2× | final loss (memorised) |")
    print("|---|---|---|---|---|---|")
    for name, kwargs in METHODS.items():
        fresh, _ = run(kwargs, False, args.steps)
        memo, loss = run(kwargs, True, args.steps)
        ok = memo / fresh <= 1.2
        rows.append({"method": name, "fresh_ms": 1e3 * fresh, "memorised_ms": 1e3 * memo, "ratio": memo / fresh,
                     "within_1_2": ok, "final_loss": loss, "flush": not args.no_flush})
        print(f"| {name} | {1e3 * fresh:.1f} | {1e3 * memo:.1f} | {memo / fresh:.2f} | {'yes' if ok else 'no'} | "
              f"{loss:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": bench_step.machine(), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
