"""Double-loop algorithms: several inner steps, then one outer step per iteration.

AID (Ghadimi & Wang 2018; Ji et al. 2021), stocBiO (Ji et al. 2021), AmIGO (Arbel & Mairal 2022),
BSA (Ghadimi & Wang 2018), HOAG (Pedregosa 2016; Crockett & Fessler Alg. 1), ITD (Ji et al. 2021).
Each step is one hypergradient estimator of :mod:`bilevel_dist.hypergrad` on a gradient-descent
:mod:`~bilevel_dist.solvers` run, warm-started from the previous iteration's inner variables.
``inner_batch`` may be one batch or ``PerStep([b0, b1, ...])``: inner step ``k`` then uses batch
``k mod len`` (stocBiO and AmIGO draw a fresh batch per inner step) and the second-order products
use the last.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dist import hypergrad
from bilevel_dist._checks import ConfigError, positive_int
from bilevel_dist.algorithms.base import Algorithm, State, adam, choice, count, decayed, descend, fraction, lr, zeros
from bilevel_dist.hypergrad.base import Estimator, Solution
from bilevel_dist.metrics import Metrics
from bilevel_dist.solvers import GD
from bilevel_dist.tree import Tree


class DoubleLoop(Algorithm):
    """Inner GD (``inner_steps`` at ``inner_lr``, optionally to a tolerance) and a hypergradient
    estimator, then ``x ← x − β_t d`` (``outer_optimizer="sgd"``) or an Adam step on ``d``
    (``"adam"``, as meta-learning does; its moments are state, kept across episodes)."""

    def init(self, outer: Tree, inner: Tree) -> State:
        state = super().init(outer, inner)
        if self.h.get("outer_optimizer") == "adam":
            state |= {"outer_m": zeros(outer), "outer_s": zeros(outer)}
        return state

    def estimator(self, state: State) -> Estimator:
        """This step's hypergradient estimator."""
        raise NotImplementedError

    def solve(self, state: State, inner_batch: Any, outer_batch: Any, tol: float | None = None, **kw: Any) -> Solution:
        solver = GD(self.h["inner_lr"], self.h["inner_steps"], tol)
        estimator = self.estimator(state)
        if self.h.get("compile"):
            from bilevel_dist.compiled import implicit_cg

            outer, inner = state["outer"], state["inner"]
            return implicit_cg(self.oracles, outer, inner, solver, estimator, inner_batch, outer_batch)  # type: ignore[arg-type]
        return estimator(self.oracles, state["outer"], state["inner"], solver, inner_batch, outer_batch, **kw)

    def outer_update(self, state: State, solution: Solution, metrics: Metrics) -> tuple[State, Metrics]:
        t = state["t"]
        step = decayed(self.h["outer_lr"], t, self.h.get("outer_decay", 0.0) or 0.0)
        d = solution.grad
        if "outer_m" in state:
            state, moved = adam(state, d, t)
        else:
            moved = d
        state = {**state, "outer": descend(state["outer"], moved, step), "inner": solution.inner, "t": t + 1}
        shown = solution.info.select("inner_grad_norm", "linear_residual")
        return state, Metrics(hypergrad_norm=self.norm(d), direction=d, outer_lr=step) | shown | metrics

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        return self.outer_update(state, self.solve(state, inner_batch, outer_batch), Metrics())

    def linear_cost(self) -> int:
        """Hessian-vector products of the linear solve."""
        raise NotImplementedError

    def cost(self, t: int) -> dict[str, int]:
        steps, products = self.h["inner_steps"], self.linear_cost()
        return {"inner_grad": steps, "linearize": 1, "hvp": products, "mixed": 1, "outer_grad": 1}


# what every double-loop method takes: the inner GD run and the outer step
_LOOP = {
    "inner_lr": (0.1, lr),
    "inner_steps": (10, count),
    "outer_lr": (0.01, lr),
    "outer_decay": (0.0, fraction),
    "outer_optimizer": ("sgd", choice("sgd", "adam")),
}
_AID = {
    **_LOOP,
    "linear_solver": ("cg", choice("cg", "neumann")),
    "linear_iters": (10, count),
    "linear_lr": (None, lr),
    # the inner run and CG as one torch.compile-d function (bilevel_dist.compiled)
    "compile": (False, lambda name, v: bool(v)),
}


class AID(DoubleLoop):
    """Approximate implicit differentiation: inner GD, then ``H v = ∇_w f`` by CG or a Neumann
    series (``linear_lr`` its step, default ``inner_lr``), then ``x ← x − β (∇_x f − J v)``.
    ``compile=True`` runs the inner run and CG compiled (:mod:`bilevel_dist.compiled`).

    Cost per step: ``inner_steps`` inner gradients, one linearisation, ``linear_iters`` (CG) or
    ``linear_iters − 1`` (Neumann) Hessian-vector products, one mixed product, one outer gradient.
    """

    name = "aid"
    hparams = _AID

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.h["compile"] and self.h["linear_solver"] != "cg":
            raise ConfigError("compile", f"compile=True needs linear_solver='cg', got {self.h['linear_solver']!r}")

    def estimator(self, state: State) -> Estimator:
        if self.h["linear_solver"] == "cg":
            return hypergrad.CG(iters=self.h["linear_iters"], tol=0.0)
        return hypergrad.Neumann(iters=self.h["linear_iters"], alpha=self.h["linear_lr"] or self.h["inner_lr"])

    def linear_cost(self) -> int:
        return self.h["linear_iters"] - (self.h["linear_solver"] == "neumann")


class StocBiO(AID):
    """stocBiO: AID with the Neumann ("SHIA") inverse on mini-batches (Ji et al. 2021, Alg. 2).
    Cost as AID's with Neumann."""

    name = "stocbio"
    hparams = {**_AID, "linear_solver": ("neumann", choice("cg", "neumann"))}


class AmIGO(DoubleLoop):
    """AmIGO: warm-started inner GD and ``linear_iters`` warm-started GD steps on
    ``½ vᵀHv − vᵀ∇_w f`` for ``v`` (kept in the state).

    Cost per step: ``inner_steps`` inner gradients, one linearisation, ``linear_iters``
    Hessian-vector products, one mixed product, one outer gradient.
    """

    name = "amigo"
    inner_keys = ("inner", "v")
    hparams = {**_LOOP, "linear_lr": (None, lr), "linear_iters": (10, count)}

    def init(self, outer: Tree, inner: Tree) -> State:
        return {**super().init(outer, inner), "v": zeros(inner)}

    def estimator(self, state: State) -> Estimator:
        return hypergrad.GradientDescent(iters=self.h["linear_iters"], alpha=self.h["linear_lr"] or self.h["inner_lr"])

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        solution = self.solve(state, inner_batch, outer_batch, start=state["v"])
        return self.outer_update({**state, "v": solution.v}, solution, Metrics())

    def linear_cost(self) -> int:
        return self.h["linear_iters"]


class BSA(DoubleLoop):
    """BSA (Ghadimi & Wang 2018): the inverse Hessian by the randomly truncated product
    ``H⁻¹ ≈ α Q Π_{i<p} (I − αH)``, ``p`` uniform in ``{0..Q−1}``, unbiased for the Q-term series;
    the generator's state is part of the algorithm state. ``truncation_samples = K`` averages K
    independent draws of ``p`` (1 is the paper's estimator); they share one product chain (a
    Neumann series whose term ``j`` is weighed by ``Q/K`` times the draws of ``j``).

    Cost per step: ``inner_steps`` inner gradients, one linearisation, ``max p`` ``≤ Q − 1``
    Hessian-vector products, one mixed product, one outer gradient.
    """

    name = "bsa"
    hparams = {
        **_LOOP,
        "neumann_terms": (10, count),
        "truncation_samples": (1, count),
        "linear_lr": (None, lr),
        "seed": (0, lambda name, v: int(v)),
    }

    def init(self, outer: Tree, inner: Tree) -> State:
        generator = torch.Generator().manual_seed(self.h["seed"])
        return {**super().init(outer, inner), "rng": generator.get_state()}

    def draw(self, state: State) -> tuple[list[float], torch.Tensor]:
        """The Neumann term weights of this step's truncations, and the generator's next state."""
        generator = torch.Generator()
        generator.set_state(state["rng"])
        terms, samples = self.h["neumann_terms"], self.h["truncation_samples"]
        powers = torch.randint(terms, (samples,), generator=generator)
        weights = (torch.bincount(powers).double() * (terms / samples)).tolist()
        return weights, generator.get_state()

    def estimator(self, state: State) -> Estimator:
        weights = state["weights"]  # this step's draw (step)
        alpha = self.h["linear_lr"] or self.h["inner_lr"]
        return hypergrad.Neumann(iters=len(weights), alpha=alpha, weights=weights)

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        weights, rng = self.draw(state)
        solution = self.solve({**state, "weights": weights}, inner_batch, outer_batch)
        return self.outer_update({**state, "rng": rng}, solution, Metrics())

    def linear_cost(self) -> int | None:
        return None  # random: at most Q − 1


class HOAG(DoubleLoop):
    """HOAG (Pedregosa 2016): inner solve and CG to a tolerance ``ε_k`` that shrinks by
    ``tol_decay`` every iteration (a summable sequence), then an outer gradient step.

    Cost per step: at most ``inner_steps`` inner gradients (fewer once ``‖∇_w g‖ ≤ ε_k``), one
    linearisation, at most ``linear_iters`` Hessian-vector products, one mixed product, one outer
    gradient.
    """

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

    def estimator(self, state: State) -> Estimator:
        return hypergrad.CG(iters=self.h["linear_iters"], absolute_tol=state["tol"])

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        tol = state["tol"]
        solution = self.solve(state, inner_batch, outer_batch, tol=tol)
        return self.outer_update({**state, "tol": tol * self.h["tol_decay"]}, solution, Metrics(tol=tol))

    def linear_cost(self) -> int:
        return self.h["linear_iters"]


class ITD(DoubleLoop):
    """Iterative differentiation: backpropagation through ``inner_steps`` warm-started GD steps
    (the ``reverse`` estimator), or through the last ``backprop_steps`` of them only (the
    ``truncated`` estimator; ``0`` keeps only the direct term ``∂f/∂x``: first-order MAML when
    the inner variables are a displacement from the outer ones).

    Cost per step: ``inner_steps`` inner gradients (with their graph; ``+ backprop_steps``
    replayed when truncated) and one outer gradient.
    """

    name = "itd"
    hparams = {**_LOOP, "backprop_steps": (None, lambda name, v: positive_int(name, v, allow_zero=True))}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.h["backprop_steps"]
        if k is not None and k > self.h["inner_steps"]:
            raise ConfigError("backprop_steps", f"backprop_steps={k} exceeds inner_steps={self.h['inner_steps']}")

    def estimator(self, state: State) -> Estimator:
        k = self.h["backprop_steps"]
        return hypergrad.Reverse() if k is None else hypergrad.Truncated(k)

    def cost(self, t: int) -> dict[str, int]:
        return {"inner_grad": self.h["inner_steps"] + (self.h["backprop_steps"] or 0), "outer_grad": 1}


__all__ = ["AID", "BSA", "HOAG", "ITD", "AmIGO", "StocBiO"]
