"""The registration table: which parameter belongs to which tracked layer, with what curvature block,
and why any parameter falls back to identity preconditioning."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from .capture import Model, trace
from .layers import NORMS, weight_matrix
from .tree import PyTree, flatten


class Entry(NamedTuple):
    """One parameter: its layer and kind (empty when untracked), curvature block, and ``reason`` (empty
    when tracked)."""

    parameter: str
    shape: tuple[int, ...]
    layer: str
    kind: str
    block: str
    reason: str


class Registration(NamedTuple):
    """Every parameter of a model, in the order of its flattened parameters (:mod:`kfac_func.tree`);
    ``str()`` gives the table."""

    entries: tuple[Entry, ...]

    @property
    def fallbacks(self) -> dict[str, str]:
        """Untracked parameter → reason."""
        return {e.parameter: e.reason for e in self.entries if not e.layer}

    def __str__(self) -> str:
        rows = [("parameter", "shape", "layer", "kind", "curvature block")]
        for e in self.entries:
            status = e.block if e.layer else f"identity fallback: {e.reason}"
            rows.append((e.parameter, "×".join(map(str, e.shape)) or "scalar", e.layer or "—", e.kind or "—", status))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        tracked = sum(1 for e in self.entries if e.layer)
        lines.append(f"{tracked} of {len(self.entries)} parameters tracked")
        return "\n".join(lines)


def describe(model: Model, inputs: Any, params: PyTree | None = None) -> Registration:
    """The registration table of ``model`` on ``inputs`` (``params``, any pytree, default to a module's
    parameters); parameters are named by their paths."""
    if params is None:
        if not isinstance(model, nn.Module):
            raise TypeError("describe(f, inputs) of a function model needs params")
        params = {n: p.detach() for n, p in model.named_parameters()}
    plan = trace(model, params, inputs)
    params = flatten(params)[0]
    owner = {}
    for name, spec in plan.layers.items():
        blocks, d_g, d_a = weight_matrix(spec, params[spec.weight], params[spec.bias] if spec.bias else None).shape
        if spec.kind in NORMS:
            block = f"full {d_g}×{d_g} (scale and shift)"
        else:
            a = f"diagonal A {d_a}" if spec.diagonal_a else f"A {d_a}×{d_a}"
            block = f"G {d_g}×{d_g} ⊗ {a}" + (f", {blocks} groups" if blocks > 1 else "")
            if spec.rows is not None:
                block += f" (rows {spec.rows[0]}:{spec.rows[1]})"
        for p in (spec.weight, spec.bias):
            if p is not None:
                owner.setdefault(p, []).append((name, spec.kind, block))
    entries = []
    for n, p in params.items():
        layers = owner.get(n, [])
        entries.append(Entry(
            n, tuple(p.shape), ", ".join(dict.fromkeys(l for l, _, _ in layers)),
            ", ".join(dict.fromkeys(k for _, k, _ in layers)), "; ".join(b for _, _, b in layers),
            plan.reasons.get(n, ""),
        ))
    return Registration(tuple(entries))
