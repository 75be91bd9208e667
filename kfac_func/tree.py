"""Parameter pytrees named by path: any optree pytree of tensors (nested dicts, tuples, lists,
NamedTuples, ...) is handled internally as a flat dict ``name → tensor``, each leaf named by its optree
path joined with ``"."`` (``{"l1": {"w": w}}`` → ``"l1.w"``, ``((w, b),)`` → ``"0.0"``, ``"0.1"``; a flat
dict's keys are its names). ``None`` entries are empty subtrees, not leaves. :func:`inner` takes the weighted
inner products of two such flat dicts (the step's dot products of gradients, directions and parameters)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import optree
import torch
from torch import Tensor

PyTree = Any  # a pytree of tensors
INNER_ENTRIES = 2**20  # the entries of one slice of :func:`inner`'s products


@dataclass(frozen=True)
class Spec:
    """How to rebuild a flattened pytree: its leaf ``names`` (in leaf order) and optree ``treespec``
    (``None`` for a flat dict ``str → tensor``, rebuilt as a dict in ``names`` order)."""

    names: tuple[str, ...]
    treespec: optree.PyTreeSpec | None = None

    def unflatten(self, flat: Mapping[str, Tensor], what: str = "the flat dict") -> PyTree:
        """The tree of this structure whose leaf ``name`` is ``flat[name]`` (the same tensor objects);
        ``what`` names ``flat`` in the error when its names are not this spec's."""
        require_names(flat, self.names, what)
        if self.treespec is None:
            return {n: flat[n] for n in self.names}
        return self.treespec.unflatten([flat[n] for n in self.names])

    def like(self, tree: PyTree, what: str) -> dict[str, Tensor]:
        """``tree`` (e.g. gradients or a direction) flattened, in this spec's name order; its names must be
        this spec's (``what`` names it in the error)."""
        return Spec(self.names).unflatten(flatten(tree)[0], what)


def flatten(tree: PyTree) -> tuple[dict[str, Tensor], Spec]:
    """``(name → tensor, spec)``. A flat dict of tensors costs a dict copy; otherwise a non-tensor leaf
    raises ``TypeError`` and two paths with the same name raise ``ValueError``, naming the paths."""
    tensors = type(tree) is dict and all(map(isinstance, tree.values(), repeat(Tensor)))
    if tensors and all(map(isinstance, tree, repeat(str))):
        return dict(tree), Spec(tuple(tree))
    paths, leaves, treespec = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    flat: dict[str, Tensor] = {}
    path_of: dict[str, tuple] = {}
    for path, leaf in zip(paths, leaves):
        name = ".".join(map(str, path))
        if not isinstance(leaf, Tensor):
            raise TypeError(f"parameter {name!r} (path {path}) must be a tensor, got {type(leaf).__name__}")
        if name in flat:
            raise ValueError(f"parameter paths {path_of[name]} and {path} have the same name {name!r}")
        flat[name], path_of[name] = leaf, path
    return flat, Spec(tuple(flat), treespec)


def require_names(got: Collection[str], expected: Collection[str], what: str) -> None:
    """Raise ``ValueError`` naming the missing and unexpected names unless ``got`` (a dict or set) has
    exactly the (distinct) names ``expected``."""
    if len(got) == len(expected) and all(map(got.__contains__, expected)):
        return
    got, expected = set(got), set(expected)
    raise ValueError(
        f"{what} must have the parameters' names; missing {sorted(expected - got)}, unexpected {sorted(got - expected)}"
    )


def inner(a: Mapping[str, Tensor], b: Mapping[str, Tensor], weights: Mapping[str, float] | Collection[str]) -> Tensor:
    """``Σₙ wₙ ⟨aₙ, bₙ⟩`` (float64) over the names of ``weights`` — a mapping ``name → wₙ`` (zero weights are
    skipped) or names with ``wₙ = 1``. Each product is summed a slice of :data:`INNER_ENTRIES` entries at a
    time (along the first dim, so strided tensors are not copied): no temporary of a parameter's size, and a
    rounding that does not depend on where the tensors lie in memory — a BLAS ``dot``'s does, on its alignment."""
    terms = weights.items() if isinstance(weights, Mapping) else zip(weights, repeat(1.0))
    total = None
    for name, w in terms:
        if not w:
            continue
        x, y = a[name], b[name]
        rows = max(1, INNER_ENTRIES // max(1, x[0].numel())) if x.dim() else 1
        parts = zip(x.split(rows), y.split(rows)) if x.dim() else [(x, y)]
        term = w * sum((p * q).sum().double() for p, q in parts)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), dtype=torch.float64, device=next(iter(a.values())).device if a else None)
    return total
