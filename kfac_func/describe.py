"""The registration table: which parameter belongs to which tracked layer, with what curvature block (each
factor side as the size policy holds it, :mod:`kfac_func.layout`), why any parameter falls back to identity
preconditioning, and what the K-FAC state costs in bytes per layer and in total."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
from torch import Tensor, nn

from . import sides
from .capture import Model, trace
from .layers import NORMS, stat_dtype
from .layout import DEFAULT_MAX_FACTOR_DIM, Overrides, layer_dims, side_layout
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


class LayerEntry(NamedTuple):
    """One tracked layer: its sides as held, the bytes of one copy of its factors (``A`` and ``G``) and, when
    :func:`describe` was given a state, the bytes that state holds for it (averages, decompositions,
    E-KFAC scaling, coarse vectors; the velocity is per parameter and counted in the total only)."""

    layer: str
    kind: str
    a: str
    g: str
    factor_bytes: int
    state_bytes: int | None


class Registration(NamedTuple):
    """Every parameter of a model, in the order of its flattened parameters (:mod:`kfac_func.tree`), and every
    tracked layer; ``param_bytes`` and, given a state, its ``state_bytes`` in total. ``str()`` gives the tables."""

    entries: tuple[Entry, ...]
    layers: tuple[LayerEntry, ...] = ()
    param_bytes: int = 0
    state_bytes: int | None = None

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
        if self.layers:
            lines += ["", _table([("layer", "A", "G", "factors", "state")] + [
                (e.layer, e.a, e.g, _mb(e.factor_bytes), "—" if e.state_bytes is None else _mb(e.state_bytes))
                for e in self.layers])]
            total = sum(e.factor_bytes for e in self.layers)
            lines.append(f"factors {_mb(total)} ({total / self.param_bytes:.2f}× the parameters' "
                         f"{_mb(self.param_bytes)})")
            if self.state_bytes is not None:
                lines.append(f"K-FAC state {_mb(self.state_bytes)} ({self.state_bytes / self.param_bytes:.2f}× the "
                             "parameters; velocity, counters and key included)")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def describe(model: Model, inputs: Any, params: PyTree | None = None, *,
             max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM, factor_sides: Overrides | None = None,
             state: Any = None, output: Any = None, batch_dims: Any = 0) -> Registration:
    """The registration table of ``model`` on ``inputs`` (``params``, any pytree, default to a module's
    parameters); parameters are named by their paths. Each factor side is shown as the size policy
    (``max_factor_dim``, ``factor_sides``: those of the optimizer) holds it; with ``state`` (a
    :class:`~kfac_func.KFACState`, e.g. ``KFAC.kfac_state``) the bytes it holds per layer and in total.
    ``inputs`` may be :class:`~kfac_func.Args`; ``output`` and ``batch_dims`` as the optimizer's."""
    if params is None:
        if not isinstance(model, nn.Module):
            raise TypeError("describe(f, inputs) of a function model needs params")
        params = {n: p.detach() for n, p in model.named_parameters()}
    plan = trace(model, params, inputs, output=output, batch_dims=batch_dims)
    params = flatten(params)[0]
    dims = layer_dims(plan.layers, params)
    layout = side_layout(dims, plan.layers, max_factor_dim, factor_sides)
    held = _layer_bytes(state, plan.layers) if state is not None else {}
    owner, held_sides = {}, []
    for name, spec in plan.layers.items():
        blocks, d_g, d_a = dims[name]
        side_a, side_g = layout[name]
        a, g = side_a.describe("A", d_a), side_g.describe("G", d_g)
        like = params[spec.weight].to("meta")  # the factors as the optimizer makes them, without their memory
        dtype = stat_dtype(like.dtype)
        factor_bytes = sum(t.numel() * t.element_size() for t in (sides.zeros(*side_a, blocks, d_a, like, dtype),
                                                                  sides.zeros(*side_g, blocks, d_g, like, dtype)))
        held_sides.append(LayerEntry(name, spec.kind, a, g, factor_bytes, held.get(name)))
        if spec.kind in NORMS and side_g.kind == "dense":
            block = f"full {d_g}×{d_g} (scale and shift)"
        else:
            block = f"{g} ⊗ {a}" + (f", {blocks} groups" if blocks > 1 else "")
            if spec.rows is not None:
                block += f" (rows {spec.rows[0]}:{spec.rows[1]})"
        if name in plan.tied:
            block += " (a use of a tied weight: the uses' updates add up)"
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
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    total = None if state is None else sum(t.numel() * t.element_size() for t in optree.tree_leaves(state))
    return Registration(tuple(entries), tuple(held_sides), param_bytes, total)


def _layer_bytes(state: Any, layers: dict) -> dict[str, int]:
    """Bytes of the state's tensors filed under each layer's name (the velocity, per parameter, left out)."""
    out = dict.fromkeys(layers, 0)
    for accessor, t in zip(*optree.tree_flatten_with_accessor(state)[:2]):
        if isinstance(t, Tensor) and accessor[0].field != "velocity":
            keys = [e.key for e in accessor if isinstance(e, optree.MappingEntry) and e.key in out]
            if keys:
                out[keys[0]] += t.numel() * t.element_size()
    return out
