"""Iterative differentiation (ITD) through the solver's own trajectory (Crockett & Fessler
eqs. 4.18, B.2, B.3): reverse mode, reverse mode truncated to the last ``k`` steps, and forward
mode. These differentiate the ``T``-step solution exactly, whatever the solver.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from bilevel_dist import tree
from bilevel_dist._checks import positive_int
from bilevel_dist.hypergrad.base import Estimator, Solution, outer_grads, run_info
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Solver, State, masked_step, replay, run
from bilevel_dist.tree import Tree


def _backprop(problem: BilevelProblem, inner: Tree, outer: Tree, batch: Any) -> Tree:
    """``d f(inner(x), x) / dx`` by backpropagation through whatever graph ``inner`` carries."""
    value = problem.outer_loss(inner, outer, batch)
    if not value.requires_grad:  # neither level depends on the outer variables
        return tree.zeros_like(tree.detach(outer))
    grads = torch.autograd.grad(value, list(outer.values()), allow_unused=True)
    return {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(outer.items(), grads, strict=True)}


def _leaves(outer: Tree) -> Tree:
    return {k: v.detach().requires_grad_() for k, v in outer.items()}


class Reverse(Estimator):
    """Backpropagation through all ``T`` solver steps: time ``O(T)``, memory ``O(T·n)``."""

    name = "reverse"

    def __call__(
        self,
        problem: BilevelProblem,
        outer: Tree,
        inner: Tree,
        solver: Solver,
        inner_batch: Any = None,
        outer_batch: Any = None,
    ) -> Solution:
        outer = _leaves(outer)
        with torch.enable_grad():
            end = run(solver, problem, tree.detach(inner), outer, inner_batch)
            grad = _backprop(problem, end.inner, outer, outer_batch)
        return Solution(tree.detach(end.inner), grad, run_info(end, problem.batched))


class Truncated(Estimator):
    """Backpropagation through the last ``k`` solver steps only (Shaban et al. 2019); the
    earlier ones run without a graph. Error decays exponentially in ``k`` for strongly convex
    lower levels."""

    name = "truncated"

    def __init__(self, k: int = 10) -> None:
        self.k = positive_int("k", k)

    def check(self, solver: Solver) -> None:
        if self.k > solver.steps:
            raise ValueError(f"Truncated(k={self.k}) needs k <= solver steps ({solver.steps})")

    def __call__(
        self,
        problem: BilevelProblem,
        outer: Tree,
        inner: Tree,
        solver: Solver,
        inner_batch: Any = None,
        outer_batch: Any = None,
    ) -> Solution:
        end = run(solver, problem, tree.detach(inner), tree.detach(outer), inner_batch, keep_last=self.k)
        outer = _leaves(outer)
        with torch.enable_grad():
            last = replay(solver, problem, end, outer, inner_batch)
            grad = _backprop(problem, last, outer, outer_batch)
        return Solution(end.inner, grad, run_info(end, problem.batched))


class Forward(Estimator):
    """Forward mode: carries ``Z_t = dw_t/dx`` (all ``R`` outer directions at once, vmapped
    ``jvp``) along the run. Memory ``O(n·R)`` flat in ``T``, time ``O(T·R)``: for few outer
    variables."""

    name = "forward"

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
        inner = tree.detach(inner)
        directions = tree.basis(outer)
        count = next(iter(directions.values())).shape[0]

        def expand(t: Tree) -> Tree:
            return {k: v.new_zeros((count,) + v.shape) for k, v in t.items()}

        tangents: list = [expand(inner), {k: expand(s) for k, s in solver.init(inner).items()}]

        def advance(w: Tree, state: State, grad: Tree, active: Tensor | None, t: int) -> tuple[Tree, State]:
            def step(w_: Tree, s_: State, x_: Tree) -> tuple[Tree, State]:
                return masked_step(solver, problem, w_, s_, x_, inner_batch, active, t)

            def push(tw: Tree, ts: State, tx: Tree) -> tuple[tuple[Tree, State], tuple[Tree, State]]:
                return jvp(step, (w, state, outer), (tw, ts, tx))

            primal, tangents[:] = vmap(push, out_dims=(None, 0))(tangents[0], tangents[1], directions)
            return primal

        end = run(solver, problem, inner, outer, inner_batch, advance=advance)
        gw, gx = outer_grads(problem, end.inner, outer, outer_batch)
        jacobian = tangents[0]  # (R, *inner shape) per key
        through_inner = sum((jacobian[k] * g).flatten(1).sum(1) for k, g in gw.items())
        grad = tree.add(gx, tree.unflatten(through_inner, outer))  # type: ignore[arg-type]
        return Solution(end.inner, grad, run_info(end, problem.batched))
