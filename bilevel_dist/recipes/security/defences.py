"""Defences against clean-label poisoning, as baselines for the audits (issue 18, Deliver 6).

- :func:`outlier_filter`: the thesis's outlier defence (ch. 6 §6.5 "Defenses", Table 6.6): per
  class, drop the ``fraction`` of training points farthest from their class's mean in the
  penultimate-layer features of a model trained on the (poisoned) data, then retrain the victim
  on what is left; compared with removing the same number of points per class at random.
- :func:`learn_weights`: the data-denoising recipe's bilevel weighting run on the poisoned set —
  outer: one logit per training sample, weight ``σ(a_i)``; inner: the classifier trained on the
  weighted training loss; upper: cross-entropy on a small clean validation split
  (:class:`~bilevel_dist.recipes.data_denoising.module.Denoising`'s losses, solved by a registered
  :mod:`bilevel_dist.algorithms` method). :func:`weight_auc` scores "low weight" as a detector of
  the poisons (ROC-AUC; 0.5 is chance).
- :func:`defend_case`: one Witches' Brew case (:func:`~.witches_brew.attack_case`) followed by
  both defences, with the figures of Table 6.6 (poisons and clean points removed, against random
  removal's expectation; poison success with and without the filter) and the weights' ROC-AUC.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel_dist._checks import ConfigError, is_number, positive_int, setting
from bilevel_dist.recipes.security.witches_brew import (
    NO_BOX,
    Box,
    CaseResult,
    Victims,
    apply_poison,
    attack_case,
    flips,
    train_victims,
)


def _check_fraction(fraction: Any) -> float:
    if not is_number(fraction) or not 0 <= fraction < 1:
        raise ConfigError("fraction", f"the fraction of each class to remove lies in [0, 1), got {fraction!r}")
    return float(fraction)


def _removals(labels: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """``(counts, drops)`` per class: its size and how many points the defence removes from it
    (``⌊fraction · size⌋``; the tiny slack keeps e.g. 0.3 · 10 at 3, not 2, after rounding)."""
    counts = torch.bincount(labels.long())
    drops = torch.floor(fraction * counts.to(torch.float64) + 1e-9).long()
    return counts, drops


def outlier_filter(features: Tensor, labels: Tensor, fraction: float) -> Tensor:
    """The kept mask ``(n,)``: per class, the ``⌊fraction · size⌋`` points farthest (Euclidean)
    from their class's mean of ``features`` ``(n, d)`` are dropped (ties: the later index goes
    first). Vectorised: class means by ``index_add``, ranks within a class from one stable sort by
    distance then one by label. Raises :class:`ConfigError` naming ``fraction`` outside [0, 1)."""
    fraction = _check_fraction(fraction)
    labels = labels.long().to(features.device)
    features = features.flatten(1).to(torch.float64)  # distances in float64: ranks must not flip by rounding
    counts, drops = _removals(labels, fraction)
    sums = torch.zeros(len(counts), features.shape[1], dtype=features.dtype, device=features.device)
    means = sums.index_add_(0, labels, features) / counts.clamp_min(1)[:, None].to(features)
    distance = (features - means[labels]).norm(dim=1)
    # farthest first; among equal distances the later index first (a reversed stable order)
    order = torch.sort(distance.flip(0), descending=True, stable=True).indices
    order = len(labels) - 1 - order
    order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, farthest first
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    kept = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    kept[order[rank < drops[labels[order]]]] = False
    return kept


def random_filter(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """The control of Table 6.6: the kept mask after removing as many points per class as
    :func:`outlier_filter` does, chosen uniformly at random (from ``seed``)."""
    fraction = _check_fraction(fraction)
    labels = labels.long()
    counts, drops = _removals(labels, fraction)
    noise = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # a random rank within each class: the same grouping trick as outlier_filter, on random keys
    order = torch.sort(noise).indices
    order = order[torch.sort(labels[order], stable=True).indices]
    rank = torch.arange(len(labels)) - (torch.cumsum(counts, 0) - counts)[labels[order]]
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[order[rank < drops[labels[order]]]] = False
    return kept.to(labels.device)


def expected_random_removals(labels: Tensor, poisons: Tensor, fraction: float) -> tuple[float, float]:
    """``(poisons, clean points)`` that random removal of ``⌊fraction · size⌋`` points per class
    removes in expectation: each class's drops times its share of poisons (and of clean points)."""
    fraction = _check_fraction(fraction)
    labels = labels.long().cpu()
    counts, drops = _removals(labels, fraction)
    per_class = torch.bincount(labels[poisons.cpu()], minlength=len(counts)).to(torch.float64)
    share = per_class / counts.clamp_min(1)
    expected_poisons = float((drops * share).sum())
    return expected_poisons, float(drops.sum()) - expected_poisons


def penultimate(victims: Victims, x: Tensor, member: int = 0, batch_size: int = 4096) -> Tensor:
    """``(n, d)``: the input of the last parametrised layer of victim ``member`` on ``x`` (its
    penultimate-layer features, the thesis's feature space), in evaluation mode."""
    net = victims.net
    last = [m for m in net.modules() if next(m.parameters(recurse=False), None) is not None][-1]
    params, buffers = victims.member(member)
    captured: list[Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for part in x.split(batch_size):
                functional_call(net, (params, buffers), (part,))
    finally:
        handle.remove()
        net.train(training)
    return torch.cat(captured).flatten(1)


# -- learned importance weights (the denoising recipe on the poisoned set) -------------------------


@dataclass
class Weights:
    """Learned importance weights ``σ(a_i)`` ``(n,)`` of the training set, the algorithm's last
    metrics, and the clean-validation loss before and after."""

    weights: Tensor
    metrics: dict[str, Any]
    val_loss: tuple[float, float]


def learn_weights(
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    model: str = "linear",
    classes: int = 10,
    algorithm: dict[str, Any] | None = None,
    steps: int = 300,
    reg: float = 1e-3,
    model_seed: int = 0,
) -> Weights:
    """Per-sample importance weights of ``(x, y)`` learnt bilevelly against the clean split
    ``(x_val, y_val)``: the :class:`~bilevel_dist.recipes.data_denoising.module.Denoising`
    module's variables and losses (``model`` one of its classifiers, ``reg`` its ``‖θ‖²``), as a
    :class:`~bilevel_dist.problem.BilevelProblem`, ``steps`` steps of ``algorithm`` (default the
    recipe's: Penalty, T = 5, inner lr 0.5, outer lr 100) on full batches, without Lightning."""
    from bilevel_dist import algorithms
    from bilevel_dist.problem import BilevelProblem
    from bilevel_dist.recipes.data_denoising.module import Denoising

    steps = setting("steps", positive_int, steps)
    spec = dict(algorithm or {"name": "penalty", "inner_steps": 5, "inner_lr": 0.5, "outer_lr": 100.0})
    name = spec.pop("name")
    recipe = Denoising(
        model=model, n_train=len(y), input_shape=tuple(x.shape[1:]), classes=classes, reg=reg, model_seed=model_seed
    )
    outer, inner = recipe.configure_variables()
    outer = {k: v.to(x) for k, v in outer.items()}
    inner = {k: v.to(x) for k, v in inner.items()}
    problem = BilevelProblem(recipe.inner_loss, recipe.outer_loss)
    solver = algorithms.get(name, problem=problem, **spec)
    train = {"x": x, "y": y, "index": torch.arange(len(y), device=x.device)}
    val = {"x": x_val, "y": y_val}
    with torch.no_grad():
        before = float(recipe.outer_loss(inner, outer, val))
    state, metrics = solver.init(outer, inner), {}
    for _ in range(steps):
        state, metrics = solver.step(state, train, val)
    with torch.no_grad():
        after = float(recipe.outer_loss(state["inner"], state["outer"], val))
    return Weights(torch.sigmoid(state["outer"]["logit"]).detach(), dict(metrics), (before, after))


def weight_auc(weights: Tensor, poisons: Tensor) -> float:
    """ROC-AUC of "low weight" as a detector of the rows ``poisons``: 1 when every poison weighs
    less than every clean point, 0.5 chance, below 0.5 when the poisons weigh more."""
    from sklearn.metrics import roc_auc_score

    truth = torch.zeros(len(weights), dtype=torch.bool)
    truth[poisons.cpu()] = True
    return float(roc_auc_score(truth.numpy(), (-weights.detach().cpu().to(torch.float64)).numpy()))


# -- the defended protocol -------------------------------------------------------------------------


@dataclass
class DefendedCase:
    """One case with the defences: the undefended ``attack`` (its poisoned and clean-control
    hits); per defence the number of poisons and clean points removed (``outlier_removed``,
    ``random_removed``: ``(poisons, clean)``), random removal's expectation
    (``expected_removed``), and the hits of victims retrained on the filtered sets
    (``outlier_hits``, ``random_hits``) and their test accuracy; the learned ``weights`` and their
    ROC-AUC as a poison detector (``weight_auc``; ``nan`` when not learnt)."""

    attack: CaseResult
    fraction: float
    outlier_removed: tuple[int, int]
    random_removed: tuple[int, int]
    expected_removed: tuple[float, float]
    outlier_hits: Tensor
    random_hits: Tensor
    outlier_accuracy: Tensor
    weights: Weights | None
    weight_auc: float


def _removed(kept: Tensor, poisons: Tensor) -> tuple[int, int]:
    is_poison = torch.zeros(len(kept), dtype=torch.bool, device=kept.device)
    is_poison[poisons.to(kept.device)] = True
    return int((~kept & is_poison).sum()), int((~kept & ~is_poison).sum())


def defend_case(
    model_factory: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    eps: float | Tensor,
    fraction: float = 0.1,
    seed: int = 0,
    defender_seed: int | None = None,
    victim_seeds: Sequence[int] = tuple(range(8)),
    box: Box = NO_BOX,
    training: dict | None = None,
    validation: int = 200,
    weighting: dict[str, Any] | None = None,
    **attack: Any,
) -> DefendedCase:
    """Brew one case (:func:`~.witches_brew.attack_case`, ``attack`` its further settings), then:

    (a) the outlier defence: a model trained on the poisoned set (``defender_seed``, default
    ``20_000 + seed``: neither the attacker's nor a victim's initialisation) gives penultimate
    features, :func:`outlier_filter` drops ``fraction`` of each class, victims (the same seeds)
    are retrained on the kept points; the same for :func:`random_filter`, the control;

    (b) with ``weighting`` (``None`` skips it; ``{}`` the defaults): :func:`learn_weights` on the
    poisoned set against a clean validation split of ``validation`` test points (the first ones,
    the target excluded; the defender holds clean data the attacker did not see), and the
    ROC-AUC of low weight as a poison detector (:func:`weight_auc`).
    """
    fraction = _check_fraction(fraction)
    if isinstance(validation, bool) or not isinstance(validation, int) or not 0 < validation < len(y_test):
        raise ConfigError("validation", f"validation takes (0, {len(y_test)}) test points, got {validation!r}")
    training = dict(training or {})
    result = attack_case(
        model_factory,
        x,
        y,
        x_test,
        y_test,
        eps,
        seed=seed,
        victim_seeds=victim_seeds,
        box=box,
        training=training,
        **attack,
    )
    case = result.case
    unbounded = all(isinstance(b, float) and math.isinf(b) for b in box)
    poisoned = apply_poison(x, case.poisons, result.brew.delta, None if unbounded else box)

    defender = train_victims(
        model_factory, poisoned, y, [20_000 + seed if defender_seed is None else defender_seed], **training
    )
    kept = outlier_filter(penultimate(defender, poisoned), y, fraction)
    control = random_filter(y, fraction, seed=seed)
    hits, accuracy = {}, None
    for name, mask in (("outlier", kept), ("random", control)):
        victims = train_victims(model_factory, poisoned[mask], y[mask], victim_seeds, **training)
        hits[name] = flips(victims, x_test[case.target], case.adversarial)
        if name == "outlier":
            accuracy = (victims.predict(x_test) == y_test).to(torch.float64).mean(1)

    weights, auc = None, math.nan
    if weighting is not None:
        rows = torch.arange(len(y_test), device=y_test.device)
        rows = rows[rows != case.target][:validation]
        weights = learn_weights(poisoned, y, x_test[rows], y_test[rows], **weighting)
        auc = weight_auc(weights.weights, case.poisons)
    return DefendedCase(
        attack=result,
        fraction=fraction,
        outlier_removed=_removed(kept, case.poisons),
        random_removed=_removed(control, case.poisons),
        expected_removed=expected_random_removals(y, case.poisons, fraction),
        outlier_hits=hits["outlier"],
        random_hits=hits["random"],
        outlier_accuracy=accuracy,  # type: ignore[arg-type]
        weights=weights,
        weight_auc=auc,
    )
