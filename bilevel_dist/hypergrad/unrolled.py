"""Iterative differentiation (ITD) through the solver's own trajectory (Crockett & Fessler
eqs. 4.18, B.2, B.3): reverse mode, reverse mode truncated to the last ``k`` steps, and forward
mode. These differentiate the ``T``-step solution exactly, whatever the solver.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from bilevel_dist import _autograd as autograd
from bilevel_dist import tree
from bilevel_dist._checks import positive_int
from bilevel_dist.hypergrad.base import Estimator, Solution, outer_grads, run_info
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import Solver, SolverState, masked_step, replay, run
from bilevel_dist.tree import Tree


def _backprop(oracles: Oracles, inner: Tree, outer: Tree, batch: Any) -> Tree:
    """``d f(inner(x), x) / dx`` by backpropagation through whatever graph ``inner`` carries,
    reduced over ranks."""
    oracles.calls["outer_grad"] += 1
    value = oracles.problem.outer_loss(inner, outer, batch)
    if not value.requires_grad:  # neither level depends on the outer variables
        return oracles.outer_gradient(tree.zeros_like(tree.detach(outer)))
    grads = autograd.grad((value,), outer.values())
    local = {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(outer.items(), grads, strict=True)}
    return oracles.outer_gradient(local)


def _leaves(outer: Tree) -> Tree:
    return {k: v.detach().requires_grad_() for k, v in outer.items()}


class Reverse(Estimator):
    """Backpropagation through all ``T`` solver steps: time ``O(T)``, memory ``O(T·n)``."""

    name = "reverse"

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
        outer = _leaves(outer)
        with torch.enable_grad():
            end = run(solver, oracles, tree.detach(inner), outer, inner_batch)
            grad = _backprop(oracles, end.inner, outer, outer_batch)
        return Solution(tree.detach(end.inner), grad, run_info(end, oracles.batched))


class Truncated(Estimator):
    """Backpropagation through the last ``k`` solver steps only (Shaban et al. 2019); the
    earlier ones run without a graph. Error decays exponentially in ``k`` for strongly convex
    lower levels."""

    name = "truncated"

    def __init__(self, k: int = 10) -> None:
        self.k = positive_int("k", k, allow_zero=True)  # 0: the direct term only (first order)

    def check(self, solver: Solver) -> None:
        if self.k > solver.steps:
            raise ValueError(f"Truncated(k={self.k}) needs k <= solver steps ({solver.steps})")

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
        end = run(solver, oracles, tree.detach(inner), tree.detach(outer), inner_batch, keep_last=self.k)
        outer = _leaves(outer)
        with torch.enable_grad():
            last = replay(solver, oracles, end, outer, inner_batch)
            grad = _backprop(oracles, last, outer, outer_batch)
        return Solution(end.inner, grad, run_info(end, oracles.batched))


class Forward(Estimator):
    """Forward mode: carries ``Z_t = dw_t/dx`` (all ``R`` outer directions at once, vmapped
    ``jvp``) along the run. Memory ``O(n·R)`` flat in ``T``, time ``O(T·R)``: for few outer
    variables."""

    name = "forward"

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
        inner = tree.detach(inner)
        directions = tree.basis(outer)
        count = next(iter(directions.values())).shape[0]

        def expand(t: Tree) -> Tree:
            return {k: v.new_zeros((count,) + v.shape) for k, v in t.items()}

        tangents: list = [expand(inner), {k: expand(s) for k, s in solver.init(inner).items()}]

        def advance(w: Tree, state: SolverState, grad: Tree, active: Tensor | None, t: int) -> tuple[Tree, SolverState]:
            def step(w_: Tree, s_: SolverState, x_: Tree) -> tuple[Tree, SolverState]:
                return masked_step(solver, oracles, w_, s_, x_, inner_batch, active, t)

            def push(tw: Tree, ts: SolverState, tx: Tree) -> tuple[tuple[Tree, SolverState], tuple[Tree, SolverState]]:
                return jvp(step, (w, state, outer), (tw, ts, tx))

            primal, tangents[:] = vmap(push, out_dims=(None, 0))(tangents[0], tangents[1], directions)
            return primal

        end = run(solver, oracles, inner, outer, inner_batch, advance=advance)
        gw, gx = outer_grads(oracles, end.inner, outer, outer_batch)
        jacobian = tangents[0]  # (R, *inner shape) per key
        through_inner = sum((jacobian[k] * g).flatten(1).sum(1) for k, g in gw.items())
        grad = oracles.outer_gradient(tree.add(gx, tree.unflatten(through_inner, outer)))  # type: ignore[arg-type]
        return Solution(end.inner, grad, run_info(end, oracles.batched))
