"""Callbacks for :class:`~bilevel_dist.lightning.BilevelModule` training.

:class:`HypergradientMonitor` checks, while training, the direction the algorithm used against a
tight reference hypergradient at the same point, so that a wrong or too loose estimator shows up
as a number instead of a silently worse result.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection

from bilevel_dist import hypergrad, tree
from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.api import solve
from bilevel_dist.metrics import as_float
from bilevel_dist.solvers import GD
from bilevel_dist.tree import Tree

_PREFIX = "monitor/"


class HypergradientMonitor(L.Callback):
    """Every ``every_n_steps`` steps, a reference hypergradient at the point where the step began,
    compared with the direction the step used (``BilevelModule.last_metrics.direction``).

    The reference solves the lower level by gradient descent (``inner_lr``, default the
    algorithm's; up to ``inner_steps`` steps, to ``inner_tol``), then applies ``estimator`` (a
    :mod:`bilevel_dist.hypergrad` name and settings: ``cg`` to a tolerance, ``exact`` for small
    problems, ``reverse`` with many steps). ``batches="step"`` computes it on the step's own
    batches, from the step's inner variables: what a stochastic method's direction estimates, and
    the only comparison that means something when outer variables are per sample (a batch's
    hypergradient touches only its own samples' weights). ``batches="fixed"`` keeps the first
    checked step's batches as a fixed subsample and warm-starts each check from the last one's
    solution (a shared outer variable, such as hyperparameters). It runs on detached copies through its own
    oracles, so the training step sees none of its gradients, calls or random draws. Under DDP it
    reduces like the algorithm (the module's ``Comm``), so every rank logs the same numbers and
    reaches the same verdict.

    Logged under ``monitor/``: ``cosine``, ``relative_error`` (``‖d − g‖ / ‖g‖``), ``norm_ratio``
    (``‖d‖ / ‖g‖``), the reference's own ``reference_residual`` (its linear solve) and
    ``reference_inner_grad_norm``, and ``seconds`` (the check's cost). When the cosine stays
    below ``threshold`` for ``patience`` checks in a row it warns, and with ``strict=True`` stops
    the run (``trainer.should_stop``). :attr:`history` keeps every check's values.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        estimator: dict[str, Any] | None = None,
        inner_lr: float | None = None,
        inner_steps: int = 1000,
        inner_tol: float | None = 1e-8,
        threshold: float = 0.9,
        patience: int = 3,
        strict: bool = False,
        batches: str = "step",
    ) -> None:
        self.every_n_steps = setting("every_n_steps", positive_int, every_n_steps)
        spec = dict(estimator or {"name": "cg", "iters": 500, "tol": 1e-10})
        name = spec.pop("name", "cg")
        try:
            self.estimator = hypergrad.get(name, **spec)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError("estimator", f"HypergradientMonitor estimator {name!r}: {error}") from None
        self.inner_lr = None if inner_lr is None else setting("inner_lr", positive_float, inner_lr)
        self.inner_steps = setting("inner_steps", lambda k, v: positive_int(k, v, allow_zero=True), inner_steps)
        self.inner_tol = None if inner_tol is None else setting("inner_tol", positive_float, inner_tol)
        if not -1.0 <= float(threshold) <= 1.0:
            raise ConfigError("threshold", f"threshold is a cosine in [-1, 1], got {threshold}")
        self.threshold = float(threshold)
        self.patience = setting("patience", positive_int, patience)
        self.strict = bool(strict)
        if batches not in ("step", "fixed"):
            raise ConfigError("batches", f"batches must be 'step' or 'fixed', got {batches!r}")
        self.batches = batches
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self._low = 0
        self._batches: tuple[Any, Any] | None = None
        self._point: tuple[Tree, Tree] | None = None
        self._solved: Tree | None = None
        self._copy_seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        start = time.perf_counter()
        if self._batches is None or self.batches == "step":  # "fixed": the first checked batch, kept
            kept = apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone())  # buffers may be reused
            self._batches = (module.localize(kept["inner"]), module.localize(kept["outer"], "outer"))
        state = module.state  # the algorithm's state is never modified in place: no copy needed
        self._point = (state["outer"], state["inner"])
        self._copy_seconds = time.perf_counter() - start

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        point, self._point = self._point, None
        metrics = module.last_metrics
        if point is None or metrics is None or metrics.direction is None:
            return  # not a checked step, or a skipped one
        start = time.perf_counter()
        values = self.check(module, point, metrics.direction)
        values["seconds"] = time.perf_counter() - start + self._copy_seconds
        self.seconds += values["seconds"]
        self.history.append({"step": float(trainer.global_step - 1), **values})
        for logger in trainer.loggers:
            logger.log_metrics({_PREFIX + k: v for k, v in values.items()}, step=trainer.global_step - 1)
        self._verdict(trainer, values["cosine"])

    def reference(self, module: Any, outer: Tree, inner: Tree) -> Any:
        """The reference :class:`~bilevel_dist.hypergrad.base.Solution` at ``(outer, inner)``."""
        assert self._batches is not None
        inner_batch, outer_batch = self._batches
        if module.episodic:
            inner = module.inner_init(outer, inner_batch)
        elif self._solved is not None and self.batches == "fixed":  # the last check's solution, same data
            inner = self._solved
        lr = self.inner_lr or module.algorithm.h.get("inner_lr")
        if lr is None:
            raise ConfigError("inner_lr", f"HypergradientMonitor needs inner_lr: {module.algorithm_name} has none")
        solver = GD(lr, self.inner_steps, self.inner_tol)
        with torch.enable_grad():
            solution = solve(
                module.problem,
                tree.detach(outer),
                tree.detach(inner),
                solver=solver,
                hypergrad=self.estimator,
                inner_batch=inner_batch,
                outer_batch=outer_batch,
                check=False,
                comm=module.comm,
            )
        if self.batches == "fixed" and not module.episodic:  # the next check's warm start
            self._solved = tree.detach(solution.inner)
        return solution

    def check(self, module: Any, point: tuple[Tree, Tree], direction: Tree) -> dict[str, float]:
        """The comparison of ``direction`` with the reference at ``point``: global numbers (the
        module's ``Comm`` sums sharded rows over ranks)."""
        outer, inner = point
        solution = self.reference(module, outer, inner)
        comm, ref = module.comm, solution.grad
        d = {k: direction[k].to(ref[k].dtype) for k in ref}
        dots = torch.stack([comm.dot(d, ref), comm.dot(d, d), comm.dot(ref, ref)]).tolist()  # one host read
        error = float(comm.norm(tree.sub(d, ref)))
        dr, dd, rr = dots
        norm_d, norm_r = dd**0.5, rr**0.5
        info = solution.info
        return {  # a zero direction (SOBA's first step: v = 0) has no cosine: NaN, not counted
            "cosine": dr / (norm_d * norm_r) if norm_d * norm_r > 0 else float("nan"),
            "relative_error": error / max(norm_r, 1e-300),
            "norm_ratio": norm_d / max(norm_r, 1e-300),
            "reference_residual": _number(info.get("linear_residual")),
            "reference_inner_grad_norm": _number(info.get("inner_grad_norm")),
        }

    def _verdict(self, trainer: L.Trainer, cosine: float) -> None:
        if cosine != cosine:  # NaN: no verdict either way
            return
        self._low = self._low + 1 if cosine < self.threshold else 0
        if self._low < self.patience:
            return
        message = (
            f"HypergradientMonitor: the cosine between the step's direction and the reference hypergradient "
            f"stayed below {self.threshold} for {self._low} checks in a row (last {cosine:.3f}, step "
            f"{trainer.global_step - 1}): the algorithm's estimator is too loose or wrong here"
        )
        if self._low == self.patience:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if self.strict:
            trainer.should_stop = True


def _number(value: Any) -> float:
    """A diagnostic as a float, NaN where the reference has none (e.g. no linear residual)."""
    return float("nan") if value is None else as_float(value)


__all__ = ["HypergradientMonitor"]
