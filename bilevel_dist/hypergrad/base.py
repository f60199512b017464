"""What every hypergradient estimator shares: its signature and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from bilevel_dist import tree
from bilevel_dist.metrics import Metrics
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Run, Solver
from bilevel_dist.tree import Tree


@dataclass
class Solution:
    """A solved bilevel step: the lower-level solution reached, the hypergradient (shaped like
    the outer tree, reduced over ranks), the linear-system solution ``v`` where there is one, and
    diagnostics (steps taken, residuals, seconds), computed when read."""

    inner: Tree
    grad: Tree
    info: Metrics = field(default_factory=Metrics)
    v: Tree | None = None


class Estimator:
    """A hypergradient estimator: ``(problem, outer, inner, solver, batches) -> Solution``.

    Estimators run the lower-level solver themselves because they differ in how: with a graph
    (reverse), with tangents (forward), or plainly followed by a linear solve (implicit).
    ``problem`` may be its :class:`~bilevel_dist.oracles.Oracles`: then every oracle goes through
    that ``Comm`` and reduction policy, and the returned gradient is the global one.
    """

    name: str = ""

    def check(self, solver: Solver) -> None:
        """Raises if this estimator cannot work with ``solver``; called before any solve."""

    def __call__(
        self,
        problem: BilevelProblem | Oracles,
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


def per_problem_value(value: Tensor, batched: bool) -> Any:
    """A diagnostic tensor as a Python number unless it holds one value per problem."""
    if batched:
        return value
    return value.item()


def run_info(end: Run, batched: bool, grad: Tree | None = None) -> Metrics:
    """The solver's diagnostics (``grad``: an inner gradient at the end, when one was computed)."""
    return Metrics(
        inner_steps=lambda: per_problem_value(end.steps, batched),
        inner_grad_norm=lambda: per_problem_value(end.oracles.norm(end.gradient() if grad is None else grad), batched),
    )


def outer_grads(oracles: Oracles, inner: Tree, outer: Tree, batch: Any) -> tuple[Tree, Tree]:
    """``(∇_w f, ∇_x f)`` at the given point, detached (``∇_x f`` local, see :class:`Oracles`)."""
    return oracles.outer_grads(tree.detach(inner), tree.detach(outer), batch)
