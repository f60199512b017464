"""Variance-reduced single-loop algorithms: SABA (SAGA-type memory; Dagréou et al. 2022),
SRBA (SARAH-type recursion with periodic full passes; Dagréou et al. 2023) and VRBO
(SARAH/SPIDER estimates of the inner gradient and Neumann hypergradient; Yang et al. 2021).

SABA keeps one memory slot per sample, so its batches are dicts with an ``"index"`` entry of
sample ids; SRBA and VRBO take the full inner and outer batches for their periodic refresh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.base import State, count, descend, zeros
from bilevel_dist.algorithms.single_loop import _NEUMANN, _STEPS, SingleLoop
from bilevel_dist.linalg import linearize, loss_grads
from bilevel_dist.metrics import Metrics
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import GD, run
from bilevel_dist.tree import Tree


def _index(batch: Any, which: str) -> Tensor:
    if not isinstance(batch, dict) or "index" not in batch:
        raise ValueError(f"saba needs {which} batches as dicts with an 'index' entry of sample ids")
    return batch["index"]


def _stack(t: Tree, n: int) -> Tree:
    return {k: v.new_zeros((n,) + v.shape) for k, v in t.items()}


class SABA(SingleLoop):
    """SABA: SOBA's directions with SAGA variance reduction. Per sample it remembers the last
    ``∇_w g_i``, ``H_i v``, ``J_i v`` (inner samples) and ``∇_w f_j``, ``∇_x f_j`` (outer samples);
    each estimate is ``mean(new) − mean(old at the batch) + mean(memory)``.

    Cost per step: SOBA's, each oracle per sample of the batch in one vectorised call.
    """

    name = "saba"
    hparams = {**_STEPS, "n_inner": (None, count), "n_outer": (None, count)}
    data_needs = {"n_inner": 1, "n_outer": 1}
    episodic = False

    def __init__(self, problem: BilevelProblem, comm=None, **hparams: Any) -> None:
        super().__init__(problem, comm, **hparams)
        for key in ("n_inner", "n_outer"):
            if self.h[key] is None:
                raise ValueError(f"saba needs {key}, the number of samples its memory covers")
        if self.comm.world_size > 1:
            raise ConfigError("algorithm.name", "saba keeps per-sample memory on one process: run it on 1 device")

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        n, m = self.h["n_inner"], self.h["n_outer"]
        memory = {"g": _stack(inner, n), "hv": _stack(inner, n), "jv": _stack(outer, n)}
        memory |= {"fw": _stack(inner, m), "fx": _stack(outer, m)}
        return {**state, "v": zeros(inner), "memory": memory, "memory_mean": {k: _mean0(t) for k, t in memory.items()}}

    def cost(self, t: int) -> dict[str, int]:
        return self.soba_cost()

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t, w, v, x = state["t"], state["inner"], state["v"], state["outer"]
        rho, gamma = self.rates(t)
        inner_ids, outer_ids = _index(inner_batch, "inner"), _index(outer_batch, "outer")
        problem = self.problem

        calls = self.oracles.calls  # per-sample oracles, each run once vectorised over the samples

        def inner_sample(batch: Any) -> Tree:
            lin = linearize(problem.inner_loss, w, x, batch, joint=True)
            hv, jv = lin.both(v)
            calls.update(("linearize", "hvp", "mixed"))
            return {"g": lin.grad, "hv": hv, "jv": jv}

        def outer_sample(batch: Any) -> Tree:
            fw, fx = loss_grads(problem.outer_loss, w, x, batch)
            calls.update(("outer_grad",))
            return {"fw": fw, "fx": fx}

        fresh = {
            **self.oracles.per_sample(inner_sample, inner_batch),
            **self.oracles.per_sample(outer_sample, outer_batch),
        }
        memory, means = dict(state["memory"]), dict(state["memory_mean"])
        estimate = {}
        for key, new in fresh.items():
            ids = inner_ids if key in ("g", "hv", "jv") else outer_ids
            table = memory[key]
            old = {k: table[k][ids] for k in table}
            estimate[key] = self.comm.mean({k: new[k].mean(0) - old[k].mean(0) + means[key][k] for k in new})
            # A sample drawn twice has one slot: update the memory and its mean once per id.
            unique, inverse = torch.unique(ids, return_inverse=True)
            last = torch.empty_like(unique).scatter_(0, inverse, torch.arange(ids.numel(), device=ids.device))
            size = table[next(iter(table))].shape[0]
            means[key] = {k: means[key][k] + (new[k][last] - table[k][unique]).sum(0) / size for k in new}
            memory[key] = {k: table[k].index_put((unique,), new[k][last]) for k in table}
        dw, dv = estimate["g"], tree.sub(estimate["hv"], estimate["fw"])
        dx = tree.sub(estimate["fx"], estimate["jv"])
        state = {
            **state,
            "inner": descend(w, dw, rho),
            "v": descend(v, dv, rho),
            "outer": descend(x, dx, gamma),
            "memory": memory,
            "memory_mean": means,
            "t": t + 1,
        }
        return state, self.soba_metrics(dw, dv, dx)


def _mean0(t: Tree) -> Tree:
    return {k: v.mean(0) for k, v in t.items()}


class _Recursive(SingleLoop):
    """SARAH recursion ``D_t = D_{t−1} + D_B(z_t) − D_B(z_{t−1})``, refreshed by a full pass every
    ``period`` iterations on ``full_batches = (inner, outer)`` (batches or
    :class:`~bilevel_dist.oracles.Chunks`)."""

    data_needs = {"full_batches": (None, None)}
    episodic = False

    def __init__(self, problem: BilevelProblem, comm=None, full_batches: tuple[Any, Any] | None = None, **hp: Any):
        super().__init__(problem, comm, **hp)
        if not isinstance(full_batches, (tuple, list)) or len(full_batches) != 2:
            raise ValueError(f"{self.name} needs full_batches=(inner_batch, outer_batch) for its periodic full pass")
        self.full_batches = tuple(full_batches)

    def directions(self, point: State, inner_batch: Any, outer_batch: Any) -> dict[str, Tree]:
        raise NotImplementedError

    def recursive(self, state: State, point: State, inner_batch: Any, outer_batch: Any) -> dict[str, Tree]:
        if state["t"] % self.h["period"] == 0:
            return self.directions(point, *self.full_batches)
        new = self.directions(point, inner_batch, outer_batch)
        old = self.directions(state["prev"], inner_batch, outer_batch)
        return {k: tree.add(state["estimate"][k], tree.sub(new[k], old[k])) for k in new}


class SRBA(_Recursive):
    """SRBA: SOBA's three directions estimated by SARAH recursion with a full pass every
    ``period`` iterations, fixed steps (Dagréou et al. 2023).

    Cost per step: SOBA's twice (new and previous point), once on a full-pass step.
    """

    name = "srba"
    hparams = {**_STEPS, "period": (32, count)}

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        v = zeros(inner)
        estimate = {"w": zeros(inner), "v": zeros(inner), "x": zeros(outer)}
        return {
            **state,
            "v": v,
            "estimate": estimate,
            "prev": {"inner": state["inner"], "v": v, "outer": state["outer"]},
        }

    def cost(self, t: int) -> dict[str, int]:
        return self.soba_cost(1 if t % self.h["period"] == 0 else 2)

    def directions(self, point: State, inner_batch: Any, outer_batch: Any) -> dict[str, Tree]:
        dw, dv, dx = self.soba_directions(point["inner"], point["v"], point["outer"], inner_batch, outer_batch)
        return {"w": dw, "v": dv, "x": dx}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t = state["t"]
        rho, gamma = self.rates(t)
        point = {"inner": state["inner"], "v": state["v"], "outer": state["outer"]}
        est = self.recursive(state, point, inner_batch, outer_batch)
        state = {
            **state,
            "prev": point,
            "estimate": est,
            "inner": descend(point["inner"], est["w"], rho),
            "v": descend(point["v"], est["v"], rho),
            "outer": descend(point["outer"], est["x"], gamma),
            "t": t + 1,
        }
        return state, Metrics(
            hypergrad_norm=self.norm(est["x"]), direction=est["x"], inner_grad_norm=self.norm(est["w"])
        )


class VRBO(_Recursive):
    """VRBO: SARAH/SPIDER estimates of ``∇_w g`` and of the Neumann hypergradient, a full pass
    every ``period`` iterations, and ``inner_steps`` recursive inner steps per outer step
    (Yang et al. 2021).

    Cost per step: TTSA's twice (once on a full-pass step) and ``2·inner_steps`` inner gradients.
    """

    name = "vrbo"
    hparams = {**_NEUMANN, "period": (32, count), "inner_steps": (1, count)}

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        return {**state, "estimate": {"w": zeros(inner), "x": zeros(outer)}, "prev": {"inner": inner, "outer": outer}}

    def cost(self, t: int) -> dict[str, int]:
        times = 1 if t % self.h["period"] == 0 else 2
        return {**self.neumann_cost(times), "inner_grad": 2 * self.h["inner_steps"]}

    def directions(self, point: State, inner_batch: Any, outer_batch: Any) -> dict[str, Tree]:
        dw, dx = self.neumann_directions(point["inner"], point["outer"], inner_batch, outer_batch)
        return {"w": dw, "x": dx}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t = state["t"]
        rho, gamma = self.rates(t)
        point = {"inner": state["inner"], "outer": state["outer"]}
        est = self.recursive(state, point, inner_batch, outer_batch)
        x = descend(point["outer"], est["x"], gamma)
        sarah = _Sarah(self.oracles, est["w"], point["inner"], point["outer"])
        steps = GD(rho, self.h["inner_steps"])
        end = run(steps, self.oracles, point["inner"], x, inner_batch, gradient=sarah, final_grad=True)
        # The stored estimate stays the one at ``point``: the next recursion differences from there.
        state = {**state, "prev": point, "estimate": est, "inner": end.inner, "outer": x, "t": t + 1}
        metrics = Metrics(hypergrad_norm=self.norm(est["x"]), direction=est["x"])
        return state, metrics | {"inner_grad_norm": self.norm(end.gradient())}


class _Sarah:
    """The SARAH/SPIDER estimate of ``∇_w g`` as the direction of a solver run: ``u`` at the run's
    start (the outer step's estimate, no oracle), then ``u ← u + ∇g(w, x) − ∇g(w_prev, x_prev)`` at
    each new point, two inner gradients."""

    def __init__(self, oracles: Any, start: Tree, w: Tree, x: Tree) -> None:
        self.oracles, self.u, self.previous = oracles, start, (w, x)
        self.started = False

    def __call__(self, w: Tree, x: Tree, batch: Any) -> Tree:
        if self.started:
            before_w, before_x = self.previous
            change = tree.sub(self.oracles.inner_grad(w, x, batch), self.oracles.inner_grad(before_w, before_x, batch))
            self.u = tree.add(self.u, change)
            self.previous = (w, x)
        self.started = True
        return self.u


__all__ = ["SABA", "SRBA", "VRBO"]
