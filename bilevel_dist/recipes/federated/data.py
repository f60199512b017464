"""Federated data: a partition of a training set over clients, one round per training step.

Round ``t`` samples ``m = max(1, round(C·K))`` of the ``K`` clients without replacement, from a
generator seeded by ``(seed, t)``; every random choice of the round (which clients, which drop
out, each client's minibatch order in each local epoch) is drawn for all ``m`` clients at once
from that generator, so a round is the same whatever the number of processes, and a resumed
run replays it. Rank ``r`` of ``W`` holds the sampled clients ``r, r + W, ...``, padded to
``⌈m / W⌉`` rows with empty clients (id ``-1``, size 0, marked dropped), so every rank holds as
many rows (one all-gather suffices for robust aggregation).

A round's inner batch, per client row: ``"x"``, ``"y"`` (padded to the round's largest client),
``"weight"`` ``(S, C, n)``: local step ``s``'s minibatch weights (``1/|minibatch|`` on its
samples), ``"size"``, ``"share"`` (its size over the round's total), ``"dropped"``,
``"sampled"`` (``m``) and ``"index"`` (client id). Local training runs ``E`` epochs of
minibatches of ``B`` (``local_batch = 0``: the full local set, FedSGD), so a client with
``n`` samples takes ``E·⌈n/B⌉`` steps, as in McMahan et al.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from bilevel_dist._checks import ConfigError, positive_int, setting
from bilevel_dist.distributed import Comm
from bilevel_dist.lightning.data import StepSampler
from bilevel_dist.recipes.federated.partition import SCHEMES, WITH_REPLACEMENT_ABOVE, partition

DATASETS = ("digits", "mnist", "cifar10", "femnist")
_ROUNDS_PER_EPOCH = 1000  # an "epoch" is only a unit for Lightning's loops


def digits(held_out: float = 0.3, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's bundled digits (8×8, 10 classes), pixels in [0, 1], float32, split by
    ``seed`` into ``train`` and a held-out share cut in two: ``val`` (a third) and ``test``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, rest = order.tensor_split([int(round(len(y) * (1 - held_out)))])
    val, test = rest.tensor_split([len(rest) // 3])
    return {name: (x[ids], y[ids]) for name, ids in (("train", train), ("val", val), ("test", test))}


def round_generator(seed: int, t: int) -> torch.Generator:
    """The generator of round ``t``: every random choice of the round comes from it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + t + 1)


def _table(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Index lists padded into a ``(K, n_max)`` table (``-1`` past a list's end), and the sizes."""
    sizes = torch.tensor([len(p) for p in parts])
    table = torch.full((len(parts), max(int(sizes.max()), 1)), -1, dtype=torch.long)
    for i, p in enumerate(parts):  # once, at setup
        table[i, : len(p)] = p
    return table, sizes


class Clients:
    """The clients' data: each client's training samples (indices into ``x``, ``y``) and its own
    held-out samples (indices into ``test_x``, ``test_y``), padded into ``(K, n_max)`` tables
    (``-1`` past a client's size)."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        train: list[Tensor],
        test: list[Tensor],
        test_x: Tensor | None = None,
        test_y: Tensor | None = None,
    ) -> None:
        self.x, self.y = x, y
        self.test_x, self.test_y = (x, y) if test_x is None else (test_x, test_y)
        self.table, self.sizes = _table(train)
        self.test_table, self.test_sizes = _table(test)

    @classmethod
    def split_locally(cls, x: Tensor, y: Tensor, parts: list[Tensor], local_test: float, seed: int) -> Clients:
        """Each client keeps a ``local_test`` share of its samples as its own test set (none for
        a client of one sample)."""
        generator = torch.Generator().manual_seed(seed + 7)
        train, test = [], []
        for p in parts:  # once, at setup
            p = p[torch.randperm(len(p), generator=generator)]
            held = int(local_test * len(p)) if len(p) > 1 else 0
            train.append(p[: len(p) - held].sort().values)
            test.append(p[len(p) - held :].sort().values)
        return cls(x, y, train, test)

    def __len__(self) -> int:
        return len(self.sizes)

    def gather(self, ids: Tensor, split: str = "train") -> dict[str, Tensor]:
        """Clients ``ids``' samples of ``split``, padded to the largest: ``x``, ``y``, ``size``."""
        if split == "train":
            table, sizes, x, y = self.table, self.sizes, self.x, self.y
        else:
            table, sizes, x, y = self.test_table, self.test_sizes, self.test_x, self.test_y
        rows = table[ids, : max(int(sizes[ids].max()), 1) if len(ids) else 1].clamp_min(0)
        return {"x": x[rows], "y": y[rows], "size": sizes[ids]}


def local_schedule(
    sizes: Tensor, epochs: int, batch: int, generator: torch.Generator, only: Tensor | None = None
) -> Tensor:
    """``(S, C, n)`` minibatch weights of ``E`` epochs for clients of ``sizes`` (vectorised over
    the clients): in each epoch a random order of the client's samples, cut into minibatches of
    ``batch`` (0: the whole set), each sample weighted ``1/|its minibatch|``. ``only``: the rows
    of these clients alone (a rank's share), equal to theirs in the whole schedule: the random
    draws are the whole round's, and ``S`` and ``n`` are the largest client's."""
    clients, n = len(sizes), int(sizes.max()) if len(sizes) else 0
    size = sizes.clamp_min(1)
    per_batch = size if batch == 0 else torch.full_like(size, batch).minimum(size)
    steps_per_epoch = -(-size // per_batch)
    total = int((steps_per_epoch * epochs).max()) if clients else 0
    keep = torch.arange(clients) if only is None else only
    sizes, size, per_batch, steps_per_epoch = sizes[keep], size[keep], per_batch[keep], steps_per_epoch[keep]
    weight = torch.zeros(total, len(keep), n, dtype=torch.float64)
    real = torch.arange(n)[None, :] < sizes[:, None]
    cols = torch.arange(n).expand(len(keep), n)
    rows = torch.arange(len(keep))[:, None].expand(len(keep), n)
    for e in range(epochs):  # a loop over epochs (a few), vectorised over clients and samples
        keys = torch.rand(clients, n, generator=generator, dtype=torch.float64)[keep].masked_fill(~real, 2.0)
        position = keys.argsort(1).argsort(1)  # each sample's place in this epoch's order
        within = torch.div(position, per_batch[:, None], rounding_mode="floor")
        start = within * per_batch[:, None]
        members = (size[:, None] - start).clamp(max=per_batch[:, None])
        step = e * steps_per_epoch[:, None] + within
        weight[step[real], rows[real], cols[real]] = 1.0 / members[real].double()
    return weight


class _Rounds(Dataset):
    """Item ``t``: this rank's clients of round ``t``."""

    def __init__(self, data: FederatedData) -> None:
        self.data = data

    def __len__(self) -> int:
        return _ROUNDS_PER_EPOCH

    def __getitem__(self, t: int) -> dict[str, dict[str, Tensor]]:
        return self.data.round(t)


class _ClientEval(Dataset):
    """Item ``i``: chunk ``i`` of the clients, their training and held-out samples."""

    def __init__(self, data: FederatedData) -> None:
        comm = Comm()
        self.data, self.chunks = data, data.client_chunks()[comm.rank :: comm.world_size]  # this rank's

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids, clients = self.chunks[i], self.data.client_data
        train, test = clients.gather(ids, "train"), clients.gather(ids, "test")
        return {**train, **{f"test_{k}": v for k, v in test.items()}, "index": ids}


class FederatedData(L.LightningDataModule):
    """A training set split over clients, sampled round by round; the global test set.

    Args:
        dataset: ``digits`` (built in), or ``mnist``, ``cifar10``, ``femnist`` read from ``root``
            (:mod:`~bilevel_dist.recipes.federated.folders`; FEMNIST's clients are its writers).
        root: the dataset's directory, for the ones read from disk.
        clients: ``K``, from 2 to 10,000 (past 1,000: samples assigned with replacement).
        partition: ``iid``, ``dirichlet`` (over labels, concentration ``alpha``) or ``shards``
            (McMahan's pathological split: ``shards_per_client`` label-sorted shards each).
        fraction: ``C``, the share of clients sampled each round, in (0, 1].
        epochs: ``E``, local epochs.
        local_batch: ``B``, the local minibatch (0: the full local set).
        samples_per_client: samples each client draws when they are assigned with replacement.
        dropout: probability that a sampled client drops out of a round (simulated).
        local_test: the share of each client's samples it keeps as its own test set (the
            personalised and per-client accuracies).
        held_out: the share of the dataset held out from every client: a third for validation,
            the rest the global test set.
        faults: per round, ``{"nan": k, "scaled": j, "scale": s}``: ``k`` sampled clients send a
            non-finite update and ``j`` send theirs multiplied by ``s`` (a simulated fault or
            attack, drawn from the round's generator).
        eval_batch: samples per evaluation batch.
        eval_clients: clients per evaluation batch of the per-client test.
        seed: the seed of the partition and of every round.
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        clients: int = 100,
        partition: str = "iid",
        alpha: float = 0.3,
        shards_per_client: int = 2,
        fraction: float = 0.1,
        epochs: int = 1,
        local_batch: int = 10,
        samples_per_client: int = 8,
        dropout: float = 0.0,
        local_test: float = 0.2,
        held_out: float = 0.3,
        faults: dict[str, float] | None = None,
        eval_batch: int = 512,
        eval_clients: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
        if dataset != "digits" and root is None:
            raise ConfigError("root", f"the {dataset} dataset is read from a local directory: set root")
        if root is not None and not Path(root).expanduser().is_dir():
            raise ConfigError("root", f"{root} is not a directory (the {dataset} dataset is read from it)")
        if partition not in SCHEMES:
            raise ConfigError("partition", f"unknown partition {partition!r}; choose one of {list(SCHEMES)}")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ConfigError("fraction", f"fraction (C) must be in (0, 1], got {fraction!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ConfigError("alpha", f"alpha must be > 0 (the Dirichlet concentration), got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ConfigError("dropout", f"dropout must be in [0, 1), got {dropout!r}")
        if not (isinstance(local_test, (int, float)) and 0 <= local_test < 1):
            raise ConfigError("local_test", f"local_test must be in [0, 1), got {local_test!r}")
        if not (isinstance(held_out, (int, float)) and 0 < held_out < 1):
            raise ConfigError("held_out", f"held_out must be in (0, 1), got {held_out!r}")
        faults = {"nan": 0, "scaled": 0, "scale": 100.0, **(faults or {})}
        unknown = sorted(set(faults) - {"nan", "scaled", "scale"})
        if unknown:
            raise ConfigError("faults", f"unknown fault {unknown[0]!r}; faults are 'nan', 'scaled' and 'scale'")
        for key in ("clients", "shards_per_client", "epochs", "samples_per_client", "eval_batch", "eval_clients"):
            setting(key, positive_int, locals()[key])
        setting("local_batch", lambda k, v: positive_int(k, v, allow_zero=True), local_batch)
        setting("seed", lambda k, v: positive_int(k, v, allow_zero=True), seed)
        self.dataset, self.root, self.clients, self.scheme = dataset, root, clients, partition
        self.alpha, self.shards_per_client, self.fraction = alpha, shards_per_client, fraction
        self.epochs, self.local_batch, self.samples_per_client = epochs, local_batch, samples_per_client
        self.dropout, self.held_out, self.eval_batch, self.seed = dropout, held_out, eval_batch, seed
        self.faults, self.local_test, self.eval_clients = faults, local_test, eval_clients
        if int(faults["nan"]) + int(faults["scaled"]) > self.sampled:
            raise ConfigError("faults", f"{faults['nan']} + {faults['scaled']} faulty clients > {self.sampled} sampled")
        self._data: tuple[Clients, dict[str, tuple[Tensor, Tensor]]] | None = None
        if dataset == "digits":  # bundled: checks the partition against the data now (e.g. too many shards)
            self.client_data  # noqa: B018

    # -- data --------------------------------------------------------------------------------
    @property
    def client_data(self) -> Clients:
        """The partitioned training set."""
        return self._load()[0]

    def held_out_set(self, split: str) -> tuple[Tensor, Tensor]:
        """The global ``val`` or ``test`` set: ``(x, y)``."""
        return self._load()[1][split]

    def _load(self) -> tuple[Clients, dict[str, tuple[Tensor, Tensor]]]:
        if self._data is None:
            if self.dataset == "femnist":  # LEAF's writers are the clients: the partition is given
                from bilevel_dist.recipes.federated.folders import femnist

                splits, own, own_test = femnist(self.root)
                (x, y), (test_x, test_y) = splits.pop("train"), splits["test"]
                self.clients = len(own)
                self._data = (Clients(x, y, own, own_test, test_x, test_y), splits)
                return self._data
            if self.dataset == "digits":
                splits = digits(self.held_out, self.seed)
            else:
                from bilevel_dist.recipes.federated import folders

                splits = getattr(folders, self.dataset)(self.root)
            x, y = splits.pop("train")
            parts = partition(
                y, self.clients, self.scheme, self.alpha, self.shards_per_client, self.samples_per_client, self.seed
            )
            self._data = (Clients.split_locally(x, y, parts, self.local_test, self.seed), splits)
        return self._data

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.client_data.x.shape[1:])

    @property
    def classes(self) -> int:
        return int(self.client_data.y.max()) + 1

    @property
    def sampled(self) -> int:
        """Clients per round."""
        return max(1, round(self.fraction * self.clients))

    @property
    def with_replacement(self) -> bool:
        return self.clients > WITH_REPLACEMENT_ABOVE

    # -- rounds ------------------------------------------------------------------------------
    def round(self, t: int, rank: int | None = None, world: int | None = None) -> dict[str, dict[str, Tensor]]:
        """Rank ``rank``'s share of round ``t`` (default: this process's)."""
        if rank is None or world is None:
            comm = Comm()
            rank, world = comm.rank, comm.world_size
        data, m = self.client_data, self.sampled
        generator = round_generator(self.seed, t)
        ids = torch.randperm(len(data), generator=generator)[:m].sort().values
        dropped = torch.rand(m, generator=generator, dtype=torch.float64) < self.dropout
        fault = torch.zeros(m, dtype=torch.long)  # 0: none, 1: non-finite update, 2: scaled update
        faulty = torch.randperm(m, generator=generator)[: int(self.faults["nan"]) + int(self.faults["scaled"])]
        fault[faulty[: int(self.faults["nan"])]] = 1
        fault[faulty[int(self.faults["nan"]) :]] = 2
        sizes = data.sizes[ids]
        mine = torch.arange(rank, m, world)
        weight = local_schedule(sizes, self.epochs, self.local_batch, generator, only=mine)
        # a second, independent schedule: Per-FedAvg's outer minibatches D'
        weight_query = local_schedule(sizes, self.epochs, self.local_batch, generator, only=mine)
        share = sizes.double() / sizes.sum()
        rows = -(-m // world)
        pad = rows - len(mine)
        table = data.table[ids[mine], : int(sizes.max())]
        x = data.x[table.clamp_min(0)]
        y = data.y[table.clamp_min(0)]
        batch = {
            "x": x,
            "y": y,
            "weight": weight,
            "weight_query": weight_query,
            "size": sizes[mine],
            "share": share[mine],
            "dropped": dropped[mine],
            "sampled": torch.full((len(mine),), m),
            "fault": fault[mine],
            "fault_scale": torch.full((len(mine),), float(self.faults["scale"]), dtype=torch.float64),
            "index": ids[mine],
        }
        if pad:  # empty clients, so every rank holds as many rows
            filler = {"index": -1, "dropped": True, "sampled": m}
            batch = {
                k: torch.cat([v, _pad_rows(v, pad, filler.get(k, 0), dim=_axis(k))], dim=_axis(k))
                for k, v in batch.items()
            }
        return {"inner": batch, "outer": batch}

    # -- loaders -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        position = (lambda: trainer.global_step) if trainer is not None else None
        return DataLoader(_Rounds(self), batch_size=None, sampler=StepSampler(_ROUNDS_PER_EPOCH, position))

    def client_chunks(self) -> list[Tensor]:
        """Client ids in evaluation chunks, small enough that every rank gets one."""
        clients = len(self.client_data)
        size = min(self.eval_clients, -(-clients // Comm().world_size))
        return list(torch.arange(clients).split(size))

    def _eval_loader(self, split: str) -> DataLoader:
        """This rank's share of a held-out set: samples ``rank, rank + W, ...``, unpadded (a
        padded sampler would count a sample twice), behind a one-replica ``DistributedSampler``
        that Lightning keeps."""
        x, y = self.held_out_set(split)
        comm = Comm()
        mine = TensorDataset(x[comm.rank :: comm.world_size], y[comm.rank :: comm.world_size])
        sampler = DistributedSampler(mine, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(mine, batch_size=self.eval_batch, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        """The global test set, then every client's own held-out samples (with its training
        samples, to personalise from)."""
        clients = _ClientEval(self)
        sampler = DistributedSampler(clients, num_replicas=1, rank=0, shuffle=False)  # ranks dealt already
        return [self._eval_loader("test"), DataLoader(clients, batch_size=None, sampler=sampler)]


def _axis(key: str) -> int:
    """The client axis of a round's batch entry: the schedules lead with the local step."""
    return 1 if key.startswith("weight") else 0


def _pad_rows(v: Tensor, count: int, value: Any, dim: int) -> Tensor:
    shape = list(v.shape)
    shape[dim] = count
    return torch.full(shape, value, dtype=v.dtype)


__all__ = ["FederatedData", "digits", "local_schedule", "round_generator"]
