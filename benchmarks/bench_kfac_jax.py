"""kfac-jax as a peer: its K-FAC step as a ratio to the same framework's SGD step (same model, batch, dtype).

    benchmarks/setup_kfac_jax.sh                      # once: .venv-kfac-jax with jax 0.9.1, kfac-jax 0.0.8
    .venv-kfac-jax/bin/python benchmarks/bench_kfac_jax.py [--repeats 15] [--quick] [--lr 0.0] [--json PATH]

Runs in its own environment (no torch). The models are those of ``bench_step.py``, written in haiku, float32,
inputs NHWC (XLA's CPU layout; torch's is NCHW):

* MLP 784-512-256-10 (ReLU) at batch 256 and 2048;
* CNN at batch 128: Conv 1→16 5×5 pad 2 (``SAME``), ReLU, MaxPool 2, Conv 16→32 5×5 pad 2, ReLU, adaptive
  average pool to 4×4, Flatten, Linear 512→10. The 14×14 map is pooled exactly as torch's
  ``AdaptiveAvgPool2d(4)`` does: window ``i`` spans ``floor(14 i / 4)`` to ``ceil(14 (i + 1) / 4)``, i.e. the
  overlapping 4-wide windows starting at 0, 3, 7, 10, each a slice and a mean.

The loss is the mean softmax cross-entropy, registered with ``kfac_jax.register_softmax_cross_entropy_loss``;
the layers are found by kfac-jax's graph matcher (automatic registration; the blocks it found are printed).

Two candidates per case, timed round-robin (so machine noise hits both alike) over whole 10-step periods,
after a warm-up period that compiles everything, each period ended by ``block_until_ready``; the median
period over ``--repeats`` divided by 10 is the ms/step:

* ``sgd``: SGD with momentum 0.9 as ``optax.sgd`` does it (``optax.trace``, then ``p - lr v``), one ``jax.jit``
  step (value_and_grad + update, params and state donated like kfac-jax donates its own);
* ``kfac``: ``kfac_jax.Optimizer`` with fixed learning rate ``lr`` and momentum 0.9 (no adaptive learning
  rate, momentum or damping), damping 1e-3, Tikhonov damping split between the factors by π (the default,
  ``use_exact_inverses=False``), curvature estimate every step with EMA 0.95, inverses every 10 steps (one per
  timed period), ``estimation_mode='fisher_gradients'`` — the Monte-Carlo Fisher of the original K-FAC: the
  gradients of the loss at targets sampled from the model's own predictive distribution, one sample
  (``num_estimator_samples=1``); ``'fisher_curvature_prop'`` / ``'ggn_curvature_prop'`` instead use random
  ±1 vectors times half-factors. No burn-in, ``multi_device=False``, no l2. The step counter is passed as
  ``global_step_int`` so no step waits to read it back from the device. kfac-jax compiles its step itself.

The learning rate defaults to 0, as in ``bench_step.py`` (the same work; the parameters stay put). It is a
runtime array in both steps, so XLA cannot fold it away. With ``--lr 0.01`` the steps keep training on the one
fixed random batch, and K-FAC soon leaves the regime worth timing: the MLP memorises it (loss exactly 0 from
about step 10 at batch 256) and the CNN at batch 128 diverges (NaN from about step 7), so the timed periods
would be of a saturated or NaN network. The final losses are printed and saved so a run can be checked.

On CPU, kfac-jax's conv blocks are dear: its patch second moments (``patches_moments``, a loop of
convolutions built for accelerators) are nearly all of the CNN's step; with curvature updates every 5 steps
instead of every step, the steps without one cost about an SGD step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata

import haiku as hk
import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax

PERIOD = 10  # inverse update period; timing is over whole periods
MOMENTUM, DAMPING, EMA = 0.9, 1e-3, 0.95


# ---------------------------------------------------------------- models (haiku)


def mlp(x: jax.Array) -> jax.Array:
    x = jax.nn.relu(hk.Linear(512)(x))
    x = jax.nn.relu(hk.Linear(256)(x))
    return hk.Linear(10)(x)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch's AdaptiveAvgPool2d(size) on an NHWC map: window i is [floor(n i / size), ceil(n (i + 1) / size))."""
    def pool(x, axis):
        n = x.shape[axis]
        windows = [(n * i // size, -(-n * (i + 1) // size)) for i in range(size)]
        parts = [jax.lax.slice_in_dim(x, a, b, axis=axis).mean(axis=axis, keepdims=True) for a, b in windows]
        return jnp.concatenate(parts, axis=axis)
    return pool(pool(x, 1), 2)


def cnn(x: jax.Array) -> jax.Array:
    x = jax.nn.relu(hk.Conv2D(16, 5, padding="SAME")(x))
    x = hk.max_pool(x, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="VALID")
    x = jax.nn.relu(hk.Conv2D(32, 5, padding="SAME")(x))
    x = adaptive_avg_pool(x, 4)
    return hk.Linear(10)(hk.Flatten()(x))


# ---------------------------------------------------------------- machine and versions


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = os.environ.get("XLA_FLAGS", "")
    threads = f"XLA CPU, {cores} cores available (XLA's intra-op pool uses them all by default)"
    return f"{cpu}, {threads}{', XLA_FLAGS=' + flags if flags else ''}, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "jaxlib", "kfac-jax", "optax", "dm-haiku", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


# ---------------------------------------------------------------- timing


def interleaved(candidates: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call, candidates run round-robin ``repeats`` times (warm-up is the caller's)."""
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench(name: str, net: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, repeats: int,
          learning_rate: float) -> dict:
    model = hk.without_apply_rng(hk.transform(net))
    params0 = model.init(jax.random.PRNGKey(0), x)

    def loss_fn(params, batch):
        inputs, labels = batch
        logits = model.apply(params, inputs)
        kfac_jax.register_softmax_cross_entropy_loss(logits, labels)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value_and_grad = jax.value_and_grad(loss_fn)
    batch = (x, y)

    def copy(tree):  # both steps donate their params and state: each gets its own copy
        return jax.tree_util.tree_map(jnp.array, tree)

    # (a) SGD with momentum: optax.trace (v = g + 0.9 v), then p -= lr v, as optax.sgd does; lr an argument
    sgd = optax.trace(decay=MOMENTUM)
    lr = jnp.asarray(learning_rate)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def sgd_step(params, opt_state, batch, lr):
        loss, grads = value_and_grad(params, batch)
        updates, opt_state = sgd.update(grads, opt_state, params)
        return jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates), opt_state, loss

    s = {"params": copy(params0)}
    s["state"] = sgd.init(s["params"])

    def sgd_period():
        params, state = s["params"], s["state"]
        for _ in range(PERIOD):
            params, state, loss = sgd_step(params, state, batch, lr)
        s["params"], s["state"], s["loss"] = jax.block_until_ready((params, state, loss))

    # (b) kfac_jax.Optimizer, fixed learning rate / momentum / damping
    opt = kfac_jax.Optimizer(
        value_and_grad_func=value_and_grad,
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        use_adaptive_momentum=False,
        use_adaptive_damping=False,
        estimation_mode="fisher_gradients",
        num_estimator_samples=1,
        curvature_ema=EMA,
        curvature_update_period=1,
        inverse_update_period=PERIOD,
        use_exact_inverses=False,  # π-adjusted factored Tikhonov damping
        num_burnin_steps=0,
        multi_device=False,
    )
    mom, damp = jnp.asarray(MOMENTUM), jnp.asarray(DAMPING)
    keys = list(jax.random.split(jax.random.PRNGKey(1), PERIOD))  # one key per step of a period, made up front
    k = {"params": copy(params0), "step": 0}
    k["state"] = opt.init(k["params"], jax.random.PRNGKey(2), batch)

    def kfac_period():
        params, state = k["params"], k["state"]
        for i in range(PERIOD):
            params, state, stats = opt.step(params, state, keys[i], batch=batch, learning_rate=lr, momentum=mom,
                                            damping=damp, global_step_int=k["step"])
            k["step"] += 1
        k["params"], k["state"], k["loss"] = jax.block_until_ready((params, state, stats["loss"]))

    warmup = {}
    for label, fn in (("sgd", sgd_period), ("kfac", kfac_period)):
        start = time.perf_counter()
        fn()  # compiles; the kfac period holds a step with and one without the inverse update
        warmup[label] = time.perf_counter() - start
    try:
        blocks = [type(b).__name__ for b in opt._estimator.blocks]  # private: only for the printout
    except Exception as e:  # noqa: BLE001
        blocks = [f"unknown ({type(e).__name__})"]
    t = interleaved({"sgd": sgd_period, "kfac": kfac_period}, repeats)
    sgd_ms, kfac_ms = 1e3 * t["sgd"] / PERIOD, 1e3 * t["kfac"] / PERIOD
    return {
        "model": name, "batch": int(x.shape[0]), "sgd_ms": sgd_ms, "kfac_ms": kfac_ms, "x_sgd": kfac_ms / sgd_ms,
        "warmup_s": warmup, "blocks": blocks, "kfac_steps": k["step"],
        "final_loss": {"sgd": float(s["loss"]), "kfac": float(k["loss"])},
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | SGD ms/step | kfac-jax ms/step | kfac-jax / SGD |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['sgd_ms']:.2f} | {r['kfac_ms']:.2f} | {r['x_sgd']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny batches, 2 repeats (a smoke run)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--lr", type=float, default=0.0,
                        help="fixed learning rate of both steps (default 0: see above why not 0.01)")
    args = parser.parse_args(argv)
    if args.quick:
        cases = [("MLP 784-512-256-10", mlp, 32, (784,)), ("CNN 2 conv + linear", cnn, 8, (28, 28, 1))]
        args.repeats = 2
    else:
        cases = [
            ("MLP 784-512-256-10", mlp, 256, (784,)),
            ("MLP 784-512-256-10", mlp, 2048, (784,)),
            ("CNN 2 conv + linear", cnn, 128, (28, 28, 1)),
        ]
    print(f"machine: {machine()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"config: lr {args.lr}, momentum {MOMENTUM}, damping {DAMPING}, EMA {EMA}, inverses every {PERIOD}, "
          f"MC Fisher (fisher_gradients, 1 sample), float32, median of {args.repeats} periods of {PERIOD} steps")
    rng = np.random.default_rng(0)
    rows = []
    for name, net, n, shape in cases:
        x = jnp.asarray(rng.standard_normal((n,) + shape, dtype=np.float32))
        y = jnp.asarray(rng.integers(0, 10, n), dtype=jnp.int32)
        row = bench(name, net, x, y, args.repeats, args.lr)
        print(f"{name} batch {n}: blocks {row['blocks']}, warm-up (compile) s "
              f"{ {k: round(v, 1) for k, v in row['warmup_s'].items()} }, final loss {row['final_loss']}")
        rows.append(row)
    print(table(rows))
    if args.json:
        config = {"learning_rate": args.lr, "momentum": MOMENTUM, "damping": DAMPING, "curvature_ema": EMA,
                  "inverse_update_period": PERIOD, "curvature_update_period": 1,
                  "estimation_mode": "fisher_gradients", "num_estimator_samples": 1, "use_exact_inverses": False,
                  "dtype": "float32", "repeats": args.repeats, "quick": args.quick}
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "versions": versions(), "config": config, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
