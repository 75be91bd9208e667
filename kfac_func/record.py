r"""Curvature statistics from the user's own forward and backward — the ``torch.optim`` flows
(``loss.backward(); opt.step()``, ``opt.step(closure)``) and :class:`kfac_func.Preconditioner`.

While a module with a :class:`Recorder` runs forward with gradients enabled, the capture's layer mode
(:mod:`kfac_func.capture`, without probes) sees every tracked layer call and records its input and
output; nothing in the forward changes. The output gradients of the curvature vectors come from

* ``fisher="empirical"``: the user's own ``backward`` (a hook on each recorded output): the gradient of
  the loss ``L = R Σₙ ℓₙ`` as it was backpropagated, rescaled to ``√R ∇ℓₙ`` (``R`` of the loss option over
  every example recorded since the last step, all counted: class-index targets are not seen, so
  ``ignore_index`` cannot be honoured; and divided by the ``GradScaler`` scale when one is given);
* ``"mc"`` / ``"exact"``: :meth:`Recorder.curvature_backward` on the tensor the loss reads (the model output,
  or whatever the user computed from it: ``logits.view(-1, V)``), after the forward and before
  ``loss.backward()`` frees the graph: one ``autograd.grad`` per curvature vector of
  :func:`kfac_func.losses.cotangents` (MC targets drawn with the optimizer's key) from that tensor to the
  recorded layer outputs only — the input-gradient half of a backward, as the hook-based K-FAC libraries
  do it. In ``step(closure)`` it runs by itself when the forward ends, on the output ``output=`` picks.

The model may be called with any arguments (``model(x, hidden)``, ``model(input_ids=..., attention_mask=...)``)
and return any structure; the examples of each layer are found as for the functional step
(:mod:`kfac_func.batching`, with the optimizer's ``batch_dims``). A layer whose input is shared by all examples
(a position embedding of ``arange(T)``) has its output expanded to the batch — a view, the forward's values
unchanged — so that each example's output gradient is seen.

Several forwards before one step (gradient accumulation over micro-batches) are one batch: their rows are
concatenated, each forward's curvature weighted by its share of the examples (``R_total / R_k``), which is
exact when the micro-batch losses are scaled to a mean over all of them — the usual ``loss / k``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .batching import Layout, batch_first, batch_first_loss, batched_shape, unbatch_first
from .calls import Args, ModelIO, batch_size, select
from .capture import Capture, Plan, _CaptureMode, layer_statistics, trace
from .layers import parameter_grads, split_weight_matrix, weight_matrix
from .losses import NAME_THE_LOSS, Loss, cotangents


class _Hook:
    """A module hook calling a :class:`Recorder` method through a weak reference. A copy of the module gets a
    hook that does nothing — ``deepcopy(model)`` neither copies the optimizer nor is recorded by it; a copied
    optimizer registers hooks on its own copy of the model (:meth:`Recorder.__setstate__`)."""

    def __init__(self, recorder: Recorder, method: str):
        self._ref, self._method = weakref.ref(recorder), method

    def __call__(self, *args: Any) -> None:
        recorder = self._ref() if self._ref is not None else None
        if recorder is not None:
            getattr(recorder, self._method)(*args)

    def __reduce__(self) -> tuple:
        return _dead_hook, ()


def _dead_hook() -> _Hook:
    hook = _Hook.__new__(_Hook)
    hook._ref, hook._method = None, ""
    return hook


class _RecordMode(_CaptureMode):
    """The capture's layer mode on the live parameters: records each tracked call's output (no probe) and
    hooks its gradient in the user's backward."""

    def __init__(self, plan: Plan, params: dict[str, Tensor], hook: bool, examples: int):
        super().__init__(plan, params, ())
        self.outputs: list[Tensor] = []
        self.grads: dict[int, Tensor] = {}
        self.hook, self.listening, self.examples = hook, True, examples
        self.tied = {k for k, call in enumerate(plan.calls) if call.layer in plan.tied}  # their shares of ∇

    def recorded(self, k: int, out: Tensor) -> Tensor:
        layout = self.plan.layouts[k]
        if layout.shared:  # shared by all examples: each example's gradient is seen on its own rows
            out = out.expand(batched_shape(self.plan.probes[k][0], layout, self.examples))
        self.outputs.append(out)
        if (self.hook or k in self.tied) and out.requires_grad:
            out.register_hook(lambda g, k=k: self._store(k, g))
        return out

    def _store(self, k: int, g: Tensor) -> None:
        if self.listening:  # not during the curvature backward
            self.grads[k] = g.detach() + self.grads[k] if k in self.grads else g.detach()


@dataclass
class _Forward:
    """One recorded forward: its plan, layer mode (inputs, outputs, hooked gradients), the output the loss
    reads (``None`` with the reason in ``unreadable`` when ``output=`` could not pick it), the curvature
    vectors' output gradients with their reduction scale and the tensor they started from (``mc``/``exact``)."""

    plan: Plan
    mode: _RecordMode
    output: Tensor | None
    unreadable: str = ""
    curvature: list[Tensor] | None = None
    scale: float = 1.0
    read: Tensor | None = None

    @property
    def examples(self) -> int:
        return self.mode.examples


class Recorder:
    """Records the statistics of a module's forwards (see the module docstring). ``key(inputs, k)`` gives the
    MC key of the ``k``-th curvature backward since the last step; ``wanted`` says whether the next step reads
    statistics (when it does not, forwards are not recorded and the curvature backward is skipped)."""

    def __init__(self, model: nn.Module, loss: Loss | None, fisher: str, mc_samples: int,
                 key: Callable[[Any, int], Tensor], output: Any = None, batch_dims: Any = 0):
        self.model, self.loss, self.fisher, self.mc_samples, self.key = model, loss, fisher, mc_samples, key
        self.io = ModelIO(model, output, batch_dims)
        self.records: list[_Forward] = []
        self.wanted = True
        self.auto = False  # step(closure): the curvature backward runs when the forward ends
        self.inputs: Any = None  # the last forward's input and plan
        self.plan: Plan | None = None
        self.unrecorded = ""  # why the last forward could not be recorded
        self._open: tuple[_RecordMode, Plan] | None = None
        self._first = next(model.parameters(), None)  # swapped out while the module runs functionally
        self._register()

    def _register(self) -> None:
        self.model.register_forward_pre_hook(_Hook(self, "_enter"), with_kwargs=True)
        self.model.register_forward_hook(_Hook(self, "_exit"), with_kwargs=True, always_call=True)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (or pickle) holds no recorded forward (their graphs cannot be copied)."""
        return {**self.__dict__, "records": [], "_open": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The copy records its own model: ``deepcopy((model, opt))`` or ``deepcopy(opt)``."""
        self.__dict__.update(state)
        self._register()

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or self._open is not None:
            return
        if next(module.parameters(), None) is not self._first:
            return  # a functional call (torch.func.functional_call, any optimizer's pure step): not the user's forward
        inputs = args[0] if len(args) == 1 and not kwargs else Args(*args, **kwargs)
        params = dict(module.named_parameters())
        try:
            plan = trace(self.io, {n: p.detach() for n, p in params.items()}, inputs)
        except Exception as err:  # the user's forward goes on unrecorded; the step says why
            self.plan, self.unrecorded = None, f"{type(err).__name__}: {err}"
            return
        self.plan, self.inputs, self.unrecorded = plan, inputs, ""
        if not (self.wanted or plan.tied):  # a tied weight's shares of the gradient are read every step
            return
        mode = _RecordMode(plan, {n: params[n] for n in plan.tracked}, self.fisher == "empirical",
                           batch_size(inputs, self.io.batch_dims))
        mode.__enter__()
        self._open = (mode, plan)

    def _exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._open is None:
            return
        mode, plan = self._open
        mode.__exit__(None, None, None)
        self._open = None
        if len(mode.inputs) != len(plan.calls):
            return  # the forward failed: its error is the user's, nothing to record
        try:
            picked, unreadable = select(output, self.io.output), ""
        except ValueError as err:  # the user's forward goes on; a step that needs the output says why
            picked, unreadable = None, str(err)
        self.records.append(_Forward(plan, mode, picked, unreadable))
        if self.auto and self.fisher != "empirical":
            self.curvature_backward(self._readable(self.records[-1]))

    @staticmethod
    def _readable(rec: _Forward) -> Tensor:
        if rec.output is None:
            raise ValueError(f"kfac_func: {rec.unreadable}")
        return rec.output

    def curvature_backward(self, output: Tensor) -> None:
        """The Fisher's backward passes from ``output`` — the tensor the loss reads, computed from the last
        forward (its logits, or ``logits.view(-1, V)``) — to the recorded layer outputs."""
        if not self.wanted:
            return  # the next step reads no statistics: nothing to do
        if not self.records:
            raise ValueError("curvature_backward needs a tensor computed by the model's last forward (run with "
                             "gradients on)")
        rec = self.records[-1]
        if self.fisher == "empirical" or rec.curvature is not None:
            return
        if not isinstance(output, Tensor) or output.grad_fn is None:
            raise ValueError(f"curvature_backward needs the tensor the loss reads, computed by the model's last forward "
                             f"with gradients on; got {type(output).__name__}"
                             + (" without a graph" if isinstance(output, Tensor) else ""))
        loss = self._named_loss()
        out = output.detach()
        # the exact Fisher's columns must not couple two rows of one example: where the examples are matters
        layout = _layout(out, output, rec) if self.fisher == "exact" else Layout()
        # the targets only set the scale R (all counted) and the class weights (none ignored): stand-ins
        loss, first, stand_in = batch_first_loss(loss, out, loss.stand_in_targets(out), layout, rec.examples)
        _, _, vectors, scale = cotangents(loss, first, stand_in, self.fisher, self.mc_samples,
                                          self.key(self.inputs, len(self._used(self.records))))
        vectors = unbatch_first(vectors, layout, 1)
        outs = [o for o in rec.mode.outputs if o.requires_grad]
        rec.mode.listening = False
        try:
            grads = [torch.autograd.grad(output, outs, v, retain_graph=True, allow_unused=True) for v in vectors]
        finally:
            rec.mode.listening = True
        if outs and all(g is None for g in grads[0]):
            raise ValueError("curvature_backward: the tensor passed does not depend on the model's last forward")
        grads = [[torch.zeros_like(o) if g is None else g for g, o in zip(gs, outs)] for gs in grads]
        stacked = iter(torch.stack(gs).detach() for gs in zip(*grads)) if grads else iter(())
        rec.curvature = [next(stacked) if o.requires_grad else torch.zeros((len(vectors),) + o.shape, dtype=o.dtype)
                         for o in rec.mode.outputs]
        rec.scale, rec.read = float(scale), out

    def capture(self, grads: dict[str, Tensor], loss: Tensor, *, statistics: bool, stats_fraction: float = 1.0,
                grad_scale: float = 1.0, share: float = 1.0, compact: Mapping[str, bool] | None = None) -> tuple[Capture, Plan]:
        """The :class:`Capture` of the forwards since the last step (then forgotten), with ``grads`` and
        ``loss`` as given; ``g`` carries ``√share`` (this rank's weight in a data-parallel sum); ``compact``: layers
        whose statistics only the factors read (:func:`~kfac_func.capture.layer_statistics`)."""
        records, self.records = self.records, []
        if self._open is not None:
            raise RuntimeError("kfac_func: step() was called inside the model's forward")
        plan = self.require_forward(statistics and not records)
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        uses = _tied_uses(records, grads, params)
        if not statistics:
            return Capture(loss, grads, {}, {}, uses=uses), plan
        records = self._used(records)
        if not records:
            if self.fisher == "empirical":
                raise ValueError("kfac_func: no recorded forward had a backward before step(); the empirical "
                                 "Fisher reads the output gradients of the user's loss.backward()")
            raise ValueError(
                f"kfac_func: fisher={self.fisher!r} needs its backward from the model output: call "
                "opt.curvature_backward(output) after the forward and before loss.backward() (or use "
                "step(closure), step(inputs, targets), or fisher='empirical')"
            )
        total = sum(_terms(self._named_loss(), r.read if r.read is not None else self._readable(r)) for r in records)
        total_scale = 1.0 if self._named_loss().reduction == "sum" else 1.0 / total
        parts = []
        for r in records:
            if self.fisher == "empirical":
                factor = 1.0 / (grad_scale * total_scale**0.5)
                vectors = [(r.mode.grads[k] if k in r.mode.grads else torch.zeros_like(o)).unsqueeze(0) * factor
                           for k, o in enumerate(r.mode.outputs)]
            else:
                weight = (total_scale / r.scale) ** 0.5  # this forward's share of the whole batch's R
                vectors = [v * weight for v in r.curvature]
            examples = math.ceil(stats_fraction * r.examples) if stats_fraction < 1 else None
            inputs, vectors = r.plan.inputs_first(r.examples, r.mode.inputs), r.plan.grads_first(r.examples, vectors)
            parts.append(layer_statistics(r.plan, params, inputs, vectors, examples, compact=compact))
        a = {n: torch.cat([p[0][n] for p in parts]) for n in plan.layers}
        g = {n: torch.cat([p[1][n] for p in parts], 1) * share**0.5 for n in plan.layers}
        return Capture(loss, grads, a, g, uses=uses), plan

    def _named_loss(self) -> Loss:
        if self.loss is None:
            raise ValueError(f"kfac_func: {NAME_THE_LOSS}")
        return self.loss

    def require_forward(self, missing: bool = False) -> Plan:
        """The last forward's plan; an error when there was none (or ``missing``: none since the last step)."""
        if self.plan is None or missing:
            raise ValueError(
                "kfac_func: no forward of the model was recorded since the last step: run the forward and "
                "backward with gradients enabled before step() (or pass step(inputs, targets))"
                + (f"; the last forward could not be recorded: {self.unrecorded}" if self.unrecorded else "")
            )
        return self.plan

    def _used(self, records: list[_Forward]) -> list[_Forward]:
        """The forwards whose statistics exist: with a backward through them (empirical) or a curvature backward
        (MC, exact). Others — an evaluation forward with gradients on, say — contributed to no gradient."""
        if self.fisher == "empirical":
            return [r for r in records if r.mode.grads]
        return [r for r in records if r.curvature is not None]

    @property
    def examples(self) -> int:
        """Examples of the forwards with statistics since the last step."""
        return sum(r.examples for r in self._used(self.records))


def _tied_uses(records: list[_Forward], grads: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each use's share of a tied weight's gradient (:attr:`Capture.uses`) from the recorded inputs and the hooked
    output gradients of its calls, scaled so that the shares add up along the gradient the step uses (``p.grad``
    as the user left it: clipping, ``GradScaler``'s scale and averaging over ranks are such factors)."""
    shares: dict[str, Tensor] = {}
    for r in records:
        for k in sorted(r.mode.tied & set(r.mode.grads)):
            call, layout = r.plan.calls[k], r.plan.layouts[k]
            spec = r.plan.layers[call.layer]
            x = batch_first(r.mode.inputs[k], layout, r.examples)
            g = batch_first(r.mode.grads[k], layout, r.examples, grad=True)
            share = weight_matrix(spec, *parameter_grads(call, x, g, params[spec.weight], spec.bias is not None))
            shares[call.layer] = shares[call.layer] + share if call.layer in shares else share
    if not shares:
        return shares
    layers = records[-1].plan.layers
    for weight in {layers[n].weight for n in shares}:
        mine = [n for n in shares if layers[n].weight == weight]
        total = sum(split_weight_matrix(layers[n], shares[n], params)[weight] for n in mine)
        scale = (grads[weight] * total).sum() / (total * total).sum().clamp_min(torch.finfo(total.dtype).tiny)
        for n in mine:
            shares[n] = shares[n] * scale
    return shares


def _layout(out: Tensor, output: Tensor, rec: _Forward) -> Layout:
    """Where the examples are in ``output``, the tensor passed to ``curvature_backward``: the trace's layout for
    the model's output; batch-first when its leading dim is the examples; for the output's leading dims
    flattened into rows (``logits.view(-1, V)``), example-major or -minor as the output's examples dim is first
    or last of them. Anything else is an error: no layout is guessed."""
    model_out, n = rec.output, rec.examples
    if output is model_out:
        return rec.plan.output_layout
    if out.dim() and out.shape[0] == n:
        return Layout()
    lay = rec.plan.output_layout
    flattened = (model_out is not None and out.dim() == 2 and model_out.dim() > 2 and out.shape[-1] == model_out.shape[-1]
                 and out.numel() == model_out.numel() and lay.rows == 1)
    if flattened and lay.dim in (0, model_out.dim() - 2):
        return Layout(0, out.shape[0] // n, major=lay.dim == 0)
    raise ValueError(
        f"curvature_backward with fisher='exact': cannot tell which rows of a tensor of shape {tuple(out.shape)} "
        f"belong to which of the {n} examples; pass the model's output, a tensor whose dim 0 is the examples, or the "
        "output's leading dims flattened (output.view(-1, V))"
    )


def _terms(loss: Loss, output: Tensor) -> int:
    """How many terms a mean of ``loss`` runs over on ``output``, every target counted."""
    return loss.terms_of(output)
