r"""Data-parallel K-FAC: 2 and 4 gloo processes on loopback, each with its shard of the batch, end where one
process on the whole batch ends (float64, exact Fisher, so that no sampling differs), for K-FAC (eigen
and factored damping, the adaptive quadratic-model step with damping adaptation and rejected steps, lazy
factor averaging, KAISA's split with half of the ranks holding each decomposition: one holder per layer
on 2 ranks, two holders serving blocks of two on 4), E-KFAC and two-level K-FAC (exact and Kronecker
coarse matrices), through a ``DistributedDataParallel``-wrapped module, a function model with explicit
params, the pure functions, and :class:`kfac_func.Preconditioner` feeding SGD in an ordinary
``loss.backward()`` loop on a ``DistributedDataParallel`` module.

The targets include ignored classes spread unevenly over the ranks, so the global ``R`` differs from
each rank's own.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kfac_func as kf
import oracles as O
from kfac_func.distributed import Communicator, DataParallel, weight_inputs

DT = torch.float64
STEPS = 4
# the fixed step (eigen damping, statistics every step) unless a configuration says otherwise
COMMON = O.fixed_step(fisher="exact", lr=0.1, damping=0.1, inverse_period=2,
                      loss=kf.Loss("cross_entropy", ignore_index=-1))
CONFIGS = {
    "kfac-eigen": {},
    # the quadratic model on the whole batch: a fraction's first rows of each shard are not the global batch's
    "kfac-factored-adaptive": dict(damping_mode="factored", adaptive="lr_momentum", damping_adaptation=True,
                                   damping_interval=1, reject_steps=True, quadratic_fraction=1.0),
    "kfac-lazy-factors": dict(lazy_factors=True, factor_period=1),
    "kfac-kaisa-half": dict(decomposition_fraction=0.5, damping_mode="factored"),
    # E-KFAC's scaling depends on the basis chosen inside degenerate eigenspaces (the null space of a
    # rank-deficient A): expand and a fresh eigenbasis every step keep each batch inside A's range
    "ekfac": dict(method="ekfac", reduce=False, inverse_period=1),
    "two-level-exact-adef2": dict(method="two_level", combination="adef2"),
    "two-level-kronecker-spectral": dict(method="two_level", coarse_mode="kronecker", coarse_space="spectral"),
    # held sides (the linear layer's A 49 in blocks of ≤16, a diagonal G; the conv's A 19 in blocks of ≤5):
    # both layers decomposed by blocks shared across the ranks and all-gathered
    "held-sides-kaisa-half": dict(factor_sides={"3": {"A": 16, "G": "diagonal"}, "0": {"A": 5}},
                                  decomposition_fraction=0.5, damping_mode="factored"),
    "held-sides-two-level-spectral": dict(factor_sides={"3": {"A": 16}}, method="two_level", coarse_space="spectral"),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5)).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 4, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 5, (8,), generator=gen)
    y[[0, 1, 5]] = -1  # ignored targets spread unevenly over the shards
    return x, y


def _train(model, config: dict, x, y, **extra) -> dict[str, torch.Tensor]:
    opt = kf.KFAC(model, **{**COMMON, **config}, **extra)
    for _ in range(STEPS):
        opt.step(x, y)
    if extra.get("data_parallel") and "factor_sides" in config:  # decomposed by blocks across the ranks
        assert opt._comm.shared == set(config["factor_sides"]) and opt._comm.comm_bytes > 0
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def _function_model(x, y, **extra) -> dict[str, torch.Tensor]:
    """``KFAC`` on ``f(params, x)`` written with ``torch.nn.functional`` and a dict of leaf tensors."""
    params = {n: p.detach().clone().requires_grad_() for n, p in _model().named_parameters()}

    def f(p, inputs):
        h = torch.tanh(torch.conv2d(inputs, p["0.weight"], p["0.bias"], padding=1))
        return torch.nn.functional.linear(h.flatten(1), p["3.weight"], p["3.bias"])

    opt = kf.KFAC(f, params, **COMMON, **extra)
    for _ in range(STEPS):
        opt.step(x, y)
    return {n: p.detach().clone() for n, p in params.items()}


def _functional_step(x, y, comm) -> dict[str, torch.Tensor]:
    """capture → factors → precondition with explicit params, summed over ranks by ``comm``."""
    model = _model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    plan = kf.trace(model, params, x)
    loss, share = comm.shard_loss(COMMON["loss"], y, len(y))
    cap = kf.capture(model, params, x, y, loss, fisher="exact")
    factors = comm.sum(weight_inputs(kf.kronecker_factors(cap), share))
    return kf.precondition(params, comm.sum(cap.grads), factors, layers=plan.layers, damping=0.1)


def _preconditioned_sgd(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """``kf.Preconditioner`` feeding SGD in the ordinary loop (``curvature_backward``, ``loss.backward()``).
    With ``DistributedDataParallel`` each rank's loss is the mean over its shard and DDP averages ``p.grad``:
    the global mean only when no target is ignored, so this run has none."""
    y = torch.where(y < 0, 0, y)
    precond = kf.Preconditioner(model, loss=COMMON["loss"], fisher="exact", damping=0.1, inverse_period=2,
                                kl_clip=1e-2, lr=0.1, damping_mode="eigen", factor_period=1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        sgd.zero_grad()
        out = model(x)
        precond.curvature_backward(out)
        nn.functional.cross_entropy(out, y).backward()
        precond.step()
        sgd.step()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on the host name resolving
    # a bounded timeout: a rank that fails makes the others fail too instead of waiting 30 minutes
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    x, y = _data()
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    results = {name: _train(_model(), cfg, x[shard], y[shard], data_parallel=True) for name, cfg in CONFIGS.items()}
    results["ddp"] = _train(nn.parallel.DistributedDataParallel(_model()), {}, x[shard], y[shard])
    results["ddp preconditioner"] = _preconditioned_sgd(nn.parallel.DistributedDataParallel(_model()), x[shard],
                                                        y[shard])
    results["functional"] = _functional_step(x[shard], y[shard], DataParallel())
    results["function model"] = _function_model(x[shard], y[shard], data_parallel=True)
    torch.save(results, f"{out}.{rank}")
    dist.barrier()  # no rank closes its connections while the other still reads
    # leave without running gloo's C++ teardown, which can abort ("terminate called without an active
    # exception") when its worker threads are destroyed at interpreter exit
    os._exit(0)


@pytest.mark.parametrize("world", [2, 4])
def test_processes_equal_one_process_on_the_global_batch(world):
    x, y = _data()
    expected = {name: _train(_model(), cfg, x, y) for name, cfg in CONFIGS.items()}
    expected["ddp"] = expected["kfac-eigen"]
    expected["ddp preconditioner"] = _preconditioned_sgd(_model(), x, y)
    expected["functional"] = _functional_step(x, y, Communicator())
    expected["function model"] = _function_model(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(world, f"file://{os.path.join(tmp, 'rendezvous')}", out), nprocs=world)
        ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    start = {n: p.detach() for n, p in _model().named_parameters()}
    for name, want in expected.items():
        assert any(not torch.equal(want[p], start[p]) for p in want), name  # the runs moved
        for rank, got in enumerate(ranks):
            for p in want:
                torch.testing.assert_close(got[name][p], want[p], atol=1e-10, rtol=1e-8, msg=f"{name} rank {rank} {p}")


def test_data_parallel_errors_are_clear():
    with pytest.raises(RuntimeError, match="init_process_group"):
        kf.KFAC(_model(), data_parallel=True)
    with pytest.raises(ValueError, match="decomposition_fraction"):
        kf.KFAC(_model(), method="ekfac", decomposition_fraction=0.5)
