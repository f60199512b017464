"""Implicit differentiation (AID): ``∇F = ∇_x f − ∇²_xw g · v`` with ``∇²_ww g · v = ∇_w f``
at the lower-level solution (Crockett & Fessler eq. 4.8; Grazzi et al. 2020).

The estimators differ only in how they solve for ``v``: conjugate gradient, a truncated Neumann
series, fixed-point iteration of the gradient-descent map, or a dense solve (an oracle).
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dist import tree
from bilevel_dist._checks import positive_float, positive_int
from bilevel_dist.hypergrad.base import Estimator, Solution, outer_grads, per_problem_value, run_info
from bilevel_dist.linalg import Linearization, LinearSolve, cg, dense_hessian, fixed_point, linearize, neumann
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Solver, run
from bilevel_dist.tree import Tree


class Implicit(Estimator):
    """Runs the solver without a graph, then solves ``H v = ∇_w f`` (memory flat in ``T``)."""

    def linear_solve(self, lin: Linearization, b: Tree, batched: bool, solver: Solver) -> LinearSolve:
        """Returns ``v ≈ (∇²_ww g)⁻¹ b``."""
        raise NotImplementedError

    def __call__(
        self,
        problem: BilevelProblem,
        outer: Tree,
        inner: Tree,
        solver: Solver,
        inner_batch: Any = None,
        outer_batch: Any = None,
    ) -> Solution:
        outer = tree.detach(outer)
        end = run(solver, problem, tree.detach(inner), outer, inner_batch)
        gw, gx = outer_grads(problem, end.inner, outer, outer_batch)
        lin = linearize(problem.inner_loss, end.inner, outer, inner_batch)
        solved = self.linear_solve(lin, gw, problem.batched, solver)
        grad = tree.sub(gx, lin.mixed(solved.solution))
        info = run_info(end, problem.batched)
        info["linear_residual"] = per_problem_value(solved.residual, problem.batched)
        info["linear_iters"] = solved.iterations
        return Solution(end.inner, grad, info)


def relative_tol(tol: float, b: Tree, batched: bool) -> torch.Tensor:
    """An absolute tolerance per problem from one relative to ``‖b‖``."""
    return tol * tree.norm(b, batched)


class CG(Implicit):
    """Conjugate gradient on ``H v = ∇_w f``; stops per problem once ``‖r‖ ≤ tol·‖∇_w f‖``."""

    name = "cg"

    def __init__(self, iters: int = 100, tol: float = 1e-10) -> None:
        self.iters = positive_int("iters", iters)
        self.tol = positive_float("tol", tol, allow_zero=True)

    def linear_solve(self, lin: Linearization, b: Tree, batched: bool, solver: Solver) -> LinearSolve:
        return cg(lin.hvp, b, iters=self.iters, tol=relative_tol(self.tol, b, batched), batched=batched)


class Neumann(Implicit):
    """Truncated Neumann series ``v = α Σ_{j<iters} (I − αH)^j ∇_w f`` (Lorraine et al. 2020);
    converges for ``α < 2/L``, ``α`` defaults to the solver's learning rate."""

    name = "neumann"

    def __init__(self, iters: int = 100, alpha: float | None = None) -> None:
        self.iters = positive_int("iters", iters)
        self.alpha = None if alpha is None else positive_float("alpha", alpha)

    def linear_solve(self, lin: Linearization, b: Tree, batched: bool, solver: Solver) -> LinearSolve:
        alpha = self.alpha if self.alpha is not None else solver.lr
        return neumann(lin.hvp, b, iters=self.iters, alpha=alpha, batched=batched)


class FixedPoint(Implicit):
    """Fixed-point iteration ``u ← Jᵀu + ∇_w f`` for the gradient-descent map
    ``Ψ(w) = w − α∇_w g`` (``J = I − αH``), as hypertorch's ``fixed_point``; then ``v = αu``.
    Stops per problem once ``‖u_{k+1} − u_k‖ ≤ tol·‖∇_w f‖``."""

    name = "fixed_point"

    def __init__(self, iters: int = 100, tol: float = 1e-10, alpha: float | None = None) -> None:
        self.iters = positive_int("iters", iters)
        self.tol = positive_float("tol", tol, allow_zero=True)
        self.alpha = None if alpha is None else positive_float("alpha", alpha)

    def linear_solve(self, lin: Linearization, b: Tree, batched: bool, solver: Solver) -> LinearSolve:
        alpha = self.alpha if self.alpha is not None else solver.lr

        def transpose_jacobian(u: Tree) -> Tree:
            return tree.axpy(-alpha, lin.hvp(u), u)

        tol = relative_tol(self.tol, b, batched)
        solved = fixed_point(transpose_jacobian, b, iters=self.iters, tol=tol, batched=batched)
        solved.solution = tree.scale(solved.solution, alpha)
        return solved


class Exact(Implicit):
    """Dense Hessian and a direct solve: an oracle for small problems (``O(n²)`` memory).

    Batched problems get one ``n × n`` block each, built with ``n`` Hessian-vector products.
    """

    name = "exact"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = None if chunk_size is None else positive_int("chunk_size", chunk_size)

    def linear_solve(self, lin: Linearization, b: Tree, batched: bool, solver: Solver) -> LinearSolve:
        hessian = dense_hessian(lin.hvp, b, batched, self.chunk_size)
        rhs = tree.flatten(b, batched)
        v = torch.linalg.solve(hessian, rhs)
        residual = torch.linalg.vector_norm(torch.einsum("...ij,...j->...i", hessian, v) - rhs, dim=-1)
        return LinearSolve(tree.unflatten(v, b, batched), residual, 1)


__all__ = ["CG", "Exact", "FixedPoint", "Implicit", "Neumann"]
