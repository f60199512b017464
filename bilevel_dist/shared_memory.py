"""Sums over CPU ranks on one host through shared memory, for small buffers.

A bilevel step with a shared lower level reduces once per inner gradient and once per
Hessian-vector product: about 24 small reductions per AID step. Through gloo each costs 1–2 ms
on a 2-core VM, mostly thread wake-ups (``benchmarks/overhead.py``), which made 2 processes slower
than 1. Here each rank copies its buffer into its slot of a shared segment, publishes a sequence
number, and spins until every rank has published; then all ranks sum the slots in rank order, so
the result is bitwise the same on every rank. No library offers this for torch CPU tensors.

Used only when every rank of the group runs on this host, on x86 (its store order makes the
published number a release of the data written before it), with no more ranks than CPUs (they
spin), and ``BILEVEL_DIST_SHM`` is not ``0``. Anything larger than a slot goes through gloo.
"""

from __future__ import annotations

import os
import platform
import secrets
import time

import torch
import torch.distributed as dist
from torch import Tensor

#: bytes of one rank's slot; larger buffers use the process group's all-reduce
SLOT_BYTES = 4 << 20
_RANKS = 64  # at most: one int64 sequence number each
_TOKEN = 64  # bytes after them: the creator's token
_HEADER = _RANKS * 8 + _TOKEN


class SharedMemorySum:
    """A sum over the ranks of ``group`` through a shared segment (module docstring). Create it
    with :meth:`create`, a collective call."""

    def __init__(self, path: str, rank: int, world: int) -> None:
        raw = torch.from_file(path, shared=True, size=_HEADER + 2 * world * SLOT_BYTES, dtype=torch.uint8)
        self.path = path
        self.flags = raw[: _RANKS * 8].view(torch.int64)
        self.slots = raw[_HEADER:].view(2, world, SLOT_BYTES)  # double-buffered by call parity
        self.rank, self.world, self.calls = rank, world, 0
        self.timeout_s = 600.0  # how long a rank waits for the others before it raises

    @classmethod
    def create(cls, group: dist.ProcessGroup | None = None) -> SharedMemorySum | None:
        """The shared sum of ``group``'s ranks, or ``None`` where it does not apply (then every
        rank gets ``None``). Collective: every rank of the group calls it at once."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        usable = (
            os.environ.get("BILEVEL_DIST_SHM", "1") != "0"
            and platform.machine().lower() in ("x86_64", "amd64")
            and world <= min(_RANKS, os.cpu_count() or 1)
            and os.path.isdir("/dev/shm")
            and dist.get_backend(group) == "gloo"
        )
        token = secrets.token_hex(8)
        path = f"/dev/shm/bilevel_dist_{token}"
        if rank == 0 and usable:
            with open(path, "wb") as handle:
                handle.truncate(_HEADER + 2 * world * SLOT_BYTES)
                handle.seek(_RANKS * 8)
                handle.write(token.encode())
        offers: list = [None] * world
        dist.all_gather_object(offers, (usable, path, token), group=group)
        path, token = offers[0][1], offers[0][2]
        # the same host: rank 0's file, with its token, is here (a host name can repeat)
        here = all(ok for ok, _, _ in offers) and _holds(path, token)
        verdicts: list = [None] * world
        dist.all_gather_object(verdicts, here, group=group)
        if not all(verdicts):
            if rank == 0 and usable:
                os.unlink(path)
            return None
        summer = cls(path, rank, world)
        summer._sum(torch.zeros(1))  # every rank has mapped the file once this returns; rank 0 unlinks it
        return summer

    def fits(self, flat: Tensor) -> bool:
        """Whether ``flat`` goes through shared memory: a CPU tensor no larger than a slot."""
        return flat.device.type == "cpu" and flat.numel() * flat.element_size() <= SLOT_BYTES

    def __call__(self, flat: Tensor) -> Tensor:
        """The sum of ``flat`` over the ranks, added in rank order."""
        return self._sum(flat)

    def _sum(self, flat: Tensor) -> Tensor:
        self.calls += 1
        nbytes = flat.numel() * flat.element_size()
        slots = self.slots[self.calls % 2]
        # a slot is rewritten two calls later, after every rank has published the call between,
        # so after every rank has read it
        slots[self.rank, :nbytes].copy_(flat.contiguous().view(-1).view(torch.uint8))
        self.flags[self.rank] = self.calls
        self._wait(self.calls)
        if self.calls == 1 and self.rank == 0:
            os.unlink(self.path)  # the mappings stay, and no file is left behind
        parts = slots[:, :nbytes].view(flat.dtype)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.view_as(flat)

    def _wait(self, call: int) -> None:
        flags = self.flags[: self.world]
        spins, deadline = 0, None
        while int(flags.min()) < call:
            spins += 1
            os.sched_yield()  # lets a sibling hardware thread or another process run
            if spins % 1000 == 0:
                deadline = deadline or time.monotonic() + self.timeout_s
                if time.monotonic() > deadline:
                    late = [r for r in range(self.world) if int(flags[r]) < call]
                    raise RuntimeError(f"ranks {late} did not reach shared-memory sum {call} in {self.timeout_s:.0f} s")


def _holds(path: str, token: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(_RANKS * 8)
            return handle.read(len(token)) == token.encode()
    except OSError:
        return False
