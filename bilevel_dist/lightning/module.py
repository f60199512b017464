"""``BilevelModule``: a ``LightningModule`` that runs one bilevel algorithm step per training step.

A user subclasses it with the two losses and the starting variables; the module builds the
:class:`~bilevel_dist.problem.BilevelProblem` and the algorithm named in ``algorithm`` and works
with ``lightning.Trainer`` unchanged (devices, DDP, precision, ``max_steps``, validation, test).

Distribution goes through :class:`~bilevel_dist.distributed.Comm`, never through DDP's reducer,
with the lower level's reduction policy (:mod:`bilevel_dist.oracles`): a ``"shared"`` lower level
averages every inner oracle across ranks; ``"batched"`` lower levels (one row per sample, task,
client or image, losses summed over them) make no collective until the outer gradient. Leaves
named in ``per_sample`` are sharded by rows (each rank keeps the rows of the samples it owns) and
gathered for checkpoints. Replicated variables are the module's parameters, so they are in
``state_dict`` and are broadcast from rank 0 when a DDP strategy starts, which does not wrap the
module in ``DistributedDataParallel``: nothing calls ``backward`` on its parameters, so the
wrapper's reducer and per-step buffer broadcasts would only cost time. A lower level that starts afresh
every step (:meth:`BilevelModule.inner_init`) is neither kept nor checkpointed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from bilevel_dist import algorithms
from bilevel_dist._checks import ConfigError, NonFiniteError, one_line
from bilevel_dist.distributed import Comm, local_rows, pin_cpus
from bilevel_dist.metrics import Metrics
from bilevel_dist.oracles import Chunks
from bilevel_dist.problem import BilevelProblem, check_tree
from bilevel_dist.tree import Tree

_LEVELS = ("outer", "inner")
_PROGRESS_EVERY = 10  # steps between progress-bar updates of the outer loss and throughput
LOWER_LEVELS = ("shared", "batched")
NONFINITE = ("raise", "skip")


class _StepCounter(torch.optim.Optimizer):
    """Lets Lightning count algorithm steps (``global_step``, ``max_steps``, checkpoint cadence);
    the algorithm itself updates the variables."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> Any:  # noqa: D102
        return closure() if closure is not None else None


class BilevelModule(L.LightningModule):
    """Runs a bilevel algorithm from :mod:`bilevel_dist.algorithms` under Lightning.

    Subclasses define :meth:`configure_variables`, :meth:`inner_loss` and :meth:`outer_loss`;
    training batches are ``{"inner": ..., "outer": ...}`` (:class:`BilevelDataModule`).

    Args:
        algorithm: ``{"name": <registered name>, **hyperparameters}``, e.g.
            ``{"name": "soba", "inner_lr": 0.1}``.
        per_sample: names of variables with one row per training sample (or task) that are
            sharded across ranks; their losses index them with the batch's ``"index"``.
        lower_level: ``"shared"`` (one lower-level problem over every rank's data, losses are
            means) or ``"batched"`` (independent problems, one row each, losses are sums over
            them: see :mod:`bilevel_dist.oracles`).
        nonfinite: what a step with a non-finite hypergradient or new variables does, found
            before the state is updated (one host read per step): ``"raise"`` stops the run with
            :class:`~bilevel_dist._checks.NonFiniteError` naming the step, the quantity and the
            last logged values (the CLI exits with code 1); ``"skip"`` drops the step, counts it
            (``skipped_steps``, logged) and goes on. A checkpoint is never written with
            non-finite values.
        inner_loss, outer_loss, variables, inner_init: the two losses, ``() -> (outer, inner)``
            and :meth:`inner_init`, to build a module from callables instead of a subclass.
    """

    #: what :meth:`validation_step` logs: the metrics a sweep may rank trials by
    validation_metrics: tuple[str, ...] = ("val_outer_loss",)

    def __init__(
        self,
        algorithm: dict[str, Any] | None = None,
        per_sample: Iterable[str] = (),
        lower_level: str = "shared",
        nonfinite: str = "raise",
        *,
        inner_loss: Callable[[Tree, Tree, Any], Tensor] | None = None,
        outer_loss: Callable[[Tree, Tree, Any], Tensor] | None = None,
        variables: Callable[[], tuple[Tree, Tree]] | None = None,
        inner_init: Callable[[Tree, Any], Tree] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # callables instead of a subclass: BilevelModule(inner_loss=g, outer_loss=f, variables=init)
        for attribute, given in (("inner_loss", inner_loss), ("outer_loss", outer_loss), ("inner_init", inner_init)):
            if given is not None:
                setattr(self, attribute, given)
        if variables is not None:
            self.configure_variables = variables
        if lower_level not in LOWER_LEVELS:
            raise ConfigError("lower_level", f"lower_level must be one of {list(LOWER_LEVELS)}, got {lower_level!r}")
        self.lower_level = lower_level
        if nonfinite not in NONFINITE:
            raise ConfigError("nonfinite", f"nonfinite must be one of {list(NONFINITE)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        #: the last step's metrics (``last_metrics.direction``: the direction it used), for callbacks
        self.last_metrics: Metrics | None = None
        self._last_logged: tuple[int, dict[str, float]] | None = None
        # a lower level that starts afresh every step: the hook is overridden or given
        self.episodic = inner_init is not None or type(self).inner_init is not BilevelModule.inner_init
        spec = dict(algorithm or {})
        name = spec.pop("name", "aid")
        self.comm = Comm(sharded=per_sample)
        self.algorithm_name, self._spec = name, spec
        found = algorithms.find(name)
        needs = found.data_needs if found is not None else {}
        self.algorithm = self._make_algorithm(needs)  # checks the settings now, data stood in for
        if self.episodic and not self.algorithm.episodic:
            raise ConfigError("algorithm.name", f"{name} needs persistent inner variables, not an inner_init")
        self._state: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self._rows: dict[str, int] = {}
        self._last_step_end: float | None = None

    # -- what a subclass defines -------------------------------------------------------------
    def configure_variables(self) -> tuple[Tree, Tree]:
        """The starting ``(outer, inner)`` trees, full size (per-sample leaves with all rows)."""
        raise NotImplementedError

    def inner_loss(self, inner: Tree, outer: Tree, batch: Any) -> Tensor:
        """The lower-level loss ``g`` on one batch."""
        raise NotImplementedError

    def outer_loss(self, inner: Tree, outer: Tree, batch: Any) -> Tensor:
        """The upper-level loss ``f`` on one batch."""
        raise NotImplementedError

    def inner_init(self, outer: Tree, batch: Any) -> Tree:
        """The starting inner variables of this step's lower level, for one that starts afresh
        every step (new tasks, clients or images: episodic); define it and
        :meth:`configure_variables` may return an empty inner tree. Its variables live for one
        step and are not checkpointed."""
        raise NotImplementedError

    # -- variables and state -----------------------------------------------------------------
    @property
    def problem(self) -> BilevelProblem:
        """The bilevel problem made of this module's two losses."""
        return BilevelProblem(self.inner_loss, self.outer_loss, batched=self.lower_level == "batched")

    @property
    def state(self) -> dict[str, Any]:
        """This rank's algorithm state: variables (per-sample leaves: this rank's rows) and buffers."""
        self._build()
        self._sync_state()
        assert self._state is not None
        return self._state

    @property
    def outer(self) -> Tree:
        """This rank's outer variables."""
        return self.state["outer"]

    @property
    def inner(self) -> Tree:
        """This rank's inner variables."""
        return self.state["inner"]

    def gathered(self, level: str) -> Tree:
        """The full ``"outer"`` or ``"inner"`` tree, per-sample rows gathered from every rank
        (a collective: call it on all ranks)."""
        return {k: self._gather(k, v) for k, v in self.state[level].items()}

    def _gather(self, key: str, value: Tensor) -> Tensor:
        return self.comm.gather_rows(value, self._rows[key]) if key in self._rows else value

    def _build(self) -> None:
        """Creates the variables once: replicated leaves become parameters, per-sample leaves
        are cut to this rank's rows."""
        if self._state is not None or hasattr(self, "outer_vars"):
            return
        outer, inner = self.configure_variables()
        for level, tree in zip(_LEVELS, (outer, inner), strict=True):
            if not (level == "inner" and self.episodic and tree == {}):
                check_tree(tree, f"configure_variables() {level}")
        trees = {"outer": outer, "inner": inner}
        unknown = sorted(self.comm.sharded - set(outer) - set(inner))
        if unknown:
            raise ConfigError("per_sample", f"per_sample names {unknown[0]!r}, which is not a variable")
        self._rows = {k: v.shape[0] for t in trees.values() for k, v in t.items() if k in self.comm.sharded}
        local = {
            level: {k: self.comm.scatter_rows(v) if k in self._rows else v for k, v in tree.items()}
            for level, tree in trees.items()
        }
        for level in _LEVELS:
            params = {k: nn.Parameter(v.detach().clone()) for k, v in local[level].items() if k not in self._rows}
            # "." separates modules in parameter names: nested names (``"0.weight"``) use "|"
            setattr(self, f"{level}_vars", nn.ParameterDict({k.replace(".", "|"): v for k, v in params.items()}))
        if not any(True for _ in self.parameters()):
            self.anchor = nn.Parameter(torch.zeros(()))  # DDP and the step counter need a parameter
        # configure_variables()'s key order, so that reductions always sum in the same order
        self._key_order = {level: list(tree) for level, tree in trees.items()}
        self._initial_rows = {
            level: {k: v for k, v in tree.items() if k in self._rows} for level, tree in local.items()
        }

    def _make_algorithm(self, from_data: dict[str, Any]) -> algorithms.Algorithm:
        try:
            return algorithms.get(
                self.algorithm_name, problem=self.problem, comm=self.comm, **{**from_data, **self._spec}
            )
        except ConfigError as error:
            raise error.under("algorithm") from None

    def configure_model(self) -> None:
        # under the strategy's init context: e.g. float64 tensors with precision="64-true"
        self._build()
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None and hasattr(data, "per_sample"):
            sharded = bool(self._rows)
            stated = {
                "per_sample": (sharded, f"the model {'shards' if sharded else 'has no'} per-sample variables"),
                "lower_level": (self.lower_level, f"the model's lower level is {self.lower_level!r}"),
            }
            for key, (model_says, why) in stated.items():
                if getattr(data, key) is None:  # e.g. each rank must draw the samples whose rows it holds
                    setattr(data, key, model_says)
                elif getattr(data, key) != model_says:
                    raise ConfigError(
                        f"data.init_args.{key}",
                        f"{key}={getattr(data, key)!r} but {why}; leave it unset to follow the model",
                    )
        needs = self.algorithm.data_needs
        if needs and self._trainer is not None:
            self.algorithm = self._make_algorithm(self._algorithm_data(data, needs))

    def _algorithm_data(self, data: Any, needs: dict[str, Any]) -> dict[str, Any]:
        """What the algorithm declares it needs (``data_needs``), from the trainer's data module,
        batches as the training loop would hand them over: on the device, in the precision's dtype."""
        if data is None or not hasattr(data, "algorithm_data"):
            raise ConfigError("algorithm.name", f"{self.algorithm_name} needs a BilevelDataModule: {sorted(needs)}")
        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin

        def move(batch: Any, level: str) -> Any:
            return self.localize(precision.convert_input(strategy.batch_to_device(batch)), level)

        provided = data.algorithm_data(needs)
        if "full_batches" in provided:
            provided["full_batches"] = tuple(
                Chunks((move(batch, level), weight) for batch, weight in chunks)
                for level, chunks in zip(_LEVELS[::-1], provided["full_batches"], strict=True)
            )
        return provided

    def _sync_state(self) -> None:
        """Makes the algorithm state agree with the parameters (after a device or dtype move, or
        a checkpoint load) and the parameters mirror the state."""
        params = {
            level: {k.replace("|", "."): v for k, v in getattr(self, f"{level}_vars").items()} for level in _LEVELS
        }
        reference = next(self.parameters())
        if self._state is None:
            local = self._initial_rows if self._restored is None else self._restore(self._restored)
            self._restored = self._initial_rows = None
            order = self._key_order
            trees = {level: {k: params[level].get(k, local[level].get(k)) for k in order[level]} for level in _LEVELS}
            if "buffers" in local:
                self._state = {**_to(local["buffers"], reference), **_to(trees, reference)}
            else:
                self._state = self.algorithm.init(*_to([trees["outer"], trees["inner"]], reference))
        state = self._state
        for level in _LEVELS:
            tree = state[level]
            for key, param in params[level].items():
                if tree[key].device != param.device or tree[key].dtype != param.dtype:
                    self._state = state = _to(state, param)
                    tree = state[level]
        self._mirrors = [(level, key, param) for level in _LEVELS for key, param in params[level].items()]
        self._mirror()

    def _mirror(self) -> None:
        """Points the parameters at the state's replicated variables (no copy)."""
        state = self._state
        for level, key, param in self._mirrors:
            param.data = state[level][key].detach()

    def _restore(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The local state from a checkpoint's gathered one."""
        if saved["algorithm"] != self.algorithm_name:
            raise ConfigError(
                "algorithm.name",
                f"the checkpoint was written by {saved['algorithm']!r}, this run uses {self.algorithm_name!r}",
            )
        parts = {level: saved[level] for level in (*_LEVELS, "buffers")}
        return _map_sharded(parts, self.comm.sharded, lambda k, v: self.comm.scatter_rows(v))

    # -- training ----------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _StepCounter(self.parameters())

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):  # Ray Train's strategy too: it subclasses DDPStrategy
            strategy.configure_ddp = lambda: _sync_module_states(strategy.model)  # no wrapper, same start

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1 and self.device.type == "cpu":  # CPU ranks: one slice of the CPUs each
            pin_cpus(trainer.local_rank, trainer.num_devices)
        self._sync_state()

    def localize(self, batch: dict[str, Tensor], level: str = "inner") -> dict[str, Tensor]:
        """The batch with ``"index"`` pointing at this rank's rows of the per-sample variables
        (the global ids stay under ``"id"``). Outer batches index rows only when the lower levels
        are batched (their items are the inner batch's problems)."""
        if not self._rows or "index" not in batch or (level == "outer" and self.lower_level != "batched"):
            return batch
        ids = batch["index"]
        return {**batch, "id": ids, "index": local_rows(ids, self.comm.world_size)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not isinstance(batch, dict) or set(batch) != {"inner", "outer"}:
            raise TypeError('BilevelModule training batches must be {"inner": ..., "outer": ...}')
        start = time.perf_counter()
        if self._state is None:
            self._sync_state()
        inner_batch, outer_batch = self.localize(batch["inner"]), self.localize(batch["outer"], "outer")
        state = self._state
        if self.episodic:
            state = self.algorithm.restart(state, self.inner_init(state["outer"], inner_batch))
        state, metrics = self.algorithm.step(state, inner_batch, outer_batch)
        log_now = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        show_now = self.global_step % _PROGRESS_EVERY == 0
        losses = {}
        if log_now or show_now:  # metrics are computed (and reduced) only when shown: checked with the step
            with torch.no_grad():
                losses = {
                    "inner_loss": self.inner_loss(state["inner"], state["outer"], inner_batch).detach(),
                    "outer_loss": self.outer_loss(state["inner"], state["outer"], outer_batch).detach(),
                }
                losses = self.comm.mean({k: v.reshape(1).to(torch.float64) for k, v in losses.items()})
        # a lower level that starts afresh every step is dropped next step: only what persists counts
        inner = {} if self.episodic else state["inner"]
        parts = {"hypergradient": metrics.direction, "outer": state["outer"], "inner": inner, "loss": losses}
        bad = self._nonfinite(parts)
        if bad is not None:
            self._refuse(bad)  # raises, or the step is dropped: the state stays as it was
            self.optimizers().step()
            self.last_metrics = None
            for logger in self.loggers:
                logger.log_metrics({"skipped_steps": float(self.skipped_steps)}, step=self.global_step - 1)
            return
        self.last_metrics = metrics
        self._state = state
        self._mirror()
        self.optimizers().step()
        now = time.perf_counter()
        elapsed = now - (self._last_step_end or start)
        self._last_step_end = now
        if not (log_now or show_now):
            return
        size = _batch_size(batch["inner"]) * self.comm.world_size
        logged = {**{k: float(v) for k, v in losses.items()}, "samples_per_sec": size / elapsed}
        # straight to the loggers, one row per step (self.log would cost ~0.35 ms per key)
        if log_now:
            logged |= Metrics(metrics).floats()
            if self.skipped_steps:
                logged["skipped_steps"] = float(self.skipped_steps)
            self._last_logged = (self.global_step - 1, logged)
            for logger in self.loggers:
                logger.log_metrics(logged, step=self.global_step - 1)
        if show_now:  # self.log costs ~0.35 ms per key
            shown = {k: logged[k] for k in ("outer_loss", "samples_per_sec")}
            self.log_dict(shown, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=size)

    def _nonfinite(self, parts: dict[str, Tree | None]) -> tuple[str, str] | None:
        """The first ``(quantity, key)`` with a non-finite value, on any rank, or ``None``. Every
        rank gets the same answer: where ranks hold different values (sharded rows, persistent
        independent lower levels) the per-tensor flags are summed over ranks, one small sum;
        replicated and reduced values are the same everywhere and need none."""
        named = [(part, k, v) for part, t in parts.items() if t for k, v in t.items() if v.is_floating_point()]
        if not named:
            return None
        bad = torch.stack([~torch.isfinite(v).all() for _, _, v in named]).to(torch.float64)
        local = bool(self._rows) or (self.lower_level == "batched" and not self.episodic)
        if local and self.comm.active:
            bad = self.comm.sum({"nonfinite": bad})["nonfinite"]
        flags = bad.tolist()  # the one host read of the check
        first = next((i for i, flag in enumerate(flags) if flag), None)
        return None if first is None else named[first][:2]

    def _refuse(self, where: tuple[str, str]) -> None:
        quantity, key = where
        what = {
            "hypergradient": "the hypergradient",
            "outer": "the outer variable",
            "inner": "the inner variable",
            "loss": "the loss",
        }
        step = self.global_step
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return
        if self._last_logged is None:
            last = f"none logged yet (logging every {self.trainer.log_every_n_steps} steps)"
        else:
            logged_step, values = self._last_logged
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "samples_per_sec" and math.isfinite(v))
            last = f"at step {logged_step}: {shown}"
        raise NonFiniteError(
            one_line(
                f"step {step}: {what[quantity]} {key!r} is not finite after the {self.algorithm_name} step; the "
                f"state was not updated. Last finite values: {last}. Lower the step sizes, or set the "
                "model's nonfinite: skip to drop such steps"
            )
        )

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None

    # -- evaluation --------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._sync_state()

    def on_test_start(self) -> None:
        self._sync_state()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_outer_loss("val_outer_loss", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_outer_loss("test_outer_loss", batch)

    def _log_outer_loss(self, name: str, batch: dict[str, Tensor]) -> None:
        """The outer loss of the learned variables on an evaluation batch. Batched lower levels:
        each rank scores the problems whose rows it holds (Lightning's distributed sampler deals
        them out as the rows are sharded; its padding repeats are dropped), per problem."""
        if self.episodic:
            raise NotImplementedError(
                f"{type(self).__name__}: a lower level that starts afresh every step has to be solved on the "
                "evaluation problems first; override validation_step/test_step"
            )
        batched = self.lower_level == "batched"
        if batched and self._rows and "index" in batch:
            own = batch["index"] % self.comm.world_size == self.comm.rank
            batch = self.localize({k: v[own] for k, v in batch.items()}, "outer")
        size = _batch_size(batch)
        loss = self.outer_loss(self.inner, self.outer, batch)
        self.log(name, loss / size if batched else loss, sync_dist=True, batch_size=size)

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.state
        bad = self._nonfinite({level: state[level] for level in _LEVELS})
        if bad is not None:  # never write one: the last good checkpoint stays the last
            raise NonFiniteError(f"refusing to write a checkpoint: the {bad[0]} variable {bad[1]!r} is not finite")
        # replicated variables are in state_dict; per-sample rows are gathered from every rank
        parts = {level: {k: v for k, v in state[level].items() if k in self._rows} for level in _LEVELS}
        # a lower level that starts afresh every step is not kept: only persistent rows and buffers
        transient = set(self.algorithm.inner_keys) if self.episodic else set()
        parts["buffers"] = {k: v for k, v in state.items() if k not in _LEVELS and k not in transient}
        saved = _map_sharded(parts, self.comm.sharded, self._gather)
        checkpoint["bilevel"] = {"algorithm": self.algorithm_name, **saved, "rng": torch.get_rng_state()}
        checkpoint["bilevel"]["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("bilevel")
        if saved is None:
            raise ValueError("the checkpoint has no 'bilevel' entry: it was not written by a BilevelModule")
        self._build()
        self._restored = saved
        self._state = None
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        torch.set_rng_state(saved["rng"])


def _to(obj: Any, like: Tensor) -> Any:
    """Moves every tensor of a nested state to ``like``'s device (floating ones to its dtype)."""
    return apply_to_collection(
        obj, Tensor, lambda t: t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)
    )


def _map_sharded(obj: Any, sharded: frozenset[str], fn: Any) -> Any:
    """Applies ``fn(key, tensor)`` to every tensor stored under a sharded name in a nested state."""
    if isinstance(obj, dict):
        return {
            k: fn(k, v) if k in sharded and isinstance(v, Tensor) else _map_sharded(v, sharded, fn)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_sharded(v, sharded, fn) for v in obj)
    return obj


def _batch_size(batch: dict[str, Tensor]) -> int:
    return len(batch["index"]) if "index" in batch else len(next(iter(batch.values())))
