"""The DARTS approximation (Liu et al. 2019, eq. 7–8), as Betty's ``darts``.

At the lower-level solution ``w`` it takes one more inner step ``w' = w − ξ∇_w g`` and returns
``∇_x f(w') − ξ ∇²_xw g(w) · ∇_w f(w')``, the second-order term by a central difference
``[∇_x g(w + h d) − ∇_x g(w − h d)] / 2h`` with ``d = ∇_w f(w')`` and ``h = ε / ‖d‖``: first-order
passes only, error ``O(h²)`` against the one-step unrolled hypergradient.
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dist import tree
from bilevel_dist._checks import positive_float
from bilevel_dist.hypergrad.base import Estimator, Solution, outer_grads, run_info
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Solver, last_batch, run
from bilevel_dist.tree import Tree


class FiniteDiff(Estimator):
    """DARTS: one-step unrolled hypergradient with a finite-difference mixed product.

    Args:
        eps: the difference step, relative to ``‖∇_w f‖`` (DARTS uses 0.01).
        xi: the virtual inner step; defaults to the solver's learning rate.
    """

    name = "finite_diff"

    def __init__(self, eps: float = 1e-2, xi: float | None = None) -> None:
        self.eps = positive_float("eps", eps)
        self.xi = None if xi is None else positive_float("xi", xi)

    def __call__(
        self,
        problem: BilevelProblem | Oracles,
        outer: Tree,
        inner: Tree,
        solver: Solver,
        inner_batch: Any = None,
        outer_batch: Any = None,
    ) -> Solution:
        oracles = Oracles.of(problem)
        batched = oracles.batched
        outer = tree.detach(outer)
        end = run(solver, oracles, tree.detach(inner), outer, inner_batch)
        xi = self.xi if self.xi is not None else solver.lr
        w, batch = end.inner, last_batch(inner_batch)
        g = oracles.inner_grad(w, outer, batch)
        virtual = tree.axpy(-xi, g, w)
        direction, gx = outer_grads(oracles, virtual, outer, outer_batch)
        length = tree.norm(direction)  # one step for every problem: the difference is linear in d
        h = self.eps / torch.where(length > 0, length, torch.ones_like(length))
        plus = oracles.inner_grads(tree.axpy(h, direction, w, batched), outer, batch)[1]
        minus = oracles.inner_grads(tree.axpy(-h, direction, w, batched), outer, batch)[1]
        mixed = tree.scale(tree.sub(plus, minus), 1 / (2 * h))
        grad = oracles.outer_gradient(tree.axpy(-xi, mixed, gx))
        return Solution(w, grad, run_info(end, batched, g))
