"""kfac_func against peer libraries and the autograd exact-Fisher baseline: speed, scaling, agreement,
approximation quality.

    python benchmarks/bench_peers.py [--quick] [--out DIR] [--repeats 7] [--skip scaling,quality,...]

Run it in a venv that has the peers, installed with torch pinned (a peer that is not installed or fails is
printed as ``missing: reason``, never dropped)::

    python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install torch==2.13.0
    /tmp/peers-venv/bin/pip install -c benchmarks/constraints.txt curvlinops-for-pytorch backpack-for-pytorch \
        asdfghjkl nngeometry matplotlib
    /tmp/peers-venv/bin/pip install -c benchmarks/constraints.txt -e .
    /tmp/peers-venv/bin/python benchmarks/bench_peers.py --out benchmarks/results

Sections, each from one run:

1. **speed** — MLP 784-512-256-10 at batch 256 and the MNIST-size CNN of ``bench_step`` at batch 128
   (cross-entropy, float32), all candidates of a model interleaved round-robin (``bench_step.interleaved``)
   so machine noise hits them alike; medians, ratios to the plain gradient step and, for every peer, to
   kfac_func's row doing the same work:

   * ``grad``: forward, backward, SGD-momentum update (scale);
   * ``kfac_func curvature [F]``: ``capture`` + ``kronecker_factors`` for Fisher ``F`` in mc (1 sample),
     exact (type-2) and empirical — the loss, the gradient and the batch's Kronecker factors;
   * ``kfac_func E-KFAC factors [mc]``: that, plus ``eigendecompose`` (float32 like the peers, and the
     library's default float64) and ``ekfac_scaling`` of the same capture;
   * ``kfac_func KFAC / EKFAC / two-level step``: full optimizer steps (``kf.KFAC``, ``kf.EKFAC``,
     ``kf.KFAC(method='two_level')``; MC Fisher, eigen damping 1e-3, factors every step, decompositions
     every 10 steps), timed over whole 10-step periods, reported per step;
   * ``autograd exact Fisher``: per-example gradients of the MC-sampled loss by ``vmap(grad)`` plus the
     true gradient, the layer-block-diagonal Fisher of those gradients and the damped natural-gradient
     solve ``(F_l + λI)⁻¹∇_l`` per layer block, done as a dense Cholesky solve of the ``N×N`` Gram matrix
     of the block (Woodbury: identical to the dense ``P_l×P_l`` solve, checked in section 3, which for the
     MLP's first layer would need a 402k × 402k matrix);
   * peers, factor computation only (a fresh operator per call, as their docs require after a parameter
     change): curvlinops ``KFACLinearOperator.compute_kronecker_factors`` (mc / type-2 / empirical,
     ``kfac_approx='expand'``, weight and bias joint like kfac_func), ``EKFACLinearOperator`` (factors,
     eigenbasis, eigenvalue correction); backpack ``KFAC(mc_samples=1)`` / ``KFLR`` (forward + backward in
     the extension context: also the gradient); asdl ``FisherConfig(fisher_shapes=['kron'])``
     ``fisher_mc`` / ``fisher_exact`` / ``fisher_emp``; nngeometry ``PMatKFAC`` (``FIM_MonteCarlo``
     with 1 trial, and ``FIM``: exact) and ``PMatEKFAC`` (+ ``update_diag``, the E-KFAC re-estimation).

2. **scaling** — kfac_func's pieces on an MLP 784-w-w-10: ``capture`` (mc; forward + batched backward,
   gradients included), the factor matmuls (``kronecker_factors``), the eigendecompositions
   (``eigendecompose``, float64) and the preconditioning (``precondition``, eigen damping), against width
   (batch 256) and batch (width 512); table + log-log PNG; which piece dominates a step (eigendecompositions
   amortised over the default period 10).

3. **agreement** — float64, same model and data: max relative difference ``max|ours − theirs| / max|theirs|``
   of kfac_func's ``A`` and ``G`` against curvlinops' ``KFACLinearOperator`` factors for type-2 and
   empirical, for mc with a shared seed (both draw their labels with one ``torch.multinomial`` call on the
   same generator state) and, without shared randomness, each library's MC estimate with many samples
   against the other's exact factor (a statistical error, ~1/√(N·M)). Plus backpack KFLR and asdl exact
   on the MLP, and the autograd baseline's Woodbury solve against a dense block solve on a small MLP.

4. **quality** — ``bench_quality.evaluate`` (error against the exact damped natural gradient), as a table
   and a PNG.

``--out DIR`` writes ``peers.json``, ``peers.md``, ``scaling.png`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_step, bench_quality
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # kfac_func from a checkout
import bench_quality  # noqa: E402
import bench_step  # noqa: E402
from bench_step import PERIOD, cnn, interleaved, machine, mlp  # noqa: E402

import kfac_func as kf  # noqa: E402

DAMPING = 1e-3  # the optimizer's default λ, used by the baseline solve too
LOSS = "cross_entropy"


class Missing(Exception):
    """A peer that is not installed or fails on this model: its reason is reported."""


def reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (text if isinstance(err, Missing) else f"{type(err).__name__}: {text}")[:200]


# ---------------------------------------------------------------- kfac_func candidates


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], Any]]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    key = kf.random.key(0)

    def curvature(fisher: str) -> Callable[[], Any]:
        return lambda: kf.kronecker_factors(kf.capture(model, params, x, y, LOSS, fisher=fisher, key=key))

    def ekfac_factors(dtype: torch.dtype) -> Callable[[], Any]:
        def run():
            cap = kf.capture(model, params, x, y, LOSS, fisher="mc", key=key)
            eigen = kf.eigendecompose(kf.kronecker_factors(cap), dtype)
            return kf.ekfac_factors(eigen, kf.ekfac_scaling(cap, eigen))

        return run

    def period(make_opt: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[[], Any]:
        opt = make_opt(model)
        opt.step(x, y)  # builds the state; each timed period starts at a decomposition step

        def run():
            for _ in range(PERIOD):
                opt.step(x, y)

        return run

    # lr 0: same work, θ fixed; expand factors like the peers (not the optimizer's reduce="auto")
    common = {**kf.FIXED_STEP, "lr": 0.0, "inverse_period": PERIOD, "kl_clip": None, "damping": DAMPING,
              "reduce": False}
    return {
        "curvature[mc]": curvature("mc"),
        "curvature[exact]": curvature("exact"),
        "curvature[empirical]": curvature("empirical"),
        "ekfac_factors[f32]": ekfac_factors(torch.float32),
        "ekfac_factors[f64]": ekfac_factors(torch.float64),
        "step:kfac": period(lambda m: kf.KFAC(m, **common)),
        "step:ekfac": period(lambda m: kf.EKFAC(m, **common)),
        "step:two_level": period(lambda m: kf.KFAC(m, method="two_level", **common)),
    }


def grad_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def run():
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    return run


# ---------------------------------------------------------------- the autograd exact-Fisher baseline


def layer_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names of each Linear/Conv2d module: one Fisher block per layer (weight and bias joint)."""
    return [
        [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]
        for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def fisher_baseline(model: nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float = DAMPING, dense: bool = False):
    """One natural-gradient direction with the layer-block-diagonal MC Fisher, by plain autograd.

    Per-example gradients ``∇ℓₙ`` of the sampled-label loss by ``vmap(grad)``; per layer ``U_l`` (N × P_l)
    with rows ``√R ∇ℓₙ`` so that ``F_l = U_lᵀU_l`` (``R = 1/N``: the same MC Fisher as kfac_func's);
    ``(F_l + λI)⁻¹∇_l`` as ``(∇_l − U_lᵀ(U_lU_lᵀ + λI)⁻¹U_l∇_l)/λ`` (a dense Cholesky solve, N×N), or,
    with ``dense=True``, by forming ``F_l`` and solving ``P_l × P_l`` (only for small checks).
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    blocks = layer_blocks(model)
    gen = torch.Generator().manual_seed(0)

    def loss(p, xb, yb):
        out = functional_call(model, p, (xb,))
        return F.cross_entropy(out, yb), out

    def example_loss(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def run():
        grads, out = grad(loss, has_aux=True)(params, x, y)
        sampled = torch.multinomial(out.detach().softmax(1), 1, generator=gen)[:, 0]
        ex = per_example(params, x, sampled)
        n = x.shape[0]
        update = {}
        for names in blocks:
            u = torch.cat([ex[k].reshape(n, -1) for k in names], 1) / math.sqrt(n)
            g = torch.cat([grads[k].reshape(-1) for k in names])
            if dense:
                d = torch.linalg.solve(u.T @ u + damping * torch.eye(u.shape[1], dtype=u.dtype), g)
            else:
                gram = u @ u.T + damping * torch.eye(n, dtype=u.dtype)
                d = (g - u.T @ torch.cholesky_solve((u @ g)[:, None], torch.linalg.cholesky(gram))[:, 0]) / damping
            offset = 0
            for k in names:
                update[k] = d[offset:offset + grads[k].numel()].reshape(grads[k].shape)
                offset += grads[k].numel()
        return update

    return run


# ---------------------------------------------------------------- peers (factor computation only)


def _fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def curvlinops_kfac(model, x, y, fisher_type: str, ekfac: bool = False):
    """curvlinops' ``KFACLinearOperator`` factors, or with ``ekfac`` the ``EKFACLinearOperator`` factors
    and eigenvalue correction."""
    try:
        from curvlinops import EKFACLinearOperator, KFACLinearOperator
    except Exception as err:
        raise Missing(reason(err)) from err
    m = _fresh(model)
    params = [p for p in m.parameters()]

    def run():
        op = (EKFACLinearOperator if ekfac else KFACLinearOperator)(
            m, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher_type, kfac_approx="expand",
            separate_weight_and_bias=False, check_deterministic=False, num_data=len(x), num_per_example_loss_terms=1,
        )
        op.compute_kronecker_factors()
        if ekfac:
            op.compute_eigenvalue_correction()
        return op

    return run


def backpack_ext(model, x, y, kind: str):
    try:
        from backpack import backpack, extend
        from backpack.extensions import KFAC, KFLR
    except Exception as err:
        raise Missing(reason(err)) from err
    m = extend(_fresh(model))
    lossf = extend(nn.CrossEntropyLoss())
    ext = KFAC(mc_samples=1) if kind == "kfac" else KFLR()

    def run():
        m.zero_grad()
        with backpack(ext):
            lossf(m(x), y).backward()

    return run


def asdl_kron(model, x, y, fisher: str, with_grad: bool = False):
    try:
        import asdl
    except Exception as err:
        raise Missing(reason(err)) from err
    m = _fresh(model)
    kind = {"mc": asdl.FISHER_MC, "exact": asdl.FISHER_EXACT, "empirical": asdl.FISHER_EMP}[fisher]
    cfg = asdl.FisherConfig(fisher_type=kind, fisher_shapes=[asdl.SHAPE_KRON], loss_type=asdl.LOSS_CROSS_ENTROPY,
                            data_size=len(x))
    maker = asdl.get_fisher_maker(m, cfg)
    dummy = maker.setup_model_call(m, x)
    maker.setup_loss_call(F.cross_entropy, dummy, y)
    if not with_grad:
        return maker.forward_and_backward

    def run():  # the loss gradient too, from the same forward (asdl's own option)
        m.zero_grad(set_to_none=True)
        return maker.forward_and_backward(calc_loss_grad=True)

    return run


def nngeometry_kfac(model, x, y, kind: str):
    try:
        from nngeometry.metrics import FIM, FIM_MonteCarlo
        from nngeometry.object import PMatEKFAC, PMatKFAC
        from torch.utils.data import DataLoader, TensorDataset
    except Exception as err:
        raise Missing(reason(err)) from err
    m = _fresh(model)
    loader = DataLoader(TensorDataset(x.clone(), y.clone()), batch_size=len(x))  # nngeometry sets requires_grad

    def run():
        if kind == "mc":
            return FIM_MonteCarlo(m, loader, PMatKFAC, trials=1)
        if kind == "exact":
            return FIM(m, loader, PMatKFAC)
        e = FIM_MonteCarlo(m, loader, PMatEKFAC, trials=1)
        e.update_diag(loader)
        return e

    return run


# (key, library, what is timed, Fisher, kfac_func row doing the same work, factory, also returns ∇L)
PEERS: list[tuple[str, str, str, str, str, Callable, bool]] = [
    ("curvlinops KFAC[mc]", "curvlinops", "KFACLinearOperator.compute_kronecker_factors", "mc", "curvature[mc]",
     lambda m, x, y: curvlinops_kfac(m, x, y, "mc"), False),
    ("curvlinops KFAC[type-2]", "curvlinops", "KFACLinearOperator.compute_kronecker_factors", "exact",
     "curvature[exact]", lambda m, x, y: curvlinops_kfac(m, x, y, "type-2"), False),
    ("curvlinops KFAC[empirical]", "curvlinops", "KFACLinearOperator.compute_kronecker_factors", "empirical",
     "curvature[empirical]", lambda m, x, y: curvlinops_kfac(m, x, y, "empirical"), False),
    ("curvlinops EKFAC[mc]", "curvlinops", "EKFACLinearOperator: factors + eigh (f32) + eigenvalue correction", "mc",
     "ekfac_factors[f32]", lambda m, x, y: curvlinops_kfac(m, x, y, "mc", ekfac=True), False),
    ("backpack KFAC", "backpack", "forward + backward with extension KFAC(mc_samples=1)", "mc", "curvature[mc]",
     lambda m, x, y: backpack_ext(m, x, y, "kfac"), True),
    ("backpack KFLR", "backpack", "forward + backward with extension KFLR", "exact", "curvature[exact]",
     lambda m, x, y: backpack_ext(m, x, y, "kflr"), True),
    ("asdl kron[fisher_mc]", "asdl", "FisherMaker.forward_and_backward, shapes=['kron']", "mc", "curvature[mc]",
     lambda m, x, y: asdl_kron(m, x, y, "mc"), False),
    ("asdl kron[fisher_exact]", "asdl", "FisherMaker.forward_and_backward, shapes=['kron']", "exact",
     "curvature[exact]", lambda m, x, y: asdl_kron(m, x, y, "exact"), False),
    ("asdl kron[fisher_emp]", "asdl", "FisherMaker.forward_and_backward, shapes=['kron']", "empirical",
     "curvature[empirical]", lambda m, x, y: asdl_kron(m, x, y, "empirical"), False),
    ("asdl kron[fisher_mc] + grad", "asdl", "forward_and_backward(calc_loss_grad=True), shapes=['kron']", "mc",
     "curvature[mc]", lambda m, x, y: asdl_kron(m, x, y, "mc", True), True),
    ("asdl kron[fisher_exact] + grad", "asdl", "forward_and_backward(calc_loss_grad=True), shapes=['kron']", "exact",
     "curvature[exact]", lambda m, x, y: asdl_kron(m, x, y, "exact", True), True),
    ("asdl kron[fisher_emp] + grad", "asdl", "forward_and_backward(calc_loss_grad=True), shapes=['kron']",
     "empirical", "curvature[empirical]", lambda m, x, y: asdl_kron(m, x, y, "empirical", True), True),
    ("nngeometry PMatKFAC[mc]", "nngeometry", "FIM_MonteCarlo(PMatKFAC, trials=1)", "mc", "curvature[mc]",
     lambda m, x, y: nngeometry_kfac(m, x, y, "mc"), False),
    ("nngeometry PMatKFAC[exact]", "nngeometry", "FIM(PMatKFAC): closed-form exact Fisher", "exact",
     "curvature[exact]", lambda m, x, y: nngeometry_kfac(m, x, y, "exact"), False),
    ("nngeometry PMatEKFAC[mc]", "nngeometry", "FIM_MonteCarlo(PMatEKFAC, trials=1) + update_diag (eigh f32)", "mc",
     "ekfac_factors[f32]", lambda m, x, y: nngeometry_kfac(m, x, y, "ekfac"), False),
]

OURS_WHAT = {
    "grad": ("plain step", "forward + backward + SGD-momentum update", "-"),
    "curvature[mc]": ("kfac_func", "capture + kronecker_factors", "mc"),
    "curvature[exact]": ("kfac_func", "capture + kronecker_factors", "exact"),
    "curvature[empirical]": ("kfac_func", "capture + kronecker_factors", "empirical"),
    "ekfac_factors[f32]": ("kfac_func", "capture + kronecker_factors + eigendecompose(f32) + ekfac_scaling", "mc"),
    "ekfac_factors[f64]": ("kfac_func", "capture + kronecker_factors + eigendecompose(f64, default) + ekfac_scaling",
                           "mc"),
    "step:kfac": ("kfac_func", "kf.KFAC step (eigh every 10, amortised)", "mc"),
    "step:ekfac": ("kfac_func", "kf.EKFAC step (eigh every 10, scaling every step)", "mc"),
    "step:two_level": ("kfac_func", "kf.KFAC(method='two_level') step (nicolaides, exact C0, additive)", "mc"),
    "baseline": ("autograd", "vmap(grad) per-example grads + per-layer Fisher block solve (Woodbury, N×N)", "mc"),
}


def speed(name: str, make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int,
          warmup: int) -> tuple[list[dict], list[dict]]:
    torch.manual_seed(0)
    model = make()
    candidates: dict[str, Callable[[], Any]] = {"grad": grad_step(_fresh(model), x, y)}
    candidates.update(ours(_fresh(model), x, y))
    candidates["baseline"] = fisher_baseline(_fresh(model), x, y)
    missing = []
    for key, lib, what, fisher, same, factory, _ in PEERS:
        try:
            fn = factory(model, x, y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()  # fails here rather than inside the timing loop
            candidates[key] = fn
        except Exception as err:
            missing.append({"model": name, "batch": len(x), "peer": key, "reason": reason(err)})
            print(f"  {name}: {key}: missing: {reason(err)}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = interleaved(candidates, repeats, warmup)
    for k in ("step:kfac", "step:ekfac", "step:two_level"):
        t[k] /= PERIOD
    rows = []
    for key, sec in t.items():
        peer = next((p for p in PEERS if p[0] == key), None)
        if peer is None:
            lib, what, fisher = OURS_WHAT[key]
            same, with_grad = key, True  # every kfac_func row and the baseline also compute the loss and ∇L
        else:
            _, lib, what, fisher, same, _, with_grad = peer
        # equal work: kfac_func's rows also return the loss and ∇L; a peer that does not needs a gradient step too
        equal = (sec if with_grad else sec + t["grad"]) / t[same] if peer else None
        rows.append({
            "model": name, "batch": len(x), "row": key, "library": lib, "what": what, "fisher": fisher,
            "ms": 1e3 * sec, "x_grad": sec / t["grad"], "same_work_as": same if peer else None,
            "x_ours": sec / t[same] if peer else None, "returns_grad": with_grad, "x_ours_equal_work": equal,
        })
    return rows, missing


# ---------------------------------------------------------------- scaling


def wide_mlp(width: int, inputs: int = 784) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def scaling_point(width: int, batch: int, repeats: int, inputs: int = 784, warmup: int = 1) -> dict:
    torch.manual_seed(0)
    model = wide_mlp(width, inputs)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, inputs, generator=g), torch.randint(0, 10, (batch,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}
    key = kf.random.key(0)
    plan = kf.trace(model, params, x)
    cap = kf.capture(model, params, x, y, LOSS, fisher="mc", key=key)
    factors = kf.kronecker_factors(cap)
    eigen = kf.eigendecompose(factors)
    candidates = {
        "grad": grad_step(_fresh(model), x, y),
        "capture": lambda: kf.capture(model, params, x, y, LOSS, fisher="mc", key=key),
        "factors": lambda: kf.kronecker_factors(cap),
        "eigh": lambda: kf.eigendecompose(factors),
        "precondition": lambda: kf.precondition(params, cap.grads, eigen, layers=plan.layers, damping=DAMPING),
    }
    t = interleaved(candidates, repeats, warmup)
    row = {"inputs": inputs, "width": width, "batch": batch, **{k: 1e3 * v for k, v in t.items()}}
    per_step = {"capture": t["capture"], "factors": t["factors"], f"eigh/{PERIOD}": t["eigh"] / PERIOD,
                "precondition": t["precondition"]}
    row["dominant"] = max(per_step, key=per_step.get)
    row["dominant_share"] = per_step[row["dominant"]] / sum(per_step.values())
    return row


# ---------------------------------------------------------------- agreement (float64)


def rel(ours_t: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours_t - theirs).abs().max() / theirs.abs().max())


def rel_fro(est: torch.Tensor, ref: torch.Tensor) -> float:
    return float((est - ref).norm() / ref.norm())


def _ours_factors(model, params, x, y, fisher: str, m: int = 1, seed: int = 0) -> dict:
    key = kf.random.key(seed)
    cap = kf.capture(model, params, x, y, LOSS, fisher=fisher, mc_samples=m, key=key)
    return {k: (f.A[0], f.G[0]) for k, f in kf.kronecker_factors(cap).items()}


def _curvlinops_factors(operator, model, x, y, fisher_type: str, m: int = 1, seed: int = 0) -> dict:
    op = operator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)], fisher_type=fisher_type, mc_samples=m,
        seed=seed, kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False, num_data=len(x),
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    state = op.state_dict()  # the factors, keyed by module name; A carries the bias column (joint weight and bias)
    return {k: (state["input_covariances"][k], state["gradient_covariances"][k]) for k in state["gradient_covariances"]}


def agreement(quick: bool) -> tuple[list[dict], list[dict]]:
    rows, missing = [], []
    try:
        from curvlinops import KFACLinearOperator
    except Exception as err:
        missing.append({"peer": "curvlinops (agreement)", "reason": reason(err)})
        KFACLinearOperator = None
    dt = torch.float64
    samples = 16 if quick else 256
    cases = [("MLP 784-512-256-10", mlp, (784,), 16 if quick else 64),
             ("CNN 2 conv + linear", cnn, (1, 28, 28), 4 if quick else 16)]
    for name, make, shape, n in cases:
        torch.manual_seed(0)
        model = make().to(dt)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn((n,) + shape, generator=g, dtype=dt), torch.randint(0, 10, (n,), generator=g)
        params = {k: p.detach() for k, p in model.named_parameters()}

        ours_f = functools.partial(_ours_factors, model, params, x, y)
        theirs_f = functools.partial(_curvlinops_factors, KFACLinearOperator, model, x, y)

        def record(label, a_ours, b_theirs, metric, note, name=name, n=n):
            per_layer = {k: (metric(a_ours[k][0], b_theirs[k][0]), metric(a_ours[k][1], b_theirs[k][1]))
                         for k in a_ours}
            rows.append({
                "model": name, "batch": n, "comparison": label, "metric": metric.__name__, "note": note,
                "A": max(v[0] for v in per_layer.values()), "G": max(v[1] for v in per_layer.values()),
                "per_layer": per_layer,
            })

        if KFACLinearOperator is not None:
            exact, emp = ours_f("exact"), ours_f("empirical")
            their_exact = theirs_f("type-2")
            record("exact (type-2) vs curvlinops type-2", exact, their_exact, rel, "deterministic")
            record("empirical vs curvlinops empirical", emp, theirs_f("empirical"), rel, "deterministic")
            record(f"kfac_func mc (M={samples}) vs curvlinops type-2", ours_f("mc", samples, seed=3), their_exact,
                   rel_fro, "statistical: ‖mc − exact‖_F/‖exact‖_F; A has no labels in it")
            record(f"curvlinops mc (M={samples}) vs kfac_func exact", theirs_f("mc", samples, seed=3), exact, rel_fro,
                   "statistical: ‖mc − exact‖_F/‖exact‖_F; A has no labels in it")
        if make is mlp:
            exact = ours_f("exact")
            try:  # backpack KFLR: weight factors [G, A] with A without the bias column
                from backpack import backpack, extend
                from backpack.extensions import KFLR

                m2 = extend(copy.deepcopy(model))
                with backpack(KFLR()):
                    extend(nn.CrossEntropyLoss())(m2(x), y).backward()
                bp = {k.rsplit(".", 1)[0]: (p.kflr[1], p.kflr[0])
                      for k, p in m2.named_parameters() if k.endswith("weight")}
                record("exact vs backpack KFLR (A without bias column)",
                       {k: (a[:-1, :-1], gg) for k, (a, gg) in exact.items()}, bp, rel, "deterministic")
            except Exception as err:
                missing.append({"peer": "backpack KFLR (agreement)", "reason": reason(err)})
            try:  # asdl kron: A without the bias column, B = G
                import asdl

                m3 = copy.deepcopy(model)
                cfg = asdl.FisherConfig(fisher_type=asdl.FISHER_EXACT, fisher_shapes=[asdl.SHAPE_KRON],
                                        loss_type=asdl.LOSS_CROSS_ENTROPY, data_size=n)
                maker = asdl.get_fisher_maker(m3, cfg)
                maker.setup_loss_call(F.cross_entropy, maker.setup_model_call(m3, x), y)
                maker.forward_and_backward()
                ad = {k: (mod.fisher.kron.A, mod.fisher.kron.B)
                      for k, mod in m3.named_modules() if isinstance(mod, nn.Linear)}
                record("exact vs asdl fisher_exact kron (A without bias column)",
                       {k: (a[:-1, :-1], gg) for k, (a, gg) in exact.items()}, ad, rel, "deterministic")
            except Exception as err:
                missing.append({"peer": "asdl (agreement)", "reason": reason(err)})
    # the baseline's Woodbury solve against a dense block solve (small model: dense blocks fit)
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dt)
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(32, 20, generator=g, dtype=dt), torch.randint(0, 4, (32,), generator=g)
    woodbury, dense = fisher_baseline(small, xs, ys)(), fisher_baseline(small, xs, ys, dense=True)()
    rows.append({
        "model": "MLP 20-16-16-4", "batch": 32, "comparison": "baseline Woodbury solve vs dense block solve",
        "metric": "rel", "note": "float64, λ = 1e-3", "A": float("nan"), "G": float("nan"),
        "update": max(rel(woodbury[k], dense[k]) for k in dense), "per_layer": {},
    })
    return rows, missing


# ---------------------------------------------------------------- quality (bench_quality.evaluate)


def quality(seeds: int) -> list[dict]:
    cases = [("MLP 12-16-16-4, N=32", bench_quality.mlp, (12,), 32),
             ("CNN 2 conv + linear, 8×8, N=16", bench_quality.cnn, (1, 8, 8), 16)]
    rows = []
    for title, make, shape, n in cases:
        runs = [bench_quality.evaluate(make, shape, n, seed) for seed in range(seeds)]
        for method in {k[0]: None for k in runs[0]}:
            for lam in bench_quality.DAMPINGS:
                rows.append({
                    "case": title, "method": method, "damping": lam, "seeds": seeds,
                    "rel_error": statistics.median(r[(method, lam)][0] for r in runs),
                    "cosine": statistics.median(r[(method, lam)][1] for r in runs),
                })
    return rows


# ---------------------------------------------------------------- output


def md_speed(rows: list[dict], missing: list[dict]) -> str:
    out = [("| model | batch | row | library | what is timed | Fisher | returns ∇L | median ms | × grad step | "
            "kfac_func row of the same work | peer ÷ kfac_func (factors only) | peer ÷ kfac_func (equal work) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = r["x_ours"] is not None
        same = r["same_work_as"] if peer else ""
        factors_only = f"{r['x_ours']:.2f}" if peer else ""
        equal = f"{r['x_ours_equal_work']:.2f}" if peer else ""
        out.append(
            f"| {r['model']} | {r['batch']} | {r['row']} | {r['library']} | {r['what']} | {r['fisher']} | "
            f"{'yes' if r['returns_grad'] else 'no'} | {r['ms']:.2f} | {r['x_grad']:.2f} | {same} | {factors_only} | "
            f"{equal} |"
        )
    for m in missing:
        out.append(f"| {m['model']} | {m['batch']} | {m['peer']} | missing: {m['reason']} | | | | | | | | |")
    return "\n".join(out)


def md_scaling(rows: list[dict]) -> str:
    out = [("| width | batch | grad ms | capture ms | factors ms | eigh ms | eigh/10 ms | precondition ms | "
            "dominant per step |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['width']} | {r['batch']} | {r['grad']:.2f} | {r['capture']:.2f} | {r['factors']:.2f} | "
                   f"{r['eigh']:.1f} | {r['eigh'] / PERIOD:.2f} | {r['precondition']:.2f} | {r['dominant']} "
                   f"({100 * r['dominant_share']:.0f}%) |")
    return "\n".join(out)


def md_agreement(rows: list[dict], missing: list[dict]) -> str:
    out = ["| model | N | comparison | metric | A | G | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "update" in r:
            out.append(f"| {r['model']} | {r['batch']} | {r['comparison']} | max rel. diff of the update | "
                       f"{r['update']:.1e} | | {r['note']} |")
            continue
        out.append(f"| {r['model']} | {r['batch']} | {r['comparison']} | {r['metric']} | {r['A']:.1e} | {r['G']:.1e} | "
                   f"{r['note']} |")
    for m in missing:
        out.append(f"| | | {m['peer']} | missing: {m['reason']} | | | |")
    return "\n".join(out)


def md_quality(rows: list[dict]) -> str:
    out = []
    for case in {r["case"]: None for r in rows}:
        sub = [r for r in rows if r["case"] == case]
        lams = sorted({r["damping"] for r in sub})
        out += [(f"\n{case}: median over {sub[0]['seeds']} seeds of rel. error ‖d − d*‖/‖d*‖ (cosine), "
                 "d* = (C + λI)⁻¹∇\n"), "| method | " + " | ".join(f"λ = {lam:g}" for lam in lams) + " |",
                "|---|" + "---|" * len(lams)]
        for method in {r["method"]: None for r in sub}:
            cells = [next(f"{r['rel_error']:.3f} ({r['cosine']:.3f})" for r in sub
                          if r["method"] == method and r["damping"] == lam) for lam in lams]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plots(out_dir: str, scaling: list[dict], quality_rows: list[dict], title: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        print(f"plots: missing: {reason(err)}")
        return []
    written = []
    if scaling:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, fixed in ((axes[0], "width", "batch"), (axes[1], "batch", "width")):
            pts = [r for r in scaling if r["sweep"] == key]
            if not pts:
                continue
            xs = [r[key] for r in pts]
            for piece, style in (("grad", "k:"), ("capture", "o-"), ("factors", "s-"), ("eigh", "^-"),
                                 ("precondition", "d-")):
                ax.plot(xs, [r[piece] for r in pts], style, label=piece)
            ax.plot(xs, [r["eigh"] / PERIOD for r in pts], "^--", color="C2", alpha=0.5, label=f"eigh/{PERIOD}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel("median ms")
            ax.set_title(f"MLP {pts[0]['inputs']}-w-w-10, {fixed} {pts[0][fixed]}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"kfac_func cost per piece ({title})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if quality_rows:
        cases = list({r["case"]: None for r in quality_rows})
        fig, axes = plt.subplots(2, len(cases), figsize=(13, 9), squeeze=False, sharex=True)
        for col, case in enumerate(cases):
            sub = [r for r in quality_rows if r["case"] == case]
            methods = list({r["method"]: None for r in sub})
            base = {r["damping"]: r["rel_error"] for r in sub if r["method"] == methods[0]}
            for i, method in enumerate(methods):
                pts = sorted((r["damping"], r["rel_error"]) for r in sub if r["method"] == method)
                style = {"marker": "os^dv<>ph*x"[i % 11], "linestyle": "-" if i < 3 else "--", "label": method}
                axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], **style)
                axes[1][col].plot([p[0] for p in pts], [p[1] / base[p[0]] for p in pts], **style)
            axes[0][col].set_yscale("log")
            axes[0][col].set_ylabel("median ‖d − d*‖/‖d*‖")
            axes[0][col].set_title(f"{case} ({sub[0]['seeds']} seeds)", fontsize=9)
            axes[1][col].set_ylabel(f"÷ {methods[0]}")
            axes[1][col].set_xlabel("damping λ")
            for ax in axes[:, col]:
                ax.set_xscale("log")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("error against the exact damped natural gradient d* = (C + λI)⁻¹∇ (bench_quality.evaluate)",
                     fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "quality.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def sources_digest() -> str:
    """sha256 over kfac_func's source files (the library changes under a checkout: say which code was timed)."""
    import hashlib

    root = os.path.dirname(kf.__file__)
    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(root) if f.endswith(".py")):
        with open(os.path.join(root, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "kfac_func", "curvlinops-for-pytorch", "backpack-for-pytorch", "asdfghjkl", "nngeometry",
                 "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = f"from {os.path.dirname(kf.__file__)}" if dist == "kfac_func" else "missing: not installed"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of the speed section")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (a smoke run, < 30 s)")
    parser.add_argument("--out", help="write peers.json, peers.md (every table), scaling.png and quality.png here")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: step,speed,scaling,agreement,quality")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    if args.quick:  # small models: the point is that every code path runs
        speed_cases = [("MLP 64-32-32-10 (quick)", lambda: wide_mlp(32, 64), 16, (64,)),
                       ("CNN 2 conv + linear, 12×12 (quick)", cnn, 4, (1, 12, 12))]
        repeats, warmup, scale_repeats, seeds, inputs = 1, 0, 1, 1, 64
        widths, batches, fixed_width, fixed_batch = (16, 32), (8, 16), 32, 16
    else:
        speed_cases = [("MLP 784-512-256-10", mlp, 256, (784,)), ("CNN 2 conv + linear", cnn, 128, (1, 28, 28))]
        repeats, warmup, scale_repeats, seeds, inputs = args.repeats, 2, 3, 5, 784
        widths, batches, fixed_width, fixed_batch = (128, 256, 512, 1024, 2048), (32, 64, 128, 256, 512, 1024), 512, 256
    result: dict[str, Any] = {
        "machine": machine(), "versions": versions(), "kfac_func_sources_sha256": sources_digest(),
        "quick": args.quick, "repeats": repeats, "loadavg_start": os.getloadavg(),
    }
    print(f"machine: {result['machine']}; load average at start {result['loadavg_start']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
          + f"; kfac_func sources sha256 {result['kfac_func_sources_sha256']}", flush=True)
    md = ["# kfac_func against peers (benchmarks/bench_peers.py)\n", f"machine: {result['machine']}  ",
          "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
          + f"; kfac_func sources sha256 {result['kfac_func_sources_sha256']}"]

    if "speed" not in skip:
        rows, missing = [], []
        for name, make, n, shape in speed_cases:
            x, y = torch.randn((n,) + shape, generator=g), torch.randint(0, 10, (n,), generator=g)
            r, m = speed(name, make, x, y, repeats, warmup)
            rows += r
            missing += m
        result["speed"], result["speed_missing"] = rows, missing
        checks = [
            {"model": r["model"], "peer": r["row"], "same_work_as": r["same_work_as"], "x_ours": r["x_ours"],
             "x_ours_equal_work": r["x_ours_equal_work"], "faster_equal_work": r["x_ours_equal_work"] > 1.0,
             "faster_factors_only": r["x_ours"] > 1.0}
            for r in rows if r["x_ours"] is not None
        ]
        result["faster_than_peers"] = checks
        text = md_speed(rows, missing)

        def verdict_line(key: str, ratio: str, label: str) -> str:
            slower = [c for c in checks if not c[key]]
            if not slower:
                return f"{label}: kfac_func is faster than every peer that ran."
            return f"{label}: kfac_func is NOT faster than " + "; ".join(
                f"{c['model']}: {c['peer']} (peer ÷ kfac_func = {c[ratio]:.2f})" for c in slower)

        verdict = (verdict_line("faster_equal_work", "x_ours_equal_work", "Equal work (loss + ∇L + factors)") + "\n\n"
                   + verdict_line("faster_factors_only", "x_ours", "Factors only (peer without its gradient)"))
        legend = ("peer ÷ kfac_func > 1: kfac_func is faster. 'factors only' compares the peer's factor computation "
                  "with kfac_func's row of the same work (which also returns the loss and ∇L); 'equal work' adds a "
                  "plain gradient step (the `grad` row) to a peer that does not return ∇L.")
        print(f"\n## Speed (medians of {repeats} interleaved rounds)\n\n{text}\n\n{legend}\n\n{verdict}", flush=True)
        md += [f"\n## Speed (medians of {repeats} interleaved rounds)\n", text, "", legend, "", verdict]

    if "step" not in skip:  # the README's step-versus-floor table (benchmarks/bench_step.py)
        rows = bench_step.main(["--quick"] if args.quick else ["--repeats", str(max(repeats, 11))])
        result["step"] = rows
        md += ["\n## Step cost against its floor (benchmarks/bench_step.py)\n", bench_step.table(rows)]

    if "scaling" not in skip:
        sw = min(warmup, 1)
        rows = [{**scaling_point(w, fixed_batch, scale_repeats, inputs, sw), "sweep": "width"} for w in widths]
        rows += [{**scaling_point(fixed_width, b, scale_repeats, inputs, sw), "sweep": "batch"} for b in batches]
        result["scaling"] = rows
        text = (f"width sweep (batch {fixed_batch}):\n\n" + md_scaling([r for r in rows if r["sweep"] == "width"]) +
                f"\n\nbatch sweep (width {fixed_width}):\n\n" + md_scaling([r for r in rows if r["sweep"] == "batch"]))
        print(f"\n## Scaling (kfac_func pieces, medians of {scale_repeats} interleaved rounds)\n\n{text}", flush=True)
        md += [f"\n## Scaling (kfac_func pieces, medians of {scale_repeats} interleaved rounds)\n", text]

    if "agreement" not in skip:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows, missing = agreement(args.quick)
        result["agreement"], result["agreement_missing"] = rows, missing
        text = md_agreement(rows, missing)
        print(f"\n## Agreement (float64)\n\n{text}", flush=True)
        md += ["\n## Agreement (float64)\n", text]

    if "quality" not in skip:
        rows = quality(seeds)
        result["quality"] = rows
        text = md_quality(rows)
        print(f"\n## Approximation quality (bench_quality.evaluate)\n{text}", flush=True)
        md += ["\n## Approximation quality (bench_quality.evaluate)", text]

    result["wall_s"], result["loadavg_end"] = time.perf_counter() - start, os.getloadavg()
    end = (f"total wall time {result['wall_s']:.1f} s; load average at start {result['loadavg_start']}, "
           f"at end {result['loadavg_end']}")
    print(f"\n{end}")
    md.append(f"\n{end}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "peers.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        written = plots(args.out, result.get("scaling", []), result.get("quality", []), result["machine"])
        md += [f"\n![{os.path.basename(p)}]({os.path.basename(p)})" for p in written]
        with open(os.path.join(args.out, "peers.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        print("wrote " + ", ".join([os.path.join(args.out, n) for n in ("peers.json", "peers.md")] + written))
    return result


if __name__ == "__main__":
    main()
