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
from bilevel_dist.oracles import Oracles
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.tree import Tree

SolverState = dict[str, Tree]


class Solver:
    """Base class: ``lr``, ``steps`` and ``tol`` (stop once ``‖∇_w g‖ ≤ tol``, per problem)."""

    lr: float
    steps: int
    tol: float | None

    def init(self, inner: Tree) -> SolverState:
        """The optimiser state at the start of a solve."""
        return {}

    def update(self, inner: Tree, state: SolverState, grad: Tree, t: int) -> tuple[Tree, SolverState]:
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

    def update(self, inner: Tree, state: SolverState, grad: Tree, t: int) -> tuple[Tree, SolverState]:
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

    def init(self, inner: Tree) -> SolverState:
        return {"buffer": tree.zeros_like(inner)}

    def update(self, inner: Tree, state: SolverState, grad: Tree, t: int) -> tuple[Tree, SolverState]:
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

    def init(self, inner: Tree) -> SolverState:
        return {"m": tree.zeros_like(inner), "v": tree.zeros_like(inner)}

    def update(self, inner: Tree, state: SolverState, grad: Tree, t: int) -> tuple[Tree, SolverState]:
        b1, b2 = self.betas
        m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grad.items()}
        v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grad.items()}
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        new = {k: w - self.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k, w in inner.items()}
        return new, {"m": m, "v": v}


class OGM(Solver):
    """The optimized gradient method with gradient restart (Kim & Fessler 2018; Crockett &
    Fessler's inner solver for image reconstruction), step ``lr = 1/L``:

        y⁺ = w − lr ∇g(w),   θ⁺ = (1 + √(1 + 4θ²)) / 2,
        w⁺ = y⁺ + ((θ − 1)/θ⁺)(y⁺ − y) + (θ/θ⁺)(y⁺ − w),

    restarted (``w⁺ = y⁺``, ``θ⁺ = 1``) where ``⟨∇g(w), y⁺ − y⟩ > 0``, per problem when
    ``batched`` (one ``θ`` per leading row).
    """

    def __init__(self, lr: float, steps: int, tol: float | None = None, batched: bool = False) -> None:
        self.lr = positive_float("lr", lr)
        self.steps = positive_int("steps", steps, allow_zero=True)
        self.tol = optional_tol("tol", tol)
        self.batched = bool(batched)

    def init(self, inner: Tree) -> SolverState:
        ref = next(iter(inner.values()))
        shape = ref.shape[:1] if self.batched else ()
        return {"y": tree.detach(inner), "theta": {"theta": torch.ones(shape, dtype=ref.dtype, device=ref.device)}}

    def update(self, inner: Tree, state: SolverState, grad: Tree, t: int) -> tuple[Tree, SolverState]:
        y_old, theta = state["y"], state["theta"]["theta"]
        y = tree.axpy(-self.lr, grad, inner)
        step = tree.sub(y, y_old)
        keep = (tree.dot(grad, step, self.batched) <= 0).to(theta.dtype)  # 0 where restarting
        theta_new = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
        momentum, correction = keep * (theta - 1) / theta_new, keep * theta / theta_new
        theta_new = keep * theta_new + (1 - keep)
        new = {}
        for k, v in y.items():
            m, c = tree.per_problem(momentum, v, self.batched), tree.per_problem(correction, v, self.batched)
            new[k] = v + m * step[k] + c * (v - inner[k])
        return new, {"y": y, "theta": {"theta": theta_new}}


class PerStep(list):
    """Inner batches for a solve, one per step: step ``t`` uses batch ``t mod len`` (stocBiO and
    AmIGO draw a fresh batch per inner step) and what follows the solve (products, the
    linearisation) uses the last. A plain list or tuple is one batch, as a DataLoader yields it."""


def batch_at(batch: Any, t: int) -> Any:
    """The batch of step ``t``."""
    return batch[t % len(batch)] if isinstance(batch, PerStep) else batch


def last_batch(batch: Any) -> Any:
    """The batch of the computations after a solve."""
    return batch[-1] if isinstance(batch, PerStep) else batch


def masked_step(
    solver: Solver,
    oracles: Oracles,
    inner: Tree,
    state: SolverState,
    outer: Tree,
    batch: Any,
    active: Tensor | None,
    t: int,
    grad: Tree | None = None,
) -> tuple[Tree, SolverState]:
    """One solver step; problems whose ``active`` flag is off keep their variables."""
    if grad is None:
        grad = oracles.inner_grad(inner, outer, batch_at(batch, t))
    new, new_state = solver.update(inner, state, grad, t)
    if active is None:
        return new, new_state
    batched = oracles.batched
    new = tree.where(active, new, inner, batched)
    new_state = {name: tree.where(active, s, state[name], batched) for name, s in new_state.items()}
    return new, new_state


Advance = Callable[[Tree, SolverState, Tree, "Tensor | None", int], tuple[Tree, SolverState]]


@dataclass
class Run:
    """The end of a solver run: the inner variables reached, steps taken (per problem when
    batched), the last inner gradient evaluated, and the last ``keep_last`` steps for replay
    with a graph.

    That gradient is at the point reached when the run stopped on its tolerance or was asked for
    ``final_grad``; otherwise it is the one the last step took (no oracle runs only for a metric).
    """

    inner: Tree
    steps: Tensor
    last_grad: Tree | Callable[[], Tree]
    oracles: Oracles
    window: list[tuple[Tree, SolverState, Tensor | None, int]] = field(default_factory=list)
    #: the solver's state at the end (e.g. Adam's moments), to continue in a later run
    state: SolverState = field(default_factory=dict)

    def gradient(self) -> Tree:
        """The last inner gradient; after a run of no steps, evaluated now (nothing needed it)."""
        if callable(self.last_grad):
            self.last_grad = self.last_grad()
        return self.last_grad

    @property
    def grad_norm(self) -> Tensor:
        """``‖last_grad‖`` (per problem when batched), computed when asked."""
        return self.oracles.norm(self.gradient())


def run(
    solver: Solver,
    problem: BilevelProblem | Oracles,
    inner: Tree,
    outer: Tree,
    batch: Any,
    *,
    keep_last: int = 0,
    advance: Advance | None = None,
    final_grad: bool = False,
    gradient: Callable[[Tree, Tree, Any], Tree] | None = None,
    state: SolverState | None = None,
    start: int = 0,
) -> Run:
    """Runs ``solver.steps`` steps, each problem stopping once its gradient norm is ``≤ tol``.

    ``problem`` may be the problem's :class:`~bilevel_dist.oracles.Oracles` (its ``Comm`` and
    reduction policy, its call counts). ``batch`` may be :class:`PerStep`.
    ``advance(inner, state, grad, active, t)`` replaces the plain step (forward mode carries
    tangents through it). ``gradient(inner, outer, batch)`` replaces ``∇_w g`` as the direction
    the solver follows: a solve of another objective of ``w`` (a penalised or proximal one) built
    from the same oracles. ``state`` and ``start`` continue a solver (its moments, its step count
    for bias correction) from an earlier run's :attr:`Run.state`. Under a shared policy the
    gradient norms are global, so every rank stops at the same step; under an independent one
    nothing here communicates.
    """
    oracles = Oracles.of(problem)
    batched = oracles.batched
    direction = gradient or oracles.inner_grad
    state = solver.init(inner) if state is None else state
    ref = next(iter(inner.values()))
    shape = (ref.shape[0],) if batched else ()
    done = torch.zeros(shape, dtype=torch.bool, device=ref.device)
    steps = torch.zeros(shape, dtype=torch.long, device=ref.device)
    window: deque = deque(maxlen=keep_last or None)
    grad, stopped, plain_steps = None, False, 0
    for t in range(start, start + solver.steps):
        grad = direction(inner, outer, batch_at(batch, t))
        active = None
        if solver.tol is not None:
            done = done | (oracles.norm(tree.detach(grad)) <= solver.tol)
            if bool(done.all()):
                stopped = True
                break
            active = ~done
        if keep_last:
            window.append((tree.detach(inner), {k: tree.detach(s) for k, s in state.items()}, active, t))
        if advance is None:
            inner, state = masked_step(solver, oracles, inner, state, outer, batch, active, t, grad)
        else:
            inner, state = advance(inner, state, grad, active, t)
        if active is None:
            plain_steps += 1  # counted in Python: no tensor op per step
        else:
            steps = steps + active.long()
    steps = steps + plain_steps
    window_list = list(window) if keep_last else []
    if final_grad and not stopped:
        grad = direction(tree.detach(inner), tree.detach(outer), last_batch(batch))
    elif grad is None:  # no step ran: the gradient at the start only if someone asks for it
        point, at = tree.detach(inner), tree.detach(outer)
        return Run(inner, steps, lambda: direction(point, at, last_batch(batch)), oracles, window_list, state)
    return Run(inner, steps, tree.detach(grad), oracles, window_list, state)


def replay(solver: Solver, problem: BilevelProblem | Oracles, end: Run, outer: Tree, batch: Any) -> Tree:
    """Recomputes the steps kept in ``end.window`` so that autograd sees only them."""
    if not end.window:
        return end.inner
    oracles = Oracles.of(problem)
    inner, state = end.window[0][0], end.window[0][1]
    for _, _, active, t in end.window:
        inner, state = masked_step(solver, oracles, inner, state, outer, batch, active, t)
    return inner
