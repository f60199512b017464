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

An ensemble is one problem over the members' stacked parameters (``vmap``): the inner loss is the
sum of the members' losses, separable, so each member's GD steps are its own; the outer loss is
the members' mean. With ``advance`` every member then takes MetaPoison's "+1 clean update step"
(one graph-free victim step on the current poisoned set), so the ensemble keeps training while the
poisons change; staggering (members trained to different epochs) is the caller's choice of
starting points. Left out: resetting members that reach the last epoch, the colour perturbation
and the Carlini–Wagner surrogate loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

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
    members: bool = False,
) -> BilevelProblem:
    """The poisoning bilevel problem (6.1) with inner ``{parameter name: θ}`` and outer
    ``{"delta": Δ}`` (``(P, ...)``, the rows ``poisons`` of ``x``):

    - inner ``g(θ, Δ) = train_loss(F(x + Δ; θ), y) + weight_decay/2 ‖θ‖²`` on the whole poisoned
      set (:func:`apply_poison`, clamped into ``box`` when given: what the victim would store);
    - outer ``f(θ) = adversarial_loss(F(x_t; θ), y_adv)``.

    ``model`` is called functionally (its own parameters are ignored); batches are unused. With
    ``members`` the inner variable is an ensemble's parameters stacked on a leading axis (shared
    ``buffers``): inner the sum of the members' ``g`` (each member's gradient its own), outer the
    mean of their ``f``, both one ``vmap``."""
    buffers = buffers or {}

    def forward(params: Tree, inputs: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (inputs,))

    def member_inner(params: Tree, delta: Tensor) -> Tensor:
        loss = train_loss(forward(params, apply_poison(x, poisons, delta, box)), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in params.values())
        return loss

    def member_outer(params: Tree) -> Tensor:
        return adversarial_loss(forward(params, x_target), y_adversarial)

    if members:

        def inner_loss(params: Tree, outer: Tree, batch: Any) -> Tensor:
            return vmap(member_inner, in_dims=(0, None))(params, outer["delta"]).sum()

        def outer_loss(params: Tree, outer: Tree, batch: Any) -> Tensor:
            return vmap(member_outer)(params).mean()

    else:

        def inner_loss(params: Tree, outer: Tree, batch: Any) -> Tensor:
            return member_inner(params, outer["delta"])

        def outer_loss(params: Tree, outer: Tree, batch: Any) -> Tensor:
            return member_outer(params)

    # members: independent lower-level problems on a leading axis, the framework's ``batched``
    return BilevelProblem(inner_loss, outer_loss, batched=members)


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
    advance: bool = False,
) -> MetaPoison:
    """Unrolled poisoning of the rows ``poisons`` of ``(x, y)`` (labels kept) so that the target
    ``x_target`` is classified as ``y_adversarial`` after ``unroll`` victim steps from each
    ``params`` (one ``θ``, or an ensemble: a list, stacked and unrolled as one ``vmap``, the
    hypergradient of the members' mean adversarial loss).

    ``Δ`` starts at ``clamp(ε·N(0, I))`` projected (as the brew), then each of ``steps`` takes the
    unrolled hypergradient (:func:`unrolled_gradient`), one Adam step of size ``lr`` on its sign
    with the brew's ×0.1 decays, and :func:`project` onto the ε-ball and the box. With ``advance``
    every starting point then takes one GD step of size ``inner_lr`` on the poisoned set at the
    new ``Δ`` (MetaPoison's clean update step, no graph)."""
    eps = _check_eps(eps)
    unroll = _check_unroll(unroll)
    steps = setting("steps", positive_int, steps)
    lr = setting("lr", positive_float, lr)
    inner_lr = setting("inner_lr", positive_float, inner_lr)
    single = isinstance(params, dict)
    ensemble = [params] if single else list(params)
    if not ensemble:
        raise ConfigError("params", "the ensemble of starting models is empty")
    # one model: its own tree (unchanged path); several: one stacked problem, one unroll
    theta = (
        {k: v.detach() for k, v in ensemble[0].items()}
        if single
        else {k: torch.stack([p[k].detach() for p in ensemble]) for k in ensemble[0]}
    )
    problem = poisoning_problem(
        model, x, y, poisons, x_target, y_adversarial, box=box, weight_decay=weight_decay, buffers=buffers,
        members=not single,
    )  # fmt: skip
    clean_gradient = grad(lambda p, d: problem.inner_loss(p, {"delta": d}, None))
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
            solution = unrolled_gradient(problem, theta, delta.detach(), unroll, inner_lr, truncate)
            with torch.no_grad():
                history.append(problem.outer_loss(solution.inner, {}, None).detach())
            delta.grad = solution.grad["delta"].sign()  # signed Adam, as the brew
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(project(delta, x_poison, eps, box))
            if advance:
                step = clean_gradient(theta, delta.detach())
                theta = {k: (v - inner_lr * step[k]).detach() for k, v in theta.items()}
    finally:
        model.train(training)
    return MetaPoison(delta.detach().clone(), torch.stack(history))
