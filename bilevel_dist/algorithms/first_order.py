"""First-order and penalty algorithms: Penalty (Mehra & Hamm 2021, Alg. 1 with its γ/ε
schedule), BOME (Ye et al. 2022, value-function dynamic barrier) and F2SA (Kwon et al. 2023)."""

from __future__ import annotations

from typing import Any

from bilevel_dist import tree
from bilevel_dist.algorithms.base import (
    Algorithm,
    State,
    adam,
    choice,
    count,
    decayed,
    descend,
    factor,
    fraction,
    lr,
    nonnegative,
    zeros,
)
from bilevel_dist.metrics import Metrics
from bilevel_dist.solvers import GD, Adam, run
from bilevel_dist.tree import Tree


def _unit_or_more(name: str, value: Any) -> float:
    value = factor(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class Penalty(Algorithm):
    """Mehra & Hamm's Algorithm 1 on ``f̃ = f + γ/2 ‖∇_w g‖²`` (+ ``λ g`` in the w-step and the
    multiplier term ``⟨∇_w g, ν⟩``, §2.3). ``inner_steps`` w-steps then one x-step; when
    ``‖∇_x f̃‖² + ‖∇_w f̃‖² ≤ ε²`` holds: ``γ ← c_γ γ``, ``λ ← c_λ λ``, ``ε ← c_ε ε``, then
    ``ν ← ν + γ ∇_w g`` with the new ``γ`` and ``∇_w g`` where the tolerance was checked (the
    authors' order), and both step sizes shrink by ``lr_decay``. With
    ``gamma_lr_coef = b`` every step is further divided by ``1 + bγ`` (the synthetic experiments'
    rule ``0.5 / (2 + 2s + 4γs²)``, since ``f̃``'s curvature grows like ``γ``).
    ``inner_optimizer`` / ``outer_optimizer = "adam"`` take Adam steps on that level instead (the
    authors' code uses Adam on both); the inner moments and their step count belong to the lower
    level (reset with it).

    Across ranks ``∇_w g`` is averaged before it enters the square (``f + γ⟨∇_w g_r, mean⟩``).


    Cost per step: ``inner_steps + 1`` linearisations, Hessian-vector products and outer
    gradients, one mixed product.
    """

    name = "penalty"
    inner_keys = ("inner", "nu", "inner_m", "inner_s", "inner_t")
    hparams = {
        "inner_lr": (1e-2, lr),
        "outer_lr": (1e-2, lr),
        "inner_steps": (1, count),
        "gamma": (1.0, factor),
        "epsilon": (1.0, factor),
        "gamma_factor": (1.1, _unit_or_more),
        "epsilon_factor": (0.9, fraction),
        "lam": (0.0, nonnegative),
        "lam_factor": (0.9, fraction),
        "multiplier": (False, lambda n, v: bool(v)),
        "lr_decay": (1.0, factor),
        "gamma_lr_coef": (0.0, nonnegative),
        "inner_optimizer": ("sgd", choice("sgd", "adam")),
        "outer_optimizer": ("sgd", choice("sgd", "adam")),
    }

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        schedule = {"gamma": self.h["gamma"], "epsilon": self.h["epsilon"], "lam": self.h["lam"]}
        lrs = {"inner_lr": self.h["inner_lr"], "outer_lr": self.h["outer_lr"]}
        state = {**state, **schedule, **lrs, "nu": zeros(inner), "stage_steps": 0}
        if self.h["inner_optimizer"] == "adam":
            state |= {"inner_m": zeros(inner), "inner_s": zeros(inner), "inner_t": 0}
        if self.h["outer_optimizer"] == "adam":
            state |= {"outer_m": zeros(outer), "outer_s": zeros(outer)}
        return state

    def gradients(
        self, state: State, w: Tree, x: Tree, inner_batch: Any, outer_batch: Any, outer: bool = True
    ) -> tuple[Tree, Tree | None, Tree]:
        """``(∇_w f̃, ∇_x f̃, ∇_w g)`` at ``(w, x)``, the multiplier and λ terms added;
        ``outer=False`` skips ``∇_x f̃`` (and its mixed product): the w-steps need only ``∇_w f̃``."""
        lin = self.oracles.linearize(w, x, inner_batch, joint=outer, mixed=outer)
        g = lin.grad  # already the mean over ranks: reduced before it is squared
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        direction = tree.scale(g, state["gamma"])
        if self.h["multiplier"]:
            direction = tree.add(direction, state["nu"])
        if not outer:
            return tree.add(fw, lin.hvp(direction)), None, g
        hv, jv = lin.both(direction)
        return tree.add(fw, hv), self.oracles.outer_gradient(tree.add(fx, jv)), g

    def cost(self, t: int) -> dict[str, int]:
        steps = self.h["inner_steps"] + 1
        return {"linearize": steps, "hvp": steps, "mixed": 1, "outer_grad": steps}

    def penalised_solve(
        self, state: State, w: Tree, x: Tree, inner_batch: Any, outer_batch: Any, step: float
    ) -> tuple[Tree, State]:
        """``inner_steps`` steps of the core's GD or Adam on ``f̃ = f + γ/2 ‖∇_w g‖²`` (``+ λ g``)
        in ``w``; Adam's moments and step count persist across outer steps in ``state``."""

        def direction(w: Tree, x: Tree, batch: Any) -> Tree:
            dw, _, g = self.gradients(state, w, x, batch, outer_batch, outer=False)
            return tree.axpy(state["lam"], g, dw) if state["lam"] else dw

        steps = self.h["inner_steps"]
        if "inner_m" not in state:
            return run(GD(step, steps), self.oracles, w, x, inner_batch, gradient=direction).inner, state
        moments = {"m": state["inner_m"], "v": state["inner_s"]}
        end = run(
            Adam(step, steps),
            self.oracles,
            w,
            x,
            inner_batch,
            gradient=direction,
            state=moments,
            start=state["inner_t"],
        )
        moved = {"inner_m": end.state["m"], "inner_s": end.state["v"], "inner_t": state["inner_t"] + steps}
        return end.inner, {**state, **moved}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        w, x = state["inner"], state["outer"]
        shrink = 1.0 + self.h["gamma_lr_coef"] * state["gamma"]
        w, state = self.penalised_solve(state, w, x, inner_batch, outer_batch, state["inner_lr"] / shrink)
        dw, dx, g = self.gradients(state, w, x, inner_batch, outer_batch)
        assert dx is not None
        moved = dx
        if "outer_m" in state:
            state, moved = adam(state, dx, state["t"])
        x = descend(x, moved, state["outer_lr"] / shrink)
        # the schedule's test needs this number on every step (one scalar, same on every rank)
        residual = float(self.oracles.total_dot(dw, dw) + self.comm.dot(dx, dx))
        state = {**state, "inner": w, "outer": x, "t": state["t"] + 1, "stage_steps": state["stage_steps"] + 1}
        metrics = Metrics(
            hypergrad_norm=self.norm(dx), direction=dx, penalty_gamma=state["gamma"], penalty_residual=residual**0.5
        )
        if residual <= state["epsilon"] ** 2:
            gamma = state["gamma"] * self.h["gamma_factor"]
            state |= {
                "gamma": gamma,
                "lam": state["lam"] * self.h["lam_factor"],
                "epsilon": state["epsilon"] * self.h["epsilon_factor"],
                "inner_lr": state["inner_lr"] / self.h["lr_decay"],
                "outer_lr": state["outer_lr"] / self.h["lr_decay"],
                "stage_steps": 0,
            }
            if self.h["multiplier"]:
                state["nu"] = tree.axpy(gamma, g, state["nu"])
        metrics |= {"inner_grad_norm": self.norm(g), "penalty_epsilon": state["epsilon"]}
        return state, metrics


class BOME(Algorithm):
    """BOME: with ``q(x, w) = g(x, w) − g(x, ŵ)`` (``ŵ``: ``inner_steps`` GD steps from ``w``),
    step ``(x, w)`` along ``∇f + λ∇q``, ``λ = max(η‖∇q‖² − ⟨∇f, ∇q⟩, 0) / ‖∇q‖²``.

    Cost per step: ``inner_steps + 2`` inner gradients, one outer gradient.
    """

    name = "bome"
    hparams = {
        "inner_lr": (0.1, lr),
        "inner_steps": (10, count),
        "outer_lr": (0.01, lr),
        "outer_decay": (0.0, fraction),
        "eta": (0.5, factor),
    }

    def cost(self, t: int) -> dict[str, int]:
        return {"inner_grad": self.h["inner_steps"] + 2, "outer_grad": 1}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        w, x = state["inner"], state["outer"]
        approx = run(GD(self.h["inner_lr"], self.h["inner_steps"]), self.oracles, w, x, inner_batch).inner
        gw, gx = self.oracles.inner_grads(w, x, inner_batch)
        gx_hat = self.oracles.inner_grads(approx, x, inner_batch)[1]
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        # λ is not linear in the pieces: ∇_x q and ∇_x f are reduced before the products
        qw, qx = gw, self.oracles.outer_gradient(tree.sub(gx, gx_hat))
        fx = self.oracles.outer_gradient(fx)
        q_sq = float(self.oracles.total_dot(qw, qw) + self.comm.dot(qx, qx))
        inner_product = float(self.oracles.total_dot(fw, qw) + self.comm.dot(fx, qx))
        lam = max(self.h["eta"] * q_sq - inner_product, 0.0) / max(q_sq, 1e-30)
        dw, dx = tree.axpy(lam, qw, fw), tree.axpy(lam, qx, fx)
        step = decayed(self.h["outer_lr"], state["t"], self.h["outer_decay"])
        state = {**state, "inner": descend(w, dw, step), "outer": descend(x, dx, step), "t": state["t"] + 1}
        return state, Metrics(
            hypergrad_norm=self.norm(dx), direction=dx, inner_grad_norm=self.norm(gw), bome_lambda=lam
        )


class F2SA(Algorithm):
    """F2SA: ``z`` tracks ``argmin g``, ``y`` tracks ``argmin f + λg``; the outer direction is
    ``∇_x f(x, y) + λ(∇_x g(x, y) − ∇_x g(x, z))`` and ``λ`` grows by ``lam_growth`` per step up to
    ``lam_max``. ``state["inner"]`` is ``z``; the ``y`` step is scaled by ``1/λ`` to stay stable.

    Cost per step: ``2·inner_steps + 2`` inner gradients, ``inner_steps + 1`` outer gradients.
    """

    name = "f2sa"
    inner_keys = ("inner", "y")
    hparams = {
        "inner_lr": (0.1, lr),
        "inner_steps": (1, count),
        "outer_lr": (0.01, lr),
        "lam": (1.0, factor),
        "lam_growth": (0.1, nonnegative),
        "lam_max": (1e4, factor),
    }

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        return {**state, "y": {k: v.clone() for k, v in state["inner"].items()}, "lam": self.h["lam"]}

    def cost(self, t: int) -> dict[str, int]:
        steps = self.h["inner_steps"]
        return {"inner_grad": 2 * steps + 2, "outer_grad": steps + 1}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        x, z, y, lam = state["outer"], state["inner"], state["y"], state["lam"]
        step = self.h["inner_lr"]
        z = run(GD(step, self.h["inner_steps"]), self.oracles, z, x, inner_batch).inner

        def penalised(y: Tree, x: Tree, batch: Any) -> Tree:  # y: gradient steps on f + λg, not on g
            fy = self.oracles.outer_grads(y, x, outer_batch)[0]
            return tree.axpy(lam, self.oracles.inner_grad(y, x, batch), fy)

        y = run(GD(step / lam, self.h["inner_steps"]), self.oracles, y, x, inner_batch, gradient=penalised).inner
        fx = self.oracles.outer_grads(y, x, outer_batch)[1]
        gx_y = self.oracles.inner_grads(y, x, inner_batch)[1]
        gx_z = self.oracles.inner_grads(z, x, inner_batch)[1]
        d = self.oracles.outer_gradient(tree.axpy(lam, tree.sub(gx_y, gx_z), fx))
        state = {
            **state,
            "outer": descend(x, d, self.h["outer_lr"]),
            "inner": z,
            "y": y,
            "lam": min(lam + self.h["lam_growth"], self.h["lam_max"]),
            "t": state["t"] + 1,
        }
        return state, Metrics(hypergrad_norm=self.norm(d), direction=d, f2sa_lambda=lam)
