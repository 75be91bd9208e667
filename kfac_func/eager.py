"""Functions that run outside ``torch.compile``'s graphs — host reads, writes into the model — marked without
importing torch's compiler when kfac_func is imported (``torch.compiler.disable`` imports it: about a second).

:func:`eager` marks a function; :func:`install`, called when an optimizer is built (before any of its steps can
be compiled), wraps each marked function in ``torch.compiler.disable``. Until then a marked function is the
plain function."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)
_MARKED: list[tuple[Callable, Callable]] = []


def eager(fn: F) -> F:
    """``fn``, run through ``torch.compiler.disable(fn)`` once :func:`install` has run."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (call.disabled or fn)(*args, **kwargs)

    call.disabled = None
    _MARKED.append((call, fn))
    return call  # type: ignore[return-value]


def install() -> None:
    """Wrap every marked function in ``torch.compiler.disable`` (once)."""
    for call, fn in _MARKED:
        if call.disabled is None:
            call.disabled = torch.compiler.disable(fn)
