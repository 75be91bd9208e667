r"""How a model is called and read: its arguments, which output the loss reads, and where the examples are.

Models are called as their code is written:

* ``inputs`` is one argument (a tensor or any pytree: ``model(inputs)``), or :class:`Args` for several
  positional and keyword arguments — ``Args(ids, hidden)``, ``Args(input_ids=ids, attention_mask=mask)`` —
  which calls ``model(*args, **kwargs)`` (a function model ``f(params, *args, **kwargs)``);
* ``output`` picks the tensor the loss reads from whatever the model returns (:func:`select`): by default the
  tensor itself, the first element of a tuple or list (``(logits, loss)``, ``(output, hidden)``) or the
  ``"logits"`` entry of a mapping or ``ModelOutput``; a key, an index, an attribute name or a function
  ``output(out) -> Tensor`` otherwise;
* ``batch_dims`` says which dim of each input leaf indexes the examples, as ``torch.func.vmap``'s ``in_dims``:
  an int for every leaf (default 0; 1 for sequence-first ``(T, N)`` inputs), or a pytree prefix of the inputs
  with an int or ``None`` (not batched: a mask shared by all examples) per leaf. With an int, a leaf whose size
  at that dim differs from the first leaf's (the batch size) is taken as not batched. ``None`` alone: the inputs
  are one example (a graph whose nodes interact through an adjacency matrix), every row a position of it.

Which dim of each *layer's* input holds the examples is then found from the dataflow, not from sizes
(:mod:`kfac_func.batching`): the trace runs the model on the batch and on the batch concatenated with itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch import Tensor

Selector = str | int | Callable[[Any], Tensor] | None
BatchDims = int | Any  # an int, or a pytree prefix of the inputs with int / None leaves


class Args:
    """The positional and keyword arguments of one model call: ``step(Args(x, mask=m), y)`` runs
    ``model(x, mask=m)``. A pytree node (optree), so transforms map over its tensors."""

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"Args({', '.join(parts)})"


optree.register_pytree_node(
    Args,
    lambda a: ((a.args, a.kwargs), None, ("args", "kwargs")),
    lambda _, children: Args(*children[0], **children[1]),
    namespace=optree.registry.__GLOBAL_NAMESPACE,  # every optree call sees it, as tuples and dicts
)


def call(fn: Callable, first: Any, inputs: Any) -> Any:
    """``fn(first, inputs)``, or ``fn(first, *args, **kwargs)`` for :class:`Args`."""
    if isinstance(inputs, Args):
        return fn(first, *inputs.args, **inputs.kwargs)
    return fn(first, inputs)


def positional(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call on ``inputs``."""
    return (inputs.args, inputs.kwargs) if isinstance(inputs, Args) else ((inputs,), {})


def select(out: Any, output: Selector = None) -> Tensor:
    """The tensor the loss reads from the model's return value ``out`` (see the module docstring)."""
    if callable(output):
        picked = output(out)
        how = f"output={getattr(output, '__name__', output)!r}"
    elif output is not None:
        how = f"output={output!r}"
        if isinstance(out, Mapping) or (isinstance(output, int) and isinstance(out, (tuple, list))):
            try:
                picked = out[output]
            except (KeyError, IndexError) as err:
                raise ValueError(f"{how}: the model's output {_describe(out)} has no such entry") from err
        elif isinstance(output, str) and hasattr(out, output):
            picked = getattr(out, output)
        else:
            raise ValueError(f"{how}: cannot pick that from the model's output {_describe(out)}")
    else:
        how = "the default output (the tensor, a tuple's first element or a mapping's 'logits')"
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping):
            if "logits" not in out:
                raise ValueError(f"the model returned {_describe(out)} without a 'logits' entry: pass output= (a key, "
                                 "index, attribute name or function) naming the tensor the loss reads")
            picked = out["logits"]
        elif isinstance(out, (tuple, list)) and out:
            picked = out[0]
        elif hasattr(out, "logits"):
            picked = out.logits
        else:
            raise ValueError(f"the model returned {_describe(out)}: pass output= (a key, index, attribute name or "
                             "function) naming the tensor the loss reads")
    if not isinstance(picked, Tensor):
        raise ValueError(f"{how} picked {_describe(picked)} from the model's output {_describe(out)}, not a tensor; "
                         "pass output= naming the tensor the loss reads")
    return picked


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(type(o).__name__ for o in out)})"
    return f"a {type(out).__name__}"


def batch_leaves(inputs: Any, batch_dims: BatchDims = 0) -> list[int | None]:
    """Per leaf of ``inputs`` (optree order, ``None`` a leaf), the dim that indexes the examples or ``None``."""
    leaves = optree.tree_leaves(inputs, none_is_leaf=True)
    if batch_dims is None:
        return [None] * len(leaves)
    if isinstance(batch_dims, int) and not isinstance(batch_dims, bool):
        dims = [batch_dims if isinstance(t, Tensor) and t.dim() > batch_dims else None for t in leaves]
        sized = [t.shape[d] for t, d in zip(leaves, dims) if d is not None]
        return [d if d is not None and t.shape[d] == sized[0] else None for t, d in zip(leaves, dims)]
    try:
        dims = optree.tree_broadcast_prefix(batch_dims, inputs, none_is_leaf=True)
    except ValueError as err:
        raise ValueError(f"batch_dims {batch_dims!r} is not a prefix of the inputs' structure: {err}") from err
    dims = optree.tree_leaves(dims, none_is_leaf=True)
    for t, d in zip(leaves, dims):
        if d is not None and not (isinstance(d, int) and isinstance(t, Tensor) and -t.dim() <= d < t.dim()):
            raise ValueError(f"batch_dims gives dim {d!r} for an input {_describe(t)}")
    return [None if d is None else d % t.dim() for t, d in zip(leaves, dims)]


def batch_size(inputs: Any, batch_dims: BatchDims = 0) -> int:
    """The number of examples in ``inputs`` (1 for ``batch_dims=None``); an error when no leaf is batched or two
    batched leaves disagree."""
    if batch_dims is None:
        return 1
    leaves = optree.tree_leaves(inputs, none_is_leaf=True)
    sizes = {t.shape[d] for t, d in zip(leaves, batch_leaves(inputs, batch_dims)) if d is not None}
    if len(sizes) != 1:
        what = "no input tensor has" if not sizes else f"the batched inputs disagree on ({sorted(sizes)})"
        raise ValueError(f"{what} a batch dim (batch_dims={batch_dims!r}); pass batch_dims= saying which dim of "
                         "each input indexes the examples (None for inputs shared by all examples)")
    return sizes.pop()


def doubled(inputs: Any, batch_dims: BatchDims = 0) -> Any:
    """``inputs`` with every batched leaf concatenated with itself along its batch dim (``2N`` examples)."""
    leaves, spec = optree.tree_flatten(inputs, none_is_leaf=True)
    dims = batch_leaves(inputs, batch_dims)
    out = [torch.cat([t, t], d) if d is not None else t for t, d in zip(leaves, dims)]
    return optree.tree_unflatten(spec, out)


def first_examples(inputs: Any, m: int, batch_dims: BatchDims = 0) -> Any:
    """``inputs`` restricted to their first ``m`` examples (unbatched leaves as they are)."""
    leaves, spec = optree.tree_flatten(inputs, none_is_leaf=True)
    dims = batch_leaves(inputs, batch_dims)
    out = [t.narrow(d, 0, m) if d is not None else t for t, d in zip(leaves, dims)]
    return optree.tree_unflatten(spec, out)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelIO:
    """A model with its :func:`select` ``output`` and ``batch_dims`` (see the module docstring)."""

    model: Any
    output: Selector = None
    batch_dims: BatchDims = 0


def model_io(model: Any, output: Selector = None, batch_dims: BatchDims = 0) -> ModelIO:
    """``model`` as a :class:`ModelIO` (one already is stays as it is when no option is given)."""
    if isinstance(model, ModelIO):
        if output is None and batch_dims == 0:
            return model
        model = model.model
    return ModelIO(model, output, batch_dims)
