r"""Checkpoints of the optimizer state as plain data, as ``torch.optim`` keeps them.

``KFAC.state_dict()["kfac"]`` is :func:`pack`'s entry: a format tag and version, the options the state
depends on, and the :class:`~kfac_func.optimizer.KFACState` with each of the library's state NamedTuples
written as a dict tagged with its type name (:func:`to_plain`). It holds only tensors, numbers, strings,
lists, dicts and ``None``, so ``torch.load(path, weights_only=True)`` reads it. :func:`unpack` checks the
tag and the options and rebuilds the state (:func:`from_plain`); :func:`check_params` and
:func:`check_state` compare its parameters and tensors against a model and a reference state. Every
check raises ``ValueError`` naming what differs, before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch
from torch import Tensor

from .averaging import MovingAverage
from .factors import EigenFactors, InverseFactors, KroneckerFactors
from .layers import stat_dtype
from .losses import Loss
from .optimizer import KFACState, Options
from .two_level import CoarseSpace

FORMAT = "kfac_func.KFAC"
VERSION = 1
TYPE = "__type__"  # the key that tags a dict as one of the state NamedTuples
STATE_TYPES: dict[str, type] = {
    t.__name__: t for t in (KFACState, MovingAverage, KroneckerFactors, EigenFactors, InverseFactors, CoarseSpace)
}
# the options the state's meaning or layout depends on (not the step sizes, periods or decays one may change);
# not ``output`` (it may be a function, not plain data; the layers it leaves are compared by :func:`check_state`)
# nor ``batch_dims`` (which dim of the inputs holds the examples: the same state for the same data)
STATE_OPTIONS = ("method", "damping_mode", "fisher", "loss", "reduce", "coarse_space", "coarse_vectors", "coarse_mode",
                 "combination", "adaptive", "decomposition_dtype", "lazy_factors", "max_factor_dim", "factor_sides")


def to_plain(tree: Any) -> Any:
    """``tree`` with every state NamedTuple replaced by ``{TYPE: its name, field: value, ...}``."""

    def node(x: Any) -> Any:
        if not optree.is_namedtuple(x):
            return x
        if STATE_TYPES.get(type(x).__name__) is not type(x):
            raise TypeError(f"{type(x).__name__} is not a state type of kfac_func: cannot write it as plain data")
        return {TYPE: type(x).__name__, **{f: to_plain(v) for f, v in zip(x._fields, x)}}

    return optree.tree_map(node, tree, is_leaf=optree.is_namedtuple, none_is_leaf=True)


def from_plain(obj: Any) -> Any:
    """Undo :func:`to_plain`."""
    def tagged(x: Any) -> bool:
        return isinstance(x, dict) and TYPE in x

    def node(x: Any) -> Any:
        if not tagged(x):
            return x
        cls = STATE_TYPES.get(x[TYPE])
        if cls is None or set(x) != {TYPE, *cls._fields}:
            raise ValueError(f"malformed kfac_func checkpoint: {x[TYPE]!r} with fields {sorted(set(x) - {TYPE})}")
        return cls(**{f: from_plain(x[f]) for f in cls._fields})

    return optree.tree_map(node, obj, is_leaf=tagged, none_is_leaf=True)


def _loss(loss: Loss | None) -> str:
    """``kind/reduction``, and ``/class_dim=c`` when the class dim is given (it picks the softmax's dim, so the
    Fisher the factors average; ``None`` is written as before it existed). No loss named is cross-entropy's
    mean: the only loss a step then takes (on class-index targets)."""
    loss = Loss("cross_entropy") if loss is None else loss
    plain = f"{loss.kind}/{loss.reduction}"
    return plain if loss.class_dim is None else f"{plain}/class_dim={loss.class_dim}"


def state_options(o: Options) -> dict[str, Any]:
    """The options in :data:`STATE_OPTIONS`, as plain values (the loss as :func:`_loss`, a dtype by name)."""
    plain = {"loss": _loss(o.loss), "decomposition_dtype": str(o.decomposition_dtype)}
    return {k: plain.get(k, getattr(o, k)) for k in STATE_OPTIONS}


def pack(state: KFACState | None, options: Options) -> dict[str, Any]:
    """The checkpoint entry of ``state`` (``None`` before the first step) made with ``options``."""
    return {"format": FORMAT, "version": VERSION, "options": state_options(options),
            "state": None if state is None else to_plain(state)}


def unpack(entry: Any, options: Options) -> KFACState | None:
    """The state of a :func:`pack` entry (its tensors cloned), after checking its format, version and that it
    was made with the same :data:`STATE_OPTIONS` as ``options``."""
    if entry is None or isinstance(entry, Mapping) and set(entry) == set(KFACState._fields):
        raise ValueError("this kfac_func checkpoint is in the old format (the state as NamedTuples, no options, "
                         "before format version 1): this version cannot check or load it")
    if not isinstance(entry, Mapping) or entry.get("format") != FORMAT:
        raise ValueError("the 'kfac' entry is not a kfac_func checkpoint (no format tag "
                         f"{FORMAT!r}); it was not saved by kfac_func.KFAC")
    if entry.get("version") != VERSION:
        raise ValueError(f"kfac_func checkpoint format version {entry.get('version')!r}; this version reads {VERSION}")
    saved, ours = entry.get("options"), state_options(options)
    saved = saved if isinstance(saved, Mapping) else {}
    for k, v in ours.items():
        if k not in saved or saved[k] != v:
            raise ValueError(f"the checkpoint was saved with {k}={saved.get(k, '<missing>')!r}, "
                             f"this optimizer has {k}={v!r}")
    state = from_plain(entry.get("state"))
    if state is not None and not isinstance(state, KFACState):
        raise ValueError("malformed kfac_func checkpoint: its 'state' is not a KFACState")
    return optree.tree_map(torch.clone, state)


def _compare(saved: Mapping[str, Any], expected: Mapping[str, Tensor], what: str, ours: str) -> None:
    """Same names, and per name a tensor of the same shape and dtype; ``what`` names an entry, ``ours`` the
    side of ``expected`` ("the model", "this optimizer")."""
    missing, extra = [k for k in expected if k not in saved], [k for k in saved if k not in expected]
    if missing or extra:
        parts = [f"{ours} has {', '.join(missing)}, the checkpoint does not"] if missing else []
        parts += [f"the checkpoint has {', '.join(extra)}, {ours} does not"] if extra else []
        raise ValueError(f"{what}s differ: " + "; ".join(parts))
    for k, e in expected.items():
        s = saved[k]
        if not isinstance(s, Tensor) or s.shape != e.shape or s.dtype != e.dtype:
            got = f"{tuple(s.shape)} {s.dtype}" if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"{what} {k}: the checkpoint has {got}, {ours} {tuple(e.shape)} {e.dtype}")


def check_params(state: KFACState, params: Mapping[str, Tensor]) -> None:
    """The state's velocity has one tensor per parameter of ``params`` (flat ``name → tensor``) of its shape,
    in the parameter's statistics dtype (at least float32)."""
    expected = {repr(n): p.new_empty(p.shape, dtype=stat_dtype(p.dtype)) for n, p in params.items()}
    _compare({repr(n): v for n, v in state.velocity.items()}, expected, "parameter", "the model")


def check_state(state: KFACState, reference: KFACState) -> None:
    """``state`` has ``reference``'s layers and, entry by entry (factors, decompositions, scalings, coarse
    space and matrix, velocity, counters), its tensors' shapes and dtypes."""
    layers, ref_layers = list(state.factors.value), list(reference.factors.value)
    if layers != ref_layers:
        raise ValueError(f"layers differ: the checkpoint has {layers}, this optimizer {ref_layers}")

    def name(a: optree.PyTreeAccessor) -> str:
        keys = [e.key for e in a if isinstance(e, optree.MappingEntry) and e.key in ref_layers]
        return a.codify("state") + (f" (layer {keys[0]!r})" if keys and a[0].field != "velocity" else "")

    def leaves(s: KFACState) -> dict[str, Tensor]:
        return {name(a): t for a, t in zip(*optree.tree_flatten_with_accessor(s)[:2])}

    _compare(leaves(state), leaves(reference), "state entry", "this optimizer")
    if optree.tree_structure(state) != optree.tree_structure(reference):
        raise ValueError("the checkpoint's state is structured differently from this optimizer's")
