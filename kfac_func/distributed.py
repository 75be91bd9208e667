r"""Data-parallel K-FAC on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each of ``W`` ranks captures its own shard of the global batch. Everything is made to *add up* across
ranks, so that the result equals one process on the global batch (up to floating-point reassociation):

* the loss gets the global batch's reduction scale ``R`` (:func:`shard_loss`: one all-reduce of the
  term and example counts), so each rank's loss, gradients, ``G`` factors, E-KFAC scalings, coarse
  matrices and quadratic-model forms are its share of the global sums;
* ``A`` factors are means over examples: each rank's ``A`` is weighted by its share of the examples
  (:func:`weight_inputs`) before the sum;
* sums are bucketed all-reduces (:meth:`Communicator.sum`: tensors of one dtype concatenated into
  buckets of ``bucket_mb``). Factor averaging can be *lazy* (kfac-jax): every rank keeps the moving
  average of its own weighted factors and they are summed only when read (an inverse refresh, a damping
  change) — exact, because the moving average is linear;
* decompositions are split by layer: each layer has one owner rank (greedy balance of ``d³``), which
  decomposes it and broadcasts the result (one bucketed broadcast per owner). A layer with a block-diagonal
  side (the size policy, :mod:`kfac_func.layout`) is shared by blocks instead: every rank decomposes
  ``1/W`` of its blocks and they are all-gathered, so that a vocabulary-sized output layer does not land on
  one rank; every rank holds such a layer. KAISA's trade-off
  (Pauloski et al. 2021): ``fraction`` of the ranks hold each layer's decomposition. ``fraction = 1``
  (every rank holds every decomposition and preconditions locally: most memory, least communication per
  step); ``fraction = 1/W`` (only the owner holds it, preconditions that layer and broadcasts the
  preconditioned gradient every step: least memory); in between, the ``k = fraction·W`` holders of a
  layer each serve a block of ``W/k`` ranks.

MC sampling uses an independent key per rank (``seed + rank``), so MC runs match the single process in
distribution, not sample for sample; ``fisher="exact"``/``"empirical"`` match exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from . import sides
from .factors import EigenFactors, InverseFactors, KroneckerFactors
from .layers import LayerSpec, split_weight_matrix, weight_matrix
from .losses import Loss


class Communicator:
    """One process: every collective is the identity. :class:`DataParallel` is the distributed one."""

    world, rank = 1, 0
    comm_seconds, comm_bytes = 0.0, 0

    def shard_loss(self, loss: Loss, targets: Tensor, examples: int) -> tuple[Loss, float]:
        """The loss to capture with and this rank's share of the examples."""
        return loss, 1.0

    def sum(self, tree: Any) -> Any:
        """The sum of ``tree`` over ranks."""
        return tree

    def holds(self, layer: str) -> bool:
        """Whether this rank holds ``layer``'s decomposition."""
        return True

    def decompose(self, factors: dict[str, KroneckerFactors], compute: Callable[[dict], dict], kind: type) -> dict:
        """Decompositions (of type ``kind``) of the layers this rank holds."""
        return compute(factors)

    def spread(self, delta: dict[str, Tensor], layers: dict[str, LayerSpec]) -> dict[str, Tensor]:
        """Preconditioned gradients of the layers other ranks hold, from them."""
        return delta

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers on every rank (as ``DistributedDataParallel`` does)."""


class DataParallel(Communicator):
    """Collectives over ``group`` (default: the world), timed in :attr:`comm_seconds` and counted in
    :attr:`comm_bytes` (bytes this rank sends into collectives). The timing is wall time around each
    call: transfers and waiting with gloo; with NCCL, whose collectives run asynchronously on the GPU
    stream, only their launch."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, fraction: float = 1.0, bucket_mb: float = 25.0):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("data-parallel K-FAC needs torch.distributed.init_process_group(...) first")
        self.group = group
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        self.world, self.rank = len(self.ranks), self.ranks.index(dist.get_rank())
        holders = max(1, round(fraction * self.world))
        if not 0 < fraction <= 1 or self.world % holders:
            raise ValueError(f"fraction must be in (0, 1] with fraction·W dividing W = {self.world}; got {fraction}")
        self.holders, self.block = holders, self.world // holders
        self.bucket = max(1, int(bucket_mb * 2**20))
        self.owners: dict[str, int] = {}
        self.shared: set[str] = set()  # layers decomposed by blocks on every rank
        self.comm_seconds, self.comm_bytes = 0.0, 0
        # sub-groups, created in the same order on every rank: holder sets and receiver blocks
        self.groups: dict[tuple[int, ...], Any] = {}
        sets = {self._holder_set(o) for o in range(self.world)} | {self._block(h) for h in range(self.world)}
        for members in sorted(sets):
            if 1 < len(members) < self.world:
                self.groups[members] = dist.new_group([self.ranks[r] for r in members])

    def _holder_set(self, owner: int) -> tuple[int, ...]:
        return tuple(sorted((owner + j * self.block) % self.world for j in range(self.holders)))

    def _block(self, holder: int) -> tuple[int, ...]:
        return tuple(sorted((holder + i) % self.world for i in range(self.block)))

    def _group(self, members: tuple[int, ...]):
        return self.group if len(members) == self.world else self.groups[members]

    def _timed(self, fn: Callable, *args, **kwargs) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.comm_seconds += time.perf_counter() - start
        return out

    def _buckets(self, leaves: list[Tensor]) -> list[list[int]]:
        """Indices of ``leaves`` grouped into buckets of one dtype and device, at most ``bucket`` bytes
        (a larger tensor is a bucket of its own)."""
        buckets: list[list[int]] = []
        filling: dict[tuple, tuple[list[int], int]] = {}
        for i, t in enumerate(leaves):
            key, nbytes = (t.dtype, t.device), t.numel() * t.element_size()
            idx, size = filling.get(key, ([], 0))
            if idx and size + nbytes > self.bucket:
                buckets.append(idx)
                idx, size = [], 0
            filling[key] = (idx + [i], size + nbytes)
        return buckets + [idx for idx, _ in filling.values()]

    def _collective(self, tree: Any, op: Callable[[Tensor], None]) -> Any:
        """Apply the in-place collective ``op`` to ``tree``'s leaves, bucketed; returns a new tree."""
        leaves, spec = optree.tree_flatten(tree)
        out = list(leaves)
        for idx in self._buckets(leaves):
            flat = torch.cat([leaves[i].reshape(-1) for i in idx])
            self.comm_bytes += flat.numel() * flat.element_size()
            self._timed(op, flat)
            for i, part in zip(idx, flat.split([leaves[i].numel() for i in idx])):
                out[i] = part.view_as(leaves[i])
        return optree.tree_unflatten(spec, out)

    def shard_loss(self, loss: Loss, targets: Tensor, examples: int) -> tuple[Loss, float]:
        counts = torch.tensor([float(loss.terms(targets)), float(examples)], dtype=torch.float64)
        terms, total = self.sum(counts.to(targets.device)).tolist()
        scale = 1.0 / terms if loss.reduction == "mean" else 1.0
        return dataclasses.replace(loss, reduction_scale=scale), examples / total

    def sum(self, tree: Any) -> Any:
        return self._collective(tree, lambda t: dist.all_reduce(t, group=self.group))

    def _assign(self, factors: dict[str, KroneckerFactors]) -> None:
        """Owner of each layer: largest decompositions first, each to the least loaded rank; layers with a
        block-diagonal side are shared by blocks (no owner)."""
        self.shared = {n for n, f in factors.items() if sides.is_blocked(f.A) or sides.is_blocked(f.G)}
        factors = {n: f for n, f in factors.items() if n not in self.shared}
        if set(self.owners) == set(factors):
            return
        load = [0.0] * self.world
        self.owners = {}
        cost = {n: sides.decomposition_cost(f.A) + sides.decomposition_cost(f.G) for n, f in factors.items()}
        for name in sorted(factors, key=lambda n: (-cost[n], n)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            self.owners[name] = rank
            load[rank] += cost[name]

    def holds(self, layer: str) -> bool:
        return layer in self.shared or self.rank in self._holder_set(self.owners[layer])

    def share_blocks(self, fn: Callable[[Tensor], tuple[Tensor, ...]], blocks: Tensor) -> tuple[Tensor, ...]:
        """``fn`` of ``blocks`` ``(B, k, s, s)``: this rank computes ``⌈k/W⌉`` of them (zero blocks pad ``k``)
        and the results are all-gathered (:func:`kfac_func.sides.sharing`)."""
        k = blocks.shape[1]
        chunk = -(-k // self.world)
        padded = torch.nn.functional.pad(blocks, (0, 0, 0, 0, 0, chunk * self.world - k))
        mine = fn(padded[:, self.rank * chunk : (self.rank + 1) * chunk].contiguous())
        out = []
        for t in mine:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            self.comm_bytes += t.numel() * t.element_size()
            self._timed(dist.all_gather, parts, t.contiguous(), group=self.group)
            out.append(torch.cat(parts, 1)[:, :k])
        return tuple(out)

    def decompose(self, factors: dict[str, KroneckerFactors], compute: Callable[[dict], dict], kind: type) -> dict:
        self._assign(factors)
        order, shared = list(factors), {}
        if self.shared:  # every rank, in the same order: the blocks' decompositions are all-gathered
            with sides.sharing(self.share_blocks):
                shared = compute({n: f for n, f in factors.items() if n in self.shared})
        factors = {n: f for n, f in factors.items() if n not in self.shared}
        mine = compute({n: f for n, f in factors.items() if self.owners[n] == self.rank})
        out = dict(shared)
        for owner in range(self.world):
            names = [n for n in factors if self.owners[n] == owner]
            holders = self._holder_set(owner)
            if not names or self.rank not in holders:
                continue
            tree = {n: mine[n] if owner == self.rank else _placeholder(kind, factors[n]) for n in names}
            if len(holders) > 1:
                src = self.ranks[owner]
                tree = self._collective(tree, lambda t, s=src, g=self._group(holders): dist.broadcast(t, s, group=g))
            out.update(tree)
        return {n: out[n] for n in order if n in out}

    def spread(self, delta: dict[str, Tensor], layers: dict[str, LayerSpec]) -> dict[str, Tensor]:
        if self.holders == self.world:
            return delta
        out = dict(delta)
        for holder in range(self.world):  # each holder serves its block of ranks
            block = self._block(holder)
            if self.rank not in block:
                continue
            names = [n for n in layers if n not in self.shared and holder in self._holder_set(self.owners[n])]
            if not names:
                continue
            tree = {n: weight_matrix(s, delta[s.weight], delta[s.bias] if s.bias else None)
                    for n, s in layers.items() if n in names}
            src = self.ranks[holder]
            tree = self._collective(tree, lambda t, s=src, g=self._group(block): dist.broadcast(t, s, group=g))
            if holder != self.rank:
                for n in names:
                    out.update(split_weight_matrix(layers[n], tree[n], out))
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        buffers = dict(module.named_buffers())
        if buffers:
            synced = self._collective(buffers, lambda t: dist.broadcast(t, self.ranks[0], group=self.group))
            with torch.no_grad():
                for name, b in buffers.items():
                    b.copy_(synced[name])


def _placeholder(kind: type, f: KroneckerFactors) -> EigenFactors | InverseFactors:
    """An empty decomposition of type ``kind`` for ``f``, to receive a broadcast into."""
    a, g = f.A, f.G
    blocks = a.shape[0]
    if kind is InverseFactors:
        return InverseFactors(torch.empty_like(a), torch.empty_like(g), a.new_empty(()))
    qa, qg = (torch.empty_like(m) if m.dim() == 3 else None for m in (a, g))
    return EigenFactors(qa, a.new_empty((blocks, sides.dim(a))), qg, g.new_empty((blocks, sides.dim(g))))


def weight_inputs(factors: dict[str, KroneckerFactors], share: float) -> dict[str, KroneckerFactors]:
    """Weight each ``A`` by this rank's share of the examples, so that the ranks' factors add up to the
    global batch's (``G`` already carries the global ``R``)."""
    if share == 1.0:
        return factors
    return {n: KroneckerFactors(f.A * share, f.G) for n, f in factors.items()}
