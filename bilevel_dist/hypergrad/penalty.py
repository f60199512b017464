"""The penalty hypergradient of Mehra & Hamm (2021), Lemma 3.

With ``f̃(x, w) = f(x, w) + (γ/2)‖∇_w g(x, w)‖²`` and ``ŵ = argmin_w f̃(x, ·)``, the estimate is
``∇_x f̃(x, ŵ) = ∇_x f + γ ∇²_xw g · ∇_w g``, which equals the implicit formula at ``ŵ`` and
converges to the true hypergradient as ``O(1/γ)``. ``ŵ`` is found from the lower-level
solution by Gauss–Newton steps ``(∇²_ww f + γH²) δ = −∇_w f̃`` solved with conjugate gradient;
first-order in ``x``, no inverse Hessian.
"""

from __future__ import annotations

from typing import Any

from bilevel_dist import tree
from bilevel_dist._checks import positive_float, positive_int
from bilevel_dist.hypergrad.base import Estimator, Solution, per_problem_value, run_info
from bilevel_dist.linalg import cg, linearize
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Solver, last_batch, run
from bilevel_dist.tree import Tree


class PenaltyGradient(Estimator):
    """Penalty gradient ``∇_x f̃`` at the minimiser of ``f + γ/2 ‖∇_w g‖²`` in ``w``.

    Args:
        gamma: the penalty weight ``γ > 0``.
        newton_steps: Gauss–Newton steps on ``f̃`` from the lower-level solution.
        cg_iters: conjugate-gradient iterations per step.
        tol: stop once ``‖∇_w f̃‖ ≤ tol``.
    """

    name = "penalty"

    def __init__(self, gamma: float = 1e3, newton_steps: int = 10, cg_iters: int = 200, tol: float = 1e-10) -> None:
        self.gamma = positive_float("gamma", gamma)
        self.newton_steps = positive_int("newton_steps", newton_steps, allow_zero=True)
        self.cg_iters = positive_int("cg_iters", cg_iters)
        self.tol = positive_float("tol", tol, allow_zero=True)

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
        outer = tree.detach(outer)
        batched, gamma = oracles.batched, self.gamma
        end = run(solver, oracles, tree.detach(inner), outer, inner_batch)
        w, batch = end.inner, last_batch(inner_batch)
        for iteration in range(self.newton_steps + 1):
            inner_lin = oracles.linearize(w, outer, batch)
            # the outer loss's own curvature, reduced as the inner level's
            outer_lin = linearize(oracles.problem.outer_loss, w, outer, outer_batch)
            outer_grad = oracles.reduce_inner(outer_lin.grad)
            residual_grad = tree.axpy(gamma, inner_lin.hvp(inner_lin.grad), outer_grad)
            residual = oracles.norm(residual_grad)
            if bool((residual <= self.tol).all()) or iteration == self.newton_steps:
                break

            def gauss_newton(p: Tree, inner_lin=inner_lin, outer_lin=outer_lin) -> Tree:
                return tree.axpy(gamma, inner_lin.hvp(inner_lin.hvp(p)), oracles.reduce_inner(outer_lin.hvp(p)))

            rhs = tree.scale(residual_grad, -1.0)
            step = cg(gauss_newton, rhs, iters=self.cg_iters, tol=self.tol, batched=batched, dot=oracles.dot)
            w = tree.add(w, step.solution)
        gx = oracles.outer_grads(w, outer, outer_batch)[1]
        grad = oracles.outer_gradient(tree.axpy(gamma, inner_lin.mixed(inner_lin.grad), gx))
        info = run_info(end, batched, inner_lin.grad)
        info |= {"penalty_residual": lambda: per_problem_value(residual, batched)}
        return Solution(end.inner, grad, info)
