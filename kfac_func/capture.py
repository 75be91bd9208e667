r"""Find a model's tracked layers and capture, in one forward and one batched backward, the loss, the
gradients and every tracked layer's inputs ``a`` and output gradients ``g``.

Layers are *found*, not declared: while the model runs, a :class:`~torch.overrides.TorchFunctionMode`
sees every call of ``F.linear`` and ``torch.conv2d`` and recognises the weight (and bias) by tensor
identity against the parameter pytree. In the capture pass it records the call's input and adds a zero
"probe" tensor to its output; the vector-Jacobian product with respect to the probes is exactly the
output gradient ``∂ℓ/∂s`` of every call — no hooks, one backward for all layers, and it composes with
``torch.func`` (``vmap`` over an ensemble of parameter sets included).

The backward is batched with ``vmap`` over ``1 + V`` cotangents: the true-loss gradient and the ``V``
curvature vectors of :func:`kfac_func.losses.cotangents`. Tracked weights are *not* differentiated:
their gradient is rebuilt from the layer input and the true output gradient with the kernels autograd
would use (``∇W = Σₙ,ₛ g aᵀ``; the native convolution weight backward), so the curvature vectors cost
only the input-gradient half of a backward. Parameters that no rule matches (*untracked*: norm layers, weights
used outside a linear/conv call, ...) are differentiated by autograd and reported in
:attr:`Plan.untracked`; :func:`kfac_func.precondition` passes their gradients through unchanged.

A weight used by several calls (weight sharing, tied layers of the same kind) is one layer whose
positions are the positions of all its calls (the *expand* rule: ``S`` counts every call).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode

from .layers import LINEAR, LayerCall, LayerSpec, conv2d_call, input_patches, output_grads, parameter_grads
from .losses import Loss, as_loss, cotangents

Model = nn.Module | Callable[[dict[str, Tensor], Any], Tensor]

_SIGNATURES = {
    F.linear: ("input", "weight", "bias"),
    torch.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass(frozen=True)
class Plan:
    """Static structure of a model on inputs of one shape: tracked layers (in call order of their
    first use), every tracked call, untracked parameters, and the probe shapes."""

    layers: dict[str, LayerSpec]
    calls: tuple[LayerCall, ...]
    untracked: tuple[str, ...]
    probes: tuple[tuple[torch.Size, torch.dtype, torch.device], ...] = field(repr=False)

    @property
    def tracked(self) -> tuple[str, ...]:
        """Names of the parameters owned by tracked layers."""
        return tuple(n for s in self.layers.values() for n in (s.weight, s.bias) if n is not None)


class Capture(NamedTuple):
    """What one capture pass returns (tensors only, so it can leave a ``vmap``).

    * ``loss``: the loss as torch computes it;
    * ``grads``: ``∂loss/∂params`` for every parameter, keyed like ``params``;
    * ``a``: per layer, homogeneous inputs ``(N, B, S, d_a)``;
    * ``g``: per layer, scaled output gradients ``(V, N, B, S, d_g)`` of the curvature vectors, such that
      the exact curvature block is ``Σ_{v,n} vec(Σₛ g āᵀ) vec(Σₛ g āᵀ)ᵀ``.

    ``a`` and ``g`` are empty when ``fisher=None``.
    """

    loss: Tensor
    grads: dict[str, Tensor]
    a: dict[str, Tensor]
    g: dict[str, Tensor]


def require_curvature(cap: Capture) -> None:
    """Raise a clear error when a capture was taken with ``fisher=None`` (no ``a``, ``g``)."""
    if not cap.g:
        raise ValueError("the capture has no curvature vectors: call capture(..., fisher='mc'|'exact'|'empirical')")


def as_function(model: Model) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """An ``nn.Module`` becomes ``f(params, x) = functional_call(model, params, (x,))``."""
    if isinstance(model, nn.Module):
        return lambda params, x: functional_call(model, params, (x,))
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a function f(params, x), got {type(model).__name__}")
    return model


def _bind(func: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    names = _SIGNATURES[func]
    bound = {n: _DEFAULTS.get(n) for n in names}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


class _TraceMode(TorchFunctionMode):
    """Records tracked calls and every other use of a parameter."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.calls: list[tuple[LayerCall, str, str | None]] = []
        self.probes: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self.other_uses: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight_name = None
        if func in _SIGNATURES:
            bound = _bind(func, args, kwargs)
            weight_name = self.names.get(id(bound["weight"]))
        if weight_name is None:
            for leaf in optree.tree_leaves((args, kwargs), none_is_leaf=True):
                if isinstance(leaf, Tensor) and id(leaf) in self.names:
                    self.other_uses.add(self.names[id(leaf)])
            return func(*args, **kwargs)
        layer = weight_name.removesuffix(".weight")
        x, weight, bias = bound["input"], bound["weight"], bound["bias"]
        if id(x) in self.names:
            self.other_uses.add(self.names[id(x)])
        if x.dtype != weight.dtype:
            raise ValueError(f"layer {layer!r}: input dtype {x.dtype} does not match weight dtype {weight.dtype}")
        if func is F.linear:
            call = LayerCall(layer, LINEAR)
        else:
            call = conv2d_call(layer, weight.shape[2:], bound["stride"], bound["padding"], bound["dilation"], bound["groups"])
        try:
            out = func(*args, **kwargs)
        except RuntimeError as err:
            raise ValueError(
                f"layer {layer!r} ({call.kind}, weight {tuple(weight.shape)}) cannot take input of shape "
                f"{tuple(x.shape)}: {err}"
            ) from err
        bias_name = self.names.get(id(bias)) if bias is not None else None
        self.calls.append((call, weight_name, bias_name))
        self.probes.append((out.shape, out.dtype, out.device))
        return out


_PLANS: "weakref.WeakKeyDictionary[Any, dict[tuple, Plan]]" = weakref.WeakKeyDictionary()


def _signature(params: dict[str, Tensor], inputs: Any) -> tuple:
    leaves = optree.tree_leaves(inputs)
    shapes = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else repr(t) for t in leaves)
    return shapes, tuple((n, tuple(p.shape), p.dtype) for n, p in params.items())


def trace(model: Model, params: dict[str, Tensor], inputs: Any) -> Plan:
    """Run ``model`` once (no grad) to find its tracked layers; cached per model and input signature."""
    if not isinstance(params, dict) or not all(isinstance(p, Tensor) for p in params.values()):
        raise TypeError("params must be a dict mapping parameter names to tensors")
    key = _signature(params, inputs)
    try:
        cache = _PLANS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        cache = {}
    if key in cache:
        return cache[key]
    mode = _TraceMode({id(p): n for n, p in params.items()})
    with torch.no_grad(), mode:
        out = as_function(model)(params, inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return one tensor (the loss's input), got {type(out).__name__}")
    plan = _make_plan(params, mode)
    cache[key] = plan
    return plan


def _make_plan(params: dict[str, Tensor], mode: _TraceMode) -> Plan:
    roles: dict[str, set[tuple[str, str]]] = {}
    specs: dict[str, LayerSpec] = {}
    bad = set(mode.other_uses)
    for call, weight, bias in mode.calls:
        spec = LayerSpec(call.layer, call.kind, weight, bias, call.groups)
        if specs.setdefault(call.layer, spec) != spec:
            bad.update(n for n in (weight, bias, specs[call.layer].bias) if n is not None)
        roles.setdefault(weight, set()).add((call.layer, "weight"))
        if bias is not None:
            roles.setdefault(bias, set()).add((call.layer, "bias"))
    bad.update(n for n, r in roles.items() if len(r) > 1)
    layers = {
        name: s for name, s in specs.items() if s.weight not in bad and (s.bias is None or s.bias not in bad)
    }
    keep = [i for i, (call, _, _) in enumerate(mode.calls) if call.layer in layers]
    owned = {n for s in layers.values() for n in (s.weight, s.bias) if n is not None}
    return Plan(
        layers=layers,
        calls=tuple(mode.calls[i][0] for i in keep),
        untracked=tuple(n for n in params if n not in owned),
        probes=tuple(mode.probes[i] for i in keep),
    )


class _CaptureMode(TorchFunctionMode):
    """Records tracked-call inputs and adds the probes to their outputs."""

    def __init__(self, plan: Plan, weights: dict[int, str], probes: tuple[Tensor, ...]):
        super().__init__()
        self.plan, self.weights, self.probes = plan, weights, probes
        self.inputs: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIGNATURES:
            bound = _bind(func, args, kwargs)
            layer = self.weights.get(id(bound["weight"]))
            if layer is not None:
                k = len(self.inputs)
                if k >= len(self.plan.calls) or self.plan.calls[k].layer != layer:
                    raise RuntimeError(
                        f"layer {layer!r} was called out of the traced order (call {k}); the model's layer "
                        "calls must not depend on the data"
                    )
                self.inputs.append(bound["input"])
                return func(*args, **kwargs) + self.probes[k]
        return func(*args, **kwargs)


def capture(
    model: Model,
    params: dict[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Loss | str,
    *,
    fisher: str | None = "mc",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    stats_examples: int | None = None,
) -> Capture:
    """Loss, gradients and per-layer ``(a, g)`` from one forward and one batched backward.

    ``model`` is an ``nn.Module`` (run through ``functional_call``) or ``f(params, inputs)``; ``fisher``
    is ``"mc"`` (``mc_samples`` targets drawn with ``generator``), ``"exact"``, ``"empirical"`` or
    ``None`` (gradients only). ``stats_examples``: keep ``(a, g)`` of the first rows only, a cheaper
    estimate of the same curvature (``g`` is rescaled by ``√(N/m)``); gradients always use the whole
    batch. Pure: no input is modified.
    """
    loss = as_loss(loss)
    plan = trace(model, params, inputs)
    f = as_function(model)
    tracked = {n: params[n] for n in plan.tracked}
    free = {n: params[n] for n in plan.untracked}
    probes = tuple(torch.zeros((), dtype=dtype, device=device).expand(shape) for shape, dtype, device in plan.probes)

    def forward(free: dict[str, Tensor], probes: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        merged = {n: tracked[n] if n in tracked else free[n] for n in params}
        weights = {id(merged[s.weight]): name for name, s in plan.layers.items()}
        mode = _CaptureMode(plan, weights, probes)
        with mode:
            out = f(merged, inputs)
        if len(mode.inputs) != len(plan.calls):
            raise RuntimeError(f"the model made {len(mode.inputs)} tracked layer calls, traced {len(plan.calls)}")
        return out, tuple(mode.inputs)

    out, vjp_fn, inputs_seen = vjp(forward, free, probes, has_aux=True)
    value, true_ct, curv_ct, scale = cotangents(loss, out, targets, fisher, mc_samples, generator)
    if curv_ct is None or fisher == "empirical":
        free_grads, probe_grads = vjp_fn(true_ct)
        probe_grads = tuple(p.unsqueeze(0) for p in probe_grads)
    else:
        free_grads, probe_grads = vmap(vjp_fn)(torch.cat([true_ct.unsqueeze(0), curv_ct]))
        free_grads = optree.tree_map(lambda t: t[0], free_grads)

    grads = dict(free_grads)
    a: dict[str, list[Tensor]] = {name: [] for name in plan.layers}
    g: dict[str, list[Tensor]] = {name: [] for name in plan.layers}
    for call, x, pg in zip(plan.calls, inputs_seen, probe_grads):
        spec = plan.layers[call.layer]
        has_bias = spec.bias is not None
        for name, grad in zip((spec.weight, spec.bias), parameter_grads(call, x, pg[0], params[spec.weight], has_bias)):
            if name is not None:
                grads[name] = grads[name] + grad if name in grads else grad
        if fisher is None:
            continue
        n = x.shape[0]
        m = n if stats_examples is None else min(stats_examples, n)
        # rescale so that factors from m rows estimate the full-batch curvature
        gs = pg[:, :m] / scale**0.5 if fisher == "empirical" else pg[1:, :m]
        a[call.layer].append(input_patches(call, x[:m], has_bias))
        g[call.layer].append(output_grads(call, gs * (n / m) ** 0.5 if m != n else gs))
    if fisher is None:
        return Capture(value, {n: grads[n] for n in params}, {}, {})
    cat = lambda parts, dim: torch.cat(parts, dim) if len(parts) > 1 else parts[0]  # noqa: E731
    return Capture(
        value,
        {n: grads[n] for n in params},
        {name: cat(parts, 2) for name, parts in a.items()},
        {name: cat(parts, 3) for name, parts in g.items()},
    )
