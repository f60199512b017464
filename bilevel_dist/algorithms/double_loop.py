"""Double-loop algorithms: several inner steps, then one outer step per iteration.

AID (Ghadimi & Wang 2018; Ji et al. 2021), stocBiO (Ji et al. 2021), AmIGO (Arbel & Mairal 2022),
BSA (Ghadimi & Wang 2018), HOAG (Pedregosa 2016; Crockett & Fessler Alg. 1), ITD (Ji et al. 2021).
The inner variables are warm-started from the previous iteration. ``inner_batch`` may be one
batch or ``PerStep([b0, b1, ...])``: inner step ``k`` then uses batch ``k mod len`` (stocBiO and AmIGO draw a
fresh batch per inner step) and the second-order products use the last.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import grad

from bilevel_dist import tree
from bilevel_dist.algorithms.base import (
    Algorithm,
    Metrics,
    State,
    choice,
    count,
    decayed,
    descend,
    fraction,
    hypergradient,
    lr,
    zeros,
)
from bilevel_dist.linalg import cg, neumann
from bilevel_dist.tree import Tree


class PerStep(list):
    """Inner batches for a double-loop step, one per inner step (a plain list or tuple is taken
    as one batch, as a DataLoader yields them)."""


def batches(inner_batch: Any) -> list:
    """``inner_batch`` as the list of batches its inner steps cycle through."""
    return list(inner_batch) if isinstance(inner_batch, PerStep) else [inner_batch]


class DoubleLoop(Algorithm):
    """Shared inner loop: ``inner_steps`` gradient steps on ``g`` from the previous solution."""

    def inner_solve(self, w: Tree, x: Tree, batch: Any, steps: int, tol: float = 0.0) -> tuple[Tree, Tree, Any]:
        """Returns the inner variables after the loop, the inner gradient there and the batch of
        the last step, which the second-order products then use."""
        cycle = batches(batch)
        g = self.oracles.inner_grad(w, x, cycle[0])
        for k in range(steps):
            if tol and self.norm(g) <= tol:
                break
            w = descend(w, g, self.h["inner_lr"])
            g = self.oracles.inner_grad(w, x, cycle[(k + 1) % len(cycle)] if k + 1 < steps else cycle[-1])
        return w, g, cycle[-1]

    def outer_update(self, state: State, d: Tree, inner: Tree, metrics: Metrics) -> tuple[State, Metrics]:
        t = state["t"]
        step = decayed(self.h["outer_lr"], t, self.h.get("outer_decay", 0.0) or 0.0)
        state = {**state, "outer": descend(state["outer"], d, step), "inner": inner, "t": t + 1}
        return state, {"hypergrad_norm": self.norm(d), "outer_lr": step, **metrics}


_AID = {
    "inner_lr": (0.1, lr),
    "inner_steps": (10, count),
    "outer_lr": (0.01, lr),
    "outer_decay": (0.0, fraction),
    "linear_solver": ("cg", choice("cg", "neumann")),
    "linear_iters": (10, count),
    "linear_lr": (None, lr),
}


class AID(DoubleLoop):
    """Approximate implicit differentiation: inner GD, then ``H v = ∇_w f`` by CG or a Neumann
    series (``linear_lr`` its step, default ``inner_lr``), then ``x ← x − β (∇_x f − J v)``."""

    name = "aid"
    hparams = _AID

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        x = state["outer"]
        w, g, last = self.inner_solve(state["inner"], x, inner_batch, self.h["inner_steps"])
        lin = self.oracles.linearize(w, x, last)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        if self.h["linear_solver"] == "cg":
            solved = cg(lin.hvp, fw, iters=self.h["linear_iters"], dot=self.comm.dot)
        else:
            alpha = self.h["linear_lr"] or self.h["inner_lr"]
            solved = neumann(lin.hvp, fw, iters=self.h["linear_iters"], alpha=alpha)
        d = hypergradient(fx, lin.mixed(solved.solution))
        return self.outer_update(
            state, d, w, {"inner_grad_norm": self.norm(g), "linear_residual": float(solved.residual)}
        )


class StocBiO(AID):
    """stocBiO: AID with the Neumann ("SHIA") inverse on mini-batches (Ji et al. 2021, Alg. 2)."""

    name = "stocbio"
    hparams = {**_AID, "linear_solver": ("neumann", choice("cg", "neumann"))}


class AmIGO(DoubleLoop):
    """AmIGO: warm-started inner GD and warm-started GD on ``½ vᵀHv − vᵀ∇_w f`` for ``v``."""

    name = "amigo"
    hparams = {
        "inner_lr": (0.1, lr),
        "inner_steps": (10, count),
        "outer_lr": (0.01, lr),
        "outer_decay": (0.0, fraction),
        "linear_lr": (None, lr),
        "linear_iters": (10, count),
    }

    def init(self, outer: Tree, inner: Tree) -> State:
        return {**super().init(outer, inner), "v": zeros(inner)}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        x = state["outer"]
        w, g, last = self.inner_solve(state["inner"], x, inner_batch, self.h["inner_steps"])
        lin = self.oracles.linearize(w, x, last)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        v, step = state["v"], self.h["linear_lr"] or self.h["inner_lr"]
        for _ in range(self.h["linear_iters"]):
            v = descend(v, tree.sub(lin.hvp(v), fw), step)
        residual = self.norm(tree.sub(lin.hvp(v), fw))
        d = hypergradient(fx, lin.mixed(v))
        state = {**state, "v": v}
        return self.outer_update(state, d, w, {"inner_grad_norm": self.norm(g), "linear_residual": residual})


class BSA(DoubleLoop):
    """BSA (Ghadimi & Wang 2018): the inverse Hessian by the randomly truncated product
    ``H⁻¹ ≈ α Q Π_{i<p} (I − αH)``, ``p`` uniform in ``{0..Q−1}``, unbiased for the Q-term series;
    the generator's state is part of the algorithm state. ``truncation_samples = K`` averages K
    independent draws of ``p`` (1 is the paper's estimator); they share one product chain, so the
    cost stays at most ``Q − 1`` Hessian-vector products."""

    name = "bsa"
    hparams = {
        "inner_lr": (0.1, lr),
        "inner_steps": (10, count),
        "outer_lr": (0.01, lr),
        "outer_decay": (0.0, fraction),
        "neumann_terms": (10, count),
        "truncation_samples": (1, count),
        "linear_lr": (None, lr),
        "seed": (0, lambda name, v: int(v)),
    }

    def init(self, outer: Tree, inner: Tree) -> State:
        generator = torch.Generator().manual_seed(self.h["seed"])
        return {**super().init(outer, inner), "rng": generator.get_state()}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        x = state["outer"]
        w, g, last = self.inner_solve(state["inner"], x, inner_batch, self.h["inner_steps"])
        lin = self.oracles.linearize(w, x, last)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        generator = torch.Generator()
        generator.set_state(state["rng"])
        terms = self.h["neumann_terms"]
        powers = torch.randint(terms, (self.h["truncation_samples"],), generator=generator).tolist()
        alpha = self.h["linear_lr"] or self.h["inner_lr"]
        chain = [fw]  # (I − αH)^j ∇_w f for j = 0 .. max p
        for _ in range(max(powers)):
            chain.append(descend(chain[-1], lin.hvp(chain[-1]), alpha))
        total = chain[powers[0]]
        for power in powers[1:]:
            total = tree.add(total, chain[power])
        v = tree.scale(total, alpha * terms / len(powers))
        d = hypergradient(fx, lin.mixed(v))
        state = {**state, "rng": generator.get_state()}
        return self.outer_update(state, d, w, {"inner_grad_norm": self.norm(g)})


class HOAG(DoubleLoop):
    """HOAG (Pedregosa 2016): inner solve and CG to a tolerance ``ε_k`` that shrinks by
    ``tol_decay`` every iteration (a summable sequence), then an outer gradient step."""

    name = "hoag"
    hparams = {
        "inner_lr": (0.1, lr),
        "inner_steps": (100, count),
        "outer_lr": (0.01, lr),
        "tol": (1e-2, lr),
        "tol_decay": (0.9, fraction),
        "linear_iters": (100, count),
    }

    def init(self, outer: Tree, inner: Tree) -> State:
        return {**super().init(outer, inner), "tol": self.h["tol"]}

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        x, tol = state["outer"], state["tol"]
        w, g, last = self.inner_solve(state["inner"], x, inner_batch, self.h["inner_steps"], tol=tol)
        lin = self.oracles.linearize(w, x, last)
        fw, fx = self.oracles.outer_grads(w, x, outer_batch)
        solved = cg(lin.hvp, fw, iters=self.h["linear_iters"], dot=self.comm.dot, tol=tol)
        d = hypergradient(fx, lin.mixed(solved.solution))
        state = {**state, "tol": tol * self.h["tol_decay"]}
        metrics = {"inner_grad_norm": self.norm(g), "linear_residual": float(solved.residual), "tol": tol}
        return self.outer_update(state, d, w, metrics)


class ITD(DoubleLoop):
    """Iterative differentiation: backpropagation through ``inner_steps`` warm-started GD steps."""

    name = "itd"
    hparams = {
        "inner_lr": (0.1, lr),
        "inner_steps": (10, count),
        "outer_lr": (0.01, lr),
        "outer_decay": (0.0, fraction),
    }

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        problem, comm, step = self.problem, self.comm, self.h["inner_lr"]
        x = {k: v.detach().requires_grad_() for k, v in state["outer"].items()}
        w = state["inner"]
        cycle = batches(inner_batch)
        with torch.enable_grad():
            for k in range(self.h["inner_steps"]):
                w = descend(w, comm.mean(grad(problem.inner_loss)(w, x, cycle[k % len(cycle)])), step)
            value = problem.outer_loss(w, x, outer_batch)
            grads = torch.autograd.grad(value, list(x.values()), allow_unused=True)
        d = comm.mean(
            {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(x.items(), grads, strict=True)}
        )
        w = tree.detach(w)
        g = self.oracles.inner_grad(w, tree.detach(x), cycle[-1])
        return self.outer_update(state, d, w, {"inner_grad_norm": self.norm(g)})
