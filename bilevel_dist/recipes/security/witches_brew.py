"""Witches' Brew: clean-label poisoning by gradient alignment (Geiping et al. 2021; thesis ch. 6).

The attack solves the bilevel problem (6.1) — poisons ``Δ`` that make a victim trained on
``{(x_i + Δ_i, y_i)}`` classify the target ``x_t`` as ``y_adv`` — through the surrogate (6.3) at
a fixed clean model ``θ``::

    B(Δ, θ) = 1 − cos(∇_θ L(F(x_t, θ), y_adv), ∇_θ Σ_i L(F(x_i + Δ_i, θ), y_i))

over all parameters at once, minimised by Algorithm 6.1: signed Adam (Adam on ``sign ∂B/∂Δ``,
step decay ×0.1 at 3/8, 5/8 and 7/8 of the ``M`` steps), a projection onto ``‖Δ‖∞ ≤ ε`` and
the box after every step, ``R`` restarts from random points of the ε-ball, the restart with the
least final ``B`` kept. ``Δ`` is held only for the ``P`` poisons; :func:`apply_poison` scatters
it into the training set. An ensemble of clean models (stacked, :class:`Victims`) averages ``B``
over its members in one ``vmap``; poison mini-batches (the code's ``--pbatch``) bound the graph.

Models are ``nn.Module`` s called functionally (``torch.func.functional_call``) with a parameter
dict ``θ``; ``∇_θ`` is ``torch.func.grad``, which keeps its graph (the double backward), so
``∂B/∂Δ`` is exact and the restarts run as one ``vmap``.

The victim (:func:`train_victims`) is trained from scratch on the (poisoned) set with SGD and
Nesterov momentum, several freshly initialised victims at once (``stack_module_state`` +
``vmap``); success (:func:`flips`, :func:`success_rate`) means the target gets the adversarial
label, reported over cases × victim seeds as the mean over cases ± its standard error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

from bilevel_dist._checks import ConfigError, positive_float, positive_int, setting
from bilevel_dist.recipes.security.data import Case, choose_case
from bilevel_dist.tree import Tree

Box = tuple[float | Tensor, float | Tensor]
NO_BOX: Box = (-math.inf, math.inf)


# -- differentiable augmentation (thesis §6.3.4) ------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Random translation by up to ``shift`` pixels per axis (zero padding) and, with ``flip``,
    a horizontal flip with probability 1/2, for images ``(n, C, H, W)``. ``integer`` shifts are
    whole pixels (the victim's random crops with zero padding); otherwise they are uniform on
    ``[−shift, shift]`` and resampled bilinearly (the brew's, differentiated through)."""

    shift: float = 4.0
    flip: bool = True
    integer: bool = False

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """Parameters ``(*shape, 3)``: x shift, y shift (pixels) and flip (0/1)."""
        if self.integer:
            steps = int(self.shift)
            shifts = torch.randint(-steps, steps + 1, (*shape, 2), generator=generator).to(dtype)
        else:
            shifts = (2 * torch.rand(*shape, 2, generator=generator, dtype=dtype) - 1) * self.shift
        flips = torch.randint(0, 2, (*shape, 1), generator=generator).to(dtype) * float(self.flip)
        return torch.cat([shifts, flips], -1)


def augment(images: Tensor, draws: Tensor) -> Tensor:
    """``images`` ``(n, C, H, W)`` translated by ``draws[:, :2]`` pixels (content moves right and
    down for positive shifts; zeros come in), then flipped left-right where ``draws[:, 2]`` is 1,
    by bilinear ``grid_sample``: differentiable in the images (whole-pixel shifts are exact)."""
    n, _, height, width = images.shape
    dtype, device = images.dtype, images.device
    sign = (1 - 2 * draws[:, 2]).to(dtype)[:, None, None]  # −1: flip
    # pixel centres in grid_sample's [−1, 1] coordinates (align_corners=False); output pixel (u, v)
    # samples the input at (sign·u − 2dx/W, v − 2dy/H). Built by broadcasting, not affine_grid,
    # which has no vmap batching rule.
    u = (2 * torch.arange(width, dtype=dtype, device=device) + 1) / width - 1
    v = (2 * torch.arange(height, dtype=dtype, device=device) + 1) / height - 1
    gx = sign * u[None, None, :] - (2 * draws[:, 0].to(dtype) / width)[:, None, None]
    gy = v[None, :, None] - (2 * draws[:, 1].to(dtype) / height)[:, None, None]
    grid = torch.stack([gx.expand(n, height, width), gy.expand(n, height, width)], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# -- the alignment loss (6.3) -------------------------------------------------------------------


def parameters(model: nn.Module) -> Tree:
    """``θ``: the model's parameters as a detached dict (what ``functional_call`` takes)."""
    return {k: v.detach() for k, v in model.named_parameters()}


def _loss(model: nn.Module, params: Tree, buffers: Tree, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)


def target_gradient(
    model: nn.Module, params: Tree, x_target: Tensor, y_adversarial: Tensor, buffers: Tree | None = None
) -> Tree:
    """``∇_θ L(F(x_t, θ), y_adv)`` (mean cross-entropy over the targets), detached."""
    with torch.enable_grad():
        g = grad(_loss, argnums=1)(model, params, buffers or {}, x_target, y_adversarial)
    return {k: v.detach() for k, v in g.items()}


def alignment_loss(
    model: nn.Module,
    params: Tree,
    target_grad: Tree,
    x: Tensor,
    y: Tensor,
    delta: Tensor,
    buffers: Tree | None = None,
    draws: Tensor | None = None,
) -> Tensor:
    """``B(Δ, θ)`` of (6.3): one minus the cosine between ``target_grad`` and the gradient of the
    poisons' cross-entropy at ``x + Δ`` (augmented by ``draws`` when given), over all parameter
    tensors at once. The poison gradient keeps its graph, so ``B`` is differentiable in ``Δ``
    (and composes with ``vmap``). The loss is the poisons' mean: the cosine ignores the scale."""
    return _cosine_loss(_poison_gradient(model, params, x, y, delta, buffers, draws), target_grad)


def _poison_gradient(
    model: nn.Module, params: Tree, x: Tensor, y: Tensor, delta: Tensor, buffers: Tree | None, draws: Tensor | None
) -> Tree:
    inputs = x + delta
    if draws is not None:
        inputs = augment(inputs, draws)
    return grad(_loss, argnums=1)(model, params, buffers or {}, inputs, y)


def _cosine_loss(g: Tree, target_grad: Tree) -> Tensor:
    dot = sum((g[k] * target_grad[k]).sum() for k in target_grad)
    norm = torch.sqrt(sum((g[k] ** 2).sum() for k in target_grad))
    target_norm = torch.sqrt(sum((t**2).sum() for t in target_grad.values()))
    return 1 - dot / (norm * target_norm).clamp_min(torch.finfo(dot.dtype).tiny)


def ensemble_target_gradient(
    model: nn.Module, params: Tree, x_target: Tensor, y_adversarial: Tensor, buffers: Tree | None = None
) -> Tree:
    """:func:`target_gradient` of each member of an ensemble: ``params``/``buffers`` stacked with a
    leading member axis (as :class:`Victims` holds them), the result stacked likewise."""
    buffers = buffers or {}
    return vmap(lambda p, b: target_gradient(model, p, x_target, y_adversarial, b))(params, buffers)


def ensemble_alignment_loss(
    model: nn.Module,
    params: Tree,
    target_grads: Tree,
    x: Tensor,
    y: Tensor,
    delta: Tensor,
    buffers: Tree | None = None,
    draws: Tensor | None = None,
) -> Tensor:
    """The ensemble's ``B``: :func:`alignment_loss` at each member (``params``, ``target_grads``
    and ``buffers`` stacked with a leading member axis), averaged over the members (one ``vmap``),
    the thesis code's ensemble objective; every member sees the same augmentation ``draws``."""
    buffers = buffers or {}

    def member(p: Tree, b: Tree, t: Tree) -> Tensor:
        return alignment_loss(model, p, t, x, y, delta, b, draws)

    return vmap(member)(params, buffers, target_grads).mean(0)


# -- the constraint set C ------------------------------------------------------------------------


def project(delta: Tensor, x: Tensor, eps: float | Tensor, box: Box = NO_BOX) -> Tensor:
    """The projection of Algorithm 6.1 line 9, as the thesis's code: clamp ``Δ`` to ``[−ε, ε]``,
    then to ``[lo − x, hi − x]`` (``x`` the clean poisons inside the box, so the result satisfies
    both up to one rounding of ``x + Δ``). ``ε``, ``lo`` and ``hi`` broadcast against one input
    (per channel in a normalised space)."""
    eps = torch.as_tensor(eps, dtype=delta.dtype, device=delta.device)
    lo, hi = (torch.as_tensor(b, dtype=delta.dtype, device=delta.device) for b in box)
    delta = torch.maximum(torch.minimum(delta, eps), -eps)
    return torch.maximum(torch.minimum(delta, hi - x), lo - x)


def apply_poison(x: Tensor, poisons: Tensor, delta: Tensor, box: Box | None = None) -> Tensor:
    """The poisoned training set: ``x`` with ``Δ`` added at rows ``poisons`` (every other row
    left bit for bit), clamped into ``box`` when given (the rounding of ``x + Δ`` at the box's
    edge, as storing an image would)."""
    poisoned = x.clone()
    rows = x[poisons] + delta.to(x)
    if box is not None:
        lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in box)
        rows = torch.maximum(torch.minimum(rows, hi), lo)
    poisoned[poisons] = rows
    return poisoned


def decay_milestones(steps: int) -> list[int]:
    """The steps after which the attack's step size drops ×0.1: 3/8, 5/8 and 7/8 of ``steps``
    (the code's ``M // 2.667``, ``M // 1.6``, ``M // 1.142``)."""
    return [int(steps // 2.667), int(steps // 1.6), int(steps // 1.142)]


@dataclass
class Brew:
    """A brew's result: ``delta`` ``(P, ...)`` the kept restart ``best``; ``deltas`` ``(R, P, ...)``
    every restart's; ``initial`` and ``final`` ``(R,)`` the alignment loss (without augmentation)
    at ``Δ_0`` and ``Δ_M``; ``history`` ``(M, R)`` the loss each step descended (augmented when
    augmentation is on)."""

    delta: Tensor
    deltas: Tensor
    initial: Tensor
    final: Tensor
    history: Tensor
    best: int


def _check_eps(eps: float | Tensor) -> float | Tensor:
    if isinstance(eps, Tensor):
        if not bool(torch.isfinite(eps).all()) or not bool((eps > 0).all()):
            raise ConfigError("eps", "the poison bound ε must be finite and > 0 everywhere")
        return eps
    return setting("eps", positive_float, eps)


def _chunks(count: int, size: int | None) -> list[slice]:
    # the code's poison loader: consecutive mini-batches in a fixed order, the last one smaller
    if size is None or size >= count:
        return [slice(None)]
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _exact_batches(
    model: nn.Module,
    params: Tree,
    buffers: Tree,
    target_grad: Tree,
    x_poison: Tensor,
    y_poison: Tensor,
    chunks: list[slice],
    ensemble: bool,
    vectorise: bool,
) -> tuple[Callable, Callable]:
    # the full B's (gradient, value) and value over the restarts, one poison batch's graph at a time
    count = len(x_poison)

    def share(rows: slice, delta: Tensor, draws: Tensor | None) -> Tree:
        # the batch's part of the poisons' mean gradient G (per member for an ensemble)
        def one(p: Tree, b: Tree) -> Tree:
            g = _poison_gradient(model, p, x_poison[rows], y_poison[rows], delta, b, draws)
            weight = len(x_poison[rows]) / count
            return {k: weight * v for k, v in g.items()}

        return vmap(one)(params, buffers) if ensemble else one(params, buffers)

    def cosine(g: Tree) -> Tensor:
        return vmap(_cosine_loss)(g, target_grad).mean(0) if ensemble else _cosine_loss(g, target_grad)

    def total(delta: Tensor, draws: Tensor | None) -> Tree:
        shares = [share(rows, delta[rows], None if draws is None else draws[rows]) for rows in chunks]
        return {k: sum(s[k] for s in shares) for k in shares[0]}

    def restart(delta: Tensor, draws: Tensor | None) -> tuple[Tensor, Tensor]:
        g = {k: v.detach() for k, v in total(delta, draws).items()}  # pass 1: no double backward
        slope, value = grad_and_value(cosine)(g)
        pieces = []
        for rows in chunks:  # pass 2: B's gradient reaches Δ_rows only through the batch's share

            def pairing(d: Tensor, rows: slice = rows) -> Tensor:
                part = share(rows, d, None if draws is None else draws[rows])
                return sum((part[k] * slope[k]).sum() for k in slope)

            pieces.append(grad(pairing)(delta[rows]))
        return torch.cat(pieces), value  # the chunks are consecutive, in order

    def restart_score(delta: Tensor) -> Tensor:
        return cosine(total(delta, None))

    if vectorise:
        with_draws, without = vmap(restart), vmap(restart, in_dims=(0, None))

        def step(deltas: Tensor, draws: Tensor | None) -> tuple[Tensor, Tensor]:
            return without(deltas, None) if draws is None else with_draws(deltas, draws)

        return step, vmap(restart_score)

    def looped(deltas: Tensor, draws: Tensor | None) -> tuple[Tensor, Tensor]:
        out = [restart(d, None if draws is None else draws[r]) for r, d in enumerate(deltas)]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    return looped, lambda deltas: torch.stack([restart_score(d) for d in deltas])


def brew(
    model: nn.Module,
    params: Tree | Victims,
    x_target: Tensor,
    y_adversarial: Tensor,
    x_poison: Tensor,
    y_poison: Tensor,
    eps: float | Tensor,
    restarts: int = 8,
    steps: int = 250,
    lr: float = 0.1,
    box: Box = NO_BOX,
    augmentation: Augmentation | None = None,
    buffers: Tree | None = None,
    seed: int = 0,
    vectorise: bool = True,
    callback: Callable[[int, Tensor], None] | None = None,
    poison_batch: int | None = None,
    exact_batches: bool = False,
) -> Brew:
    """Algorithm 6.1 at the clean model ``(model, params)``: poisons for the base points
    ``x_poison`` (labels ``y_poison``, kept) so that their gradient aligns with the target's
    adversarial gradient.

    Each of ``restarts`` starts at ``clamp(ε·N(0, I), −ε, ε)`` (the code's ``randn`` init),
    projected; each of ``steps`` takes ``∂B/∂Δ`` (through ``augmentation``, drawn anew per step
    and poison), one Adam step of size ``lr`` on its sign (``lr`` absolute, the code's τ = 0.1 in
    normalised units; the toy uses 0.4ε), with the ×0.1 decays of :func:`decay_milestones`, and
    projects (:func:`project`). ``callback(j, Δ)`` sees every restart's ``(R, P, ...)`` ``Δ`` after
    the initial projection (``j = 0``) and after step ``j``. With ``vectorise`` the restarts are one
    ``vmap``; otherwise a loop over them (same numbers up to rounding). Draws come from ``seed``.

    An ensemble (thesis §6.3.3): ``params`` a :class:`Victims` (``model`` its ``net``, ``buffers``
    unused) makes ``B`` the members' mean (:func:`ensemble_alignment_loss`, one ``vmap``). ``lr``
    is not rescaled: the thesis code's signed-Adam step is ``τ·(pbatch/512)/ensemble``; pass that
    to follow it.

    ``poison_batch`` (the code's ``--pbatch``): the poisons in consecutive mini-batches of that
    size; each batch's gradient is that of its own ``B`` (the cosine with the sum over the batch,
    as the code computes it: not the full ``B``'s gradient unless one batch holds every poison),
    the batches' gradients fill ``∂/∂Δ`` and one signed step follows. The autograd graph then holds
    one batch at a time. ``initial``, ``final`` and ``history`` are the mean over the batches of
    their ``B`` (the code's score; the full ``B`` with one batch). With ``exact_batches`` the batches
    give the full ``B``'s gradient instead, in two passes: the poisons' gradient sum ``G`` batch by
    batch (first order), then per batch the double backward of ``⟨∂B/∂G, G_batch⟩`` (``B``
    depends on a batch's ``Δ`` only through its share of ``G``); scores are then the full ``B``.
    """
    eps = _check_eps(eps)
    restarts = setting("restarts", positive_int, restarts)
    steps = setting("steps", positive_int, steps)
    lr = setting("lr", positive_float, lr)
    if poison_batch is not None:
        poison_batch = setting("poison_batch", positive_int, poison_batch)
    if augmentation is not None and x_poison.dim() != 4:
        raise ConfigError("augmentation", f"augmentation needs images (P, C, H, W), got shape {tuple(x_poison.shape)}")
    ensemble = isinstance(params, Victims)
    if ensemble:
        if buffers:
            raise ConfigError("buffers", "an ensemble (Victims) carries its own buffers: pass buffers=None")
        model, params, buffers = params.net, params.params, params.buffers
    buffers = buffers or {}
    g = torch.Generator().manual_seed(seed)
    dtype, device = x_poison.dtype, x_poison.device
    chunks = _chunks(len(x_poison), poison_batch)
    training = model.training
    model.eval()  # the clean model is fixed: batch norm uses its running statistics, no dropout
    try:
        if ensemble:
            target_grad = ensemble_target_gradient(model, params, x_target, y_adversarial, buffers)
            objective = ensemble_alignment_loss
        else:
            target_grad = target_gradient(model, params, x_target, y_adversarial, buffers)
            objective = alignment_loss

        def batched_for(rows: slice) -> tuple[Callable, Callable]:
            # the restarts' (gradient, value) and value of the poisons ``rows``' own B
            x_rows, y_rows = x_poison[rows], y_poison[rows]

            def loss(delta: Tensor, draws: Tensor | None) -> Tensor:
                return objective(model, params, target_grad, x_rows, y_rows, delta, buffers, draws)

            value_and_grad = grad_and_value(loss)
            if vectorise:
                with_draws, without = vmap(value_and_grad), vmap(value_and_grad, in_dims=(0, None))

                def batched(deltas: Tensor, draws: Tensor | None) -> tuple[Tensor, Tensor]:
                    return without(deltas, None) if draws is None else with_draws(deltas, draws)

                return batched, vmap(loss, in_dims=(0, None))

            def looped(deltas: Tensor, draws: Tensor | None) -> tuple[Tensor, Tensor]:
                out = [value_and_grad(d, None if draws is None else draws[r]) for r, d in enumerate(deltas)]
                return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

            def looped_loss(deltas: Tensor, draws: None) -> Tensor:
                return torch.stack([loss(d, None) for d in deltas])

            return looped, looped_loss

        parts = [(rows, *batched_for(rows)) for rows in chunks]
        exact = exact_batches and len(parts) > 1
        if exact:
            exact_step, exact_score = _exact_batches(
                model, params, buffers, target_grad, x_poison, y_poison, chunks, ensemble, vectorise
            )

        def step_gradient(deltas: Tensor, draws: Tensor | None) -> tuple[Tensor, Tensor]:
            if exact:
                return exact_step(deltas, draws)
            if len(parts) == 1:
                return parts[0][1](deltas, draws)
            gradient, values = torch.empty_like(deltas), []
            for rows, batched, _ in parts:  # sequential: one batch's graph alive at a time
                grad_rows, value = batched(deltas[:, rows], None if draws is None else draws[:, rows])
                gradient[:, rows] = grad_rows
                values.append(value)
            return gradient, torch.stack(values).mean(0)

        def score(deltas: Tensor) -> Tensor:
            if exact:
                return exact_score(deltas)
            values = [batched_loss(deltas[:, rows], None) for rows, _, batched_loss in parts]
            return values[0] if len(values) == 1 else torch.stack(values).mean(0)

        shape = (restarts, *x_poison.shape)
        init = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        eps_t = torch.as_tensor(eps, dtype=dtype, device=device)
        delta = project(init * eps_t, x_poison, eps, box).requires_grad_()
        optimiser = torch.optim.Adam([delta], lr=lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, decay_milestones(steps), gamma=0.1)
        with torch.no_grad():
            initial = score(delta.detach())
        if callback is not None:
            callback(0, delta.detach())
        history = []
        for step in range(1, steps + 1):
            draws = None
            if augmentation is not None:
                draws = augmentation.draw((restarts, len(x_poison)), g, dtype).to(device)
            gradient, value = step_gradient(delta.detach(), draws)
            delta.grad = gradient.sign()  # signed Adam: Adam's moments of the gradient's sign
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(project(delta, x_poison, eps, box))
            history.append(value.detach())
            if callback is not None:
                callback(step, delta.detach())
        with torch.no_grad():
            final = score(delta.detach())
    finally:
        model.train(training)
    best = int(final.argmin())
    deltas = delta.detach()
    return Brew(deltas[best].clone(), deltas, initial.detach(), final.detach(), torch.stack(history), best)


# -- victims: training from scratch (App. 6.B.2) ------------------------------------------------


@dataclass
class Victims:
    """``V`` trained models sharing one architecture: ``net`` a parameter-less template (on the
    meta device), ``params``/``buffers`` stacked with a leading victim axis."""

    net: nn.Module
    params: Tree
    buffers: Tree

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def member(self, i: int) -> tuple[Tree, Tree]:
        """Victim ``i``'s ``(params, buffers)``."""
        return {k: v[i] for k, v in self.params.items()}, {k: v[i] for k, v in self.buffers.items()}

    def logits(self, x: Tensor) -> Tensor:
        """``(V, n, classes)``: every victim's scores of ``x`` (evaluation mode)."""
        training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return vmap(lambda p, b: functional_call(self.net, (p, b), (x,)))(self.params, self.buffers)
        finally:
            self.net.train(training)

    def predict(self, x: Tensor) -> Tensor:
        """``(V, n)``: every victim's predicted classes."""
        return self.logits(x).argmax(-1)


def _fresh(model_factory: Callable[[], nn.Module], seed: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    # the initialisation is drawn from the victim's own seed, whatever the global RNG holds
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_factory().to(dtype=dtype, device=device)


def _epoch_plan(
    g: torch.Generator, n: int, batch_size: int, augmentation: Augmentation | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    order = torch.randperm(n, generator=g)
    draws = None if augmentation is None else augmentation.draw((n,), g, dtype)
    return order, draws


def train_victims(
    model_factory: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    seeds: Sequence[int],
    epochs: int = 15,
    lr: float = 0.05,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: Sequence[int] = (),
    augmentation: Augmentation | None = None,
    vectorise: bool | None = None,
) -> Victims:
    """One victim per seed, each trained from scratch on ``(x, y)``: its initialisation
    (``model_factory()`` under ``torch.manual_seed(seed)``, cast to ``x``'s dtype) and its data
    order (a fresh permutation per epoch, and augmentation draws when given, from a generator
    seeded by ``seed``) are its own. SGD with Nesterov momentum, weight decay on every parameter
    (PyTorch's ``SGD(nesterov=True)``), mean cross-entropy on minibatches of ``batch_size`` (the
    last one smaller), the step size ×0.1 after each epoch in ``milestones``.

    Defaults are the thesis toy's (15 epochs, lr 0.05, batch 64, momentum 0.9, wd 5e-4); the
    thesis's victim protocol is 40 epochs, batch 128, lr 0.1 (ResNets) or 0.01, milestones
    (14, 24, 35) and augmentation ``Augmentation(4, True, integer=True)``.

    With ``vectorise`` the victims train as one ``vmap`` over ``stack_module_state`` (models
    without running statistics updated in training, e.g. no batch norm); otherwise a loop over
    the victims with ``torch.optim.SGD`` (any module). Both give the same victims up to rounding.
    ``None`` chooses: the loop for models with batch norm, the ``vmap`` otherwise.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds", "train at least one victim: seeds is empty")
    epochs = setting("epochs", positive_int, epochs)
    batch_size = setting("batch_size", positive_int, batch_size)
    lr = setting("lr", positive_float, lr)
    momentum = setting("momentum", lambda k, v: positive_float(k, v, allow_zero=True), momentum)
    weight_decay = setting("weight_decay", lambda k, v: positive_float(k, v, allow_zero=True), weight_decay)
    if augmentation is not None and x.dim() != 4:
        raise ConfigError("augmentation", f"augmentation needs images (n, C, H, W), got shape {tuple(x.shape)}")
    models = [_fresh(model_factory, s, x.dtype, x.device) for s in seeds]
    if vectorise is None:
        vectorise = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
    generators = [torch.Generator().manual_seed(s * 1_000_003 + 17) for s in seeds]
    n, drops = len(x), set(int(m) for m in milestones)
    starts = range(0, n, batch_size)

    if not vectorise:
        for model, g in zip(models, generators, strict=True):
            model.train()
            opt = torch.optim.SGD(
                model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
            )
            schedule = torch.optim.lr_scheduler.MultiStepLR(opt, sorted(drops), gamma=0.1)
            for _ in range(epochs):
                order, draws = _epoch_plan(g, n, batch_size, augmentation, x.dtype)
                for start in starts:
                    rows = order[start : start + batch_size].to(x.device)
                    xb = x[rows] if draws is None else augment(x[rows], draws[start : start + batch_size].to(x))
                    opt.zero_grad()
                    F.cross_entropy(model(xb), y[rows]).backward()
                    opt.step()
                schedule.step()
        params, buffers = stack_module_state(models)
        params = {k: v.detach() for k, v in params.items()}
    else:
        params, buffers = stack_module_state(models)
        params = {k: v.detach() for k, v in params.items()}
        template = copy.deepcopy(models[0]).to("meta")
        template.train()
        step_grad = vmap(grad(lambda p, b, xb, yb: _loss(template, p, b, xb, yb)))
        buf = {k: torch.zeros_like(v) for k, v in params.items()}
        rate = lr
        for epoch in range(epochs):
            plans = [_epoch_plan(g, n, batch_size, augmentation, x.dtype) for g in generators]
            orders = torch.stack([p[0] for p in plans]).to(x.device)
            for j, start in enumerate(starts):
                rows = orders[:, start : start + batch_size]
                xb = x[rows]
                if augmentation is not None:
                    draws = torch.stack([p[1][start : start + batch_size] for p in plans]).to(x)
                    xb = vmap(augment)(xb, draws)
                grads = step_grad(params, buffers, xb, y[rows])
                first = epoch == 0 and j == 0
                for k, p in params.items():  # torch.optim.SGD's update, on every victim at once
                    d = grads[k] + weight_decay * p
                    if momentum > 0:
                        buf[k] = d.clone() if first else momentum * buf[k] + d
                        d = d + momentum * buf[k]
                    params[k] = p - rate * d
            if epoch + 1 in drops:
                rate *= 0.1
    template = copy.deepcopy(models[0]).to("meta")
    return Victims(template, params, {k: v.detach() for k, v in buffers.items()})


# -- success (thesis §6.5) ---------------------------------------------------------------------


def flips(victims: Victims, x_target: Tensor, adversarial: int | Tensor) -> Tensor:
    """``(V,)`` booleans: whether each victim classifies the target ``x_target`` (one input, no
    batch axis) as the adversarial class (mere misclassification does not count)."""
    return victims.predict(x_target[None])[:, 0] == torch.as_tensor(adversarial, device=x_target.device)


def success_rate(hits: Tensor) -> tuple[float, float]:
    """``(mean, standard error)`` of poison success from ``hits`` ``(cases, victims)``: each
    case's rate over its victims, then the mean over cases and its standard error
    ``std/√cases`` (0 for one case), as the thesis reports (§6.5)."""
    hits = torch.as_tensor(hits)
    if hits.dim() == 1:
        hits = hits[None]
    rates = hits.to(torch.float64).mean(1)
    se = float(rates.std(unbiased=True) / math.sqrt(len(rates))) if len(rates) > 1 else 0.0
    return float(rates.mean()), se


# -- one case of the protocol ------------------------------------------------------------------


@dataclass
class CaseResult:
    """One poison-target case: the ``case``, the ``brew``, and per victim seed whether the
    target flipped to the adversarial class with the poisons (``poisoned``) and without
    (``clean``, the control; empty when not trained); ``accuracy`` ``(V,)`` the poisoned
    victims' test accuracy (the poisons must not show in it)."""

    case: Case
    brew: Brew
    poisoned: Tensor
    clean: Tensor
    accuracy: Tensor


def attack_case(
    model_factory: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    eps: float | Tensor,
    budget: float = 0.01,
    case: Case | None = None,
    seed: int = 0,
    model_seed: int | None = None,
    victim_seeds: Sequence[int] = tuple(range(8)),
    restarts: int = 8,
    steps: int = 250,
    lr: float = 0.1,
    box: Box = NO_BOX,
    augmentation: Augmentation | None = None,
    victim_augmentation: Augmentation | None = None,
    clean_control: bool = True,
    training: dict | None = None,
    ensemble: int = 1,
    poison_batch: int | None = None,
    exact_batches: bool = False,
) -> CaseResult:
    """The thesis's protocol for one case: train the clean model (``model_seed``, default
    ``10_000 + seed``, apart from the victims' seeds: the attacker knows the architecture, not the
    initialisation), choose the case from ``seed`` (:func:`~bilevel_dist.recipes.security.data.choose_case`,
    unless given), brew (:func:`brew`), train a victim per seed on the poisoned set and, with
    ``clean_control``, on the clean set. ``training`` holds :func:`train_victims` settings shared
    by the clean model and the victims. The settings are checked before any training.

    ``ensemble`` > 1 brews on that many clean models (seeds ``model_seed + 1_000_003·k``, trained
    together; member 0 is the single model's, and its test predictions choose the case); ``lr`` is
    passed as given. ``augmentation`` (the brew's, differentiable) and ``victim_augmentation``
    (the clean model's and the victims') need images ``(n, C, H, W)``. ``poison_batch`` and
    ``exact_batches``: the brew's poison mini-batches."""
    eps = _check_eps(eps)
    setting("restarts", positive_int, restarts)
    setting("steps", positive_int, steps)
    setting("lr", positive_float, lr)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise ConfigError("budget", f"the poison budget is a fraction of the training set in (0, 1], got {budget}")
    if case is not None and not 0 <= case.target < len(y_test):
        raise ConfigError(
            "target", f"the target index must lie in [0, {len(y_test)}) (the test set), got {case.target}"
        )
    ensemble = setting("ensemble", positive_int, ensemble)
    if poison_batch is not None:
        setting("poison_batch", positive_int, poison_batch)
    for key, value in (("augmentation", augmentation), ("victim_augmentation", victim_augmentation)):
        if value is not None and x.dim() != 4:
            raise ConfigError(key, f"augmentation needs images (n, C, H, W), got shape {tuple(x.shape)}")
    training = dict(training or {})
    seed_model = 10_000 + seed if model_seed is None else model_seed
    seeds = [seed_model + 1_000_003 * k for k in range(ensemble)]
    clean_model = train_victims(model_factory, x, y, seeds, augmentation=victim_augmentation, **training)
    if case is None:
        case = choose_case(y, y_test, clean_model.predict(x_test)[0], budget=budget, seed=seed)
    # one model: its parameters as they are (today's path, bit for bit); more: the stacked ensemble
    params, buffers = clean_model.member(0) if ensemble == 1 else (clean_model, None)
    result = brew(
        clean_model.net,
        params,
        x_test[case.target][None],
        torch.tensor([case.adversarial], device=x.device),
        x[case.poisons],
        y[case.poisons],
        eps=eps,
        restarts=restarts,
        steps=steps,
        lr=lr,
        box=box,
        augmentation=augmentation,
        buffers=buffers,
        seed=seed,
        poison_batch=poison_batch,
        exact_batches=exact_batches,
    )
    unbounded = all(isinstance(b, float) and math.isinf(b) for b in box)
    poisoned_set = apply_poison(x, case.poisons, result.delta, None if unbounded else box)
    victims = train_victims(model_factory, poisoned_set, y, victim_seeds, augmentation=victim_augmentation, **training)
    hits = flips(victims, x_test[case.target], case.adversarial)
    accuracy = (victims.predict(x_test) == y_test).to(torch.float64).mean(1)
    control = torch.zeros(0, dtype=torch.bool)
    if clean_control:
        clean = train_victims(model_factory, x, y, victim_seeds, augmentation=victim_augmentation, **training)
        control = flips(clean, x_test[case.target], case.adversarial)
    return CaseResult(case, result, hits, control, accuracy)
