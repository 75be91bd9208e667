r"""A thin ``torch.optim.Optimizer`` adapter that orders the pure stages.

Each ``step(inputs, targets)``:

1. :func:`~kfac_func.capture` — loss, gradients and, when this step needs them, the layer statistics
   for ``fisher`` (one forward, one backward per cotangent);
2. NaN/Inf in the loss, gradients or any curvature statistic → the step is skipped with a warning; no
   parameter or state tensor changes (new state is built aside and committed at the end);
3. every ``factor_period`` steps, the moving average of the Kronecker factors (``ema_decay``,
   bias-corrected);
4. every ``inverse_period`` steps, eigendecompositions (``damping_mode="eigen"``) or π-damped inverse
   factors from Cholesky factors (``"factored"``: two matmuls per layer to precondition), and for
   ``method="two_level"`` with a spectral space, a new coarse space;
5. ``method="ekfac"``: every ``scale_period`` steps (and with each new eigenbasis, which restarts its
   average) the E-KFAC scaling; ``method="two_level"``: the coarse matrix ``R₀CR₀ᵀ`` of the batch
   (``coarse_mode``), averaged like the factors and restarted with each new coarse space (``adef2`` and
   ``bnn`` use the batch's own matrix, so that ``I − QC̃`` is the ``C̃``-orthogonal projection);
6. ``Δ = precondition(grads)``; with a fixed learning rate, KL clip ``ν = min(1, √(κ / (η² |Σ Δ·∇|)))``
   (``ν = 1`` when ``Σ Δ·∇ = 0``), then per parameter group ``d = νΔ + wd·θ``, ``v ← μ v + d``,
   ``θ ← θ − η v``; with ``adaptive`` set, ``δ = αΔ + μδ_prev`` with ``(α, μ)`` from the quadratic model
   (:mod:`kfac_func.quadratic`; the weight decay is the model's L2 term ``η``);
7. every ``damping_interval`` steps (``damping_adaptation``) the reduction ratio ``ρ`` and the
   Levenberg–Marquardt rule for ``λ``; ``reject_steps`` evaluates the new loss every step and keeps ``θ``
   and the velocity (raising ``λ``) when it is NaN or higher. :attr:`KFAC.info` reports what the step
   chose.

``lr``, ``momentum`` and ``weight_decay`` are per parameter group (and so work with
``torch.optim.lr_scheduler``); the curvature options are global. ``state_dict()`` carries the factors,
decompositions, scalings, coarse matrices, step counter and sampling generator, so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, NamedTuple

import optree
import torch
from torch import Tensor, nn

from .averaging import all_finite, averaged, init_average, update_average
from .capture import Model, as_function, capture, trace
from .distributed import Communicator, DataParallel, weight_inputs
from .ekfac import ekfac_factors, ekfac_scaling
from .factors import EigenFactors, InverseFactors, default_reduce, eigendecompose, inverse_factors, kronecker_factors
from .losses import FISHER_TYPES, Loss, as_loss
from .precondition import METHODS, MODES, precondition
from .quadratic import (
    fisher_quadratic_forms,
    ggn_quadratic_forms,
    levenberg_marquardt,
    reduction_ratio,
    solve_quadratic_model,
)
from .two_level import (
    COARSE_MODES,
    COMBINATIONS,
    SPACES,
    CoarseCorrection,
    coarse_matrix,
    kronecker_coarse_parts,
    nicolaides_space,
    spectral_space,
)


ADAPTIVE = (None, "lr", "lr_momentum")


class StepInfo(NamedTuple):
    """What a step chose, for logging: the loss before the step, the learning rate ``α`` and momentum
    ``μ`` applied (after any KL clip), the damping ``λ`` for the next step, the reduction ratio ``ρ``
    (NaN when not computed) and whether the step was rejected (or skipped for a non-finite value, which
    leaves the other fields NaN)."""

    loss: float
    alpha: float
    mu: float
    damping: float
    rho: float
    rejected: bool


class KFAC(torch.optim.Optimizer):
    """K-FAC, E-KFAC or two-level K-FAC for an ``nn.Module`` or a function ``f(params, x)``.

    ``method``: ``"kfac"``, ``"ekfac"`` (scaling re-estimated every ``scale_period`` steps) or
    ``"two_level"`` (``coarse_space`` ``"nicolaides"``/``"spectral"`` with ``coarse_vectors`` per layer,
    ``coarse_mode`` ``"exact"``/``"kronecker"``, ``combination`` ``"additive"``/``"adef2"``/``"bnn"``,
    ``coarse_weights`` ``(ω₁, ω₂)`` for ``additive``; the multiplicative combinations capture the
    curvature on every step).

    ``reduce``: ``"auto"`` (Eschenhagen et al. 2023 per layer, :func:`~kfac_func.factors.default_reduce`:
    expand when the model output keeps positions, reduce when they are pooled), ``True``/``False`` for
    all layers, or a dict layer name → bool.

    ``adaptive``: ``None`` (``lr``, ``momentum`` and the KL clip as given), ``"lr"`` (``α`` from the
    quadratic model, ``μ`` = the first group's momentum) or ``"lr_momentum"`` (both; the KL clip and the
    groups' ``lr`` are then unused). ``quadratic_curvature``: ``"ggn"`` (exact type-2 GGN of the batch
    through ``jvp``) or ``"fisher"`` (the captured Fisher). ``damping_adaptation`` with
    ``damping_interval`` ``T₁``, factor ``damping_decay^T₁`` and ``damping_bounds``; ``reject_steps``.

    Data-parallel (:mod:`kfac_func.distributed`): ``data_parallel=True`` (implied by a
    ``DistributedDataParallel``-wrapped model, whose module is run functionally) over ``process_group``;
    each rank passes its shard of the global batch to :meth:`step`. ``lazy_factors`` sums the factors'
    moving averages only when they are read; ``decomposition_fraction`` (K-FAC only) is KAISA's share of
    ranks holding each layer's decomposition; ``bucket_mb`` caps the all-reduce buckets.

    ``params``: for a module, ``None`` (all parameters that require grad), a list of its parameters or
    of parameter-group dicts; for a function, a dict ``name → leaf tensor`` or a list of group dicts whose
    ``"params"`` are such dicts. Parameters outside every group are held fixed.
    """

    def __init__(
        self,
        model: Model,
        params: Any = None,
        *,
        loss: Loss | str = "cross_entropy",
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        damping_mode: str = "eigen",
        fisher: str = "mc",
        mc_samples: int = 1,
        factor_period: int = 1,
        inverse_period: int = 10,
        ema_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        reduce: bool | dict[str, bool] | str = "auto",
        stats_fraction: float = 1.0,
        decomposition_dtype: torch.dtype = torch.float64,
        seed: int = 0,
        method: str = "kfac",
        scale_period: int = 1,
        coarse_space: str = "nicolaides",
        coarse_vectors: int = 1,
        coarse_mode: str = "exact",
        combination: str = "additive",
        coarse_weights: tuple[float, float] = (1.0, 1.0),
        adaptive: str | None = None,
        quadratic_curvature: str = "ggn",
        damping_adaptation: bool = False,
        damping_interval: int = 5,
        damping_decay: float = 0.95,
        damping_bounds: tuple[float, float] = (1e-8, 1e8),
        reject_steps: bool = False,
        data_parallel: bool = False,
        process_group: Any = None,
        lazy_factors: bool = False,
        decomposition_fraction: float = 1.0,
        bucket_mb: float = 25.0,
    ):
        if isinstance(model, nn.parallel.DistributedDataParallel):  # run the wrapped module functionally
            process_group = process_group if process_group is not None else model.process_group
            model, data_parallel = model.module, True
        checks = {
            "lr": lr >= 0,
            "momentum": 0 <= momentum < 1,
            "weight_decay": weight_decay >= 0,
            "damping": damping > 0,
            "damping_mode": damping_mode in MODES,
            "fisher": fisher in FISHER_TYPES,
            "mc_samples": mc_samples >= 1,
            "factor_period": factor_period >= 1,
            "inverse_period": inverse_period >= 1,
            "ema_decay": 0 <= ema_decay < 1,
            "kl_clip": kl_clip is None or kl_clip > 0,
            "stats_fraction": 0 < stats_fraction <= 1,
            "reduce": isinstance(reduce, (bool, dict)) or reduce == "auto",
            "method": method in METHODS,
            "scale_period": scale_period >= 1,
            "coarse_space": coarse_space in SPACES,
            "coarse_vectors": coarse_vectors >= 1 and (coarse_vectors == 1 or coarse_space == "spectral"),
            "coarse_mode": coarse_mode in COARSE_MODES,
            "combination": combination in COMBINATIONS,
            "adaptive": adaptive in ADAPTIVE,
            "quadratic_curvature": quadratic_curvature in ("ggn", "fisher"),
            "damping_interval": damping_interval >= 1,
            "damping_decay": 0 < damping_decay < 1,
            "damping_bounds": 0 < damping_bounds[0] <= damping <= damping_bounds[1],
            "decomposition_fraction": 0 < decomposition_fraction <= 1 and (decomposition_fraction == 1 or method == "kfac"),
            "bucket_mb": bucket_mb > 0,
        }
        if method == "ekfac" and damping_mode != "eigen":
            raise ValueError("invalid damping_mode for method='ekfac': E-KFAC adds the damping to its scaling ('eigen')")
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {locals()[name]!r}")
        self.model = model
        self.loss = as_loss(loss)
        self.damping_mode, self.fisher, self.mc_samples = damping_mode, fisher, mc_samples
        self.factor_period, self.inverse_period, self.ema_decay = factor_period, inverse_period, ema_decay
        self.kl_clip, self.reduce, self.stats_fraction = kl_clip, reduce, stats_fraction
        self.decomposition_dtype, self.method, self.scale_period = decomposition_dtype, method, scale_period
        self.coarse_space, self.coarse_vectors, self.coarse_mode = coarse_space, coarse_vectors, coarse_mode
        self.combination, self.coarse_weights = combination, coarse_weights
        self.adaptive, self.quadratic_curvature, self.reject_steps = adaptive, quadratic_curvature, reject_steps
        self.damping_adaptation, self.damping_interval = damping_adaptation, damping_interval
        self.damping_factor, self.damping_bounds = damping_decay**damping_interval, damping_bounds
        self.info: StepInfo | None = None
        self.lazy_factors = lazy_factors and data_parallel
        self._comm: Communicator = (
            DataParallel(process_group, fraction=decomposition_fraction, bucket_mb=bucket_mb) if data_parallel
            else Communicator()
        )
        self._names, groups = _named_groups(model, params)
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        first = next(iter(self._names))
        self._generator = torch.Generator(device=first.device).manual_seed(seed + self._comm.rank)
        self.kfac_state: dict[str, Any] = {
            "step": torch.zeros((), dtype=torch.int64),
            "factors": None,  # MovingAverage of the Kronecker factors
            "decomposition": None,  # EigenFactors or InverseFactors, refreshed every inverse_period
            "eigen": None,  # the eigenbasis of E-KFAC and of the spectral coarse space
            "scale": None,  # E-KFAC: MovingAverage of the scaling, restarted with each new eigenbasis
            "space": None,  # two-level: the coarse space
            "coarse": None,  # two-level: MovingAverage of R₀CR₀ᵀ, restarted with each new space
            "damping": torch.tensor(float(damping), dtype=torch.float64),  # λ, adapted by Levenberg–Marquardt
        }
        self._warned_untracked = False

    def _all_params(self) -> dict[str, Tensor]:
        """Every parameter the model takes (optimised or fixed), detached."""
        if isinstance(self.model, nn.Module):
            return {n: p.detach() for n, p in self.model.named_parameters()}
        return {n: p.detach() for p, n in self._names.items()}

    @torch.no_grad()
    def step(self, inputs: Any, targets: Tensor) -> Tensor:  # type: ignore[override]
        """One K-FAC step on a batch; returns the loss before the update."""
        state = self.kfac_state
        step = int(state["step"])
        params = self._all_params()
        plan = trace(self.model, params, inputs)
        if plan.untracked and not self._warned_untracked:
            warnings.warn(
                f"kfac_func: parameters {list(plan.untracked)} belong to no supported layer; they get identity "
                "preconditioning (a plain gradient step)",
                stacklevel=2,
            )
            self._warned_untracked = True
        refresh = state["decomposition"] is None or step % self.inverse_period == 0
        factor_step = step % self.factor_period == 0
        scale_step = self.method == "ekfac" and (refresh or step % self.scale_period == 0)
        coarse_step = self.method == "two_level" and (factor_step or refresh or self.combination != "additive")
        adapt = self.damping_adaptation and step % self.damping_interval == 0
        fisher_forms = self.quadratic_curvature == "fisher" and bool(self.adaptive or adapt or self.reject_steps)
        n = len(targets)
        examples = max(1, math.ceil(self.stats_fraction * n)) if self.stats_fraction < 1 else None
        rng = self._generator.get_state()
        comm = self._comm
        loss, share = comm.shard_loss(self.loss, targets, examples or n)  # the global batch's R
        with torch.enable_grad():
            cap = capture(
                self.model, params, inputs, targets, loss,
                fisher=self.fisher if factor_step or scale_step or coarse_step or fisher_forms else None,
                mc_samples=self.mc_samples, generator=self._generator, stats_examples=examples,
            )
        reduce = default_reduce(plan) if self.reduce == "auto" else self.reduce
        batch = kronecker_factors(cap, reduce=reduce, layers=plan.layers) if factor_step else None
        if batch is not None:
            batch = weight_inputs(batch, share)
        # one bucketed all-reduce; lazy factors stay local (a NaN flag keeps the skip decision global)
        flag = torch.where(all_finite(batch), 0.0, float("nan")) if self.lazy_factors and batch is not None else None
        total_loss, grads, reduced = comm.sum((cap.loss.detach(), cap.grads, flag if self.lazy_factors else batch))
        cap = cap._replace(loss=total_loss, grads=grads)
        if not self.lazy_factors:
            batch = reduced
        if not self._finite((cap.loss, cap.grads, reduced), step, rng):
            return cap.loss.detach()
        new = dict(state)  # committed only once every batch quantity is known to be finite
        if batch is not None:
            averages = state["factors"] if state["factors"] is not None else init_average(batch)
            new["factors"], _ = update_average(averages, batch, self.ema_decay, checked=True)
        if refresh:
            self._refresh(new)
        if scale_step:
            scale = comm.sum(ekfac_scaling(cap, new["eigen"]))
            if not self._finite(scale, step, rng):
                return cap.loss.detach()
            averages = init_average(scale) if refresh else new["scale"]
            new["scale"], _ = update_average(averages, scale, self.ema_decay, checked=True)
        if coarse_step:
            coarse = self._coarse_matrix(cap, new["space"], share)
            if not self._finite(coarse, step, rng):
                return cap.loss.detach()
            restart = new["coarse"] is None or (refresh and self.coarse_space == "spectral")
            new["coarse"], _ = update_average(init_average(coarse) if restart else new["coarse"], coarse,
                                              self.ema_decay, checked=True)
        factored = self.damping_mode == "factored"
        damping = float(new["damping"])
        held = {name: s for name, s in plan.layers.items() if comm.holds(name)}  # KAISA: the layers this rank serves
        kwargs: dict[str, Any] = dict(layers=held, damping=None if factored else damping, mode=self.damping_mode)
        factors = new["decomposition"]
        if self.method == "ekfac":
            factors = ekfac_factors(new["eigen"], averaged(new["scale"]))
        elif self.method == "two_level":
            additive = self.combination == "additive"
            # the multiplicative forms project with Q = R₀ᵀ(R₀C̃R₀ᵀ)⁻¹R₀: it must use the batch's own C̃
            matrix = averaged(new["coarse"]) if additive else coarse
            kwargs.update(
                coarse=CoarseCorrection(new["space"], matrix), combination=self.combination,
                capture=None if additive else cap, weights=self.coarse_weights, all_reduce=comm.sum,
            )
        l2 = self._l2  # the objective is L + ½ Σ η‖θ‖²: its gradient ∇ + ηθ enters the quadratic model
        objective = {n: g + l2[n] * params[n] if l2.get(n) else g for n, g in cap.grads.items()}
        if self.adaptive:
            delta = comm.spread(precondition(params, objective, factors, **kwargs), plan.layers)
            update, velocity, alpha, mu, forms = self._adaptive_update(
                delta, objective, params, inputs, targets, cap, plan, damping, loss)
        else:
            delta = comm.spread(precondition(params, cap.grads, factors, **kwargs), plan.layers)
            update, velocity, alpha, mu, forms = self._fixed_update(delta, cap.grads)
        rho = float("nan")
        if adapt or self.reject_steps:
            rho, worse = self._reduction_ratio(update, objective, params, inputs, targets, cap, plan, forms,
                                               float(cap.loss), loss)
            lam = damping
            if adapt:
                lam = levenberg_marquardt(damping, rho, factor=self.damping_factor, min_damping=self.damping_bounds[0],
                                          max_damping=self.damping_bounds[1])
            if self.reject_steps and worse:  # keep θ and the velocity; λ rises once, even if L-M raised it too
                update = velocity = None
                lam = max(lam, min(damping / self.damping_factor, self.damping_bounds[1]))
            new["damping"] = torch.tensor(lam, dtype=torch.float64)
            if factored and float(new["damping"]) != damping:
                new["decomposition"] = self._inverses(new)
        self._commit(update, velocity, cap.grads)
        if isinstance(self.model, nn.Module):  # BatchNorm running statistics move once per step, with it
            for name, b in self.model.named_buffers():
                b.copy_(cap.buffers[name])
            comm.broadcast_buffers(self.model)
        new["step"] = state["step"] + 1
        self.kfac_state = new
        self.info = StepInfo(float(cap.loss), alpha, mu, float(new["damping"]), rho, update is None)
        return cap.loss.detach()

    @property
    def _l2(self) -> dict[str, float]:
        return {self._names[p]: g["weight_decay"] for g in self.param_groups for p in g["params"]}

    def _fixed_update(self, delta, grads):
        """Fixed learning rate and momentum with the KL clip; weight decay added after preconditioning."""
        scale = 1.0
        if self.kl_clip is not None:
            vg = sum(
                group["lr"] ** 2 * (delta[self._names[p]] * grads[self._names[p]]).sum()
                for group in self.param_groups for p in group["params"]
            )
            vg = abs(float(vg))  # |Σ Δ·∇|: the two-level forms need not be symmetric
            if vg > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / vg))
        update, velocity = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[p]
                d = delta[name] * scale
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    d = velocity[name] = d if buf is None else buf * group["momentum"] + d
                update[name] = -group["lr"] * d
        return update, velocity, self.param_groups[0]["lr"] * scale, self.param_groups[0]["momentum"], None

    def _adaptive_update(self, delta, grads, params, inputs, targets, cap, plan, damping, loss):
        """``δ = αΔ + μ δ_prev`` with ``(α, μ)`` minimising the quadratic model (``μ`` fixed to the first
        group's momentum when ``adaptive="lr"``)."""
        names = [self._names[p] for g in self.param_groups for p in g["params"]]
        prev = {n: self.state[p].get("previous_update", torch.zeros_like(p)) for p, n in self._names.items()}
        directions = [{n: -delta[n] for n in params}, {n: prev.get(n, torch.zeros_like(params[n])) for n in params}]
        for d in directions:  # parameters outside every group do not move
            for n in params:
                if n not in names:
                    d[n] = torch.zeros_like(params[n])
        forms = self._quadratic_forms(directions, params, inputs, targets, cap, plan, loss)
        gram = torch.stack([torch.stack([sum((a[n] * b[n]).sum() for n in names) for b in directions]) for a in directions])
        b = torch.stack([sum((grads[n] * d[n]).sum() for n in names) for d in directions]).to(forms.dtype)
        fixed = {1: self.param_groups[0]["momentum"]} if self.adaptive == "lr" else None
        x, _ = solve_quadratic_model(forms, gram.to(forms.dtype), b, damping, fixed)
        alpha, mu = float(x[0]), float(x[1])
        update = {n: alpha * directions[0][n] + mu * directions[1][n] for n in names}
        return update, dict(update), alpha, mu, (forms, b, x)

    def _quadratic_forms(self, directions, params, inputs, targets, cap, plan, loss) -> Tensor:
        """``[dᵢᵀ (C + ηI) dⱼ]`` with ``C`` the exact GGN (``quadratic_curvature="ggn"``) or the captured Fisher."""
        with torch.enable_grad():
            if self.quadratic_curvature == "ggn":
                forms = ggn_quadratic_forms(self.model, params, inputs, targets, loss, directions)
            else:
                forms = fisher_quadratic_forms(cap, directions, plan.layers)
        forms = self._comm.sum(forms)
        l2 = self._l2
        reg = torch.stack([torch.stack([sum(l2.get(n, 0.0) * (a[n] * b[n]).sum() for n in params) for b in directions])
                           for a in directions])
        return (forms + reg.to(forms.dtype)).double()

    def _reduction_ratio(self, update, grads, params, inputs, targets, cap, plan, forms, loss_before, loss):
        """``ρ`` for the step ``update`` (undamped model) and whether the new loss is NaN or higher."""
        if forms is None:
            d = {n: update.get(n, torch.zeros_like(params[n])) for n in params}
            quad = self._quadratic_forms([d], params, inputs, targets, cap, plan, loss)[0, 0]
            change = 0.5 * quad + sum((grads[n] * d[n]).sum() for n in update)
        else:
            k, b, x = forms
            change = 0.5 * x @ k @ x + b @ x
        moved = {n: params[n] + update[n] if n in update else params[n] for n in params}
        l2 = self._l2
        penalty = lambda p: sum(0.5 * l2.get(n, 0.0) * p[n].square().sum() for n in p)  # noqa: E731
        after = float(self._comm.sum(loss.value(as_function(self.model)(moved, inputs), targets)) + penalty(moved))
        before = loss_before + float(penalty(params))
        return reduction_ratio(before, after, change), not after <= before

    def _commit(self, update, velocity, grads) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[p]
                p.grad = grads[name]
                if update is None:
                    continue
                p.add_(update[name])
                if name in velocity:
                    key = "previous_update" if self.adaptive else "momentum_buffer"
                    self.state[p][key] = velocity[name]

    def _finite(self, tree: Any, step: int, rng: Tensor) -> bool:
        """Whether ``tree`` is finite; if not, warn and restore the sampling generator (nothing else has
        been committed yet)."""
        if bool(all_finite(tree)):
            return True
        nan = float("nan")
        self.info = StepInfo(nan, nan, nan, float(self.kfac_state["damping"]), nan, True)
        warnings.warn(
            f"kfac_func: non-finite loss, gradient or curvature statistics at step {step}; step skipped, "
            "parameters and optimizer state unchanged",
            stacklevel=3,
        )
        self._generator.set_state(rng)
        return False

    def _factors(self, state: dict[str, Any]) -> dict:
        """The averaged factors of the global batch (lazy factors: summed over ranks now)."""
        factors = averaged(state["factors"])
        return self._comm.sum(factors) if self.lazy_factors else factors

    def _inverses(self, state: dict[str, Any], factors: dict | None = None) -> dict:
        """π-damped inverse factors at the current damping, each layer computed by its owner rank."""
        compute = lambda f: inverse_factors(f, float(state["damping"]), self.decomposition_dtype)  # noqa: E731
        return self._comm.decompose(self._factors(state) if factors is None else factors, compute, InverseFactors)

    def _coarse_matrix(self, cap, space, share: float) -> Tensor:
        """The global batch's coarse matrix: the exact one is a sum over examples; the Kronecker surrogate
        is the product of a mean (weighted by this rank's share of the examples) and a sum."""
        if self.coarse_mode == "exact":
            return self._comm.sum(coarse_matrix(cap, space, "exact"))
        inputs, grads = kronecker_coarse_parts(cap, space)
        inputs, grads = self._comm.sum((inputs * share, grads))
        return inputs * grads

    def _refresh(self, state: dict[str, Any]) -> None:
        """New decompositions (and eigenbasis, coarse space) from the averaged factors."""
        factors = self._factors(state)
        needs_eigen = self.damping_mode == "eigen" or self.method == "ekfac" or self.coarse_space == "spectral"
        if needs_eigen:
            compute = lambda f: eigendecompose(f, self.decomposition_dtype)  # noqa: E731
            state["eigen"] = self._comm.decompose(factors, compute, EigenFactors)
        if self.damping_mode == "factored":
            state["decomposition"] = self._inverses(state, factors)
        else:
            state["decomposition"] = state["eigen"]
        if self.method == "two_level":
            if self.coarse_space == "spectral":
                state["space"] = spectral_space(state["eigen"], self.coarse_vectors)
            elif state["space"] is None:
                state["space"] = nicolaides_space(factors)

    def __getstate__(self) -> dict[str, Any]:
        """Everything, so that ``copy.deepcopy`` and ``pickle`` keep the options and the K-FAC state
        (``torch.optim.Optimizer`` keeps only ``defaults``, ``state`` and ``param_groups``)."""
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["kfac"] = {**self.kfac_state, "generator": self._generator.get_state()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        kfac = state_dict.pop("kfac", None)
        if kfac is None:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by kfac_func.KFAC")
        super().load_state_dict(state_dict)
        kfac = optree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, kfac, none_is_leaf=True)
        self._generator.set_state(kfac.pop("generator"))
        self.kfac_state = kfac


def _named_groups(model: Model, params: Any) -> tuple[dict[Tensor, str], list[dict[str, Any]]]:
    """Resolve parameter names (by identity) and torch-style parameter groups."""
    if isinstance(model, nn.Module):
        by_id = {id(p): n for n, p in model.named_parameters()}
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        names: dict[Tensor, str] = {}
        for g in groups:
            g["params"] = list(g["params"])
            for p in g["params"]:
                if id(p) not in by_id:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} in the optimizer is not a parameter of the model")
                names[p] = by_id[id(p)]
        return names, groups
    if isinstance(params, dict) and "params" not in params:
        params = [{"params": params}]
    if not isinstance(params, Iterable) or not params:
        raise ValueError("for a function model, params must be a dict name → tensor or a list of group dicts")
    names, groups = {}, []
    for g in params:
        if not isinstance(g.get("params"), dict):
            raise ValueError("each parameter group of a function model needs 'params': a dict name → tensor")
        names.update({p: n for n, p in g["params"].items()})
        groups.append({**g, "params": list(g["params"].values())})
    return names, groups


class EKFAC(KFAC):
    """E-KFAC (George et al. 2018): :class:`KFAC` with ``method="ekfac"``."""

    def __init__(self, model: Model, params: Any = None, **kwargs: Any):
        super().__init__(model, params, method="ekfac", **kwargs)
