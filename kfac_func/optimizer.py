r"""The pure K-FAC optimizer (kfac-jax's shape): ``opt = kfac(model, loss=..., **options)`` gives

* ``state = opt.init(params, inputs)`` — a :class:`KFACState` of tensors only;
* ``params, state, info = opt.step(params, state, inputs, targets)`` — nothing is mutated.

``params`` is any pytree of tensors (nested dicts, lists, tuples, NamedTuples); the returned parameters
mirror it, layers are named by their pytree path. The MC sampling randomness comes from ``state.key``
(:mod:`kfac_func.random`), so a step is reproducible from its state alone, compiles with
``torch.compile`` and draws each ensemble member's own samples under ``torch.func.vmap``.

Each step, on the flat ``name → tensor`` view of the parameters:

1. the :class:`Schedule` — which periodic work this step does — read from the step counter
   ``t``: factors every ``factor_period``, decompositions every ``inverse_period`` (from ``t = 0``),
   E-KFAC scalings every ``scale_period`` (and with each new eigenbasis, which restarts their average),
   two-level coarse matrices with the factors (every step for ``adef2``/``bnn``), Levenberg–Marquardt
   every ``damping_interval``. It is the only host read of a step; :meth:`Optimizer.update` takes it
   explicitly, so that ``torch.compile(opt.update, fullgraph=True)`` sees no data-dependent branch;
2. :func:`~kfac_func.capture` — loss, gradients and, when the schedule needs them, the statistics of
   ``fisher`` (``mc`` samples with a key split from ``state.key``); when only the factors read them
   (:meth:`Optimizer.compact`), pooled over positions for the reduce layers (no convolution patches are
   built) and as token counts for the embeddings (no one-hot rows);
3. the moving averages (``ema_decay``, bias-corrected), decompositions (eigen, or π-damped inverses
   from Cholesky factors for ``damping_mode="factored"``), E-KFAC scalings, coarse spaces and matrices;
4. ``Δ = precondition(∇)``; with a fixed learning rate, KL clip ``ν = min(1, √(κ / (η² |Σ Δ·∇|)))``
   (``ν = 1`` when ``Σ Δ·∇ = 0``), then per parameter ``d = νΔ + wd·θ``, ``v ← μv + d``, ``θ ← θ − ηv``;
   with ``adaptive``, ``δ = αΔ + μδ_prev`` with ``(α, μ)`` from the quadratic model
   (:mod:`kfac_func.quadratic`; weight decay is its L2 term);
5. ``damping_adaptation``: the reduction ratio ``ρ`` and the Levenberg–Marquardt rule for ``λ`` (the
   quadratic model uses it from the next step, the factored inverses from their next refresh);
   ``reject_steps``: a step whose new loss is NaN or higher keeps ``θ`` and the velocity and raises
   ``λ`` once;
6. the NaN guard: a non-finite loss, gradient or statistic leaves parameters and state exactly as they
   were (the key included) and says so in ``info.finite`` — a ``torch.where``, no host sync, so it works
   under ``torch.compile`` and ``vmap``.

Every decision in 3–6 is a tensor operation; the only Python branches are on the schedule and on the
options, so a compiled step has one graph per schedule that occurs (with the defaults, three: statistics,
a refresh and Levenberg–Marquardt; statistics and Levenberg–Marquardt; neither — with :data:`FIXED_STEP`,
two: with and without a refresh).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from typing import Any, Callable, NamedTuple

import optree
import torch
from torch import Tensor

from .eager import eager, install
from . import random
from .averaging import MovingAverage, all_finite, averaged, init_average, update_average
from .calls import BatchDims, Selector, batch_size, model_io
from .capture import Capture, Model, Plan, as_function, capture, require_layers, trace
from .distributed import Communicator, weight_inputs
from .ekfac import ekfac_factors, ekfac_scaling
from .factors import (
    EigenFactors,
    InverseFactors,
    KroneckerFactors,
    default_reduce,
    eigendecompose,
    factor_dims,
    inverse_factors,
    kronecker_factors,
    reduces,
    traced,
)
from . import sides
from .layers import stat_dtype
from .layout import DEFAULT_MAX_FACTOR_DIM, Overrides, layer_dims, side_layout
from .losses import FISHER_TYPES, Loss, as_loss, for_targets
from .phases import phase
from .precondition import METHODS, MODES, precondition
from .quadratic import (
    fisher_quadratic_forms,
    ggn_quadratic_forms,
    levenberg_marquardt,
    reduction_ratio,
    safe_coefficients,
    solve_quadratic_model,
    sub_batch,
)
from .subnormal import flush
from .tree import flatten, inner
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
# The classic fixed step of hook-based K-FAC libraries (and kfac_func's defaults before the quadratic-model
# step): ``lr``, ``momentum`` and the KL clip, exact (eigen) damping, statistics every step.
# ``KFAC(model, **FIXED_STEP, lr=...)``; the speed benchmarks time it against the hook baseline and peers.
FIXED_STEP: dict[str, Any] = {"adaptive": None, "damping_adaptation": False, "damping_mode": "eigen",
                              "factor_period": 1}
Flat = dict[str, Tensor]


class KFACState(NamedTuple):
    """Everything the optimizer carries between steps, tensors only (``{}`` for parts a method does not
    use): the step counter, the sampling key, the damping ``λ``, the moving average of the Kronecker
    factors, the eigendecompositions (``damping_mode="eigen"``, E-KFAC, spectral coarse spaces; an
    embedding's identity ``Q_A`` is stored as an empty tensor), the π-damped inverse factors
    (``"factored"``), E-KFAC's moving average of the scaling, the two-level coarse space and the moving
    average of its coarse matrix, and per parameter path the velocity (the momentum buffer, or the
    previous update of the adaptive step; at least float32, like the statistics)."""

    step: Tensor
    key: Tensor
    damping: Tensor
    factors: MovingAverage
    eigen: dict
    inverses: dict
    scale: Any
    space: Any
    coarse: Any
    velocity: Flat


class Schedule(NamedTuple):
    """The periodic work of one step (host booleans, from the step counter); ``statistics``: whether it
    reads the Fisher statistics ``(a, g)`` of its batch; ``positions``: whether it reads them per position
    (E-KFAC's scaling, the coarse matrix, the Fisher quadratic forms) — if not, they are captured in the compact
    form the factors need (:meth:`Optimizer.compact`)."""

    refresh: bool
    factors: bool
    scale: bool
    coarse: bool
    adapt: bool
    statistics: bool
    positions: bool


class StepInfo(NamedTuple):
    """What a step did (0-dim tensors): the loss before the step, the learning rate ``α`` and momentum
    ``μ`` applied (after any KL clip), the damping ``λ`` for the next step, the reduction ratio ``ρ``
    (NaN when not computed), whether the step was rejected, and whether every batch quantity was finite
    (if not, nothing changed). ``grads``: the loss's gradient, shaped like the parameters; ``buffers``:
    a module's buffers after the forward (BatchNorm running statistics), for the caller to keep;
    ``direction``: per optimised parameter path (a flat dict) the preconditioned gradient ``Δ`` (times the KL clip's ``ν``
    with a fixed learning rate) that the update steps against — :class:`kfac_func.Preconditioner` hands it
    to another optimizer."""

    loss: Tensor
    alpha: Tensor
    mu: Tensor
    damping: Tensor
    rho: Tensor
    rejected: Tensor
    finite: Tensor
    grads: Any
    buffers: dict
    direction: Any


class Hyper(NamedTuple):
    """Per-parameter learning rate, momentum and weight decay (path → float); parameters absent from
    ``lr`` are held fixed. The ``torch.optim`` wrapper passes its parameter groups this way."""

    lr: dict[str, float]
    momentum: dict[str, float]
    weight_decay: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Options:
    """The validated options of :func:`kfac` (see its docstring)."""

    loss: Loss | None  # None: named by the targets (class indices: cross-entropy), else an error
    lr: float
    momentum: float
    weight_decay: float
    damping: float
    damping_mode: str
    fisher: str
    mc_samples: int
    factor_period: int
    inverse_period: int
    ema_decay: float
    kl_clip: float | None
    reduce: Any
    stats_fraction: float
    decomposition_dtype: torch.dtype | None
    seed: int
    method: str
    scale_period: int
    coarse_space: str
    coarse_vectors: int
    coarse_mode: str
    combination: str
    coarse_weights: tuple[float, float]
    adaptive: str | None
    quadratic_curvature: str
    quadratic_fraction: float | None  # None: quadratic.sub_batch's rule
    damping_adaptation: bool
    damping_interval: int
    damping_decay: float
    damping_bounds: tuple[float, float]
    reject_steps: bool
    lazy_factors: bool
    max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM
    factor_sides: Any = None
    output: Any = None
    batch_dims: Any = 0
    step_scale: Callable[[Tensor], Any] | None = None

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr >= 0 and math.isfinite(self.lr),
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "damping": self.damping > 0 and math.isfinite(self.damping),
            "damping_mode": self.damping_mode in MODES,
            "fisher": self.fisher in FISHER_TYPES,
            "mc_samples": self.mc_samples >= 1,
            "factor_period": self.factor_period >= 1,
            "inverse_period": self.inverse_period >= 1,
            "ema_decay": 0 <= self.ema_decay < 1,
            "kl_clip": self.kl_clip is None or self.kl_clip > 0,
            "stats_fraction": 0 < self.stats_fraction <= 1,
            "decomposition_dtype": self.decomposition_dtype in (None, torch.float32, torch.float64),
            "reduce": isinstance(self.reduce, (bool, dict)) or self.reduce == "auto",
            "method": self.method in METHODS,
            "scale_period": self.scale_period >= 1,
            "coarse_space": self.coarse_space in SPACES,
            "coarse_vectors": self.coarse_vectors >= 1
            and (self.coarse_vectors == 1 or self.coarse_space == "spectral"),
            "coarse_mode": self.coarse_mode in COARSE_MODES,
            "combination": self.combination in COMBINATIONS,
            "adaptive": self.adaptive in ADAPTIVE,
            "quadratic_curvature": self.quadratic_curvature in ("ggn", "fisher"),
            "quadratic_fraction": self.quadratic_fraction is None or 0 < self.quadratic_fraction <= 1,
            "damping_interval": self.damping_interval >= 1,
            "damping_decay": 0 < self.damping_decay < 1,
            "damping_bounds": 0 < self.damping_bounds[0] <= self.damping <= self.damping_bounds[1],
            "max_factor_dim": isinstance(self.max_factor_dim, int) and not isinstance(self.max_factor_dim, bool)
            and self.max_factor_dim >= 1,
            "factor_sides": self.factor_sides is None or isinstance(self.factor_sides, dict),
            "step_scale": self.step_scale is None or callable(self.step_scale),
        }
        if self.method == "ekfac" and self.damping_mode != "eigen":
            raise ValueError(
                "invalid damping_mode for method='ekfac': E-KFAC adds the damping to its scaling ('eigen')"
            )
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")

    @property
    def needs_eigen(self) -> bool:
        return self.damping_mode == "eigen" or self.method == "ekfac" or self.coarse_space == "spectral"

    @property
    def damping_factor(self) -> float:
        """The Levenberg–Marquardt factor ``ω = damping_decay^damping_interval``."""
        return self.damping_decay**self.damping_interval


class Optimizer(NamedTuple):
    """The pure functions of :func:`kfac`."""

    init: Callable[..., KFACState]
    step: Callable[..., tuple[Any, KFACState, StepInfo]]
    update: Callable[..., tuple[Any, KFACState, StepInfo]]
    apply: Callable[..., tuple[Any, KFACState, StepInfo]]
    schedule: Callable[[KFACState], Schedule]
    compact: Callable[[Plan, Schedule], dict[str, bool]]
    options: Options


def kfac(
    model: Model,
    *,
    loss: Loss | str | torch.nn.Module | None = None,
    lr: float = 1e-2,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    damping: float = 1e-3,
    damping_mode: str | None = None,
    fisher: str = "mc",
    mc_samples: int = 1,
    factor_period: int = 5,
    inverse_period: int = 10,
    ema_decay: float = 0.95,
    kl_clip: float | None = 1e-3,
    reduce: bool | dict[str, bool] | str = "auto",
    stats_fraction: float = 1.0,
    decomposition_dtype: torch.dtype | None = None,
    seed: int = 0,
    method: str = "kfac",
    scale_period: int = 1,
    coarse_space: str = "nicolaides",
    coarse_vectors: int = 1,
    coarse_mode: str = "exact",
    combination: str = "additive",
    coarse_weights: tuple[float, float] = (1.0, 1.0),
    adaptive: str | None = "lr_momentum",
    quadratic_curvature: str = "ggn",
    quadratic_fraction: float | None = None,
    damping_adaptation: bool = True,
    damping_interval: int = 5,
    damping_decay: float = 0.95,
    damping_bounds: tuple[float, float] = (1e-8, 1e8),
    reject_steps: bool = False,
    lazy_factors: bool = False,
    max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
    factor_sides: Overrides | None = None,
    output: Selector = None,
    batch_dims: BatchDims = 0,
    step_scale: Callable[[Tensor], Tensor | float] | None = None,
    communicator: Communicator | None = None,
) -> Optimizer:
    """K-FAC, E-KFAC or two-level K-FAC as pure ``init``/``step`` functions for an ``nn.Module`` (run
    through ``functional_call`` on the given parameters) or a function ``f(params, x)``.

    ``loss``: a :class:`~kfac_func.Loss`, its kind (``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``) or
    torch's loss module; left out, class-index (integer) targets mean cross-entropy and any other targets are an
    error asking for it — never a silent guess. The other options are those of :class:`kfac_func.KFAC` (which
    wraps this): ``method`` ``"kfac"`` /
    ``"ekfac"`` / ``"two_level"`` (``coarse_space``, ``coarse_vectors``, ``coarse_mode``,
    ``combination``, ``coarse_weights``); ``damping`` ``λ`` and ``damping_mode`` ``"eigen"`` (exact
    damping of ``G ⊗ A``) or ``"factored"`` (π-damped inverses, two matmuls per layer); ``fisher``
    ``"mc"`` (``mc_samples``) / ``"exact"`` / ``"empirical"``; ``factor_period``, ``inverse_period``,
    ``scale_period``, ``ema_decay``; ``stats_fraction`` (statistics from the first rows of the batch);
    ``reduce`` (``"auto"``: Eschenhagen et al. per layer); ``decomposition_dtype`` (``None``: float32 where
    it is as accurate as float64 for the damped solve, see :mod:`kfac_func.precision`); ``lr``,
    ``momentum``, ``weight_decay``, ``kl_clip`` (``None`` for none); ``adaptive`` ``"lr"`` /
    ``"lr_momentum"`` with ``quadratic_curvature`` ``"ggn"``/``"fisher"`` (``quadratic_fraction``: the GGN
    form from the first rows of the batch, ``None`` for :func:`~kfac_func.quadratic.sub_batch`'s rule — a
    quarter of a batch that holds enough loss terms, else all of it; the Fisher form uses the statistics' rows,
    ``stats_fraction``);
    ``damping_adaptation`` with ``damping_interval``, ``damping_decay``, ``damping_bounds``; ``reject_steps``;
    ``seed`` (of ``state.key``). The defaults are the quadratic-model step (``adaptive="lr_momentum"``,
    ``damping_adaptation=True``, factored damping — eigen for E-KFAC — and statistics every 5 steps);
    :data:`FIXED_STEP` gives the fixed one. ``max_factor_dim`` and ``factor_sides``: the size policy, which holds each side of a wide
    layer's factor block-diagonal, diagonal or as a multiple of the identity (:mod:`kfac_func.layout`).
    ``communicator`` and ``lazy_factors``: data-parallel training (:mod:`kfac_func.distributed`).
    ``output`` (which tensor of the model's return value the loss reads) and ``batch_dims`` (which dim of each
    input holds the examples): :mod:`kfac_func.calls`; ``inputs`` may be :class:`~kfac_func.calls.Args`.
    ``step_scale``: ``s(t)``, a function of the steps taken (``state.step``, a tensor) that multiplies every
    update: ``δ = s(t)·(−αΔ + μδ_prev)`` for the adaptive step (the scaled update is the next step's previous
    one, and ``ρ`` compares the loss with the model's prediction for it), ``lr·s(t)`` for the fixed step (the
    KL clip bounds the scaled step); ``None`` is ``s = 1``. :func:`~kfac_func.decay.cosine_decay` anneals it
    over a run of known length, which the quadratic model alone does not: its step follows the batch's noise.
    """
    if damping_mode is None:  # E-KFAC adds λ to its scaling
        damping_mode = "eigen" if method == "ekfac" else "factored"
    options = Options(
        None if loss is None else as_loss(loss), lr, momentum, weight_decay, damping, damping_mode, fisher, mc_samples, factor_period,
        inverse_period, ema_decay, kl_clip, reduce, stats_fraction, decomposition_dtype, seed, method,
        scale_period, coarse_space, coarse_vectors, coarse_mode, combination, tuple(coarse_weights), adaptive,
        quadratic_curvature, quadratic_fraction, damping_adaptation, damping_interval, damping_decay,
        tuple(damping_bounds), reject_steps, lazy_factors and communicator is not None, max_factor_dim,
        None if factor_sides is None else {k: dict(v) for k, v in factor_sides.items()}, output, batch_dims,
        step_scale,
    )
    install()  # the step's host reads run outside torch.compile's graphs (imports torch's compiler now)
    return _Transform(model, options, communicator or Communicator()).functions()


def _store(tree: Any) -> Any:
    """``None`` (an identity ``Q_A``) → an empty tensor, so that the state holds tensors only."""
    return optree.tree_map(lambda t: torch.empty(0) if t is None else t, tree, none_is_leaf=True)


def _load(tree: Any) -> Any:
    """Undo :func:`_store`."""
    return optree.tree_map(lambda t: None if t.dim() == 1 and t.numel() == 0 else t, tree)


def _select(ok: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old`` (same structure): a ``torch.where`` per leaf that differs when
    traced, one host read of ``ok`` in eager mode (no copies)."""
    if not traced(ok):
        return new if bool(ok) else old
    return optree.tree_map(lambda n, o: n if n is o else torch.where(ok, n, o), new, old)


def _zero_unless(ok: Tensor, tree: Any) -> Any:
    """``tree``, or zeros in its place when not ``ok``."""
    return _select(ok, tree, optree.tree_map(torch.zeros_like, tree)) if traced(ok) or not bool(ok) else tree


def _compile_fell_back(step: Tensor) -> bool:
    """Whether this vmapped step runs as Python under torch.compile's frame hook: the compiled function around it
    fell back to eager (a host read cannot break a graph inside ``vmap``). Never traced (``is_compiling``)."""
    return (torch._C._functorch.is_batchedtensor(step) and "torch._dynamo" in sys.modules
            and torch._C._dynamo.eval_frame.get_eval_frame_callback() is not None)


@eager  # the step's one graph break under torch.compile, without a warning about .item()
def _host_int(t: Tensor) -> int:
    """A counter's value on the host. Under ``vmap`` the members must share it (an ensemble steps
    together); it is read from the batched tensor."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    if t.dim() and not bool((t == t.flatten()[0]).all()):
        raise ValueError(f"the members of a vmapped state are at different steps {t.tolist()}; step them together")
    return int(t.flatten()[0]) if t.dim() else int(t)


def _gram(directions: list[Flat], weights: dict[str, float] | list[str]) -> Tensor:
    """``[Σₙ wₙ ⟨dᵢₙ, dⱼₙ⟩]`` (float64, symmetric: each pair once) — :func:`~kfac_func.tree.inner`."""
    k = len(directions)
    entries = {(i, j): inner(directions[i], directions[j], weights) for i in range(k) for j in range(i, k)}
    return torch.stack([torch.stack([entries[min(i, j), max(i, j)] for j in range(k)]) for i in range(k)])


class _Transform:
    """The closure of :func:`kfac`: model, options, communicator and the traced plans."""

    def __init__(self, model: Model, options: Options, comm: Communicator):
        self.model, self.o, self.comm = model_io(model, options.output, options.batch_dims), options, comm

    def functions(self) -> Optimizer:
        return Optimizer(self.init, self.step, self.update, self.apply, self.schedule, self.compact, self.o)

    # ----------------------------------------------------------------------------------------- state
    def init(self, params: Any, inputs: Any, key: Tensor | None = None) -> KFACState:
        """The state before the first step: zero averages, the decompositions of zero factors (replaced
        at step 0), zero velocity and the sampling ``key`` (default ``random.key(seed + rank)``)."""
        o = self.o
        flat, _ = flatten(params)
        plan = trace(self.model, params, inputs)
        require_layers(plan)
        first = next(iter(flat.values()))
        zeros: dict[str, KroneckerFactors] = {}
        dims = layer_dims(plan.layers, flat)
        layout = side_layout(dims, plan.layers, o.max_factor_dim, o.factor_sides)
        for name, spec in plan.layers.items():
            w = flat[spec.weight]
            blocks, d_g, d_a = dims[name]
            (a, g), dtype = layout[name], stat_dtype(w.dtype)
            zeros[name] = KroneckerFactors(sides.zeros(*a, blocks, d_a, w, dtype), sides.zeros(*g, blocks, d_g, w, dtype))
        empty = MovingAverage({}, first.new_zeros(()), first.new_zeros((), dtype=torch.int64))  # no tracked layer
        factors = init_average(zeros) if zeros else empty
        eigen, inverses, scale, space, coarse = {}, {}, {}, {}, {}  # distinct: compiled guards check aliasing
        # the decompositions of zero factors (the layers this rank holds: KAISA), replaced at step 0
        if o.needs_eigen:
            eigen = _store(self.comm.decompose(zeros, eigendecompose, EigenFactors))
        if o.damping_mode == "factored":
            inverses = self.comm.decompose(zeros, lambda f: inverse_factors(f, o.damping), InverseFactors)
        if o.method == "ekfac":
            scale = init_average({n: f.G.new_zeros(factor_dims(f)) for n, f in zeros.items()})
        if o.method == "two_level":
            spectral = o.coarse_space == "spectral"
            space = spectral_space(_load(eigen), o.coarse_vectors) if spectral else nicolaides_space(zeros)
            k = sum(u.shape[0] for u in space.UG.values())
            ref = next(iter(zeros.values())).G
            coarse = init_average(ref.new_zeros((k, k)))
        return KFACState(
            step=torch.zeros((), dtype=torch.int64),
            key=random.key(o.seed + self.comm.rank) if key is None else key,
            damping=torch.tensor(float(o.damping), dtype=torch.float64),
            factors=factors, eigen=eigen, inverses=inverses, scale=scale, space=space, coarse=coarse,
            velocity={n: torch.zeros_like(p, dtype=stat_dtype(p.dtype)) for n, p in flat.items()},
        )

    def schedule(self, state: KFACState) -> Schedule:
        if not torch.compiler.is_compiling() and _compile_fell_back(state.step):
            warnings.warn(
                "kfac_func: torch.compile could not compile vmap(opt.step) — the step reads its schedule on the host "
                "— so it ran eagerly; for a compiled ensemble compile torch.func.vmap(opt.update) with fullgraph=True "
                "and pass opt.schedule(state) of one member",
                stacklevel=2,
            )
        o, t = self.o, _host_int(state.step)
        refresh = t % o.inverse_period == 0
        factor_step = t % o.factor_period == 0
        scale = o.method == "ekfac" and (refresh or t % o.scale_period == 0)
        coarse = o.method == "two_level" and (factor_step or refresh or o.combination != "additive")
        adapt = o.damping_adaptation and t % o.damping_interval == 0
        fisher_forms = o.quadratic_curvature == "fisher" and bool(o.adaptive or adapt or o.reject_steps)
        positions = scale or coarse or fisher_forms
        return Schedule(refresh, factor_step, scale, coarse, adapt, factor_step or positions, positions)

    def _reduce(self, plan: Plan) -> bool | dict[str, bool]:
        """The ``reduce`` option resolved for ``plan`` (``"auto"``: :func:`default_reduce`)."""
        return default_reduce(plan) if self.o.reduce == "auto" else self.o.reduce

    def compact(self, plan: Plan, schedule: Schedule) -> dict[str, bool]:
        """The layers whose statistics a step with ``schedule`` captures in the compact form of their factors,
        each mapped to its convention (``True``: reduce) — every layer when nothing reads the statistics per
        position (``schedule.positions``), none otherwise: the reduce layers' pooled over positions, the
        embeddings' as token counts (:func:`~kfac_func.capture.layer_statistics`)."""
        if not schedule.statistics or schedule.positions:
            return {}
        reduce = self._reduce(plan)
        return {n: reduces(reduce, n) for n in plan.layers}

    # ------------------------------------------------------------------------------------------ step
    def step(self, params: Any, state: KFACState, inputs: Any, targets: Tensor, hyper: Hyper | None = None):
        """One step: :meth:`schedule` then :meth:`update`."""
        return self.update(params, state, inputs, targets, self.schedule(state), hyper)

    def update(self, params: Any, state: KFACState, inputs: Any, targets: Tensor, schedule: Schedule,
               hyper: Hyper | None = None) -> tuple[Any, KFACState, StepInfo]:
        """One step with its :class:`Schedule` given (for ``torch.compile(..., fullgraph=True)``)."""
        o, comm = self.o, self.comm
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a tensor (class indices or loss values), got {type(targets).__name__}")
        flat, spec = flatten(params)
        hyper = hyper or Hyper(*({n: v for n in flat} for v in (o.lr, o.momentum, o.weight_decay)))
        plan = trace(self.model, params, inputs)
        require_layers(plan)
        n = batch_size(inputs, o.batch_dims)
        examples = max(1, math.ceil(o.stats_fraction * n)) if o.stats_fraction < 1 else None
        loss, share = comm.shard_loss(for_targets(o.loss, targets), targets, examples or n)  # the global batch's R
        key, sample_key = random.split(state.key)
        # torch's RNG (dropout, noise) for every evaluation of the model in this step: forked and seeded from a
        # third key (split(k, 3)[:2] is split(k)), so that the gradient's forward, the quadratic model's and the
        # reduction ratio's draw the same masks; a host read of the key (none under torch.compile or vmap,
        # where the RNG is neither forked nor seeded)
        seed = random.torch_seed(random.split(state.key, 3)[2]) if not traced(state.key) else None
        # Γ = gᵀā for the preconditioner when the gradient it preconditions is the local batch's own
        low_rank = comm.world == 1 and not (o.adaptive and any(hyper.weight_decay.values()))
        with torch.enable_grad(), random.seeded(seed, flat.values()):
            cap = capture(self.model, params, inputs, targets, loss, fisher=o.fisher if schedule.statistics else None,
                          mc_samples=o.mc_samples, key=sample_key, stats_examples=examples, plan=plan,
                          low_rank=low_rank, compact=self.compact(plan, schedule))
        # handed over, not kept in this frame: _apply frees the statistics once the factors hold them
        held = [cap._replace(grads=spec.like(cap.grads, "gradients"))]
        del cap
        return self._apply(flat, spec, state, key, held.pop(), plan, schedule, hyper, share, loss, inputs, targets,
                           seed=seed)

    def apply(self, params: Any, state: KFACState, cap: Capture, plan: Plan, schedule: Schedule,
              hyper: Hyper | None = None, *, share: float = 1.0, reduced: bool = False
              ) -> tuple[Any, KFACState, StepInfo]:
        """One step from a :class:`~kfac_func.capture.Capture` taken elsewhere — the loss, gradients and,
        when ``schedule`` needs them, the statistics of ``fisher`` for the model's :func:`trace` ``plan``
        (how the ``torch.optim`` flows use the user's own forward and backward). The sampling key advances
        as in :meth:`update` (a capture drawing MC samples takes ``random.split(state.key)[1]``).
        ``share``: this rank's share of the global batch (its factors are weighted by it before the sum);
        ``reduced``: the gradients are already the global batch's (``DistributedDataParallel``). Options
        that evaluate the model again (``adaptive`` with ``quadratic_curvature="ggn"``,
        ``damping_adaptation``, ``reject_steps``) need :meth:`update`."""
        o = self.o
        needs_batch = {"adaptive with quadratic_curvature='ggn'": o.adaptive and o.quadratic_curvature == "ggn",
                       "damping_adaptation": o.damping_adaptation, "reject_steps": o.reject_steps}
        for what, needed in needs_batch.items():
            if needed:
                raise ValueError(f"{what} evaluates the model on the batch again: it needs step(inputs, targets)")
        require_layers(plan)
        flat, spec = flatten(params)
        hyper = hyper or Hyper(*({n: v for n in flat} for v in (o.lr, o.momentum, o.weight_decay)))
        key = random.split(state.key)[0]
        cap = cap._replace(grads=spec.like(cap.grads, "gradients"))
        return self._apply(flat, spec, state, key, cap, plan, schedule, hyper, share, o.loss, None, None,
                           reduced=reduced)

    def _apply(self, flat: Flat, spec: Any, state: KFACState, key: Tensor, cap: Capture, plan: Plan,
               schedule: Schedule, hyper: Hyper, share: float, loss: Loss, inputs: Any, targets: Tensor | None,
               reduced: bool = False, seed: int | None = None) -> tuple[Any, KFACState, StepInfo]:
        """The step after the capture: averages, decompositions, preconditioning, the update, the guard;
        ``seed``: torch's RNG for the model's evaluations (:func:`kfac_func.random.seeded`)."""
        o, comm = self.o, self.comm
        batch = kronecker_factors(cap, reduce=self._reduce(plan), layers=plan.layers, max_factor_dim=o.max_factor_dim,
                                  factor_sides=o.factor_sides) if schedule.factors else None
        if batch is not None:
            batch = weight_inputs(batch, share)
        # one bucketed all-reduce; lazy factors stay local (a NaN flag keeps the skip decision global)
        lazy = o.lazy_factors and batch is not None
        flag = torch.where(all_finite(batch), 0.0, float("nan")) if lazy else None
        # gradients already reduced (by DistributedDataParallel) are not summed again
        total_loss, grads, uses, summed = comm.sum((cap.loss.detach(), {} if reduced else cap.grads,
                                                    {} if reduced else cap.uses, flag if lazy else batch))
        grads, uses = (cap.grads, cap.uses) if reduced else (grads, uses)
        if not lazy:
            batch = summed
        if batch is not None and not schedule.positions:  # only the factors read the statistics: freed now
            cap = cap._replace(a={}, g={})
        # NaN guard: decided on the device; the statistics are zeroed when not finite so that no
        # decomposition sees a NaN, and the whole new state is discarded at the end
        # (a step without statistics has none: no empty dict is built inside a compiled graph)
        ok = all_finite((total_loss, grads, summed if batch is not None else ((cap.a, cap.g) if cap.a else ())))
        grads, a, g, parts, uses = _zero_unless(ok, (grads, cap.a, cap.g, cap.low_rank, uses))
        cap = cap._replace(loss=total_loss, a=a, g=g, low_rank=parts, uses=uses)
        new = state._replace(key=key)
        if batch is not None:
            batch = _zero_unless(ok, batch)
            new = new._replace(factors=update_average(state.factors, batch, o.ema_decay, checked=True)[0])
        batch = summed = None  # in the average now
        if schedule.refresh:
            new = self._refresh(new)
        if schedule.scale:
            scale = comm.sum(ekfac_scaling(cap, _load(new.eigen)))
            ok = ok & all_finite(scale)
            restart = init_average(scale) if schedule.refresh else new.scale
            new = new._replace(scale=update_average(restart, scale, o.ema_decay, checked=True)[0])
        coarse = None
        if schedule.coarse:
            coarse = self._coarse_matrix(cap, new.space, share)
            ok = ok & all_finite(coarse)
            restart = o.coarse_space == "spectral" and schedule.refresh
            average = init_average(coarse) if restart else new.coarse
            new = new._replace(coarse=update_average(average, coarse, o.ema_decay, checked=True)[0])
        damping = state.damping
        held = {name: s for name, s in plan.layers.items() if comm.holds(name)}  # KAISA: layers this rank serves
        factored = o.damping_mode == "factored"
        kwargs: dict[str, Any] = dict(layers=held, damping=None if factored else damping, mode=o.damping_mode,
                                      checked=True, low_rank=cap.low_rank, uses=cap.uses)  # λ: validated by Options, bounded
        factors = new.inverses if factored else _load(new.eigen)
        if o.method == "ekfac":
            factors = ekfac_factors(_load(new.eigen), averaged(new.scale))
        elif o.method == "two_level":
            additive = o.combination == "additive"
            # the multiplicative forms project with Q = R₀ᵀ(R₀C̃R₀ᵀ)⁻¹R₀: it must use the batch's own C̃
            matrix = averaged(new.coarse) if additive else coarse
            kwargs.update(coarse=CoarseCorrection(new.space, matrix), combination=o.combination,
                          capture=None if additive else cap, weights=o.coarse_weights, all_reduce=comm.sum)
        lr = hyper.lr
        l2 = {n: hyper.weight_decay.get(n, 0.0) for n in lr}
        # the objective is L + ½ Σ η‖θ‖²: its gradient ∇ + ηθ enters the quadratic model
        objective = {n: g + l2[n] * flat[n] if l2.get(n) else g for n, g in grads.items()}
        delta = comm.spread(precondition(flat, objective if o.adaptive else grads, factors, **kwargs), plan.layers)
        multiplier = None
        if o.step_scale is not None:  # a non-finite scale skips the step like a non-finite gradient
            multiplier = torch.as_tensor(o.step_scale(state.step), dtype=torch.float64, device=state.step.device)
            ok = ok & multiplier.isfinite()
        if o.adaptive:
            update, velocity, alpha, mu, forms = self._adaptive(delta, objective, flat, spec, state, inputs, targets,
                                                                cap, plan, damping, loss, hyper, seed, multiplier)
            direction = delta
        else:
            update, velocity, alpha, mu, direction = self._fixed(delta, grads, flat, state, hyper, multiplier)
            delta = forms = None  # the direction is Δ's clipped copy: Δ is not held through the rest of the step
        moved = {n: (p + update[n]).to(p.dtype) if n in update else p for n, p in flat.items()}  # float32 update
        nan = torch.full((), float("nan"), dtype=torch.float64)
        rho, rejected, lam = nan, torch.zeros((), dtype=torch.bool), damping
        if schedule.adapt or o.reject_steps:
            rho, worse = self._reduction_ratio(moved, update, objective, flat, spec, inputs, targets, cap, plan, forms,
                                               loss, hyper, seed)
            if schedule.adapt:
                lam = levenberg_marquardt(damping, rho, factor=o.damping_factor, min_damping=o.damping_bounds[0],
                                          max_damping=o.damping_bounds[1])
            if o.reject_steps:  # keep θ and the velocity; λ rises once, even if L-M raised it too
                rejected = worse
                raised = torch.maximum(lam, (damping / o.damping_factor).clamp_max(o.damping_bounds[1]))
                lam = torch.where(worse, raised, lam)
                moved = {n: torch.where(worse, p, moved[n]) if n in update else p for n, p in flat.items()}
                velocity = {n: torch.where(worse, state.velocity[n], v) for n, v in velocity.items()}
            new = new._replace(damping=lam)  # factored: the cached inverses take it at their next refresh
        new = new._replace(step=state.step + 1, velocity={**state.velocity, **velocity})
        new_state, moved = _select(ok, (new, moved), (state, flat))
        info = StepInfo(
            loss=total_loss, alpha=torch.where(ok, alpha, nan), mu=torch.where(ok, mu, nan), damping=new_state.damping,
            rho=torch.where(ok, rho, nan), rejected=rejected | ~ok, finite=ok,
            grads=spec.unflatten(cap.grads), buffers=cap.buffers, direction=direction,
        )
        return spec.unflatten(moved), new_state, info

    # ---------------------------------------------------------------------------------- components
    @phase("update")
    def _fixed(self, delta: Flat, grads: Flat, params: Flat, state: KFACState, hyper: Hyper, step_scale=None):
        """Fixed learning rate and momentum with the KL clip; weight decay added after preconditioning; every
        learning rate times ``step_scale`` (a float64 scalar tensor, ``None`` for 1). Returns the update, velocity
        (subnormals flushed), ``α``, ``μ`` and the clipped direction ``νΔ``."""
        o, lr = self.o, hyper.lr
        scale = torch.ones((), dtype=torch.float64)
        if o.kl_clip is not None:
            # |Σ (sη)² Δ·∇|: the two-level forms need not be symmetric
            vg = inner(delta, grads, {n: lr[n] ** 2 for n in lr}).abs()
            vg = vg if step_scale is None else vg * step_scale**2
            scale = torch.where(vg > 0, (o.kl_clip / torch.where(vg > 0, vg, 1.0)).sqrt().clamp_max(1.0), scale)
        update, velocity, clipped = {}, {}, {}
        for n in lr:
            vdtype = state.velocity[n].dtype  # at least float32
            d = clipped[n] = delta[n].to(vdtype) * scale.to(vdtype) if o.kl_clip is not None else delta[n].to(vdtype)
            if hyper.weight_decay.get(n):
                d = d.add(params[n], alpha=hyper.weight_decay[n])
            if hyper.momentum.get(n):
                d = velocity[n] = flush(d.add(state.velocity[n], alpha=hyper.momentum[n]))  # μv + d, one pass
            update[n] = flush(-lr[n] * d if step_scale is None else (-lr[n] * step_scale).to(d.dtype) * d)
        first = next(iter(lr), None)
        alpha = torch.as_tensor(lr[first] if first else 0.0, dtype=torch.float64) * scale
        alpha = alpha if step_scale is None else alpha * step_scale
        mu = torch.tensor(float(hyper.momentum.get(first, 0.0)) if first else 0.0, dtype=torch.float64)
        return update, velocity, alpha, mu, clipped

    @phase("update")
    def _adaptive(self, delta, grads, params, spec, state, inputs, targets, cap, plan, damping, loss, hyper, seed=None,
                  step_scale=None):
        """``δ = s(αΔ + μ δ_prev)`` with ``(α, μ)`` minimising the quadratic model (``μ`` fixed to the first
        parameter's momentum when ``adaptive="lr"``) and ``s = step_scale`` (``None`` for 1); the update, which is
        also the velocity, has its subnormals flushed."""
        names = list(hyper.lr)
        zero = {n: torch.zeros_like(p) for n, p in params.items() if n not in hyper.lr}  # outside every group
        # the directions are (−Δ, δ_prev); the forms are taken of (Δ, δ_prev) and signed after, so that no negated
        # copy of Δ is made (a model's worth of memory)
        directions = [{**{n: delta[n] for n in names}, **zero}, {**{n: state.velocity[n] for n in names}, **zero}]
        sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=next(iter(params.values())).device)
        forms = self._quadratic_forms(directions, params, spec, inputs, targets, cap, plan, loss, hyper, seed)
        forms = forms * sign.outer(sign).to(forms.dtype)
        gram = _gram(directions, names) * sign.outer(sign)
        b = torch.stack([inner(grads, d, names) for d in directions]).to(forms.dtype) * sign.to(forms.dtype)
        fixed = {1: hyper.momentum.get(names[0], 0.0)} if self.o.adaptive == "lr" else None
        x, _ = solve_quadratic_model(forms, gram.to(forms.dtype), b, damping, fixed)
        objective = cap.loss.double() + 0.5 * inner(params, params, hyper.weight_decay)
        x = safe_coefficients(forms, gram.to(forms.dtype), b, damping, x, objective, fixed is None)
        x = x if step_scale is None else x * step_scale.to(x.dtype)
        step, prev = directions
        # flushed a parameter at a time: no second parameter-sized tree
        update = {n: flush((-x[0]).to(step[n].dtype) * step[n] + x[1].to(prev[n].dtype) * prev[n]) for n in names}
        return update, dict(update), x[0], x[1], (forms, b, x)

    def _quadratic_forms(self, directions, params, spec, inputs, targets, cap, plan, loss, hyper, seed=None) -> Tensor:
        """``[dᵢᵀ (C + ηI) dⱼ]`` with ``C`` the exact GGN (``quadratic_curvature="ggn"``, the model run with
        torch's RNG seeded by ``seed``) or the captured Fisher."""
        with torch.enable_grad():
            if self.o.quadratic_curvature == "ggn":
                examples = sub_batch(self.o.quadratic_fraction, batch_size(inputs, self.o.batch_dims), loss, targets)
                forms = ggn_quadratic_forms(self.model, spec.unflatten(params), inputs, targets, loss,
                                            [spec.unflatten(d) for d in directions], examples, seed=seed)
            else:
                forms = fisher_quadratic_forms(cap, directions, plan.layers)
        forms = self.comm.sum(forms)
        return (forms + _gram(directions, hyper.weight_decay).to(forms.dtype)).double()

    def _reduction_ratio(self, moved, update, grads, params, spec, inputs, targets, cap, plan, forms, loss, hyper,
                         seed=None):
        """``ρ`` for the step ``update`` (undamped model) to the parameters ``moved`` and whether the new loss is NaN
        or higher; the model runs with torch's RNG seeded by ``seed`` (the gradient's masks)."""
        if forms is None:
            d = {n: update.get(n, torch.zeros_like(params[n])) for n in params}
            quad = self._quadratic_forms([d], params, spec, inputs, targets, cap, plan, loss, hyper, seed)[0, 0]
            change = 0.5 * quad + inner(grads, d, list(update))
        else:
            k, b, x = forms
            change = 0.5 * x @ k @ x + b @ x
        penalty = lambda p: 0.5 * inner(p, p, hyper.weight_decay)  # noqa: E731
        with random.seeded(seed, moved.values()):
            out = as_function(self.model)(spec.unflatten(moved), inputs)
        after = self.comm.sum(loss.sliced_value(out, targets)) + penalty(moved).double()
        before = (cap.loss + penalty(params)).double()
        return reduction_ratio(before, after, change), ~(after <= before)

    def _factors(self, state: KFACState) -> dict:
        """The averaged factors of the global batch (lazy factors: summed over ranks now)."""
        factors = averaged(state.factors)
        return self.comm.sum(factors) if self.o.lazy_factors else factors

    def _inverses(self, state: KFACState, factors: dict | None = None) -> dict:
        """π-damped inverse factors at the state's damping, each layer computed by its owner rank."""
        compute = lambda f: inverse_factors(f, state.damping, self.o.decomposition_dtype, checked=True)  # noqa: E731
        return self.comm.decompose(self._factors(state) if factors is None else factors, compute, InverseFactors)

    def _coarse_matrix(self, cap, space, share: float) -> Tensor:
        """The global batch's coarse matrix: the exact one is a sum over examples; the Kronecker surrogate
        is the product of a mean (weighted by this rank's share of the examples) and a sum."""
        if self.o.coarse_mode == "exact":
            return self.comm.sum(coarse_matrix(cap, space, "exact"))
        inputs, grads = kronecker_coarse_parts(cap, space)
        inputs, grads = self.comm.sum((inputs * share, grads))
        return inputs * grads

    def _refresh(self, state: KFACState) -> KFACState:
        """New decompositions (and eigenbasis, coarse space) from the averaged factors."""
        o = self.o
        factors = self._factors(state)
        if o.needs_eigen:
            compute = lambda f: eigendecompose(f, o.decomposition_dtype, state.damping)  # noqa: E731
            state = state._replace(eigen=_store(self.comm.decompose(factors, compute, EigenFactors)))
        if o.damping_mode == "factored":
            state = state._replace(inverses=self._inverses(state, factors))
        if o.method == "two_level" and o.coarse_space == "spectral":
            state = state._replace(space=spectral_space(_load(state.eigen), o.coarse_vectors))
        return state
