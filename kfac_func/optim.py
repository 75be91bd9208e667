r"""A thin ``torch.optim.Optimizer`` adapter over the pure optimizer of :mod:`kfac_func.optimizer`.

:class:`KFAC` holds the model, ``torch.optim``'s parameter groups and the pure state
(:class:`~kfac_func.optimizer.KFACState`); each ``step(inputs, targets)`` passes the groups' ``lr``,
``momentum`` and ``weight_decay`` (so ``torch.optim.lr_scheduler`` works), calls the pure ``step`` and
writes the new parameters, gradients and BatchNorm running statistics back into the model. It holds no
algorithm of its own: the mathematics and every decision of a step are in
:func:`kfac_func.optimizer.kfac`. ``state_dict()`` carries the pure state (factors, decompositions,
scalings, coarse matrices, step counter, sampling key) as plain data (:mod:`kfac_func.checkpoint`), so
``torch.load(..., weights_only=True)`` reads it and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Collection, NamedTuple

import torch
from torch import Tensor, nn

from .eager import eager
from . import checkpoint, random
from .capture import NOT_USED, Model, Plan, trace
from .distributed import Communicator, DataParallel
from .optimizer import Hyper, KFACState, StepInfo, kfac
from .record import Recorder
from .tree import Spec, flatten


# what the flows that see only gradients (``loss.backward(); opt.step()``, ``Preconditioner``) use in place of
# the defaults that evaluate the model on the batch again, unless those options are given explicitly
GRADIENT_FLOW = {"adaptive": None, "damping_adaptation": False}


class Report(NamedTuple):
    """What a step chose, as Python numbers for logging: the loss before the step, the learning rate
    ``α`` and momentum ``μ`` applied (after any KL clip), the damping ``λ`` for the next step, the
    reduction ratio ``ρ`` (``None`` on steps without Levenberg–Marquardt: it is computed every
    ``damping_interval`` steps) and whether the step was rejected (or skipped for a non-finite value, which
    leaves the other fields NaN)."""

    loss: float
    alpha: float
    mu: float
    damping: float
    rho: float | None
    rejected: bool


class KFAC(torch.optim.Optimizer):
    """K-FAC, E-KFAC or two-level K-FAC for an ``nn.Module`` or a function ``f(params, x)``; ``options``
    are those of :func:`kfac_func.kfac` (``lr``, ``momentum`` and ``weight_decay`` become the defaults of
    the parameter groups).

    ``method``: ``"kfac"``, ``"ekfac"`` (scaling re-estimated every ``scale_period`` steps) or
    ``"two_level"`` (``coarse_space`` ``"nicolaides"``/``"spectral"`` with ``coarse_vectors`` per layer,
    ``coarse_mode`` ``"exact"``/``"kronecker"``, ``combination`` ``"additive"``/``"adef2"``/``"bnn"``,
    ``coarse_weights`` ``(ω₁, ω₂)`` for ``additive``; the multiplicative combinations capture the
    curvature on every step).

    ``reduce``: ``"auto"`` (Eschenhagen et al. 2023 per layer, :func:`~kfac_func.factors.default_reduce`:
    expand when the model output keeps positions, reduce when they are pooled), ``True``/``False`` for
    all layers, or a dict layer name → bool.

    ``adaptive``: ``"lr_momentum"`` (the default: ``α`` and ``μ`` from the quadratic model; the KL clip and
    the groups' ``lr`` and ``momentum`` are then unused), ``"lr"`` (``α`` from the quadratic model, ``μ`` =
    the first group's momentum) or ``None`` (``lr``, ``momentum`` and the KL clip as given).
    ``quadratic_curvature``: ``"ggn"`` (exact type-2 GGN of the batch through ``jvp``; ``quadratic_fraction``
    of its rows) or ``"fisher"`` (the captured Fisher). ``damping_adaptation`` (on by default) with
    ``damping_interval`` ``T₁``, factor ``damping_decay^T₁`` and ``damping_bounds``; ``reject_steps``. The
    flows that see only gradients (``loss.backward(); opt.step()``, :class:`kfac_func.Preconditioner`) cannot
    evaluate the model again: unless ``adaptive`` or ``damping_adaptation`` is given, they take the fixed step
    (:data:`GRADIENT_FLOW`). :data:`kfac_func.FIXED_STEP` gives the classic fixed step everywhere.
    ``step_scale``: ``s(t)`` multiplying every update, ``t`` the steps taken (:func:`kfac_func.cosine_decay`
    anneals a run of known length; the quadratic-model step ignores the groups' ``lr``, so a torch scheduler
    does not reach it).

    Data-parallel (:mod:`kfac_func.distributed`): ``data_parallel=True`` (implied by a
    ``DistributedDataParallel``-wrapped model, whose module is run functionally) over ``process_group``;
    each rank passes its shard of the global batch to :meth:`step`. ``lazy_factors`` sums the factors'
    moving averages only when they are read; ``decomposition_fraction`` (K-FAC only) is KAISA's share of
    ranks holding each layer's decomposition; ``bucket_mb`` caps the all-reduce buckets.

    ``params``: for a module, ``None`` (all parameters that require grad), a list of its parameters or
    of parameter-group dicts; for a function, any pytree of leaf tensors (passed to the function in that
    structure; parameters are named by path) or a list of group dicts whose ``"params"`` are dicts
    ``name → leaf tensor`` (together the function's flat dict). Parameters outside every group are held
    fixed; :meth:`add_param_group` adds a group of a module's parameters later.

    A float16/bfloat16 model (not autocast) trains in its own dtype: statistics, decompositions, the
    velocity and the update are float32, each parameter is written back in its dtype.

    Copies: ``copy.deepcopy((model, opt))`` copies a training run — the copied optimizer trains the copied
    model (``opt_copy.model``) and continues exactly as the original would. ``copy.deepcopy(opt)`` alone is a
    self-contained optimizer with its own hidden copy of the model (``opt_copy.model``, not ``model``), as a
    ``torch.optim`` optimizer copied alone updates copies of its parameters; ``copy.deepcopy(model)`` alone
    is not trained by ``opt``. To optimise another model with this optimizer's state, build
    ``KFAC(other, ...)`` and ``load_state_dict(opt.state_dict())``.
    """

    def __init__(
        self,
        model: Model,
        params: Any = None,
        *,
        data_parallel: bool = False,
        process_group: Any = None,
        decomposition_fraction: float = 1.0,
        bucket_mb: float = 25.0,
        grad_scaler: torch.amp.GradScaler | None = None,
        **options: Any,
    ):
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if self._ddp:  # run the wrapped module functionally; its backward averages p.grad over ranks
            process_group = process_group if process_group is not None else model.process_group
            model, data_parallel = model.module, True
        checks = {
            "decomposition_fraction": 0 < decomposition_fraction <= 1
            and (decomposition_fraction == 1 or options.get("method", "kfac") == "kfac"),
            "bucket_mb": bucket_mb > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {locals()[name]!r}")
        self.model = model
        comm = None
        if data_parallel:
            comm = DataParallel(process_group, fraction=decomposition_fraction, bucket_mb=bucket_mb)
        self._comm: Communicator = comm or Communicator()
        self._pure = kfac(model, communicator=comm, **options)
        # the flows that see only gradients cannot evaluate the model again: unless asked for, no quadratic model
        fixed = {k: v for k, v in GRADIENT_FLOW.items() if k not in options}
        self._gradient_pure = kfac(model, communicator=comm, **options, **fixed) if fixed else self._pure
        o = self._pure.options
        self.info: Report | None = None
        self.kfac_state: KFACState | None = None  # the pure state, made by the first step
        self._unchecked = False  # a loaded state whose layers are checked at the next step (none existed to compare)
        self._names, groups, self._spec = _named_groups(model, params)
        _require_data(model, self._names)
        self._required = {p for p in self._names if p.requires_grad}
        super().__init__(groups, dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay))
        self._warned_untracked = False
        self._grad_scaler = grad_scaler
        self._recorder = None
        if isinstance(model, nn.Module):
            self._recorder = Recorder(model, o.loss, o.fisher, o.mc_samples, self._sample_key, o.output, o.batch_dims)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim``'s: a group of the module's parameters not yet in any group, named from the model and
        optimised from the next step (the K-FAC state already holds every parameter of the module: its layers'
        statistics and a zero velocity). A function model's parameters are fixed at construction."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        new = [p for p in params if p not in self._names]  # torch.optim.Optimizer.__init__ adds the known groups
        if new and not isinstance(self.model, nn.Module):
            raise TypeError(
                "add_param_group: a function model's parameters are fixed when KFAC is built (they are the "
                "function's argument); pass every group to KFAC(model, [group, ...]) instead"
            )
        names = _module_names(self.model, new) if new else {}
        super().add_param_group({**param_group, "params": params})
        self._names.update(names)
        self._required.update(names)  # trains while it requires grad, as in torch.optim

    def _all_params(self) -> dict[str, Tensor]:
        """Every parameter the model takes (optimised or fixed), detached."""
        if isinstance(self.model, nn.Module):
            return {n: p.detach() for n, p in self.model.named_parameters()}
        return self._spec.unflatten({n: p.detach() for p, n in self._names.items()})

    def _frozen(self, p: Tensor) -> bool:
        """Whether ``p`` required grad when the optimizer was built and no longer does: held fixed, as
        torch.optim skips it (a function model's plain tensors never required grad and always train)."""
        return p in self._required and not p.requires_grad

    def _hyper(self, fixed: Collection[str] = ()) -> Hyper:
        """The parameter groups' hyperparameters per parameter name, in group order, frozen parameters and
        ``fixed`` ones (without a gradient: no update, no weight decay, as in ``torch.optim``) left out (held
        fixed). A non-finite value (set by a scheduler or by hand) is an error before anything changes."""
        pairs = [(self._names[p], g) for g in self.param_groups for p in g["params"]
                 if not self._frozen(p) and self._names[p] not in fixed]
        keys = ("lr", "momentum", "weight_decay")
        for name, group in pairs:
            bad = [k for k in keys if not math.isfinite(group[k])]
            if bad:
                raise ValueError(f"parameter {name!r}: its group's {bad[0]} is {group[bad[0]]}, not a finite number; "
                                 "no parameter or state was changed")
        return Hyper(*({n: g[k] for n, g in pairs} for k in keys))

    @torch.no_grad()
    def step(self, inputs: Any = None, targets: Tensor | None = None, *,  # type: ignore[override]
             closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One K-FAC step, in one of three ways:

        * ``step(inputs, targets)``: the optimizer runs the forward and the backwards itself (functionally,
          the model untouched until the commit); returns the loss before the update;
        * ``step()`` after ``loss.backward()``: the gradient is each ``p.grad`` as it is now (clipped,
          accumulated, unscaled: any change the user made counts), the statistics those of the forwards
          recorded since the last step (:mod:`kfac_func.record`; ``fisher="mc"``/``"exact"`` need
          :meth:`curvature_backward` before ``loss.backward()``); returns ``None``;
        * ``step(closure)`` (also ``step(closure=...)``): ``closure`` clears the gradients, runs the forward
          and ``loss.backward()`` and returns the loss; it runs with the recording on (and the Fisher's
          backward done for it), then as ``step()``; returns the closure's loss.
        """
        if callable(inputs) and targets is None and closure is None:
            inputs, closure = None, inputs
        if inputs is None:
            return self._recorded_step(closure)
        params = self._all_params()
        o = self._pure.options
        plan = trace(self.model, params, inputs, output=o.output, batch_dims=o.batch_dims)
        self._warn_untracked(plan)
        if self._unchecked:
            self._check_loaded(params, inputs)
        state = self._pure.init(params, inputs) if self.kfac_state is None else self.kfac_state
        if self._recorder is not None:  # forwards the user ran since the last step are superseded by this batch
            self._recorder.records.clear()
        unused = [n for n, why in plan.reasons.items() if why == NOT_USED]  # no gradient: held fixed
        for p in self._names:  # the last step's gradients, replaced by this one's (_write): not held through it
            p.grad = None
        new, new_state, info = self._pure.step(params, state, inputs, targets, self._hyper(unused))
        loss = self._commit(new, new_state, info, state.step)
        self._write(new, info.grads)
        return loss

    def curvature_backward(self, output: Tensor) -> None:
        """For ``loss.backward(); opt.step()`` with ``fisher="mc"`` or ``"exact"``: the Fisher's backward
        passes from the model ``output`` (of the forward just run) to the tracked layers' outputs, whose
        gradients are the statistics of the next :meth:`step`. Call it after the forward, before
        ``loss.backward()`` (which frees the graph); it computes no parameter gradient, leaves ``p.grad``
        alone and does nothing on steps that read no statistics (``factor_period``)."""
        self._require_recorder("curvature_backward").curvature_backward(output)

    def _require_recorder(self, what: str) -> Recorder:
        if self._recorder is None:
            raise TypeError(f"{what} records the forward of an nn.Module; a function model takes step(inputs, targets)")
        return self._recorder

    def _warn_untracked(self, plan: Plan) -> None:
        used = [n for n in plan.untracked if plan.reasons[n] != NOT_USED]  # unused ones get no gradient: fixed
        if used and plan.layers and not self._warned_untracked:  # no layer at all: the step's error
            warnings.warn(
                f"kfac_func: parameters {used} belong to no supported layer; they get identity preconditioning (a "
                "plain gradient step). kfac_func.describe(model, inputs) says why for each",
                stacklevel=3,
            )
            self._warned_untracked = True

    def _sample_key(self, inputs: Any, k: int) -> Tensor:
        """The MC key of the ``k``-th curvature backward before the next step: the key the functional step
        would use, split ``k`` more times for further micro-batches. The state is made by the first."""
        if self.kfac_state is None:
            self.kfac_state = self._pure.init(self._all_params(), inputs)
        key = random.split(self.kfac_state.key)[1]
        for _ in range(k):
            key = random.split(key)[1]
        return key

    def _recorded_step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        """:meth:`step` from ``p.grad`` and the recorded forwards (see there)."""
        loss, new, info = self._recorded(closure)
        if bool(info.finite):
            self._write(new, None)
        return loss

    def _recorded(self, closure: Callable[[], Tensor] | None) -> tuple[Tensor | None, Any, StepInfo]:
        """The pure step on ``p.grad`` and the recorded forwards, committed to the state (not the model):
        ``(closure's loss, new parameters, info)``."""
        recorder = self._require_recorder("step() without a batch")
        loss = None
        if closure is not None:
            recorder.auto = True
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                recorder.auto = False
        params = self._all_params()
        recorder.require_forward()
        pure = self._gradient_pure
        if self.kfac_state is None:
            self.kfac_state = pure.init(params, recorder.inputs)
        elif self._unchecked:
            self._check_loaded(params, recorder.inputs)
        state = self.kfac_state
        self._warn_untracked(recorder.plan)
        schedule = pure.schedule(state)
        share = 1.0
        if self._comm.world > 1:  # this rank's share of the examples
            counts = self._comm.sum(torch.tensor([float(recorder.examples)], dtype=torch.float64))
            share = recorder.examples / float(counts[0])
        live = {n: p for p, n in self._names.items()}
        grads, missing = {}, []
        for name, p in flatten(params)[0].items():
            g = live[name].grad if name in live else None
            if g is None:
                missing.append(name)
            g = torch.zeros_like(p) if g is None else g.detach()
            grads[name] = g if self._ddp else g * share  # DDP's backward already averaged the ranks' gradients
        value = torch.zeros(()) if loss is None else loss.detach()
        scale = 1.0 if self._grad_scaler is None else float(self._grad_scaler.get_scale())
        cap, plan = recorder.capture(grads, value, statistics=schedule.statistics,
                                     stats_fraction=pure.options.stats_fraction, grad_scale=scale, share=share,
                                     compact=pure.compact(recorder.require_forward(), schedule))
        new, new_state, info = pure.apply(params, state, cap, plan, schedule, self._hyper(missing), share=share,
                                          reduced=self._ddp)
        self._commit(new, new_state, info, state.step)
        recorder.wanted = pure.schedule(self.kfac_state).statistics
        if loss is None and self.info is not None:
            self.info = self.info._replace(loss=float("nan"))
        return loss, new, info

    @eager
    def _check_loaded(self, params: Any, inputs: Any) -> None:
        """The loaded state's layers, shapes and dtypes against a fresh state of this model and batch."""
        assert self.kfac_state is not None
        checkpoint.check_state(self.kfac_state, self._pure.init(params, inputs))
        self._unchecked = False

    @eager  # runs eagerly under torch.compile(opt.step): these writes must happen for real
    @torch.no_grad()
    def _write(self, new: Any, grads: Any) -> None:
        """The new parameters into the model (and ``grads``, if given, into ``p.grad``)."""
        new = flatten(new)[0]
        grads = flatten(grads)[0] if grads is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if not self._frozen(p):
                    name = self._names[p]
                    if grads is not None:
                        p.grad = grads[name]
                    p.copy_(new[name])

    @eager  # runs eagerly under torch.compile(opt.step): these writes must happen for real
    @torch.no_grad()
    def _commit(self, new: dict[str, Tensor], state: KFACState, info: StepInfo, step: Tensor) -> Tensor:
        """Keep the pure step's state and report; a skipped step warns (the parameters are written by
        :meth:`_write`, which a skipped step leaves equal to the old ones)."""
        self.kfac_state = state
        if not bool(info.finite):
            nan = float("nan")
            self.info = Report(nan, nan, nan, float(info.damping), None, True)
            warnings.warn(
                f"kfac_func: non-finite loss, gradient, curvature statistics or step scale at step {int(step)}; "
                "step skipped, parameters and optimizer state unchanged",
                stacklevel=3,
            )
            return info.loss.detach()
        if isinstance(self.model, nn.Module) and info.buffers:  # BatchNorm running statistics move with the step
            # (a recorded step has none: the user's own forward moved them)
            for name, b in self.model.named_buffers():
                b.copy_(info.buffers[name])
            self._comm.broadcast_buffers(self.model)
        rho = float(info.rho)
        self.info = Report(float(info.loss), float(info.alpha), float(info.mu), float(info.damping),
                           None if math.isnan(rho) else rho,
                           bool(info.rejected))
        return info.loss.detach()

    def __getstate__(self) -> dict[str, Any]:
        """Everything, so that ``copy.deepcopy`` and ``pickle`` keep the options and the K-FAC state
        (``torch.optim.Optimizer`` keeps only ``defaults``, ``state`` and ``param_groups``)."""
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s groups and, under ``"kfac"``, the pure state as plain data (:func:`checkpoint.pack`)."""
        out = super().state_dict()
        out["kfac"] = checkpoint.pack(self.kfac_state, self._pure.options)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` after checking, before anything changes: its format, the options the state
        depends on, its parameters' names, shapes and dtypes against the model's and its layers and tensors
        against this optimizer's state (without one yet: against a fresh state at the next step, before it
        changes anything); then ``torch.optim``'s checks of the groups."""
        state_dict = dict(state_dict)
        if "kfac" not in state_dict:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by kfac_func.KFAC")
        state = checkpoint.unpack(state_dict.pop("kfac"), self._pure.options)
        if state is not None:
            checkpoint.check_params(state, flatten(self._all_params())[0])
            if self.kfac_state is not None and not self._unchecked:
                checkpoint.check_state(state, self.kfac_state)
        super().load_state_dict(state_dict)
        self._unchecked = state is not None and (self.kfac_state is None or self._unchecked)
        self.kfac_state = state


def _named_groups(model: Model, params: Any) -> tuple[dict[Tensor, str], list[dict[str, Any]], Spec | None]:
    """Resolve parameter names (by identity), torch-style parameter groups and, for a function model, the
    structure its parameters are passed in."""
    if isinstance(model, nn.Module):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        names: dict[Tensor, str] = {}
        for g in groups:
            g["params"] = list(g["params"])
            names.update(_module_names(model, g["params"]))
        return names, groups, None
    if isinstance(params, (list, tuple)) and params and isinstance(params[0], dict) and "params" in params[0]:
        groups = params  # torch-style groups: each 'params' a dict name → tensor, together the model's
    else:
        groups = [{"params": params}]  # one group: any pytree of tensors, passed to the model as it is
    names, out = {}, []
    for g in groups:
        flat, spec = flatten(g["params"])
        if not flat:
            raise ValueError("for a function model, params must be a pytree of tensors or a list of group dicts")
        names.update({p: n for n, p in flat.items()})
        out.append({**g, "params": list(flat.values())})
    return names, out, spec if len(groups) == 1 else Spec(tuple(names.values()))


def _module_names(model: nn.Module, params: list[Tensor]) -> dict[Tensor, str]:
    """Each of ``params`` → its name in ``model`` (matched by identity)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        if id(p) not in by_id:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} in the optimizer is not a parameter of the model")
    return {p: by_id[id(p)] for p in params}


def _require_data(model: Model, names: dict[Tensor, str]) -> None:
    """Refuse parameters or buffers on the ``meta`` device (shapes without data): nothing could be computed."""
    tensors = list(model.named_parameters()) + list(model.named_buffers()) if isinstance(model, nn.Module) else [
        (n, p) for p, n in names.items()]
    meta = [n for n, t in tensors if t.is_meta]
    if meta:
        raise ValueError(
            f"the model's {', '.join(map(repr, meta))} are on the meta device (shapes without data): materialise the "
            "model first, e.g. model.to_empty(device='cpu') and initialise it, or load_state_dict(..., assign=True)"
        )


class EKFAC(KFAC):
    """E-KFAC (George et al. 2018): :class:`KFAC` with ``method="ekfac"``."""

    def __init__(self, model: Model, params: Any = None, **kwargs: Any):
        super().__init__(model, params, method="ekfac", **kwargs)
