"""Federated optimisation with the sampled clients as one batched lower level.

The outer variable is the global model ``w``; the inner one is the stack of the round's client
models ``θ_c`` (a leading client axis, each rank holding its own clients). A client's local
training is the lower-level solve: local steps on its data from ``w``, all clients at once
under the problem's batched policy (no collective). The server step is the outer one, from the
clients' updates ``Δ_c = w − θ_c`` aggregated with one collective per round.

Inner batches (one per rank and round) hold, per client: ``"x"``, ``"y"`` padded to the
round's largest client, ``"weight"`` ``(S, C, n)`` — local step ``s``'s minibatch weights (a
mean over the minibatch; zero for padding and for a client with fewer steps, so that a
client's training equals its own run), ``"size"`` (its number of samples), ``"dropped"`` and
``"index"`` (the client's id). The problem's inner loss reads ``batch["weight"]`` for the
current local step (the algorithm hands it one step's slice).

Aggregators (``aggregator``): ``mean`` (weighted by client data size as McMahan et al., or
``weighting="uniform"``: each client alike, as the Inverting Gradients thesis words it),
``median`` and ``trimmed_mean`` (coordinate-wise over the valid clients, unweighted), each after
optional per-client norm clipping (``clip``). DP-FedAvg (``noise_multiplier > 0``) clips every
update to ``clip``, averages with the fixed denominator ``m`` (the sampled clients) and adds
``N(0, (σ·clip/m)²)`` with the same draw on every rank. A client that was dropped or whose update
is not finite is left out and reported.

Server optimisers (Reddi et al. 2021, no bias correction, ``τ`` their ``ε``): ``sgd``
(FedAvg with ``server_lr = 1``), ``avgm`` (momentum), ``adam`` and ``yogi``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.base import Algorithm, State, choice, count, fraction, lr, nonnegative, zeros
from bilevel_dist.metrics import Metrics
from bilevel_dist.solvers import GD, PerStep, run
from bilevel_dist.tree import Tree

_log = logging.getLogger(__name__)
AGGREGATORS = ("mean", "median", "trimmed_mean")
SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")


class FedAvg(Algorithm):
    """FedAvg / FedSGD / FedProx with a server optimiser and robust or private aggregation.

    Local training: ``S`` steps (the batch's ``"weight"`` rows) of ``θ_c ← θ_c − η ∇ g_c``,
    ``g_c`` the client's minibatch loss plus FedProx's ``μ/2 ‖θ_c − w‖²`` (``prox``), in chunks of
    ``client_chunk`` clients (memory grows with the chunk, not with the clients). FedSGD is one
    full-batch local step with ``server_lr = 1``: one step of centralised gradient descent.

    Cost per round: ``S`` inner gradients per chunk and one collective (an all-reduce for the
    mean, an all-gather for the median and trimmed mean); DP noise is drawn from the round's seed
    on every rank, so it needs none.
    """

    name = "fedavg"
    #: the batch's ``(S, C, n)`` minibatch schedules a local step reads
    step_keys: tuple[str, ...] = ("weight",)
    hparams = {
        "local_lr": (0.1, lr),
        "prox": (0.0, nonnegative),
        "server_optimizer": ("sgd", choice(*SERVER_OPTIMIZERS)),
        "server_lr": (1.0, lr),
        "server_momentum": (0.9, fraction),
        "beta2": (0.99, fraction),
        "tau": (1e-3, lr),
        "aggregator": ("mean", choice(*AGGREGATORS)),
        "weighting": ("size", choice("size", "uniform")),
        "trim": (0.2, fraction),
        "clip": (None, lr),
        "noise_multiplier": (0.0, nonnegative),
        "client_chunk": (None, count),
        "seed": (0, lambda n, v: int(v)),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.h["noise_multiplier"] > 0 and self.h["clip"] is None:
            raise ConfigError("clip", "DP-FedAvg (noise_multiplier > 0) needs a clip: the noise is scaled to it")
        if self.h["noise_multiplier"] > 0 and self.h["aggregator"] != "mean":
            raise ConfigError("aggregator", "DP-FedAvg (noise_multiplier > 0) averages: use aggregator 'mean'")

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        optimizer = self.h["server_optimizer"]
        if optimizer != "sgd":
            state["server_m"] = zeros(outer)
        if optimizer in ("adam", "yogi"):
            state["server_v"] = {k: torch.full_like(v, self.h["tau"] ** 2) for k, v in outer.items()}
        return state

    def cost(self, t: int) -> dict[str, int]:
        return {}

    # -- local training ----------------------------------------------------------------------
    def chunks(self, batch: dict[str, Tensor]) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """The batch's clients in chunks of ``client_chunk`` rows."""
        clients = batch["x"].shape[0]
        size = self.h["client_chunk"] or max(clients, 1)
        for lo in range(0, clients, size):
            rows = slice(lo, min(lo + size, clients))
            yield rows, {k: v[:, rows] if k.startswith("weight") else v[rows] for k, v in batch.items()}

    def train_chunk(self, w: Tree, batch: dict[str, Tensor]) -> Tree:
        """One chunk's client models after their local steps, from ``w``: one vectorised solve
        under the batched policy (no collective)."""
        clients, steps = batch["x"].shape[0], batch["weight"].shape[0]
        theta = {k: v.unsqueeze(0).expand(clients, *v.shape).clone() for k, v in w.items()}
        schedule = PerStep(self.step_batch(batch, s) for s in range(steps))
        end = run(GD(self.h["local_lr"], steps), self.oracles, theta, w, schedule, gradient=self.local_direction)
        return tree.detach(end.inner)

    def step_batch(self, batch: dict[str, Tensor], s: int) -> dict[str, Tensor]:
        """Local step ``s``'s batch: the method's minibatch schedules (:attr:`step_keys`) at that step."""
        return {**batch, **{k: batch[k][s] for k in self.step_keys}}

    def local_training(self, w: Tree, batch: dict[str, Tensor]) -> Tree:
        """Every client's model after its local steps (all rows at once: for tests and
        inspection; a round streams its chunks into the aggregation instead)."""
        done = [self.train_chunk(w, part) for _, part in self.chunks(batch)]
        return {k: torch.cat([d[k] for d in done]) for k in w}

    def local_direction(self, theta: Tree, w: Tree, step_batch: dict[str, Tensor]) -> Tree:
        """What every client of a local step descends by ``local_lr`` (``step_batch``: one step's
        minibatches): its minibatch gradient (+ FedProx's ``μ(θ − w)`` for the clients still
        training at this step)."""
        grad = self.oracles.inner_grad(theta, w, step_batch)
        if not self.h["prox"]:
            return grad
        return {k: g + self.h["prox"] * _rows(_active(step_batch, g), g) * (theta[k] - w[k]) for k, g in grad.items()}

    def personalize(self, w: Tree, batch: dict[str, Tensor]) -> Tree:
        """Each client's model for its own data (``batch``: its whole local set, ``"weight"``
        its mean): the global model itself."""
        return {k: v.unsqueeze(0).expand(batch["x"].shape[0], *v.shape) for k, v in w.items()}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        w = state["outer"]
        direction, info = self.aggregate(w, inner_batch, state["t"])
        state, moved = self.server_step(state, direction)
        # the client models lived for their chunk only: nothing per client is kept
        state = {**state, "outer": tree.axpy(-self.h["server_lr"], moved, w), "inner": {}, "t": state["t"] + 1}
        return state, Metrics(**info, direction=direction)

    # -- aggregation -------------------------------------------------------------------------
    def updates(self, w: Tree, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One chunk's flat updates ``w − θ_c`` (simulated faults applied, excluded rows zeroed,
        clipped) and which rows count."""
        theta = self.train_chunk(w, batch)
        flat = torch.cat([(w[k].unsqueeze(0) - theta[k]).flatten(1) for k in w], dim=1)
        if "fault" in batch:  # simulated faulty clients (the data module's ``faults``)
            flat = _faulty(flat, batch["fault"], batch["fault_scale"])
        valid = flat.isfinite().all(1) & ~batch["dropped"].bool()
        flat = torch.where(valid[:, None], flat, torch.zeros_like(flat))  # a NaN row must not reach a sum
        clip = self.h["clip"]
        if clip is not None:
            flat = flat * (clip / flat.norm(dim=1, keepdim=True).clamp_min(clip))
        return flat, valid

    def aggregate(self, w: Tree, batch: dict[str, Tensor], t: int) -> tuple[Tree, dict[str, float]]:
        """The round's pseudo-gradient: every chunk trained and folded in (the mean keeps running
        sums, so memory follows the chunk; the median and trimmed mean need every row), then one
        collective."""
        private = self.h["noise_multiplier"] > 0
        name = self.h["aggregator"]
        sums, rows, valids = None, [], []
        self.failed: list[int] = []
        for _, part in self.chunks(batch):
            try:
                flat, valid = self.updates(w, part)
            except RuntimeError as error:  # a real failure inside the local solve: the chunk sits out
                size = sum(v.numel() for v in w.values())
                flat = next(iter(w.values())).new_zeros(part["x"].shape[0], size)
                valid = torch.zeros(part["x"].shape[0], dtype=torch.bool, device=flat.device)
                self.failed += part["index"][part["index"] >= 0].tolist()
                _log.warning("local training of clients %s failed (%s): left out", self.failed, error)
            valids.append(valid)
            if name != "mean":
                rows.append(flat)
                continue
            uniform = private or self.h["weighting"] == "uniform"
            weight = torch.ones_like(part["size"], dtype=flat.dtype) if uniform else part["size"].to(flat.dtype)
            weight = weight * valid
            here = torch.cat(
                [(weight[:, None] * flat).sum(0), weight.sum().reshape(1), valid.sum().reshape(1).to(flat)]
            )
            sums = here if sums is None else sums + here
        valid = torch.cat(valids)
        if name == "mean":
            assert sums is not None
            totals = self.comm.sum({"totals": sums})["totals"]
            numerator, denominator, kept = totals[:-2], totals[-2], totals[-1]
            if private:  # DP-FedAvg: the fixed denominator, the sampled clients (McMahan et al. 2018)
                denominator = batch["sampled"][0].to(numerator.dtype)
            aggregate = numerator / denominator.clamp_min(1e-300)
        else:
            every, mask = _all_gather_rows(torch.cat(rows), valid, self.comm)
            aggregate = _robust(name, every[mask], self.h["trim"])
            kept = mask.sum().to(aggregate)
        if private:
            generator = torch.Generator().manual_seed(self.h["seed"] * 1_000_003 + t)
            noise = torch.randn(aggregate.shape, generator=generator, dtype=aggregate.dtype)
            aggregate = (
                aggregate
                + noise.to(aggregate.device) * self.h["noise_multiplier"] * self.h["clip"] / batch["sampled"][0]
            )
        sizes = [v.numel() for v in w.values()]
        direction = {k: p.view_as(w[k]) for k, p in zip(w, aggregate.split(sizes), strict=True)}
        real, dropped = batch["index"] >= 0, batch["dropped"].bool()  # id -1: a padding row
        self.excluded = batch["index"][~valid & real].tolist()  # by id, logged by the module
        self.non_finite = sorted(set(batch["index"][~valid & real & ~dropped].tolist()) - set(self.failed))
        return direction, {"clients_used": float(kept), "clients_excluded": float(batch["sampled"][0]) - float(kept)}

    # -- server optimiser --------------------------------------------------------------------
    def server_step(self, state: State, d: Tree) -> tuple[State, Tree]:
        """The server optimiser's direction from the pseudo-gradient ``d``."""
        optimizer = self.h["server_optimizer"]
        if optimizer == "sgd":
            return state, d
        b1, b2 = self.h["server_momentum"], self.h["beta2"]
        if optimizer == "avgm":
            m = {k: b1 * v + d[k] for k, v in state["server_m"].items()}
            return {**state, "server_m": m}, m
        m = {k: b1 * v + (1 - b1) * d[k] for k, v in state["server_m"].items()}
        if optimizer == "adam":
            v = {k: b2 * s + (1 - b2) * d[k] ** 2 for k, s in state["server_v"].items()}
        else:  # yogi: the second moment moves by at most (1 − β₂) d² per round
            v = {k: s - (1 - b2) * d[k] ** 2 * torch.sign(s - d[k] ** 2) for k, s in state["server_v"].items()}
        moved = {k: m[k] / (v[k].sqrt() + self.h["tau"]) for k in m}
        return {**state, "server_m": m, "server_v": v}, moved


def _all_gather_rows(flat: Tensor, valid: Tensor, comm: Any) -> tuple[Tensor, Tensor]:
    """Every rank's update rows and validity: one all-gather (the data pads every rank to the
    same number of client rows)."""
    if not comm.active:
        return flat, valid
    padded = torch.cat([flat, valid.to(flat.dtype)[:, None]], dim=1)
    parts = [torch.empty_like(padded) for _ in range(comm.world_size)]
    dist.all_gather(parts, padded.contiguous())
    rows = torch.cat(parts)
    return rows[:, :-1], rows[:, -1] > 0.5


def _robust(name: str, rows: Tensor, trim: float) -> Tensor:
    """Coordinate-wise median or trimmed mean of the valid clients' updates."""
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1])
    ordered = rows.sort(dim=0).values
    if name == "median":  # the mean of the two middle values for an even count
        return (ordered[(rows.shape[0] - 1) // 2] + ordered[rows.shape[0] // 2]) / 2
    cut = int(trim * rows.shape[0])
    return ordered[cut : rows.shape[0] - cut].mean(0)


def _active(step_batch: dict[str, Tensor], like: Tensor) -> Tensor:
    """1 for the clients that have a minibatch at this local step, else 0."""
    return (step_batch["weight"].sum(1) > 0).to(like.dtype)


def _faulty(update: Tensor, fault: Tensor, scale: Tensor) -> Tensor:
    """Fault 1: a non-finite update; fault 2: the update times ``scale``."""
    factor = torch.where(fault == 2, scale.to(update), torch.ones_like(scale, dtype=update.dtype))
    factor = torch.where(fault == 1, torch.full_like(factor, float("nan")), factor)
    return update * _rows(factor, update)


def _rows(per_client: Tensor, like: Tensor) -> Tensor:
    """A per-client factor shaped to multiply ``like`` (clients first)."""
    return per_client.view(-1, *([1] * (like.dim() - 1)))


class PFedMe(FedAvg):
    """pFedMe (Dinh et al. 2020): personalised models ``θ_c = argmin_θ f_c(θ) + λ/2 ‖θ − w_c‖²``,
    solved by ``personal_steps`` GD steps of ``personal_lr`` (warm-started) on each local
    minibatch; the local model moves along the Moreau envelope's gradient,
    ``w_c ← w_c − η λ (w_c − θ_c)``; the server takes ``w ← w − β · mean_c (w − w_c)``
    (``server_lr = β``; the mean weighted by data size, or any aggregator). ``∇F_c(w) = λ(w −
    θ_c*(w))`` is the hypergradient of the lower level's value, so it needs no linear solve.

    Cost per round: ``S · personal_steps`` inner gradients per chunk, one collective.
    """

    name = "pfedme"
    hparams = {
        **FedAvg.hparams,
        "local_lr": (0.05, lr),
        "personal_lr": (0.05, lr),
        "personal_steps": (5, count),
        "lam": (15.0, lr),
    }

    def personal(self, theta: Tree, anchor: Tree, batch: dict[str, Tensor], steps: int) -> Tree:
        """``steps`` GD steps on ``f_c(θ) + λ/2 ‖θ − anchor_c‖²`` (``batch["weight"]``: one step's)."""
        lam = self.h["lam"]

        def proximal(theta: Tree, outer: Tree, batch: dict[str, Tensor]) -> Tree:
            grad = self.oracles.inner_grad(theta, outer, batch)
            active = _active(batch, next(iter(grad.values())))
            return {k: g + lam * _rows(active, g) * (theta[k] - anchor[k]) for k, g in grad.items()}

        end = run(GD(self.h["personal_lr"], steps), self.oracles, theta, {}, batch, gradient=proximal)
        return tree.detach(end.inner)

    def local_direction(self, local: Tree, w: Tree, step_batch: dict[str, Tensor]) -> Tree:
        """The Moreau envelope's gradient ``λ(w_c − θ_c)``, ``θ_c`` the personal solve from ``w_c``."""
        theta = self.personal(local, local, step_batch, self.h["personal_steps"])
        active = _active(step_batch, next(iter(theta.values())))
        return {k: self.h["lam"] * _rows(active, v) * (v - theta[k]) for k, v in local.items()}

    def personalize(self, w: Tree, batch: dict[str, Tensor]) -> Tree:
        """``θ_c(w)``: the personal problem from the global model on the client's whole set."""
        start = super().personalize(w, batch)
        return self.personal({k: v.clone() for k, v in start.items()}, start, batch, 10 * self.h["personal_steps"])


class PerFedAvg(FedAvg):
    """Per-FedAvg (Fallah et al. 2020): each local step is a MAML step on the client,
    ``w_c ← w_c − β ∇f_c(w_c − α ∇f_c(w_c; D); D')`` with the second-order term
    ``(I − α ∇²f_c(w_c; D))`` (``first_order=False``: the same one-step reverse-mode
    hypergradient as the few-shot recipe's MAML, by a Hessian-vector product of the batched
    oracles) or without it (``first_order=True``: Per-FedAvg FO). ``D`` and ``D'`` are two
    independent minibatch schedules. A client personalises by one step of ``α`` on its data.

    Cost per round: per chunk and local step, two inner gradients and (second order) one
    linearisation and one Hessian-vector product; one collective.
    """

    name = "perfedavg"
    step_keys = ("weight", "weight_query")  # D and D', two independent schedules
    hparams = {
        **FedAvg.hparams,
        "local_lr": (0.05, lr),
        "alpha": (0.05, lr),
        "first_order": (False, lambda n, v: bool(v)),
    }

    def local_direction(self, local: Tree, w: Tree, step_batch: dict[str, Tensor]) -> Tree:
        """The MAML meta-gradient on the client: adapt on ``D`` by ``α``, differentiate on ``D'``."""
        support, query = step_batch, {**step_batch, "weight": step_batch["weight_query"]}
        if self.h["first_order"]:
            grad = self.oracles.inner_grad(local, w, support)
        else:
            lin = self.oracles.linearize(local, w, support)
            grad = lin.grad
        adapted = {k: v - self.h["alpha"] * grad[k] for k, v in local.items()}
        meta = self.oracles.inner_grad(tree.detach(adapted), w, query)
        if not self.h["first_order"]:
            meta = tree.axpy(-self.h["alpha"], lin.hvp(meta), meta)
        return meta

    def personalize(self, w: Tree, batch: dict[str, Tensor]) -> Tree:
        """One step of ``α`` on the client's whole set, from the global model."""
        start = super().personalize(w, batch)
        grad = self.oracles.inner_grad(start, {}, batch)
        return tree.detach({k: v - self.h["alpha"] * grad[k] for k, v in start.items()})
