"""Differentiable lower-level solvers: gradient descent, heavy-ball / Nesterov momentum, Adam.

A solver is a pure update ``(inner, state, grad, t) -> (inner, state)`` plus a step budget and
an optional tolerance on the inner gradient norm. :func:`run` drives it. Whether the run is
differentiable is decided by the caller: outer tensors that require grad give a trajectory that
reverse mode can backpropagate through; detached ones give a plain solve.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bilevel_dist import tree
from bilevel_dist._checks import optional_tol, positive_float, positive_int, unit_interval
from bilevel_dist.linalg import loss_grad
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree

State = dict[str, Tree]


class Solver:
    """Base class: ``lr``, ``steps`` and ``tol`` (stop once ``‖∇_w g‖ ≤ tol``, per problem)."""

    lr: float
    steps: int
    tol: float | None

    def init(self, inner: Tree) -> State:
        """The optimiser state at the start of a solve."""
        return {}

    def update(self, inner: Tree, state: State, grad: Tree, t: int) -> tuple[Tree, State]:
        """One step from ``inner`` given the inner gradient; ``t`` counts from 0."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class GD(Solver):
    """Gradient descent ``w ← w − lr ∇_w g``."""

    def __init__(self, lr: float, steps: int, tol: float | None = None) -> None:
        self.lr = positive_float("lr", lr)
        self.steps = positive_int("steps", steps, allow_zero=True)
        self.tol = optional_tol("tol", tol)

    def update(self, inner: Tree, state: State, grad: Tree, t: int) -> tuple[Tree, State]:
        return tree.axpy(-self.lr, grad, inner), state


class Momentum(Solver):
    """Heavy-ball momentum in PyTorch's convention: ``b ← μ b + ∇g``; ``w ← w − lr b``
    (Nesterov: ``w ← w − lr (∇g + μ b)``)."""

    def __init__(
        self, lr: float, momentum: float, steps: int, nesterov: bool = False, tol: float | None = None
    ) -> None:
        self.lr = positive_float("lr", lr)
        self.momentum = unit_interval("momentum", momentum)
        self.steps = positive_int("steps", steps, allow_zero=True)
        self.nesterov = bool(nesterov)
        self.tol = optional_tol("tol", tol)

    def init(self, inner: Tree) -> State:
        return {"buffer": tree.zeros_like(inner)}

    def update(self, inner: Tree, state: State, grad: Tree, t: int) -> tuple[Tree, State]:
        buffer = tree.axpy(self.momentum, state["buffer"], grad)
        direction = tree.axpy(self.momentum, buffer, grad) if self.nesterov else buffer
        return tree.axpy(-self.lr, direction, inner), {"buffer": buffer}


class Adam(Solver):
    """Adam with bias correction (Kingma & Ba, Algorithm 1)."""

    def __init__(
        self,
        lr: float,
        steps: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        tol: float | None = None,
    ) -> None:
        self.lr = positive_float("lr", lr)
        self.steps = positive_int("steps", steps, allow_zero=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        self.betas = (unit_interval("betas[0]", betas[0]), unit_interval("betas[1]", betas[1]))
        self.eps = positive_float("eps", eps)
        self.tol = optional_tol("tol", tol)

    def init(self, inner: Tree) -> State:
        return {"m": tree.zeros_like(inner), "v": tree.zeros_like(inner)}

    def update(self, inner: Tree, state: State, grad: Tree, t: int) -> tuple[Tree, State]:
        b1, b2 = self.betas
        m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grad.items()}
        v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grad.items()}
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        new = {k: w - self.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k, w in inner.items()}
        return new, {"m": m, "v": v}


def masked_step(
    solver: Solver,
    problem: BilevelProblem,
    inner: Tree,
    state: State,
    outer: Tree,
    batch: Any,
    active: Tensor | None,
    t: int,
    grad: Tree | None = None,
) -> tuple[Tree, State]:
    """One solver step; problems whose ``active`` flag is off keep their variables."""
    if grad is None:
        grad = loss_grad(problem.inner_loss, inner, outer, batch)
    new, new_state = solver.update(inner, state, grad, t)
    if active is None:
        return new, new_state
    batched = problem.batched
    new = tree.where(active, new, inner, batched)
    new_state = {name: tree.where(active, s, state[name], batched) for name, s in new_state.items()}
    return new, new_state


Advance = Callable[[Tree, State, Tree, "Tensor | None", int], tuple[Tree, State]]


@dataclass
class Run:
    """The end of a solver run: the inner variables reached, steps taken and gradient norm there
    (per problem when batched), and the last ``keep_last`` steps for replay with a graph."""

    inner: Tree
    steps: Tensor
    grad_norm: Tensor
    window: list[tuple[Tree, State, Tensor | None, int]] = field(default_factory=list)


def run(
    solver: Solver,
    problem: BilevelProblem,
    inner: Tree,
    outer: Tree,
    batch: Any,
    *,
    keep_last: int = 0,
    advance: Advance | None = None,
) -> Run:
    """Runs ``solver.steps`` steps, each problem stopping once its gradient norm is ``≤ tol``.

    ``advance(inner, state, grad, active, t)`` replaces the plain step (forward mode carries
    tangents through it). The gradient at the returned point is evaluated once more for the
    reported norm.
    """
    batched = problem.batched
    state = solver.init(inner)
    ref = next(iter(inner.values()))
    shape = (ref.shape[0],) if batched else ()
    done = torch.zeros(shape, dtype=torch.bool, device=ref.device)
    steps = torch.zeros(shape, dtype=torch.long, device=ref.device)
    window: deque = deque(maxlen=keep_last or None)
    grad = None
    for t in range(solver.steps):
        grad = loss_grad(problem.inner_loss, inner, outer, batch)
        active = None
        if solver.tol is not None:
            done = done | (tree.norm(tree.detach(grad), batched) <= solver.tol)
            if bool(done.all()):
                break
            active = ~done
        if keep_last:
            window.append((tree.detach(inner), {k: tree.detach(s) for k, s in state.items()}, active, t))
        if advance is None:
            inner, state = masked_step(solver, problem, inner, state, outer, batch, active, t, grad)
        else:
            inner, state = advance(inner, state, grad, active, t)
        steps = steps + (1 if active is None else active.long())
        grad = None
    if grad is None:
        grad = loss_grad(problem.inner_loss, tree.detach(inner), tree.detach(outer), batch)
    return Run(inner, steps, tree.norm(tree.detach(grad), batched), list(window) if keep_last else [])


def replay(solver: Solver, problem: BilevelProblem, end: Run, outer: Tree, batch: Any) -> Tree:
    """Recomputes the steps kept in ``end.window`` so that autograd sees only them."""
    if not end.window:
        return end.inner
    inner, state = end.window[0][0], end.window[0][1]
    for _, _, active, t in end.window:
        inner, state = masked_step(solver, problem, inner, state, outer, batch, active, t)
    return inner
