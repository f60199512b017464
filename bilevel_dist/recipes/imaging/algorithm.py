"""The review's double loop for learned reconstruction (Crockett & Fessler App. D, Alg. 3):
a warm-started OGM solve of every image's lower level with step ``1/L(γ)`` from eq. (4.19),
recomputed each outer step, to a per-image gradient-norm tolerance; the hypergradient (4.8) by
CG on ``∇²_xx Φ v = x̂ − x_true``, warm-started from the previous step's ``v``; then Adam.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bilevel_dist import hypergrad
from bilevel_dist._checks import ConfigError
from bilevel_dist.algorithms.base import State, choice, count, fraction, lr, nonnegative, zeros
from bilevel_dist.algorithms.double_loop import DoubleLoop
from bilevel_dist.hypergrad.base import Solution
from bilevel_dist.metrics import Metrics
from bilevel_dist.solvers import OGM
from bilevel_dist.tree import Tree


def _callable(name: str, value: Any) -> Callable[[Tree], float]:
    if not callable(value):
        raise ConfigError(name, f"{name} must be a function of the outer variables, got {value!r}")
    return value


class ReconstructionIFT(DoubleLoop):
    """OGM with gradient restart (``inner_steps`` at most, per image until ``‖∇_x Φ‖ ≤ inner_tol``,
    step ``1/step_bound(outer)``) and implicit differentiation by warm-started CG
    (``linear_iters`` at most, per image until the residual is ``≤ linear_tol·‖x̂ − x_true‖``).
    ``v`` is kept in the state and the checkpoint, like the warm-started images.

    Cost per step: at most ``inner_steps`` inner gradients, one linearisation, at most
    ``linear_iters`` Hessian-vector products, one mixed product, one outer gradient.
    """

    name = "reconstruction_ift"
    inner_keys = ("inner", "v")
    hparams = {
        "inner_steps": (10, count),
        "inner_tol": (1e-5, nonnegative),
        "linear_iters": (50, count),
        "linear_tol": (1e-6, nonnegative),
        "outer_lr": (1e-3, lr),
        "outer_decay": (0.0, fraction),
        "outer_optimizer": ("adam", choice("sgd", "adam")),
        "step_bound": (None, _callable),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.h["step_bound"] is None:
            raise ConfigError("step_bound", "the reconstruction's double loop needs step_bound(outer), the L of (4.19)")

    def init(self, outer: Tree, inner: Tree) -> State:
        return {**super().init(outer, inner), "v": zeros(inner)}

    def solve(self, state: State, inner_batch: Any, outer_batch: Any, tol: float | None = None, **kw: Any) -> Solution:
        bound = float(self.h["step_bound"](state["outer"]))
        solver = OGM(1 / bound, self.h["inner_steps"], self.h["inner_tol"] or None, batched=self.oracles.batched)
        estimator = hypergrad.CG(iters=self.h["linear_iters"], tol=self.h["linear_tol"])
        return estimator(
            self.oracles, state["outer"], state["inner"], solver, inner_batch, outer_batch, start=state["v"]
        )

    def step(self, state: State, inner_batch: Any, outer_batch: Any) -> tuple[State, Metrics]:
        solution = self.solve(state, inner_batch, outer_batch)
        return self.outer_update({**state, "v": solution.v}, solution, Metrics())

    def linear_cost(self) -> int:
        return self.h["linear_iters"]


__all__ = ["ReconstructionIFT"]
