"""Single-loop stochastic algorithms: one oracle call of each kind per iteration.

SOBA (Dagréou et al. 2022), TTSA (Hong et al. 2023), FSLA (Li et al. 2022), MRBO (Yang et al. 2021)
and SUSTAIN (Khanduri et al. 2021). ``v ≈ H⁻¹ ∇_w f`` is either a variable moved by one step on
the linear system per iteration (SOBA, FSLA) or a Neumann estimate (TTSA, MRBO, SUSTAIN).
"""

from __future__ import annotations

from typing import Any

from bilevel_dist import tree
from bilevel_dist.algorithms.base import (
    Algorithm,
    State,
    count,
    decayed,
    descend,
    fraction,
    hypergradient,
    lr,
    zeros,
)
from bilevel_dist.linalg import neumann
from bilevel_dist.metrics import Metrics
from bilevel_dist.tree import Tree

_STEPS = {
    "inner_lr": (0.1, lr),
    "outer_lr": (0.01, lr),
    "inner_decay": (0.0, fraction),
    "outer_decay": (0.0, fraction),
}


class SingleLoop(Algorithm):
    """Step sizes ``ρ_t = inner_lr / (t+1)^inner_decay`` and ``γ_t = outer_lr / (t+1)^outer_decay``."""

    def rates(self, t: int) -> tuple[float, float]:
        return decayed(self.h["inner_lr"], t, self.h["inner_decay"]), decayed(
            self.h["outer_lr"], t, self.h["outer_decay"]
        )

    def soba_directions(self, w: Tree, v: Tree, x: Tree, inner_batch: Any, outer_batch: Any) -> tuple[Tree, ...]:
        """SOBA's three directions at ``(w, v, x)``: ``∇_w g``, ``H v − ∇_w f``, ``∇_x f − J v``
        (the last reduced over ranks). One linearisation, one joint ``(H v, J v)`` backward and
        one outer gradient."""
        lin = self.oracles.linearize(w, x, inner_batch, joint=True)
        hv, jv = lin.both(v)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        return lin.grad, tree.sub(hv, fw), self.oracles.outer_gradient(hypergradient(fx, jv))

    def neumann_directions(self, w: Tree, x: Tree, inner_batch: Any, outer_batch: Any) -> tuple[Tree, Tree]:
        """``∇_w g`` and the Neumann hypergradient estimate at ``(w, x)`` (reduced over ranks):
        one linearisation, ``neumann_terms − 1`` Hessian-vector products, one mixed product and
        one outer gradient."""
        lin = self.oracles.linearize(w, x, inner_batch)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        alpha = self.h["linear_lr"] or self.h["inner_lr"]
        v = neumann(lin.hvp, fw, iters=self.h["neumann_terms"], alpha=alpha, batched=self.oracles.batched).solution
        return lin.grad, self.oracles.outer_gradient(hypergradient(fx, lin.mixed(v)))

    def soba_metrics(self, dw: Tree, dv: Tree, dx: Tree) -> Metrics:
        """The norms of SOBA's three directions."""
        return Metrics(
            hypergrad_norm=self.norm(dx), direction=dx, inner_grad_norm=self.norm(dw), linear_residual=self.norm(dv)
        )

    def soba_cost(self, times: int = 1) -> dict[str, int]:
        """What ``times`` calls of :meth:`soba_directions` cost."""
        return {"linearize": times, "hvp": times, "mixed": times, "outer_grad": times}

    def neumann_cost(self, times: int = 1) -> dict[str, int]:
        """What ``times`` calls of :meth:`neumann_directions` cost."""
        terms = self.h["neumann_terms"] - 1
        return {"linearize": times, "hvp": terms * times, "mixed": times, "outer_grad": times}


class SOBA(SingleLoop):
    """SOBA: ``w ← w − ρ∇_w g``, ``v ← v − ρ(Hv − ∇_w f)``, ``x ← x − γ(∇_x f − Jv)``, all
    directions at the current point (Dagréou et al. 2022, Alg. 1).

    Cost per step: one linearisation, one joint ``(H v, J v)`` product, one outer gradient.
    """

    name = "soba"
    inner_keys = ("inner", "v")
    hparams = _STEPS

    def init(self, outer: Tree, inner: Tree) -> State:
        return {**super().init(outer, inner), "v": zeros(inner)}

    def cost(self, t: int) -> dict[str, int]:
        return self.soba_cost()

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t, w, v, x = state["t"], state["inner"], state["v"], state["outer"]
        rho, gamma = self.rates(t)
        dw, dv, dx = self.soba_directions(w, v, x, inner_batch, outer_batch)
        state = {**state, "inner": descend(w, dw, rho), "v": descend(v, dv, rho), "outer": descend(x, dx, gamma)}
        state["t"] = t + 1
        return state, self.soba_metrics(dw, dv, dx)


class FSLA(SOBA):
    """FSLA: SOBA's ``w`` and ``v`` steps with a STORM-corrected outer direction
    ``d_t = D(z_t) + (1 − η)(d_{t−1} − D(z_{t−1}))`` on the same batch (Li et al. 2022).

    Cost per step: SOBA's, twice from the second step on (the correction at the previous point).
    """

    name = "fsla"
    episodic = False
    hparams = {**_STEPS, "momentum": (0.5, fraction)}

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        return {**state, "d": zeros(outer), "prev": {"inner": state["inner"], "v": state["v"], "outer": state["outer"]}}

    def cost(self, t: int) -> dict[str, int]:
        return self.soba_cost(2 if t > 0 else 1)

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t, w, v, x = state["t"], state["inner"], state["v"], state["outer"]
        rho, gamma = self.rates(t)
        dw, dv, dx = self.soba_directions(w, v, x, inner_batch, outer_batch)
        if t > 0:
            prev = state["prev"]
            old = self.soba_directions(prev["inner"], prev["v"], prev["outer"], inner_batch, outer_batch)[2]
            dx = tree.axpy(1 - self.h["momentum"], tree.sub(state["d"], old), dx)
        state = {
            **state,
            "prev": {"inner": w, "v": v, "outer": x},
            "d": dx,
            "inner": descend(w, dw, rho),
            "v": descend(v, dv, rho),
            "outer": descend(x, dx, gamma),
            "t": t + 1,
        }
        return state, self.soba_metrics(dw, dv, dx)


_NEUMANN = {**_STEPS, "neumann_terms": (10, count), "linear_lr": (None, lr)}


class TTSA(SingleLoop):
    """TTSA: one inner step and one outer step on the Neumann estimate per iteration, with
    two time scales ``ρ_t ∝ t^-2/5``, ``γ_t ∝ t^-3/5`` (Hong et al. 2023).

    Cost per step: one linearisation, ``neumann_terms − 1`` Hessian-vector products, one mixed
    product, one outer gradient.
    """

    name = "ttsa"
    hparams = {**_NEUMANN, "inner_decay": (0.4, fraction), "outer_decay": (0.6, fraction)}

    def cost(self, t: int) -> dict[str, int]:
        return self.neumann_cost()

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t, w, x = state["t"], state["inner"], state["outer"]
        rho, gamma = self.rates(t)
        dw, dx = self.neumann_directions(w, x, inner_batch, outer_batch)
        state = {**state, "inner": descend(w, dw, rho), "outer": descend(x, dx, gamma), "t": t + 1}
        return state, Metrics(hypergrad_norm=self.norm(dx), direction=dx, inner_grad_norm=self.norm(dw))


class MRBO(SingleLoop):
    """MRBO: momentum-recursive (STORM) estimates of ``∇_w g`` and of the Neumann hypergradient,
    ``u_t = D(z_t) + (1 − η_t)(u_{t−1} − D(z_{t−1}))`` with ``η_t = momentum / (t+1)^momentum_decay``
    (Yang et al. 2021).

    Cost per step: TTSA's, twice from the second step on.
    """

    name = "mrbo"
    episodic = False
    hparams = {**_NEUMANN, "momentum": (0.9, fraction), "momentum_decay": (0.0, fraction)}

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        return {
            **state,
            "u": zeros(inner),
            "d": zeros(outer),
            "prev": {"inner": state["inner"], "outer": state["outer"]},
        }

    def cost(self, t: int) -> dict[str, int]:
        return self.neumann_cost(2 if t > 0 else 1)

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t, w, x = state["t"], state["inner"], state["outer"]
        rho, gamma = self.rates(t)
        u, d = self.neumann_directions(w, x, inner_batch, outer_batch)
        if t > 0:
            keep = 1 - decayed(self.h["momentum"], t, self.h["momentum_decay"])
            old_u, old_d = self.neumann_directions(
                state["prev"]["inner"], state["prev"]["outer"], inner_batch, outer_batch
            )
            u = tree.axpy(keep, tree.sub(state["u"], old_u), u)
            d = tree.axpy(keep, tree.sub(state["d"], old_d), d)
        new_x = descend(x, d, gamma)
        new_w = descend(w, u, rho)
        state = {**state, "prev": {"inner": w, "outer": x}, "u": u, "d": d, "inner": new_w, "outer": new_x, "t": t + 1}
        return state, Metrics(hypergrad_norm=self.norm(d), direction=d, inner_grad_norm=self.norm(u))


class SUSTAIN(MRBO):
    """SUSTAIN: the same double-momentum (STORM) estimates with a fixed momentum; the inner
    estimate is refreshed at the new outer point before the inner step (Khanduri et al. 2021).

    Cost per step: MRBO's plus one inner gradient, twice from the second step on.
    """

    name = "sustain"
    hparams = {**_NEUMANN, "momentum": (0.5, fraction), "momentum_decay": (0.0, fraction)}

    def cost(self, t: int) -> dict[str, int]:
        times = 2 if t > 0 else 1
        return {**self.neumann_cost(times), "inner_grad": times}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        t, w, x = state["t"], state["inner"], state["outer"]
        rho, gamma = self.rates(t)
        keep = 1 - decayed(self.h["momentum"], t, self.h["momentum_decay"])
        _, d = self.neumann_directions(w, x, inner_batch, outer_batch)
        if t > 0:
            old_d = self.neumann_directions(state["prev"]["inner"], state["prev"]["outer"], inner_batch, outer_batch)[1]
            d = tree.axpy(keep, tree.sub(state["d"], old_d), d)
        new_x = descend(x, d, gamma)
        u = self.oracles.inner_grad(w, new_x, inner_batch)
        if t > 0:
            old_u = self.oracles.inner_grad(state["prev"]["inner"], x, inner_batch)
            u = tree.axpy(keep, tree.sub(state["u"], old_u), u)
        state = {**state, "prev": {"inner": w, "outer": x}, "u": u, "d": d, "t": t + 1}
        state["inner"], state["outer"] = descend(w, u, rho), new_x
        return state, Metrics(hypergrad_norm=self.norm(d), direction=d, inner_grad_norm=self.norm(u))
