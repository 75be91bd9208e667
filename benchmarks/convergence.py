"""Real-data convergence: steps and wall time to the best first-order result, every optimizer tuned alike.

    python benchmarks/convergence.py all --seeds 3 --out benchmarks/results   # both MNIST tasks: about 2 h on 2 CPU cores
    python benchmarks/convergence.py all --quick --out /tmp/smoke             # a smoke run of the same code: 1 min
    python benchmarks/convergence.py all --plot-only --out benchmarks/results # redraw tables and plots from JSON
    python benchmarks/convergence.py autoencoder | classifier [--dataset mnist] [--seeds K] [--out DIR] [--full]
    python benchmarks/convergence.py gpt [--seeds K] [--out DIR] [--full]     # the character-level GPT
    python benchmarks/convergence.py ablation --out benchmarks/results        # the recipe's choices: 13 min

* ``autoencoder``: Martens & Grosse's 784-1000-500-250-30 encoder, mirrored, tanh hidden units, a linear
  code layer and a sigmoid output with Bernoulli cross-entropy, on MNIST. The metric is the training loss
  per image (summed over pixels) on a fixed 5 000-image subset of the training set.
* ``classifier``: a two-conv CNN on Fashion-MNIST (``--dataset mnist`` for MNIST). The metric is the test
  accuracy on 2 000 test images; the training loss on 2 000 training images is recorded and plotted too.
* ``gpt``: :class:`kfac_func.models.GPT` (4 layers, 4 heads, width 128, tied embedding, 0.8 M parameters;
  :data:`GPT_SIZE`) as a character-level language model of Python code: the standard library's own top-level
  ``.py`` files concatenated (:func:`kfac_func.data.load_chars`, 4.7 MB on Python 3.11, a fixed 97-character
  alphabet), the first 90% for training, the last 10% for validation. Batches of 64 random 64-character
  windows of the training part. The metric is the validation loss (cross-entropy per character) on 256
  fixed windows of the validation part. The first-order baseline is the minimal-GPT recipe (:func:`adamw`):
  AdamW with weight decay 0.1 on the matrices and embeddings, betas (0.9, 0.99), a linear warmup over 5% of
  the steps then a cosine decay to a tenth of the learning rate, gradients clipped to norm 1
  (:data:`GPT_FIRST_ORDER`); the second-order configurations are :data:`GPT_SECOND_ORDER`; budgets
  :data:`GPT_STEPS` (:data:`GPT_FULL_STEPS` with ``--full``).
* ``all``: the autoencoder and the Fashion-MNIST classifier, one after the other.
* ``ablation``: K-FAC's recipe on the autoencoder with one choice changed at a time (:data:`ABLATION`), against
  the target stored in ``--out``'s autoencoder results.

**Tuning, the same for every optimizer**: three trials each, on one grid point per trial. SGD-momentum
(0.9), Adam and AdamW over their learning rate (:data:`FIRST_ORDER`, :data:`GPT_FIRST_ORDER`); K-FAC (with
the quadratic model's GGN from the whole batch, the default, and from a quarter of it), E-KFAC and two-level
K-FAC (:data:`SECOND_ORDER`) over the initial damping ``λ₀`` (:data:`DAMPINGS`): the :func:`second_order`
recipe, the library's defaults, picks their learning rate and momentum by the quadratic model each step and
adapts ``λ`` by Levenberg–Marquardt. On the GPT (:data:`GPT_SECOND_ORDER`) the annealed K-FAC recipe runs over
``λ₀``; the defaults, the annealed recipe in the expand convention and E-KFAC, one trial each at the ``λ₀`` they
name. Every configuration runs with ``--seeds K`` seeds (initialisation and batch order); all see the same
batches for the same seed.

**Interleaved runs**: the configurations of one seed advance in lock-step (:func:`run_seed`), one step of each
in turn, each with its own model, optimizer and batch generator, until each has taken its own budget; each
step is timed alone (evaluation excluded), so a slower or faster spell of a shared machine falls on every
configuration alike.

**The target** is the best first-order configuration's median final metric. Each configuration reports
its median final metric, how many seeds reach the target, and the medians (with ranges) over the seeds
that do of the steps and seconds to it. Each optimizer is then represented by its best trial: most seeds
reaching the target, then least median time to it, then the best final metric; the headline compares the
second-order ones' time to the target with the first-order winner's. Results go to ``--out`` as JSON and
PNG plots (the median curve of each optimizer's best trial with the range over seeds, against steps and
against wall time, the target as a line); a progress bar shows each seed's interleaved runs. The default
budgets fit 2 CPU cores and give the second-order methods at most the first-order ones' wall time
(autoencoder: 1 500 and 200 steps; CNN: 600 and 200, about 23 s each); ``--full`` runs paper-size budgets
on a GPU if one is present.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac_func as kf
from kfac_func.data import load, load_chars
from kfac_func.models import GPT

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

FIRST_ORDER = {"SGD-momentum": (0.01, 0.03, 0.1), "Adam": (1e-4, 3e-4, 1e-3)}  # learning-rate trials
SECOND_ORDER = {  # the recipe (:func:`second_order`) with these options
    "K-FAC": {"quadratic_fraction": 1.0},  # the quadratic model's GGN from the whole batch
    "K-FAC ¼-batch model": {"quadratic_fraction": 0.25},  # the quadratic model's GGN from a quarter of the batch
    "K-FAC ¼-batch model, growing batch": {"quadratic_fraction": 0.25},  # and the batches of :func:`growing_batch`
    "E-KFAC": {"method": "ekfac", "inverse_period": 20, "scale_period": 5},
    "two-level K-FAC": {"method": "two_level"},
}
GROWTH = (1 / 4, 2)  # "growing batch": from ¼ of the task's batch to twice it, geometrically over the budget
DAMPINGS = (1e-4, 1e-3, 1e-2)  # λ₀ trials: the library's default damping and a decade either side
TASKS = {"autoencoder": "mnist", "classifier": "fashion-mnist"}  # what ``all`` runs
DATASET = {"autoencoder": "mnist", "gpt": "python-source"}  # the data of a task run alone (else --dataset)
ABLATION = {  # the recipe's choices, one changed at a time (``ablation``)
    "the recipe (the quadratic model from the whole batch)": {},
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
    "the fixed step, `kf.FIXED_STEP` (fixed α, μ, KL clip; eigen damping; statistics every step)": {
        "adaptive": None, "damping_adaptation": False, "damping_mode": "eigen", "factor_period": 1},
}
GPT_SIZE = {"vocab_size": 97, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0, "tie": True}
GPT_BATCH = 64  # windows of GPT_SIZE["block_size"] characters
GPT_VAL_WINDOWS = 256  # the fixed validation windows (64 with --quick)
GPT_FIRST_ORDER = {"AdamW": (1e-3, 3e-3, 1e-2)}  # the minimal-GPT recipe (:func:`adamw`): learning-rate trials
GPT_SECOND_ORDER = {  # options of ``kf.KFAC`` (:func:`second_order`), over DAMPINGS unless they name λ₀
    "K-FAC": {"damping": DAMPINGS[1]},  # the library's defaults
    # α from the quadratic model (its GGN from 1/16 of the batch: 256 loss terms), μ = 0.9, the steps annealed
    # over the budget by kf.cosine_decay, the factors in the reduce convention (statistics pooled over positions)
    "K-FAC, annealed": {"adaptive": "lr", "anneal": True, "quadratic_fraction": 1 / 16, "reduce": True},
    # the same in the expand convention (the defaults' for a language model), at its best λ₀
    "K-FAC, annealed, expand": {"adaptive": "lr", "anneal": True, "quadratic_fraction": 1 / 16, "damping": 1e-4},
    "E-KFAC": {"method": "ekfac", "scale_period": 5, "damping": 1e-2},
}
GPT_STEPS = (400, 300)  # first-order and second-order budgets
GPT_FULL_STEPS = (5000, 2500)  # --full (on a GPU if present)
METRICS = {"autoencoder": "training loss (per image)", "classifier": "test accuracy",
           "gpt": "validation loss (per character)"}

Sample = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]  # n examples drawn with the generator
TrainStep = Callable[[Tensor, Tensor], Tensor]  # one step on the batch (x, y); returns the batch's loss
MakeStep = Callable[[nn.Module, int], TrainStep]  # the step of an optimizer of the model, for a budget of steps


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


def gpt_loss(out: tuple[Tensor, Any], y: Tensor) -> Tensor:
    """The mean cross-entropy per character of the GPT's ``(logits, loss)`` against the targets ``y``."""
    logits = out[0]
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def second_order(options: dict, loss: str | kf.Loss, damping: float, **changes) -> MakeStep:
    """The recipe: the library's defaults from ``λ₀ = damping`` — the quadratic-model step (``α``, ``μ`` each
    step from the exact GGN), Levenberg–Marquardt damping, factored damping (cached inverses), statistics
    every 5 steps, decompositions every 10 — with the configuration's ``options`` (:data:`SECOND_ORDER`,
    :data:`GPT_SECOND_ORDER`), then ``changes`` (the ablation's). ``"anneal": True`` among them is
    ``step_scale=kf.cosine_decay(budget)``: the steps annealed over the configuration's budget."""

    def make(model: nn.Module, steps: int) -> TrainStep:
        o = {"damping": damping, **options, **changes}
        if o.pop("anneal", False):
            o["step_scale"] = kf.cosine_decay(steps)
        return kf.KFAC(model, loss=loss, **o).step

    return make


def adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """The minimal-GPT recipe's AdamW: weight decay 0.1 on the parameters with two or more dims (matrices and
    embeddings), none on biases and LayerNorm weights; betas (0.9, 0.99)."""
    params = list(model.parameters())  # a tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def warmup_cosine(steps: int, warmup: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    """The learning rate's factor at each step: a linear warmup over the first ``warmup`` of the steps, then
    a cosine decay to ``floor`` at the last step."""
    n_warmup = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warmup:
            return (step + 1) / (n_warmup + 1)
        decay = min(1.0, (step - n_warmup) / max(1, steps - 1 - n_warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * decay))

    return factor


def first_order(name: str, lr: float, loss_fn: Callable[[Any, Tensor], Tensor]) -> MakeStep:
    """SGD with momentum 0.9, Adam, or the minimal-GPT recipe (``AdamW``: :func:`adamw`, the learning rate by
    :func:`warmup_cosine`, gradients clipped to norm 1), at learning rate ``lr``, on ``loss_fn(model(x), y)``."""

    def make(model: nn.Module, steps: int) -> TrainStep:
        schedule, clip = None, None
        if name == "AdamW":
            opt: torch.optim.Optimizer = adamw(model, lr)
            schedule, clip = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps)), 1.0
        elif name == "SGD-momentum":
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=lr)

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if schedule is not None:
                schedule.step()
            return loss.detach()

        return step

    return make


def growing_batch(batch: int, steps: int) -> list[int]:
    """Martens & Grosse's batch size schedule (§13): geometric growth, here from ``GROWTH[0]·batch`` at the
    first step to ``GROWTH[1]·batch`` at the last."""
    low, high = (round(f * batch) for f in GROWTH)
    return [round(low * (high / low) ** (s / max(1, steps - 1))) for s in range(steps)]


def random_rows(x: Tensor, y: Tensor) -> Sample:
    """Batches of examples (rows of ``x`` and ``y``) drawn uniformly with replacement."""

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x), (n,), generator=gen)
        return x[idx], y[idx]

    return sample


def random_windows(text: Tensor, context: int) -> Sample:
    """Batches of random windows of the character stream ``text``: inputs ``text[i : i+context]`` and
    next-character targets ``text[i+1 : i+1+context]``, ``(n, context)`` each."""
    offsets = torch.arange(context)

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(text) - context, (n, 1), generator=gen) + offsets
        return text[idx], text[idx + 1]

    return sample


class Task(NamedTuple):
    """A task at the budgets of ``args``: data, model, losses, metric (``better`` of two values), the
    optimizers' configurations and sizes."""

    sample: Sample  # the training batches
    evaluate: Callable[[nn.Module], dict]
    make_model: Callable[[], nn.Module]
    model: str  # the model, in words
    loss: str | kf.Loss  # K-FAC's
    loss_fn: Callable[[Any, Tensor], Tensor]  # the first-order optimizers' loss of the model's output
    better: Callable
    first_order: dict[str, tuple[float, ...]]  # learning-rate trials by optimizer
    second_order: dict[str, dict]  # K-FAC's options by configuration
    steps1: int  # first-order steps
    steps2: int  # second-order steps
    batch: int
    device: torch.device


class Config(NamedTuple):
    """One trial of one optimizer."""

    name: str
    family: str  # the optimizer
    make_step: MakeStep
    second_order: bool


class Run:
    """One configuration trained with one seed, a step at a time (:func:`run_seed`); the curve holds the
    metrics every ``steps // 30`` steps, the seconds of the steps so far (evaluation excluded) and the mean
    loss of the batches since the previous point."""

    def __init__(self, t: Task, config: Config, seed: int):
        self.t, self.config, self.seed = t, config, seed
        self.steps = t.steps2 if config.second_order else t.steps1
        growing = config.family.endswith("growing batch")
        self.batches = growing_batch(t.batch, self.steps) if growing else [t.batch] * self.steps
        self.eval_every = max(1, self.steps // 30)
        torch.manual_seed(seed)
        self.model = t.make_model().to(t.device)
        self.train_step = config.make_step(self.model, self.steps)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.step, self.elapsed, self.losses, self.curve = 0, 0.0, [], []
        self.evaluate()

    def evaluate(self) -> None:
        point = {"step": self.step, "seconds": self.elapsed, **self.t.evaluate(self.model)}
        if self.losses:
            point["batch_loss"] = statistics.fmean(self.losses)
            self.losses = []
        self.curve.append(point)

    def advance(self) -> None:
        """One training step (timed alone), then the metrics if due."""
        x, y = (v.to(self.t.device) for v in self.t.sample(self.batches[self.step], self.gen))
        start = time.perf_counter()
        loss = self.train_step(x, y)
        if self.t.device.type == "cuda":
            torch.cuda.synchronize()
        self.elapsed += time.perf_counter() - start
        self.losses.append(float(loss))
        self.step += 1
        if self.step % self.eval_every == 0 or self.step == self.steps:
            self.evaluate()

    def result(self) -> dict:
        return {"method": self.config.name, "family": self.config.family, "seed": self.seed, "curve": self.curve}


def run_seed(t: Task, configs: list[Config], seed: int) -> list[dict]:
    """Every configuration with one seed, in lock-step: one step of each in turn, each with its own model,
    optimizer and batch generator (the same batches for all), until each has taken its own budget."""
    runs = [Run(t, config, seed) for config in configs]
    bar = tqdm(total=sum(r.steps for r in runs), desc=f"seed {seed}", leave=False) if tqdm else None
    while active := [r for r in runs if r.step < r.steps]:
        for r in active:
            r.advance()
        if bar is not None:
            bar.update(len(active))
    if bar is not None:
        bar.close()
    return [r.result() for r in runs]


def task(kind: str, dataset: str, args) -> Task:
    device = torch.device("cuda" if args.full and torch.cuda.is_available() else "cpu")
    if kind == "gpt":
        text, context = load_chars(dataset), GPT_SIZE["block_size"]
        fixed = torch.Generator().manual_seed(0)  # the same validation windows for every run
        val = random_windows(text.val, context)(64 if args.quick else GPT_VAL_WINDOWS, fixed)
        x_val, y_val = (v.to(device).split(256) for v in val)

        def evaluate(model) -> dict:
            with torch.no_grad():
                total = sum(float(gpt_loss(model(x), y)) * len(x) for x, y in zip(x_val, y_val))
            return {"value": total / len(val[0])}

        make_model = lambda: GPT(**GPT_SIZE)
        size = sum(p.numel() for p in make_model().parameters()) / 1e6
        model = (f"GPT ({GPT_SIZE['n_layer']} layers, {GPT_SIZE['n_head']} heads, width {GPT_SIZE['n_embd']}, "
                 f"context {context}, {size:.2f} M parameters)")
        t = Task(random_windows(text.train, context), evaluate, make_model, model,
                 kf.Loss("cross_entropy", class_dim=-1), gpt_loss, min, GPT_FIRST_ORDER, GPT_SECOND_ORDER,
                 *(GPT_FULL_STEPS if args.full else GPT_STEPS), GPT_BATCH, device)
    elif kind == "autoencoder":
        split = load(dataset)
        subset = split.x_train[:5000].to(device)
        loss_fn = F.binary_cross_entropy_with_logits

        def evaluate(model) -> dict:
            with torch.no_grad():
                return {"value": float(loss_fn(model(subset), subset, reduction="sum")) / len(subset)}

        sizes = (20000, 4000, 1000) if args.full else (1500, 200, 512)
        t = Task(random_rows(split.x_train, split.x_train), evaluate, autoencoder, "784-1000-500-250-30 autoencoder",
                 "bce_with_logits", loss_fn, min, FIRST_ORDER, SECOND_ORDER, *sizes, device)
    else:
        split = load(dataset)
        x_test, y_test = split.x_test[:2000].to(device), split.y_test[:2000].to(device)
        x_fit, y_fit = split.x_train[:2000].to(device), split.y_train[:2000].to(device)
        loss_fn = F.cross_entropy

        def evaluate(model) -> dict:
            with torch.no_grad():
                return {"value": float((model(x_test).argmax(1) == y_test).float().mean()),
                        "train_loss": float(loss_fn(model(x_fit), y_fit))}

        sizes = (10000, 2000, 512) if args.full else (600, 200, 256)
        t = Task(random_rows(split.x_train, split.y_train), evaluate, cnn, "two-conv CNN", "cross_entropy", loss_fn,
                 max, FIRST_ORDER, SECOND_ORDER, *sizes, device)
    if args.quick:  # a smoke run: a few steps on small batches
        return t._replace(steps1=20, steps2=6, batch=8 if kind == "gpt" else 64)
    return t


def experiment(kind: str, dataset: str, args) -> dict:
    """Every optimizer's trials (three, or one where a configuration names its ``λ₀``), each with ``args.seeds``
    seeds."""
    t = task(kind, dataset, args)
    trials = 1 if args.quick else None
    configs = [Config(f"{name} lr={lr:g}", name, first_order(name, lr, t.loss_fn), False)
               for name, lrs in t.first_order.items() for lr in lrs[:trials]]
    dampings = DAMPINGS[1:2] if args.quick else DAMPINGS  # the library's default λ for a smoke run
    configs += [Config(f"{name} λ₀={damping:g}", name, second_order(options, t.loss, damping), True)
                for name, options in t.second_order.items()
                for damping in ([options["damping"]] if "damping" in options else dampings)]
    runs = [r for seed in range(args.seeds) for r in run_seed(t, configs, seed)]
    return summarise({"kind": kind, "dataset": dataset, "model": t.model, "device": str(t.device),
                      "batch": t.batch, "seeds": args.seeds, "better": t.better.__name__, "runs": runs})


def ablation(kind: str, dataset: str, args, target: float) -> dict:
    """K-FAC's recipe at the library's default ``λ₀`` with one option changed at a time (:data:`ABLATION`),
    against the ``target`` of the task's comparison."""
    t = task(kind, dataset, args)
    configs = [Config(name, name, second_order(t.second_order["K-FAC"], t.loss, DAMPINGS[1], **changes), True)
               for name, changes in ABLATION.items()]
    runs = [r for seed in range(args.seeds) for r in run_seed(t, configs, seed)]
    rows = [summary_row(name, [r for r in runs if r["method"] == name], target, t.better) for name in ABLATION]
    return {"kind": kind, "dataset": dataset, "device": str(t.device), "batch": t.batch, "seeds": args.seeds,
            "target": target, "runs": runs, "summary": rows}


def _first_order(family: str) -> bool:
    return family in FIRST_ORDER or family in GPT_FIRST_ORDER


def summarise(result: dict) -> dict:
    """Add the target, each configuration's summary and each optimizer's best trial to ``result``."""
    better = min if result["better"] == "min" else max
    by_method: dict[str, list[dict]] = {}
    for r in result["runs"]:
        by_method.setdefault(r["method"], []).append(r)
    target = better(_final(rs) for rs in by_method.values() if _first_order(rs[0]["family"]))
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
    return METRICS[result["kind"]]


def _model(result: dict) -> str:
    return result.get("model", result["kind"])  # results stored before the model was named: the task's name


def table(result: dict) -> str:
    """The configurations' table, then each optimizer's best trial against the first-order winner."""
    what, seeds = _metric(result), result["seeds"]
    if "best" not in result:  # an ablation
        return ablation_table(result)
    lines = [f"{_model(result)} on {result['dataset']}, batch {result['batch']}, {seeds} seed(s), medians (range): "
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
    winner = min((rows[m] for f, m in result["best"].items() if _first_order(f)),
                 key=lambda s: s["seconds_to_target"] or float("inf"))
    lines += ["", f"Best trials (bold) against the first-order winner, {winner['method']} "
              f"({winner['steps_to_target']:g} steps, {winner['seconds_to_target']:.1f} s):", ""]
    for family, method in result["best"].items():
        s = rows[method]
        if _first_order(family) or s["seconds_to_target"] is None:
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
    families = list(dict.fromkeys(r["family"] for r in result["runs"]))  # the configurations' order
    for family in (f for f in families if f in result["best"]):
        method = result["best"][family]
        rs, color = [r for r in result["runs"] if r["method"] == method], f"C{families.index(family)}"
        style = "--" if _first_order(family) else "-"
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
    fig.suptitle(f"{_model(result)} on {result['dataset']}:\neach optimizer's best trial, median of "
                 f"{result['seeds']} seed(s) (range shaded); {result['device']}, batch {result['batch']}")
    fig.tight_layout()
    fig.savefig(out / f"{result['kind']}_{result['dataset']}.png", dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("all", "autoencoder", "classifier", "gpt", "ablation"))
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
    tasks = TASKS.items() if args.kind == "all" else [(args.kind, DATASET.get(args.kind, args.dataset))]
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
