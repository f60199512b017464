"""Episodic data: meta-batches of tasks for training, fixed sets of tasks for validation and test.

Training batch of step ``t`` on rank ``r`` of ``W``: the tasks in slots
``[r·M/W, (r+1)·M/W)`` of the global meta-batch of ``M`` tasks, each drawn from
:func:`~bilevel_dist.recipes.few_shot.tasks.task_generator` ``(seed, "train", t, slot)``; so ranks
never overlap, and any number of processes (or a resumed run) replays the same tasks. A batch is
``{"inner": support sets, "outer": query sets}``, each ``{"x": (T, n, ...), "y": (T, n), "index":
slots}``; the inner one also carries ``"classes"``: the pool ids of each task's classes.

Evaluation batches are chunks of task ids ``i`` (from ``(seed, split, 0, i)``), dealt to ranks
round-robin: ``{"support": ..., "query": ..., "task": ids}``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bilevel_dist._checks import ConfigError, positive_int, setting
from bilevel_dist.distributed import Comm
from bilevel_dist.lightning.data import StepSampler
from bilevel_dist.recipes.few_shot.tasks import (
    ClassPool,
    Episode,
    Sinusoid,
    check_episode_shape,
    draw_episode,
    rotated_digits,
    task_generator,
)

DATASETS = ("sinusoid", "rotated_digits", "omniglot", "mini_imagenet")
_STEPS_PER_EPOCH = 1000  # tasks never repeat: an "epoch" is only a unit for Lightning's loops


def _stack(episodes: list[Episode]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    support = {"x": torch.stack([e.support_x for e in episodes]), "y": torch.stack([e.support_y for e in episodes])}
    query = {"x": torch.stack([e.query_x for e in episodes]), "y": torch.stack([e.query_y for e in episodes])}
    return support, query


class _TrainSteps(Dataset):
    """Item ``t``: this rank's share of the meta-batch of step ``t``."""

    def __init__(self, draw: Callable[[str, int, int], Episode], slots: Tensor) -> None:
        self.draw, self.slots = draw, slots

    def __len__(self) -> int:
        return _STEPS_PER_EPOCH

    def __getitem__(self, t: int) -> dict[str, dict[str, Tensor]]:
        episodes = [self.draw("train", t, int(s)) for s in self.slots]
        support, query = _stack(episodes)
        classes = torch.stack([e.classes for e in episodes])
        return {
            "inner": {**support, "index": self.slots.clone(), "classes": classes},
            "outer": {**query, "index": self.slots.clone()},
        }


class _EvalTasks(Dataset):
    """Item ``i``: the ``i``-th chunk of this rank's evaluation tasks."""

    def __init__(self, draw: Callable[[str, int, int], Episode], split: str, chunks: list[Tensor]) -> None:
        self.draw, self.split, self.chunks = draw, split, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.chunks[i]
        support, query = _stack([self.draw(self.split, 0, int(t)) for t in ids])
        return {"support": support, "query": query, "task": ids.clone()}


class FewShotData(L.LightningDataModule):
    """N-way K-shot tasks with Q queries per class (or K-shot sinusoid regression).

    Args:
        dataset: ``sinusoid``, ``rotated_digits`` (built in), ``omniglot`` or ``mini_imagenet``
            (read from ``root``: :mod:`~bilevel_dist.recipes.few_shot.folders`).
        root: the dataset's directory, for the ones read from disk.
        ways: classes per task (N); ignored for sinusoid.
        shots: support samples per class (K), or support points of a sinusoid task.
        queries: query samples per class (Q), or query points of a sinusoid task.
        meta_batch: tasks per meta-step, over all processes (M).
        val_tasks, test_tasks: the fixed validation and meta-test tasks (600 in the papers).
        eval_chunk: evaluation tasks per batch.
        image_size: side of the images read from disk (Omniglot 28, mini-ImageNet 84).
        omniglot_split: Omniglot's meta-train and meta-val characters (in file order; the rest
            is meta-test): the standard 1200/423 split with the last 100 of the 1200 for
            validation.
        seed: the seed every task is drawn from.
    """

    def __init__(
        self,
        dataset: str = "sinusoid",
        root: str | None = None,
        ways: int = 5,
        shots: int = 5,
        queries: int = 15,
        meta_batch: int = 32,
        val_tasks: int = 100,
        test_tasks: int = 600,
        eval_chunk: int = 50,
        image_size: int | None = None,
        omniglot_split: tuple[int, int] = (1100, 100),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
        for key in ("ways", "shots", "queries", "meta_batch", "val_tasks", "test_tasks", "eval_chunk"):
            setting(key, positive_int, locals()[key])
        setting("seed", lambda k, v: positive_int(k, v, allow_zero=True), seed)
        if dataset in ("omniglot", "mini_imagenet"):
            if root is None:
                raise ConfigError("root", f"the {dataset} dataset is read from a local directory: set root")
            if not Path(root).is_dir():
                raise ConfigError("root", f"{root} is not a directory (the {dataset} dataset is read from it)")
        self.dataset, self.root, self.image_size = dataset, root, image_size
        self.omniglot_split = tuple(omniglot_split)
        self.ways, self.shots, self.queries, self.meta_batch = ways, shots, queries, meta_batch
        self.val_tasks, self.test_tasks, self.eval_chunk = val_tasks, test_tasks, eval_chunk
        self.seed, self.num_workers = seed, num_workers
        self._pools: dict[str, ClassPool] | None = None
        self.sinusoid = Sinusoid()
        if dataset == "rotated_digits":
            self.pools  # noqa: B018  (bundled: checks N and K against the splits now)

    # -- what the model reads ----------------------------------------------------------------
    @property
    def regression(self) -> bool:
        """Whether tasks are regressions (sinusoid) rather than N-way classifications."""
        return self.dataset == "sinusoid"

    @property
    def pools(self) -> dict[str, ClassPool]:
        """The classes of each split, loaded once and checked against N and K + Q."""
        if self.regression:
            raise AttributeError("sinusoid tasks have no class pools")
        if self._pools is None:
            if self.dataset == "rotated_digits":
                pools = rotated_digits()
            else:
                from bilevel_dist.recipes.few_shot import folders

                options: dict[str, Any] = {} if self.image_size is None else {"image_size": self.image_size}
                if self.dataset == "omniglot":
                    options |= dict(zip(("train_classes", "val_classes"), self.omniglot_split, strict=True))
                pools = getattr(folders, self.dataset)(self.root, **options)
            for split, pool in pools.items():
                check_episode_shape(pool, split, self.ways, self.shots, self.queries)
            self._pools = pools
        return self._pools

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1,) if self.regression else tuple(self.pools["train"].images.shape[2:])

    @property
    def outputs(self) -> int:
        """Scores per sample: N for classification, 1 for regression."""
        return 1 if self.regression else self.ways

    @property
    def train_classes(self) -> int:
        """Classes of the meta-training split (the pretraining baseline's head)."""
        return 0 if self.regression else self.pools["train"].classes

    # -- drawing tasks -----------------------------------------------------------------------
    def draw(self, split: str, step: int, slot: int) -> Episode:
        """Task ``slot`` of step ``step`` of ``split``."""
        generator = task_generator(self.seed, split, step, slot)
        if self.regression:
            return self.sinusoid.draw(self.shots, self.queries, generator)
        return draw_episode(self.pools[split], self.ways, self.shots, self.queries, generator)

    def _rank(self) -> tuple[int, int]:
        comm = Comm()
        return comm.rank, comm.world_size

    def slots(self) -> Tensor:
        """This rank's slots of the global meta-batch."""
        rank, world = self._rank()
        if self.meta_batch % world:
            raise ConfigError("meta_batch", f"meta_batch={self.meta_batch} does not split over {world} processes")
        share = self.meta_batch // world
        return torch.arange(rank * share, (rank + 1) * share)

    def eval_tasks(self, split: str) -> _EvalTasks:
        """This rank's evaluation tasks of ``split`` in chunks; every rank gets as many tasks (the
        last ones padded by repeating its last id: scores are kept once per task id)."""
        rank, world = self._rank()
        n = self.val_tasks if split == "val" else self.test_tasks
        ids = torch.arange(rank, n, world)
        per_rank = -(-n // world)
        ids = torch.cat([ids, ids[-1:].expand(per_rank - len(ids))])
        return _EvalTasks(self.draw, split, list(ids.split(self.eval_chunk)))

    # -- loaders -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        position = (lambda: trainer.global_step) if trainer is not None else None
        return DataLoader(
            _TrainSteps(self.draw, self.slots()),
            batch_size=None,
            sampler=StepSampler(_STEPS_PER_EPOCH, position),
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        tasks = self.eval_tasks(split)
        # a one-replica DistributedSampler: Lightning keeps it (ranks were dealt by eval_tasks)
        sampler = DistributedSampler(tasks, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(tasks, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
