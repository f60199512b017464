"""Paired inner (training) and outer (validation) streams for bilevel training.

Every training batch is ``{"inner": {...}, "outer": {...}}``, a dict of tensors for each level,
each carrying ``"index"``: the global ids of its samples (what per-sample outer variables are
indexed by). The batch of global step ``t`` is a function of ``(seed, t, rank)`` only, so a run
resumed from a checkpoint at step ``t`` draws exactly the batches an uninterrupted run would.

Ranks: the outer stream (and the inner stream when no per-sample variables are sharded) draws a
global batch of ``batch_size × world_size`` ids from one shuffled epoch and gives rank ``r`` the
``r``-th chunk. With ``per_sample=True`` the inner stream of rank ``r`` draws only from the rows
it owns (:func:`bilevel_dist.distributed.shard_rows`), where its per-sample variables live.
Either way ``shards=N`` in a single process replays the global batches of an ``N``-rank run.

Batches with a problem axis: when the model's lower levels are independent problems (one row per
task or client, ``BilevelModule(lower_level="batched")``), the items of the inner dataset are
problems (a task's support set, a client's data) and the outer batch holds the *same* problems
from the outer dataset (their query sets): ``lower_level="batched"`` makes the outer ids follow
the inner ones, so a problem's two losses always meet on the rank that holds its row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bilevel_dist._checks import ConfigError, positive_int, setting
from bilevel_dist.distributed import Comm, shard_rows
from bilevel_dist.oracles import Chunks


class Samples(Dataset):
    """A dataset of equal-length tensors, e.g. ``Samples(x=images, y=labels)``; item ``i`` is
    ``{"x": images[i], "y": labels[i]}`` and a list of ids is fetched in one indexing operation."""

    def __init__(self, **tensors: Tensor) -> None:
        if not tensors:
            raise ValueError("Samples needs at least one tensor")
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Samples tensors must have the same length, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, ids: list[int]) -> dict[str, Tensor]:
        index = torch.as_tensor(ids)
        return {k: v[index] for k, v in self.tensors.items()}


def fetch(dataset: Dataset, ids: Tensor) -> dict[str, Tensor]:
    """The samples ``ids`` of ``dataset`` as one dict batch, with their ids under ``"index"``."""
    if isinstance(dataset, Samples):
        batch = dataset.__getitems__(ids)
    else:
        batch = torch.utils.data.default_collate([dataset[int(i)] for i in ids])
        if not isinstance(batch, Mapping):
            raise TypeError(f"dataset items must be dicts of tensors, got {type(dataset[0]).__name__}")
    return {**batch, "index": ids}


def _as_batch(items: Any) -> Any:
    return items


class _Stream:
    """Batch ids of one level at global step ``t``: a fresh permutation of a pool every epoch.

    ``split``: one pool whose global batch of ``batch_size`` is cut into one chunk per rank;
    otherwise one pool per rank (its own rows), each drawing ``batch_size`` per step.
    """

    def __init__(self, pools: list[Tensor], batch_size: int, seed: int, split: bool) -> None:
        self.pools, self.batch_size, self.seed, self.split = pools, batch_size, seed, split
        self.steps_per_epoch = min(len(p) for p in pools) // batch_size
        self._orders: dict[tuple[int, int], Tensor] = {}

    def ids(self, t: int, part: int, parts: int) -> Tensor:
        epoch, k = divmod(t, self.steps_per_epoch)
        order = self._order(epoch, 0 if self.split else part)
        chunk = order[k * self.batch_size : (k + 1) * self.batch_size]
        return chunk.tensor_split(parts)[part] if self.split else chunk

    def _order(self, epoch: int, pool: int) -> Tensor:
        """The shuffled pool of one epoch (the latest ones cached: one shuffle per epoch)."""
        key = (epoch, pool)
        if key not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 4099 + pool)
            self._orders = {k: v for k, v in self._orders.items() if k[0] == epoch}
            self._orders[key] = self.pools[pool][torch.randperm(len(self.pools[pool]), generator=gen)]
        return self._orders[key]


class PairedSteps(Dataset):
    """Item ``t``: the ``{"inner", "outer"}`` batch of global step ``t`` for this rank."""

    def __init__(
        self,
        inner: Dataset,
        outer: Dataset,
        inner_stream: _Stream,
        outer_stream: _Stream,
        rank: int,
        world: int,
        shards: int,
        outer_follows_inner: bool = False,
    ) -> None:
        self.inner, self.outer = inner, outer
        self.inner_stream, self.outer_stream = inner_stream, outer_stream
        self.rank, self.world, self.shards = rank, world, shards
        self.outer_follows_inner = outer_follows_inner

    def _ids(self, stream: _Stream, t: int) -> Tensor:
        if self.world > 1:
            return stream.ids(t, self.rank, self.world)
        if stream.split:
            return stream.ids(t, 0, 1)
        return torch.cat([stream.ids(t, r, self.shards) for r in range(self.shards)])

    def __getitem__(self, t: int) -> dict[str, dict[str, Tensor]]:
        ids = self._ids(self.inner_stream, t)
        inner = fetch(self.inner, ids)
        outer = fetch(self.outer, ids if self.outer_follows_inner else self._ids(self.outer_stream, t))
        return {"inner": inner, "outer": outer}

    def __len__(self) -> int:
        return self.inner_stream.steps_per_epoch


class StepSampler(DistributedSampler):
    """Yields global step numbers from the current position to the end of its stream epoch.

    The position is ``position()`` (the trainer's ``global_step``: the batches already consumed,
    restored with a checkpoint) or, without one, the count of steps this sampler has yielded.
    A ``DistributedSampler`` so that Lightning does not wrap it: ranks are handled by
    :class:`PairedSteps`, which turns a step number into this rank's batch.
    """

    def __init__(self, steps_per_epoch: int, position: Callable[[], int] | None = None) -> None:
        super().__init__(range(steps_per_epoch), num_replicas=1, rank=0, shuffle=False)
        self.steps_per_epoch, self.position, self.yielded = steps_per_epoch, position, 0

    def __iter__(self) -> Iterator[int]:
        start = self.position() if self.position is not None else self.yielded
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for t in range(start, end):
            self.yielded = t + 1
            yield t

    def __len__(self) -> int:
        return self.steps_per_epoch


class BilevelDataModule(L.LightningDataModule):
    """Pairs an inner (training) and an outer (validation) dataset into one training stream.

    Subclasses build the datasets in :meth:`datasets`; items are dicts of tensors. Validation
    runs over the outer dataset, test over the test dataset; both use Lightning's distributed
    samplers.

    Args:
        inner_batch_size: inner samples per step and rank.
        outer_batch_size: outer samples per step and rank; ``None`` takes the whole outer set
            every step (split across ranks).
        eval_batch_size: batch size of the validation and test loaders.
        per_sample: whether the model's per-sample variables are sharded across ranks, so that
            each rank draws inner samples only from the rows it owns; ``None`` (default): as the
            :class:`BilevelModule` being trained says.
        shards: in one process, replay the global batches of a ``shards``-rank run; default:
            the world size.
        lower_level: ``"batched"``: items are problems and each outer batch holds the inner
            batch's problems (module docstring); ``None`` (default): as the model says.
        chunk_size: samples per chunk of a full pass (SRBA's and VRBO's refresh).
        seed: seed of the sample order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        inner_batch_size: int = 64,
        outer_batch_size: int | None = 64,
        eval_batch_size: int = 512,
        per_sample: bool | None = None,
        shards: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        lower_level: str | None = None,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        for key, value in (("inner_batch_size", inner_batch_size), ("eval_batch_size", eval_batch_size)):
            setting(key, positive_int, value)
        if outer_batch_size is not None:
            setting("outer_batch_size", positive_int, outer_batch_size)
        if shards is not None:
            setting("shards", positive_int, shards)
        setting("seed", lambda k, v: positive_int(k, v, allow_zero=True), seed)
        setting("num_workers", lambda k, v: positive_int(k, v, allow_zero=True), num_workers)
        self.inner_batch_size, self.outer_batch_size, self.eval_batch_size = (
            inner_batch_size,
            outer_batch_size,
            eval_batch_size,
        )
        self.per_sample, self.shards, self.seed, self.num_workers = per_sample, shards, seed, num_workers
        if lower_level not in (None, "shared", "batched"):
            raise ConfigError("lower_level", f"lower_level must be 'shared' or 'batched', got {lower_level!r}")
        self.lower_level = lower_level
        self.chunk_size = setting("chunk_size", positive_int, chunk_size)
        self._splits: tuple[Dataset, Dataset, Dataset | None] | None = None

    def datasets(self) -> tuple[Dataset, Dataset, Dataset | None]:
        """``(inner, outer, test)`` datasets; ``test`` may be ``None``."""
        raise NotImplementedError

    @property
    def splits(self) -> tuple[Dataset, Dataset, Dataset | None]:
        """The datasets, built once."""
        if self._splits is None:
            self._splits = self.datasets()
        return self._splits

    def _world(self) -> tuple[int, int, int]:
        comm = Comm()
        world = comm.world_size
        shards = self.shards or world
        if world > 1 and shards != world:
            raise ConfigError("shards", f"shards={shards} differs from the {world} processes running")
        return comm.rank, world, shards

    def paired_steps(self) -> PairedSteps:
        """This rank's training stream (ranks from ``torch.distributed`` when initialised)."""
        inner, outer, _ = self.splits
        rank, world, shards = self._world()
        n_inner, n_outer = len(inner), len(outer)
        if self.per_sample:
            pools = [shard_rows(n_inner, r, shards) for r in range(shards)]
            inner_stream = _Stream(pools, self.inner_batch_size, self.seed, split=False)
        else:
            inner_stream = _Stream([torch.arange(n_inner)], self.inner_batch_size * shards, self.seed, split=True)
        follows = self.lower_level == "batched"  # the outer batch holds the inner batch's problems
        if follows and n_inner != n_outer:
            raise ConfigError(
                "data", f"batched lower levels pair each inner item with one outer item: {n_inner} ≠ {n_outer}"
            )
        outer_size = self.outer_batch_size * shards if self.outer_batch_size else n_outer
        outer_stream = _Stream([torch.arange(n_outer)], outer_size, self.seed + 1, split=True)
        checked = [("inner_batch_size", inner_stream, n_inner)]
        for key, stream, n in checked if follows else [*checked, ("outer_batch_size", outer_stream, n_outer)]:
            if stream.steps_per_epoch == 0:
                raise ConfigError(key, f"{key} × processes exceeds the {n} samples of the dataset")
        return PairedSteps(inner, outer, inner_stream, outer_stream, rank, world, shards, follows)

    def full_pass(self, level: str) -> Chunks:
        """This rank's share of every sample of ``level`` (``"inner"`` or ``"outer"``) as
        :class:`~bilevel_dist.oracles.Chunks` of at most about ``chunk_size`` samples, weighted by
        their share; every rank gets as many chunks, so per-chunk reductions pair up."""
        inner, outer, _ = self.splits
        rank, world, _ = self._world()
        dataset = inner if level == "inner" else outer
        n = len(dataset)
        if level == "inner" and self.per_sample:
            ids = shard_rows(n, rank, world)
        else:
            ids = torch.arange(n).tensor_split(world)[rank]
        pieces = max(1, -(-(n // world) // self.chunk_size))
        return Chunks((fetch(dataset, part), len(part) / len(ids)) for part in ids.tensor_split(pieces))

    def algorithm_data(self, needs: Mapping[str, Any]) -> dict[str, Any]:
        """What an algorithm declares it needs (``Algorithm.data_needs``): ``n_inner`` and
        ``n_outer`` (sample counts), ``full_batches`` (a chunked full pass of each level)."""
        inner, outer, _ = self.splits
        provided = {"n_inner": lambda: len(inner), "n_outer": lambda: len(outer)}
        provided["full_batches"] = lambda: (self.full_pass("inner"), self.full_pass("outer"))
        unknown = sorted(set(needs) - set(provided))
        if unknown:
            raise ConfigError("data", f"{type(self).__name__} cannot provide {unknown[0]!r}")
        return {key: provided[key]() for key in needs}

    def train_dataloader(self) -> DataLoader:
        steps = self.paired_steps()
        trainer = self.trainer
        position = (lambda: trainer.global_step) if trainer is not None else None
        return DataLoader(
            steps,
            batch_size=None,
            sampler=StepSampler(len(steps), position),
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global RNG to the model
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            _WithIndex(dataset), batch_size=self.eval_batch_size, collate_fn=_as_batch, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits[1])

    def test_dataloader(self) -> DataLoader:
        test = self.splits[2]
        if test is None:
            raise ConfigError("data", f"{type(self).__name__} has no test split")
        return self._eval_loader(test)


class TensorData(BilevelDataModule):
    """Bring-your-own tensors: ``path`` is a ``torch.save``'d dict
    ``{"train": {name: tensor}, "val": {...}, "test": {...}}`` (``test`` optional), e.g.
    ``{"train": {"x": ..., "y": ...}, ...}``. Extra arguments go to :class:`BilevelDataModule`."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not os.path.isfile(path):
            raise ConfigError("path", f"no such file: {path!r}")
        self.path = path
        self._tensors = torch.load(path, weights_only=True)
        missing = [split for split in ("train", "val") if split not in self._tensors]
        if not isinstance(self._tensors, dict) or missing:
            raise ConfigError("path", f"{path!r} must hold a dict with 'train' and 'val' entries")

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return len(next(iter(self._tensors["train"].values())))

    def datasets(self) -> tuple[Dataset, Dataset, Dataset | None]:
        test = self._tensors.get("test")
        return Samples(**self._tensors["train"]), Samples(**self._tensors["val"]), test and Samples(**test)


class _WithIndex(Dataset):
    """A dataset whose batches carry their sample ids under ``"index"``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**self.dataset[i], "index": torch.tensor(i)}

    def __getitems__(self, ids: list[int]) -> dict[str, Tensor]:
        return fetch(self.dataset, torch.as_tensor(ids))
