r"""Where the examples are in a layer's input, found from the dataflow (never from two sizes being equal).

The trace runs the model on the batch (``N`` examples) and on the batch concatenated with itself (``2N``,
:func:`kfac_func.calls.doubled`). For each tracked call, the dims of its input whose size changed are the
examples' (:func:`infer`):

* **one dim doubled**, of size ``N·k``: the examples, each with ``k`` rows (``k = 1``: batch-first,
  sequence-first ``(T, N, d)``, ...; ``k > 1``: flattened ``(N·T, d)`` rows as a ``view(-1, d)`` of a
  batch-first tensor makes them — example-major — or of a sequence-first one — example-minor, told apart by
  the values of the two runs);
* **no dim changed**: the input is *broadcast* — shared by every example, e.g. a position embedding of
  ``arange(T)`` or ``(1, T)`` ids. Its output is given the batch (a new leading dim, or its leading dim of size
  1 expanded to ``N``: what broadcasting against the batched tensors does anyway), so that the output
  gradient of every example is seen apart, and its input is repeated per example — exactly the statistics
  of the same model with the input expanded to the batch by hand;
* anything else: the layer cannot be laid out and is reported as untracked.

With ``batch_dims=None`` the inputs are one example (a graph whose nodes interact, say): no second run, every
call's rows are that example's positions (:data:`WHOLE`).

Everything downstream sees the canonical batch-first layout (:func:`batch_first`): examples at dim 0 (dim 1
after a leading vector dim), their ``k`` rows as positions.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from .losses import Loss


class Layout(NamedTuple):
    """Where the examples are in a call's input and output: ``dim`` (``None``: broadcast), ``rows`` per
    example folded into that dim, ``major`` (example-major folding); a broadcast call's output either gets
    a new leading batch dim (``prepend``) or its leading size-1 dim expanded; ``whole``: the call's input is
    all of one example (``batch_dims=None``)."""

    dim: int | None = 0
    rows: int = 1
    major: bool = True
    prepend: bool = False
    whole: bool = False

    @property
    def plain(self) -> bool:
        """Batch-first with one row per example: the canonical layout already."""
        return self.dim == 0 and self.rows == 1

    @property
    def shared(self) -> bool:
        """The input is shared by every example of a batch (broadcast)."""
        return self.dim is None and not self.whole


WHOLE = Layout(None, whole=True)


def infer(x1: Tensor, x2: Tensor, n: int, out: torch.Size) -> Layout | str:
    """The layout of a call whose input is ``x1`` on ``n`` examples and ``x2`` on the doubled batch (``out``:
    the shape of its output on ``n``), or the reason it has none."""
    if x1.dim() != x2.dim():
        return f"its input has {x1.dim()} dims for {n} examples and {x2.dim()} for {2 * n}"
    changed = [i for i, (a, b) in enumerate(zip(x1.shape, x2.shape)) if a != b]
    if not changed:
        return Layout(None, prepend=not (len(out) > 1 and out[0] == 1 and x1.dim() > 0 and x1.shape[0] == 1))
    dim = changed[0]
    size = x1.shape[dim]
    if len(changed) > 1 or x2.shape[dim] != 2 * size or size % n:
        return (f"its input's shape {tuple(x1.shape)} for {n} examples becomes {tuple(x2.shape)} for {2 * n}, "
                "which is not one dim holding the examples")
    rows = size // n
    major = True
    if rows > 1:
        a, b = x1.movedim(dim, 0), x2.movedim(dim, 0)
        if not torch.equal(b[:size], a):
            minor = b.reshape(rows, 2 * n, *b.shape[1:])[:, :n].reshape(a.shape)
            major = not torch.equal(minor, a)  # unverifiable (random values): a view of batch-first rows
    return Layout(dim, rows, major)


def batch_first(t: Tensor, layout: Layout, n: int, lead: int = 0, grad: bool = False) -> Tensor:
    """A call's input (or, ``grad``, an output gradient with ``lead`` leading vector dims) in the canonical
    layout: examples at dim ``lead``, then their rows, then the rest."""
    if layout.plain:
        return t
    if layout.whole:
        return t.unsqueeze(lead)
    if layout.dim is None:  # the gradient is the batched output's already; the input is every example's
        if grad:
            return t
        return t.expand((n,) + tuple(t.shape[int(not layout.prepend):]))
    t = t.movedim(lead + layout.dim, lead)
    if layout.rows == 1:
        return t
    rest = t.shape[lead + 1 :]
    if layout.major:
        return t.reshape(*t.shape[:lead], n, layout.rows, *rest)
    return t.reshape(*t.shape[:lead], layout.rows, n, *rest).transpose(lead, lead + 1)


def batched_shape(shape: torch.Size, layout: Layout, n: int) -> tuple[int, ...]:
    """The shape of a call's output (``shape`` on any batch) with ``n`` examples: its examples' dim resized,
    or, broadcast, the batch added in front."""
    if layout.whole:
        return tuple(shape)
    if layout.dim is None:
        return (n,) + tuple(shape[int(not layout.prepend):])
    out = list(shape)
    out[layout.dim] = n * layout.rows
    return tuple(out)


def unbatch_first(t: Tensor, layout: Layout, lead: int = 0) -> Tensor:
    """Undo :func:`batch_first` (not for a broadcast layout): back to the layout ``layout`` describes."""
    if layout.plain:
        return t
    if layout.whole:
        return t.squeeze(lead)
    if layout.rows > 1:
        t = (t if layout.major else t.transpose(lead, lead + 1)).flatten(lead, lead + 1)
    return t.movedim(lead, lead + layout.dim)


def batch_first_loss(loss: Loss, out: Tensor, targets: Tensor, layout: Layout, n: int
                     ) -> tuple[Loss, Tensor, Tensor]:
    """The loss, model output and targets with the output's examples at dim 0 and their rows next (the loss
    value is the same): so that the exact Fisher's columns of one example never couple two of its rows — the
    rows of ``(N·T, V)`` logits become ``(N, T, V)`` positions, ``(T, N, V)`` becomes ``(N, T, V)``."""
    if layout.plain:
        return loss, out, targets
    classes = loss.kind == "cross_entropy"
    c = loss.resolve(out, targets) if classes else None
    if classes and c != out.dim() - 1:
        raise ValueError(f"cross_entropy on logits {tuple(out.shape)} whose examples are at dim {layout.dim} "
                         f"({layout.rows} rows each) needs the classes in the last dim (class_dim=-1)")
    # the targets have the output's dims up to its last (class indices) or all of them: the same layout
    return (dataclasses.replace(loss, class_dim=-1) if classes else loss), batch_first(out, layout, n), \
        batch_first(targets, layout, n)
