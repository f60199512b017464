"""``solve``: one hypergradient of a bilevel problem, validated and timed."""

from __future__ import annotations

import time
from typing import Any

import torch

from bilevel_dist.distributed import Comm
from bilevel_dist.hypergrad.base import Estimator, Solution
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem, check_problem
from bilevel_dist.solvers import Solver
from bilevel_dist.tree import Tree


def solve(
    problem: BilevelProblem,
    outer: Tree,
    inner: Tree,
    *,
    solver: Solver,
    hypergrad: Estimator,
    inner_batch: Any = None,
    outer_batch: Any = None,
    check: bool = True,
    comm: Comm | None = None,
    compile: bool = False,
) -> Solution:
    """Solves the lower level from ``inner`` and returns the hypergradient at ``outer``.

    Args:
        problem: the two losses (and whether the lower level is a batch of independent problems).
        outer: the outer variables ``x``.
        inner: the starting point of the lower-level solve (a warm start when reused).
        solver: a :mod:`bilevel_dist.solvers` solver.
        hypergrad: a :mod:`bilevel_dist.hypergrad` estimator.
        inner_batch: passed to ``inner_loss`` as its ``batch``.
        outer_batch: passed to ``outer_loss`` as its ``batch``.
        check: validate the inputs first (two extra loss evaluations); turn off in hot loops.
        comm: the ranks this problem's batches are split over, e.g. ``Comm()`` for every rank
            of the process group (default: this process alone); the returned hypergradient is
            then the global one.
        compile: run the solve and the CG estimator as one ``torch.compile``-d function
            (:mod:`bilevel_dist.compiled`: GD without a tolerance, ``cg`` with ``tol=0``, one
            process); the first call compiles.

    Returns:
        :class:`Solution` with ``.inner`` (solution reached), ``.grad`` (shaped like ``outer``)
        and ``.info`` (``inner_steps``, ``inner_grad_norm``, residuals, ``seconds``).
    """
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a bilevel_dist.solvers solver, got {type(solver).__name__}")
    if not isinstance(hypergrad, Estimator):
        raise TypeError(f"hypergrad must be a bilevel_dist.hypergrad estimator, got {type(hypergrad).__name__}")
    hypergrad.check(solver)
    if check:
        check_problem(problem, outer, inner, inner_batch, outer_batch)
    start = time.perf_counter()
    oracles = Oracles(problem, comm or Comm(local=True))
    if compile:
        from bilevel_dist.compiled import implicit_cg

        solution = implicit_cg(oracles, outer, inner, solver, hypergrad, inner_batch, outer_batch)  # type: ignore[arg-type]
    else:
        solution = hypergrad(oracles, outer, inner, solver, inner_batch, outer_batch)
    solution.info |= {"seconds": time.perf_counter() - start}
    bad = [k for k, g in solution.grad.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise ValueError(
            f"hypergradient for {bad} is not finite (inner gradient norm at the end: "
            f"{solution.info.get('inner_grad_norm')}); the inner solver probably diverged, lower its lr"
        )
    return solution
