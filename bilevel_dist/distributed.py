"""``Comm``: the one place where values are reduced across ranks.

PyTorch DDP does not synchronise gradients from ``torch.autograd.grad``, ``torch.func`` or double
backward, so every hypergradient piece computed on a rank's shard goes through :meth:`Comm.mean`.
Without an initialised process group every method is the identity.

Leaves named in ``sharded`` (per-sample outer weights, per-task inner heads) are split by rows
across ranks: rank ``r`` owns global rows ``r, r + W, r + 2W, ...`` (:func:`shard_rows`), so the
derivative of the global loss with respect to them is local (scaled by ``1/W``, since the global
loss is the mean of the ranks' losses), and only their inner products need a reduction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel_dist.shared_memory import SharedMemorySum
from bilevel_dist.tree import Tree, total
from bilevel_dist.tree import dot as tree_dot

_SHARED: dict[object, SharedMemorySum | None] = {}


def _shared_sum(group: dist.ProcessGroup | None) -> SharedMemorySum | None:
    """The group's shared-memory sum, made on its first reduction (a collective: every rank
    reduces at the same point)."""
    key = group if group is not None else dist.group.WORLD
    if key not in _SHARED:
        _SHARED[key] = SharedMemorySum.create(group)
    return _SHARED[key]


def shard_rows(n: int, rank: int, world_size: int) -> Tensor:
    """The global row ids that ``rank`` owns out of ``n``: ``rank, rank + W, ...``."""
    return torch.arange(rank, n, world_size)


def local_rows(ids: Tensor, world_size: int) -> Tensor:
    """Where global rows ``ids`` sit in their owner's shard."""
    return torch.div(ids, world_size, rounding_mode="floor")


def pin_cpus(local_rank: int, local_world: int) -> list[int] | None:
    """Binds this process to the ``local_rank``-th of ``local_world`` equal slices of its CPUs,
    so that ranks on one host neither share a CPU nor migrate (measured on 2 vCPUs: 2-process
    few-shot MAML went from 2,900–3,500 to 4,150–4,850 tasks/s, ``benchmarks/scaling.py``).
    Returns the CPUs, or ``None`` where it does not apply: one rank, fewer CPUs than ranks, no
    ``sched_setaffinity``, or ``BILEVEL_DIST_PIN=0``."""
    if local_world < 2 or os.environ.get("BILEVEL_DIST_PIN", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = len(cpus) // local_world
    if per_rank < 1:
        return None
    mine = cpus[local_rank * per_rank : (local_rank + 1) * per_rank]
    os.sched_setaffinity(0, mine)
    return mine


class Comm:
    """Rank, world size and reductions of trees over a process group (default: the world)."""

    def __init__(
        self, group: dist.ProcessGroup | None = None, sharded: Iterable[str] = (), local: bool = False
    ) -> None:
        self.group = group
        self.sharded = frozenset(sharded)
        self.local = local  # this process alone, even inside a process group

    @property
    def active(self) -> bool:
        """Whether there is more than one rank to reduce over."""
        return not self.local and dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    @property
    def rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        """Number of ranks (1 without a process group)."""
        return dist.get_world_size(self.group) if self.active else 1

    def mean(self, tree: Tree) -> Tree:
        """Averages every tensor of ``tree`` over the ranks (differentiably when it needs grad);
        a sharded leaf is only scaled by ``1/W``: no other rank contributes to its rows. The
        replicated leaves travel in one flat buffer: one all-reduce per call."""
        return self._reduce(tree, average=True)

    def sum(self, tree: Tree) -> Tree:
        """Sums every replicated tensor of ``tree`` over the ranks; a sharded leaf is left as it
        is (its rows are this rank's alone). One all-reduce per call."""
        return self._reduce(tree, average=False)

    def _reduce(self, tree: Tree, average: bool) -> Tree:
        if not self.active:
            return tree
        world = self.world_size if average else 1
        out = {k: tree[k] / world if average else tree[k] for k in tree if k in self.sharded}
        dtypes = {tree[k].dtype for k in tree if k not in self.sharded}
        for dtype in dtypes:  # one buffer per dtype (usually one)
            shared = [k for k in tree if k not in self.sharded and tree[k].dtype == dtype]
            flat = torch.cat([tree[k].reshape(-1) for k in shared])
            if flat.requires_grad:
                from torch.distributed.nn.functional import all_reduce

                flat = all_reduce(flat, group=self.group)
            else:
                flat = self._sum_buffer(flat)
            parts = flat.div(world).split([tree[k].numel() for k in shared])
            out |= {k: part.view_as(tree[k]) for k, part in zip(shared, parts, strict=True)}
        return {k: out[k] for k in tree}

    def _sum_buffer(self, flat: Tensor) -> Tensor:
        """The sum of ``flat`` over the ranks, bitwise the same on every rank: through shared
        memory where the ranks share a host (:mod:`bilevel_dist.shared_memory`), else one
        all-reduce."""
        summer = _shared_sum(self.group)
        if summer is not None and summer.fits(flat):
            return summer(flat)
        flat = flat.clone()
        dist.all_reduce(flat, group=self.group)
        return flat

    def mean_value(self, value: Tensor) -> Tensor:
        """Averages one tensor over the ranks."""
        return self.mean({"value": value})["value"]

    def dot(self, a: Tree, b: Tree) -> Tensor:
        """``⟨a, b⟩`` over the whole (global) tree: sharded leaves summed over their owners."""
        if not self.sharded:
            return torch.as_tensor(tree_dot(a, b))  # a tensor even for an empty tree
        keys = list(a)
        replicated = total([(a[k] * b[k]).sum() for k in keys if k not in self.sharded])
        shards = [k for k in keys if k in self.sharded]
        if not shards:
            return replicated if isinstance(replicated, Tensor) else torch.as_tensor(replicated)
        local = total([(a[k] * b[k]).sum() for k in shards])
        if self.active:
            local = self._sum_buffer(local.reshape(1)).reshape(())
        return replicated + local

    def norm(self, a: Tree) -> Tensor:
        """``‖a‖`` over the whole (global) tree."""
        return self.dot(a, a).sqrt()

    def gather_rows(self, shard: Tensor, n: int) -> Tensor:
        """The full ``n``-row tensor from every rank's shard (:func:`shard_rows` layout)."""
        world = self.world_size
        if world == 1:
            return shard
        rows = -(-n // world)
        padded = shard.new_zeros((rows, *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        full = shard.new_empty((n, *shard.shape[1:]))
        for rank, part in enumerate(parts):
            ids = shard_rows(n, rank, world)
            full[ids] = part[: len(ids)]
        return full

    def scatter_rows(self, full: Tensor) -> Tensor:
        """This rank's shard of a full tensor."""
        return full[shard_rows(full.shape[0], self.rank, self.world_size).to(full.device)]

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world_size={self.world_size}, sharded={sorted(self.sharded)})"
