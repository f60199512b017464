"""``Comm``: the one place where values are reduced across ranks.

PyTorch DDP does not synchronise gradients from ``torch.autograd.grad``, ``torch.func`` or double
backward, so every hypergradient piece computed on a rank's shard goes through :meth:`Comm.mean`.
Without an initialised process group every method is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bilevel_dist.tree import Tree


class Comm:
    """Rank, world size and mean-reduction of trees over a process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def active(self) -> bool:
        """Whether there is more than one rank to reduce over."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    @property
    def rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        """Number of ranks (1 without a process group)."""
        return dist.get_world_size(self.group) if self.active else 1

    def mean(self, tree: Tree) -> Tree:
        """Averages every tensor of ``tree`` over the ranks (differentiably when it needs grad)."""
        if not self.active:
            return tree
        out = {}
        for key, value in tree.items():
            if value.requires_grad:
                from torch.distributed.nn.functional import all_reduce

                out[key] = all_reduce(value, group=self.group) / self.world_size
            else:
                reduced = value.clone()
                dist.all_reduce(reduced, group=self.group)
                out[key] = reduced / self.world_size
        return out

    def mean_value(self, value: torch.Tensor) -> torch.Tensor:
        """Averages one tensor over the ranks."""
        return self.mean({"value": value})["value"]

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world_size={self.world_size})"
