"""Named phases of a step for ``torch.profiler``: each stage function is decorated with :func:`phase`, which
opens a ``record_function("kfac::<name>")`` range around the outermost call of any phase (a phase
called inside another — a decomposition inside a preconditioning — counts for the outer one), so a
profiled period splits into disjoint phases; what lies outside them is the step's own bookkeeping.
``benchmarks/bench_split.py`` draws the split. No-op under ``torch.compile``."""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

import torch

PHASES = ("forward/backward", "statistics", "decompositions", "preconditioning", "update")
PREFIX = "kfac::"
F = TypeVar("F", bound=Callable)
_depth = threading.local()


def phase(name: str) -> Callable[[F], F]:
    """Decorate a stage function as phase ``name`` (one of :data:`PHASES`)."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling() or getattr(_depth, "n", 0):
                return fn(*args, **kwargs)
            _depth.n = 1
            try:
                with torch.profiler.record_function(PREFIX + name):
                    return fn(*args, **kwargs)
            finally:
                _depth.n = 0

        return wrapper  # type: ignore[return-value]

    return decorate
