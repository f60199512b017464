"""What every hypergradient estimator shares: its signature and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from bilevel_dist import tree
from bilevel_dist.linalg import loss_grads
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Run, Solver
from bilevel_dist.tree import Tree


@dataclass
class Solution:
    """A solved bilevel step: the lower-level solution reached, the hypergradient (shaped like
    the outer tree) and diagnostics (steps taken, residuals, seconds)."""

    inner: Tree
    grad: Tree
    info: dict[str, Any] = field(default_factory=dict)


class Estimator:
    """A hypergradient estimator: ``(problem, outer, inner, solver, batches) -> Solution``.

    Estimators run the lower-level solver themselves because they differ in how: with a graph
    (reverse), with tangents (forward), or plainly followed by a linear solve (implicit).
    """

    name: str = ""

    def check(self, solver: Solver) -> None:
        """Raises if this estimator cannot work with ``solver``; called before any solve."""

    def __call__(
        self,
        problem: BilevelProblem,
        outer: Tree,
        inner: Tree,
        solver: Solver,
        inner_batch: Any = None,
        outer_batch: Any = None,
    ) -> Solution:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def run_info(end: Run, batched: bool) -> dict[str, Any]:
    """The solver's diagnostics, as Python numbers unless the problem is batched."""
    if batched:
        return {"inner_steps": end.steps, "inner_grad_norm": end.grad_norm}
    return {"inner_steps": int(end.steps), "inner_grad_norm": float(end.grad_norm)}


def per_problem_value(value: Tensor, batched: bool) -> Any:
    """A diagnostic tensor as a Python float unless it holds one value per problem."""
    return value if batched else float(value)


def outer_grads(problem: BilevelProblem, inner: Tree, outer: Tree, batch: Any) -> tuple[Tree, Tree]:
    """``(∇_w f, ∇_x f)`` at the given point, detached."""
    gw, gx = loss_grads(problem.outer_loss, tree.detach(inner), tree.detach(outer), batch)
    return gw, gx
