"""Data-parallel K-FAC: where a step's time goes (compute vs communication) on 1 and 2 processes.

    python benchmarks/bench_distributed.py [--steps 40] [--batch 512] [--out benchmarks/results]

MLP 784-512-256-10 (``bench_step.mlp``), MC Fisher, π-damped inverse factors refreshed every 10 steps,
factors every step, one global batch of ``--batch`` random images split over the ranks; gloo on
loopback. Variants:

* ``1 process``: plain ``KFAC`` with all the machine's threads (no ``torch.distributed``);
* ``W=1 data-parallel``: the same through the collectives of a one-rank gloo group (their overhead);
* ``W=2 eager`` / ``lazy factors`` / ``KAISA memory`` (``decomposition_fraction=0.5``): two ranks with half
  the threads each.

Per variant: the median step time over whole 10-step periods (so the decomposition refresh is amortised
exactly), the time spent inside collectives (``DataParallel.comm_seconds``: transfers *and* waiting for
the slower rank), the rest as compute, and the bytes each rank puts into collectives per step, next to
the README's model of that volume.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import machine, mlp  # noqa: E402

import kfac_func as kf  # noqa: E402

PERIOD = 10
VARIANTS = {
    "1 process": (1, None),
    "W=1 data-parallel": (1, {}),
    "W=2 eager": (2, {}),
    "W=2 lazy factors": (2, {"lazy_factors": True}),
    "W=2 KAISA memory (fraction 1/2)": (2, {"decomposition_fraction": 0.5}),
}
OPTIONS = dict(kf.FIXED_STEP, damping_mode="factored", damping=1e-2, inverse_period=PERIOD, lr=0.05, kl_clip=1e-3)


def _run(rank: int, world: int, options: dict | None, steps: int, batch: int, threads: int, init: str | None,
         out: str | None) -> dict:
    torch.set_num_threads(threads)
    if options is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(batch, 784, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    local = slice(rank * batch // world, (rank + 1) * batch // world)
    opt = kf.KFAC(model, **OPTIONS, **({"data_parallel": True, **options} if options is not None else {}))
    comm = opt._comm
    for _ in range(PERIOD):  # warm-up: traces, first decompositions
        opt.step(x[local], y[local])
    times, comms, sent = [], [], []
    for _ in range(steps // PERIOD):
        seconds, bytes_before = comm.comm_seconds, comm.comm_bytes
        start = time.perf_counter()
        for _ in range(PERIOD):
            opt.step(x[local], y[local])
        times.append((time.perf_counter() - start) / PERIOD)
        comms.append((comm.comm_seconds - seconds) / PERIOD)
        sent.append((comm.comm_bytes - bytes_before) / PERIOD)
    result = {"step": statistics.median(times), "comm": statistics.median(comms), "bytes": statistics.median(sent)}
    if options is not None:
        dist.barrier()
        if out is not None:
            torch.save(result, f"{out}.{rank}")
            os._exit(0)  # skip gloo's C++ teardown (see tests/test_distributed.py)
    return result


def _variant(world: int, options: dict | None, steps: int, batch: int) -> dict:
    threads = max(1, os.cpu_count() // world) if os.cpu_count() else 1
    if world == 1 and options is None:
        return _run(0, 1, None, steps, batch, threads, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_run, args=(world, options, steps, batch, threads, f"file://{tmp}/rendezvous", out), nprocs=world)
        ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    return {k: max(r[k] for r in ranks) for k in ranks[0]}  # the slowest rank sets the pace


def model_bytes(world: int, options: dict | None) -> float:
    """Bytes per step each rank puts into collectives, from the README's model (float32)."""
    if options is None:
        return 0.0
    dims = [(512, 785), (256, 513), (10, 257)]  # (d_g, d_a) with the bias column
    params = sum(g * a for g, a in dims)
    factors = sum(g * g + a * a for g, a in dims)
    lazy, fraction = options.get("lazy_factors", False), options.get("decomposition_fraction", 1.0)
    volume = params + (factors / PERIOD if lazy else factors) + 2  # gradients, factors, loss and counts
    holders = max(1, round(fraction * world))
    if world > 1 and holders > 1:
        volume += factors / PERIOD  # every inverse factor once, from its owner
    if holders < world:
        volume += params  # preconditioned gradients from the holders
    if options.get("lazy_factors"):
        volume += 1  # the NaN flag
    return 4 * volume


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, (world, options) in VARIANTS.items():
        r = _variant(world, options, args.steps, args.batch)
        rows.append({"variant": name, "world": world, **r, "model_bytes": model_bytes(world, options)})
        print(f"{name}: {1e3 * r['step']:.1f} ms/step, {1e3 * r['comm']:.1f} ms in collectives", flush=True)
    lines = [f"Data-parallel K-FAC, MLP 784-512-256-10, global batch {args.batch}, MC Fisher, factored damping, "
             f"inverses every {PERIOD} steps; gloo on loopback; {machine()} (threads split over the ranks).", "",
             "| variant | step (ms) | in collectives (ms) | compute (ms) | sent per step, measured (MB) | model (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {1e3 * r['step']:.1f} | {1e3 * r['comm']:.1f} | "
                     f"{1e3 * (r['step'] - r['comm']):.1f} | {r['bytes'] / 2**20:.2f} | {r['model_bytes'] / 2**20:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distributed.md").write_text(table + "\n")
        (args.out / "distributed.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
