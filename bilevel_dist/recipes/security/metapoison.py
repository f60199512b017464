"""MetaPoison-style unrolled poisoning (Huang et al. 2020; thesis §6.2, ``geiping-thesis.md`` §4.2).

The same threat model as Witches' Brew (:mod:`~bilevel_dist.recipes.security.witches_brew`):
perturbations ``Δ`` on the chosen poison rows only, ``‖Δ‖∞ ≤ ε`` and ``x + Δ`` in the box. Instead
of aligning gradients at a fixed model, the attack differentiates the adversarial loss
``L(F(x_t; θ_K(Δ)), y_adv)`` after ``K`` unrolled victim SGD steps on the poisoned training set from
the current ``θ`` (the code's ``--nadapt``, default 2). The unroll is the framework's: the attack is a
:class:`~bilevel_dist.problem.BilevelProblem` (inner ``θ``, outer ``Δ``) whose hypergradient comes
from the ``reverse`` estimator (all ``K`` steps) or ``truncated`` (the last ``k``), with a
:class:`~bilevel_dist.solvers.GD` victim of ``K`` steps. The outer loop is Witches' Brew's: signed
Adam on ``∂L_adv/∂Δ`` averaged over the ensemble of starting points ``θ``, then :func:`project`.

Left out at this scale: MetaPoison's staggered ensemble with its clean update step per outer step,
the colour perturbation and the Carlini–Wagner surrogate loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bilevel_dist import hypergrad
from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.hypergrad.base import Solution
from bilevel_dist.problem import BilevelProblem
from bilevel_dist.recipes.security.witches_brew import NO_BOX, Box, _check_eps, apply_poison, decay_milestones, project
from bilevel_dist.solvers import GD
from bilevel_dist.tree import Tree

Loss = Callable[[Tensor, Tensor], Tensor]


def poisoning_problem(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    poisons: Tensor,
    x_target: Tensor,
    y_adversarial: Tensor,
    *,
    box: Box | None = None,
    weight_decay: float = 0.0,
    train_loss: Loss = F.cross_entropy,
    adversarial_loss: Loss = F.cross_entropy,
    buffers: Tree | None = None,
) -> BilevelProblem:
    """The poisoning bilevel problem (6.1) with inner ``{parameter name: θ}`` and outer
    ``{"delta": Δ}`` (``(P, ...)``, the rows ``poisons`` of ``x``):

    - inner ``g(θ, Δ) = train_loss(F(x + Δ; θ), y) + weight_decay/2 ‖θ‖²`` on the whole poisoned
      set (:func:`apply_poison`, clamped into ``box`` when given: what the victim would store);
    - outer ``f(θ) = adversarial_loss(F(x_t; θ), y_adv)``.

    ``model`` is called functionally (its own parameters are ignored); batches are unused."""
    buffers = buffers or {}

    def forward(params: Tree, inputs: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (inputs,))

    def inner_loss(params: Tree, outer: Tree, batch: Any) -> Tensor:
        loss = train_loss(forward(params, apply_poison(x, poisons, outer["delta"], box)), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in params.values())
        return loss

    def outer_loss(params: Tree, outer: Tree, batch: Any) -> Tensor:
        return adversarial_loss(forward(params, x_target), y_adversarial)

    return BilevelProblem(inner_loss, outer_loss)


def _check_unroll(unroll: int) -> int:
    return setting("unroll", positive_int, unroll)


def unrolled_gradient(
    problem: BilevelProblem, params: Tree, delta: Tensor, unroll: int, inner_lr: float, truncate: int | None = None
) -> Solution:
    """The hypergradient of ``f(θ_K(Δ))`` in ``Δ`` after ``unroll`` = ``K`` victim GD steps of size
    ``inner_lr`` from ``params``: the ``reverse`` estimator, or ``truncated`` through the last
    ``truncate`` steps only. ``Solution.grad["delta"]`` is it, ``Solution.inner`` is ``θ_K``."""
    unroll = _check_unroll(unroll)
    inner_lr = setting("inner_lr", positive_float, inner_lr)
    if truncate is None:
        estimator = hypergrad.get("reverse")
    else:
        truncate = setting("truncate", positive_int, truncate)
        if truncate > unroll:
            raise ConfigError("truncate", f"truncate ({truncate}) must be <= unroll ({unroll})")
        estimator = hypergrad.get("truncated", k=truncate)
    solver = GD(lr=inner_lr, steps=unroll)
    return estimator(problem, {"delta": delta}, {k: v.detach() for k, v in params.items()}, solver)


@dataclass
class MetaPoison:
    """The attack's result: ``delta`` ``(P, ...)`` the final (projected) perturbation and
    ``history`` ``(M,)`` the adversarial loss after the unroll at each step (ensemble mean)."""

    delta: Tensor
    history: Tensor


def metapoison(
    model: nn.Module,
    params: Tree | Sequence[Tree],
    x: Tensor,
    y: Tensor,
    poisons: Tensor,
    x_target: Tensor,
    y_adversarial: Tensor,
    eps: float | Tensor,
    *,
    unroll: int = 2,
    inner_lr: float = 0.1,
    truncate: int | None = None,
    steps: int = 60,
    lr: float = 0.1,
    box: Box = NO_BOX,
    weight_decay: float = 0.0,
    buffers: Tree | None = None,
    seed: int = 0,
) -> MetaPoison:
    """Unrolled poisoning of the rows ``poisons`` of ``(x, y)`` (labels kept) so that the target
    ``x_target`` is classified as ``y_adversarial`` after ``unroll`` victim steps from each
    ``params`` (one ``θ`` or an ensemble, gradients averaged).

    ``Δ`` starts at ``clamp(ε·N(0, I))`` projected (as the brew), then each of ``steps`` takes the
    unrolled hypergradient (:func:`unrolled_gradient`), one Adam step of size ``lr`` on its sign
    with the brew's ×0.1 decays, and :func:`project` onto the ε-ball and the box."""
    eps = _check_eps(eps)
    unroll = _check_unroll(unroll)
    steps = setting("steps", positive_int, steps)
    lr = setting("lr", positive_float, lr)
    ensemble = [params] if isinstance(params, dict) else list(params)
    if not ensemble:
        raise ConfigError("params", "the ensemble of starting models is empty")
    problem = poisoning_problem(
        model, x, y, poisons, x_target, y_adversarial, box=box, weight_decay=weight_decay, buffers=buffers
    )
    x_poison = x[poisons]
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(x_poison.shape, generator=g, dtype=torch.float64).to(x_poison)
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    delta = project(init * eps_t, x_poison, eps, box).requires_grad_()
    optimiser = torch.optim.Adam([delta], lr=lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, decay_milestones(steps), gamma=0.1)
    training = model.training
    model.eval()  # batch norm on running statistics, no dropout: the unroll is deterministic
    history = []
    try:
        for _ in range(steps):
            solutions = [unrolled_gradient(problem, p, delta.detach(), unroll, inner_lr, truncate) for p in ensemble]
            gradient = torch.stack([s.grad["delta"] for s in solutions]).mean(0)
            with torch.no_grad():
                losses = [problem.outer_loss(s.inner, {}, None) for s in solutions]
            history.append(torch.stack(losses).mean())
            delta.grad = gradient.sign()  # signed Adam, as the brew
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(project(delta, x_poison, eps, box))
    finally:
        model.train(training)
    return MetaPoison(delta.detach().clone(), torch.stack(history))
