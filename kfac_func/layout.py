r"""The size policy: how each side (``A``, ``G``) of each layer's Kronecker factor is held (:mod:`kfac_func.sides`).

A dense side of width ``d`` costs ``d²`` memory and ``d³`` to decompose; at a transformer's vocabulary
(50 257) one ``G`` is 10 GB. The rule, per side of width ``d`` whose layer's other side is ``o`` wide, with
``m = max_factor_dim``:

1. ``d ≤ m``: **dense** (exact K-FAC; the default ``m`` = 2048 keeps every layer of ordinary width dense);
2. else **blocks**: block-diagonal, ``k = ⌈d / w⌉`` blocks as equal as possible (width ``⌈d / k⌉``) with
   ``w = min(m, o)``: a blocked side never holds more numbers than the layer's weight ``d·o``, and costs
   ``d·w²`` to decompose instead of ``d³``;
3. else, when ``w`` < :data:`MIN_BLOCK` (the other side is thin: blocks that small are all but diagonal
   and cost more than they give), **diagonal**.

Embeddings keep their diagonal ``A`` (exact for one-hot inputs). ``factor_sides`` overrides the rule per
layer and side — ``{"head": {"G": "diagonal"}, "blocks.0.linear1": {"A": 512}}`` — with ``"dense"``,
``"diagonal"``, ``"identity"`` (``(tr M / d) I``: the side is not preconditioned, only its scale kept) or an
int (blocks of at most that width; ``≥ d`` is dense). :func:`kfac_func.describe` shows each side's choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from .layers import LayerSpec, weight_matrix

DEFAULT_MAX_FACTOR_DIM = 2048
MIN_BLOCK = 32
KINDS = ("dense", "blocks", "diagonal", "identity")
SideChoice = str | int
Overrides = Mapping[str, Mapping[str, SideChoice]]


class Side(NamedTuple):
    """One side's kind and block width (``d`` dense, 1 diagonal or identity)."""

    kind: str
    block: int

    def describe(self, name: str, d: int) -> str:
        """E.g. ``"A 769×769"``, ``"G 50257 in 66 blocks of ≤762"``, ``"diagonal A 50257"``."""
        if self.kind == "dense":
            return f"{name} {d}×{d}"
        if self.kind == "blocks":
            k = math.ceil(d / self.block)
            return f"{name} {d} in {k} blocks of {'' if k * self.block == d else '≤'}{self.block}"
        return f"{self.kind} {name} {d}"


def blocks(d: int, width: int) -> Side:
    """Blocks of at most ``width``, as equal as possible (dense when one block covers ``d``)."""
    if width >= d:
        return Side("dense", d)
    return Side("blocks", math.ceil(d / math.ceil(d / width)))


def rule(d: int, other: int, max_factor_dim: int) -> Side:
    """The default choice for a side of width ``d`` whose other side is ``other`` wide."""
    if d <= max_factor_dim:
        return Side("dense", d)
    width = min(max_factor_dim, other)
    return blocks(d, width) if width >= MIN_BLOCK else Side("diagonal", 1)


def _override(layer: str, side: str, d: int, choice: SideChoice, diagonal_input: bool) -> Side:
    if isinstance(choice, bool) or not (isinstance(choice, int) and choice >= 1 or choice in ("dense", "diagonal",
                                                                                               "identity")):
        raise ValueError(f"factor_sides[{layer!r}][{side!r}] = {choice!r}: expected 'dense', 'diagonal', 'identity' "
                         "or a block width ≥ 1")
    if diagonal_input and side == "A" and choice not in ("diagonal", "identity"):
        raise ValueError(f"factor_sides[{layer!r}]['A'] = {choice!r}: an embedding's input factor is diagonal (exact "
                         "for one-hot inputs); it can be 'diagonal' or 'identity'")
    if isinstance(choice, int):
        return blocks(d, choice)
    return Side(choice, d if choice == "dense" else 1)


def layer_dims(layers: Mapping[str, LayerSpec], params: Mapping[str, Tensor]) -> dict[str, tuple[int, int, int]]:
    """Each layer's weight-matrix dims ``(B, d_g, d_a)`` from the shapes of its parameters (on the meta device:
    nothing is copied)."""
    meta = lambda name: params[name].to("meta") if name is not None else None  # noqa: E731
    return {name: tuple(weight_matrix(s, meta(s.weight), meta(s.bias)).shape) for name, s in layers.items()}


def side_layout(
    dims: Mapping[str, tuple[int, int, int]],
    layers: Mapping[str, LayerSpec] | None = None,
    max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
    factor_sides: Overrides | None = None,
) -> dict[str, tuple[Side, Side]]:
    """``(A side, G side)`` per layer from its weight-matrix dims ``(B, d_g, d_a)``; ``layers`` (the plan's)
    marks embeddings, whose ``A`` stays diagonal."""
    if isinstance(max_factor_dim, bool) or not isinstance(max_factor_dim, int) or max_factor_dim < 1:
        raise ValueError(f"max_factor_dim must be an int ≥ 1, got {max_factor_dim!r}")
    factor_sides = factor_sides or {}
    unknown = sorted(set(factor_sides) - set(dims))
    if unknown:
        raise ValueError(f"factor_sides names unknown layers {unknown}; the layers are {sorted(dims)}")
    out = {}
    for name, (_, d_g, d_a) in dims.items():
        diagonal_input = layers is not None and layers[name].diagonal_a
        chosen = dict(factor_sides.get(name, {}))
        wrong = sorted(set(chosen) - {"A", "G"})
        if wrong:
            raise ValueError(f"factor_sides[{name!r}] has keys {wrong}; the sides are 'A' and 'G'")
        a = Side("diagonal", 1) if diagonal_input else rule(d_a, d_g, max_factor_dim)
        g = rule(d_g, d_a, max_factor_dim)
        if "A" in chosen:
            a = _override(name, "A", d_a, chosen["A"], diagonal_input)
        if "G" in chosen:
            g = _override(name, "G", d_g, chosen["G"], False)
        out[name] = (a, g)
    return out
