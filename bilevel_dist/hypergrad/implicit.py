"""Implicit differentiation (AID): ``∇F = ∇_x f − ∇²_xw g · v`` with ``∇²_ww g · v = ∇_w f``
at the lower-level solution (Crockett & Fessler eq. 4.8; Grazzi et al. 2020).

The estimators differ only in how they solve for ``v`` (the linear-solve layer,
:mod:`bilevel_dist.linalg`): conjugate gradient, a truncated Neumann series, warm-started
gradient descent on the quadratic, fixed-point iteration of the gradient-descent map, or a
dense solve (an oracle).
"""

from __future__ import annotations

from typing import Any

import torch

from bilevel_dist import tree
from bilevel_dist._checks import positive_float, positive_int
from bilevel_dist.hypergrad.base import Estimator, Solution, per_problem_value, run_info
from bilevel_dist.linalg import (
    LinearSolve,
    MatVec,
    cg,
    dense_hessian,
    fixed_point,
    gradient_descent,
    neumann,
)
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Solver, last_batch, run
from bilevel_dist.tree import Tree


class Implicit(Estimator):
    """Runs the solver without a graph, then solves ``H v = ∇_w f`` (memory flat in ``T``).

    Cost: the solver's ``T`` inner gradients, one linearisation at the solution (its gradient is
    the reported ``inner_grad_norm``), one outer gradient, the linear solve's Hessian-vector
    products and one mixed product. ``start`` warm-starts ``v`` where the linear solve can use it.
    """

    def linear_solve(
        self, hvp: MatVec, b: Tree, oracles: Oracles, solver: Solver, start: Tree | None = None
    ) -> LinearSolve:
        """Returns ``v ≈ (∇²_ww g)⁻¹ b``."""
        raise NotImplementedError

    def __call__(
        self,
        problem: BilevelProblem | Oracles,
        outer: Tree,
        inner: Tree,
        solver: Solver,
        inner_batch: Any = None,
        outer_batch: Any = None,
        *,
        start: Tree | None = None,
    ) -> Solution:
        oracles = Oracles.of(problem)
        outer = tree.detach(outer)
        end = run(solver, oracles, tree.detach(inner), outer, inner_batch)
        lin = oracles.linearize(end.inner, outer, last_batch(inner_batch))
        fw, fx = oracles.outer_grads(end.inner, outer, outer_batch)
        solved = self.linear_solve(lin.hvp, fw, oracles, solver, start)
        grad = oracles.outer_gradient(tree.sub(fx, lin.mixed(solved.solution)))
        info = run_info(end, oracles.batched, lin.grad)
        if solved.residual is not None:
            residual = solved.residual
            info |= {"linear_residual": lambda: per_problem_value(residual, oracles.batched)}
        info |= {"linear_iters": solved.iterations}
        return Solution(end.inner, grad, info, solved.solution)


def relative_tol(tol: float, b: Tree, oracles: Oracles) -> torch.Tensor:
    """An absolute tolerance per problem from one relative to ``‖b‖``."""
    return tol * oracles.norm(b)


class CG(Implicit):
    """Conjugate gradient on ``H v = ∇_w f``; stops per problem once ``‖r‖ ≤ tol·‖∇_w f‖``
    (``absolute_tol``: once ``‖r‖ ≤ absolute_tol``, as HOAG's schedule gives it)."""

    name = "cg"

    def __init__(self, iters: int = 100, tol: float = 1e-10, absolute_tol: float | None = None) -> None:
        self.iters = positive_int("iters", iters)
        self.tol = positive_float("tol", tol, allow_zero=True)
        self.absolute_tol = None if absolute_tol is None else positive_float("absolute_tol", absolute_tol)

    def linear_solve(
        self, hvp: MatVec, b: Tree, oracles: Oracles, solver: Solver, start: Tree | None = None
    ) -> LinearSolve:
        if self.absolute_tol is not None:
            tol: float | torch.Tensor = self.absolute_tol
        else:
            tol = relative_tol(self.tol, b, oracles) if self.tol else 0.0
        return cg(hvp, b, iters=self.iters, tol=tol, batched=oracles.batched, dot=oracles.dot, start=start)


class Neumann(Implicit):
    """Truncated Neumann series ``v = α Σ_{j<iters} c_j (I − αH)^j ∇_w f`` (Lorraine et al. 2020);
    converges for ``α < 2/L``, ``α`` defaults to the solver's learning rate. ``weights`` are the
    ``c_j`` (default 1; BSA's random truncation weighs the powers it drew); ``residual`` pays one
    more product to report ``‖∇_w f − H v‖``."""

    name = "neumann"

    def __init__(
        self, iters: int = 100, alpha: float | None = None, weights: list[float] | None = None, residual: bool = False
    ) -> None:
        self.iters = positive_int("iters", iters)
        self.alpha = None if alpha is None else positive_float("alpha", alpha)
        self.weights = weights
        self.residual = bool(residual)

    def linear_solve(
        self, hvp: MatVec, b: Tree, oracles: Oracles, solver: Solver, start: Tree | None = None
    ) -> LinearSolve:
        alpha = self.alpha if self.alpha is not None else solver.lr
        return neumann(
            hvp, b, iters=self.iters, alpha=alpha, batched=oracles.batched, weights=self.weights,
            dot=oracles.dot, residual=self.residual,
        )  # fmt: skip


class GradientDescent(Implicit):
    """``iters`` gradient steps on ``½ vᵀHv − vᵀ∇_w f`` from ``start`` (AmIGO's warm-started
    ``v``; Arbel & Mairal 2022), step ``alpha`` (default: the solver's learning rate)."""

    name = "gradient_descent"

    def __init__(self, iters: int = 10, alpha: float | None = None, residual: bool = False) -> None:
        self.iters = positive_int("iters", iters)
        self.alpha = None if alpha is None else positive_float("alpha", alpha)
        self.residual = bool(residual)

    def linear_solve(
        self, hvp: MatVec, b: Tree, oracles: Oracles, solver: Solver, start: Tree | None = None
    ) -> LinearSolve:
        lr = self.alpha if self.alpha is not None else solver.lr
        return gradient_descent(
            hvp, b, iters=self.iters, lr=lr, start=start, batched=oracles.batched, dot=oracles.dot,
            residual=self.residual,
        )  # fmt: skip


class FixedPoint(Implicit):
    """Fixed-point iteration ``u ← Jᵀu + ∇_w f`` for the gradient-descent map
    ``Ψ(w) = w − α∇_w g`` (``J = I − αH``), as hypertorch's ``fixed_point``; then ``v = αu``.
    Stops per problem once ``‖u_{k+1} − u_k‖ ≤ tol·‖∇_w f‖``."""

    name = "fixed_point"

    def __init__(self, iters: int = 100, tol: float = 1e-10, alpha: float | None = None) -> None:
        self.iters = positive_int("iters", iters)
        self.tol = positive_float("tol", tol, allow_zero=True)
        self.alpha = None if alpha is None else positive_float("alpha", alpha)

    def linear_solve(
        self, hvp: MatVec, b: Tree, oracles: Oracles, solver: Solver, start: Tree | None = None
    ) -> LinearSolve:
        alpha = self.alpha if self.alpha is not None else solver.lr

        def transpose_jacobian(u: Tree) -> Tree:
            return tree.axpy(-alpha, hvp(u), u)

        tol = relative_tol(self.tol, b, oracles)
        solved = fixed_point(transpose_jacobian, b, iters=self.iters, tol=tol, batched=oracles.batched, dot=oracles.dot)
        solved.solution = tree.scale(solved.solution, alpha)
        return solved


class Exact(Implicit):
    """Dense Hessian and a direct solve: an oracle for small problems (``O(n²)`` memory, one
    process). Batched problems get one ``n × n`` block each, built with ``n`` Hessian-vector
    products."""

    name = "exact"

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = None if chunk_size is None else positive_int("chunk_size", chunk_size)

    def linear_solve(
        self, hvp: MatVec, b: Tree, oracles: Oracles, solver: Solver, start: Tree | None = None
    ) -> LinearSolve:
        batched = oracles.batched
        hessian = dense_hessian(hvp, b, batched, self.chunk_size)
        rhs = tree.flatten(b, batched)
        v = torch.linalg.solve(hessian, rhs)
        residual = torch.linalg.vector_norm(torch.einsum("...ij,...j->...i", hessian, v) - rhs, dim=-1)
        return LinearSolve(tree.unflatten(v, b, batched), residual, 1)


__all__ = ["CG", "Exact", "FixedPoint", "GradientDescent", "Implicit", "Neumann"]
