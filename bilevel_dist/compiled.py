"""The compiled hypergradient path: the inner gradient-descent run, the linearisation and the CG
solve of an implicit hypergradient as one ``torch.compile``-d function.

The eager path pays Python and autograd bookkeeping for every small op: about 40 ops per CG
iteration, each a few microseconds on a CPU. Here the whole computation (``torch.func`` grad and
vjp inside) is traced once per shape into one graph, which Inductor fuses (CUDA graphs on a GPU
with ``mode="reduce-overhead"``). The arithmetic is the eager path's, so the hypergradient agrees
to rounding (tested to 1e-10 in float64).

Scope: gradient descent without a tolerance on a shared lower level in one process, and the
``cg`` estimator with a fixed number of iterations (no early exit: a data-dependent exit would
break the graph). Anything else raises :class:`~bilevel_dist._checks.ConfigError` naming the
setting. The first call compiles (tens of seconds on a CPU); later calls with the same shapes
reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, vjp

from bilevel_dist import tree
from bilevel_dist._checks import ConfigError
from bilevel_dist.hypergrad.base import Estimator, Solution
from bilevel_dist.hypergrad.implicit import CG
from bilevel_dist.linalg import cg_one_system
from bilevel_dist.metrics import Metrics
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.solvers import GD, PerStep, Solver
from bilevel_dist.tree import Tree

_CACHE: dict[tuple, tuple[BilevelProblem, Callable]] = {}


def check_compilable(oracles: Oracles, solver: Solver, estimator: Estimator, inner_batch: Any) -> None:
    """Raises :class:`ConfigError` naming what the compiled path does not cover."""
    if not isinstance(solver, GD) or solver.tol is not None:
        raise ConfigError("compile", "compile=True needs the GD solver without a tolerance")
    if not isinstance(estimator, CG) or estimator.tol or estimator.absolute_tol is not None:
        raise ConfigError("compile", "compile=True needs the cg estimator with tol=0 (a fixed number of iterations)")
    if oracles.batched:
        raise ConfigError("compile", "compile=True covers a shared lower level (batched=False) only")
    if oracles.comm.active:
        raise ConfigError("compile", "compile=True runs in one process: a collective cannot sit inside the graph")
    if isinstance(inner_batch, PerStep):
        raise ConfigError("compile", "compile=True needs one inner batch for the whole run, not PerStep")


def _implicit_cg(problem: BilevelProblem, lr: float, steps: int, iters: int) -> Callable:
    """``(w, x, inner_batch, outer_batch) -> (w_T, ∇F, v)``: ``steps`` GD steps, then CG with
    ``iters`` iterations on ``∇²_ww g v = ∇_w f`` and ``∇F = ∇_x f − ∇²_xw g v``."""
    inner_loss, outer_loss = problem.inner_loss, problem.outer_loss

    def hypergradient(w: Tree, x: Tree, inner_batch: Any, outer_batch: Any) -> tuple[Tree, Tree, Tree]:
        for _ in range(steps):
            g = grad(inner_loss)(w, x, inner_batch)
            w = {k: w[k] + (-lr) * g[k] for k in w}
        fw, fx = grad(outer_loss, argnums=(0, 1))(w, x, outer_batch)
        _, products = vjp(lambda w_, x_: grad(inner_loss)(w_, x_, inner_batch), w, x)
        # the eager CG, without its exit test (a data-dependent branch would break the graph)
        start = tree.zeros_like(fw)
        v = cg_one_system(lambda d: products(d)[0], start, fw, fw, tree.dot(fw, fw), iters, None, tree.dot).solution
        jv = products(v)[1]
        return w, {k: fx[k] - jv[k] for k in fx}, v

    return hypergradient


def implicit_cg(
    oracles: Oracles,
    outer: Tree,
    inner: Tree,
    solver: GD,
    estimator: CG,
    inner_batch: Any,
    outer_batch: Any,
    mode: str | None = None,
) -> Solution:
    """The implicit CG hypergradient through the compiled function (compiled on first use per
    problem and settings; ``mode`` is ``torch.compile``'s, by default ``"reduce-overhead"``
    (CUDA graphs) on a GPU and Inductor's default on a CPU)."""
    check_compilable(oracles, solver, estimator, inner_batch)
    problem = oracles.problem
    graphs = mode is None and next(iter(inner.values())).is_cuda
    mode = "reduce-overhead" if graphs else mode  # CUDA graphs: one launch for the whole solve
    key = (id(problem), solver.lr, solver.steps, estimator.iters, mode)
    if key not in _CACHE or _CACHE[key][0] is not problem:  # the problem is held: its id stays its own
        fn = _implicit_cg(problem, solver.lr, solver.steps, estimator.iters)
        _CACHE[key] = (problem, torch.compile(fn, fullgraph=True, dynamic=False, mode=mode))
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
    w, grad_x, v = _CACHE[key][1](tree.detach(inner), tree.detach(outer), inner_batch, outer_batch)
    if mode == "reduce-overhead":  # the graph's outputs are overwritten by its next replay
        w, grad_x, v = ({k: t.clone() for k, t in part.items()} for part in (w, grad_x, v))
    info = Metrics(inner_steps=solver.steps, linear_iters=estimator.iters)
    return Solution(w, grad_x, info, v)
