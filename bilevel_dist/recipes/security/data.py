"""Data of the security audits: the training set the attacker poisons, the test set its target
comes from, and the choice of a poison-target case.

Built in (no download, deterministic from a seed):

- ``blobs``: the thesis's CPU mechanism toy (ch. 6, reference §4.5): 10 classes in 64-D, class
  means ``0.3·N(0, I)``, noise ``N(0, I)``, 2000 training points (200 per class), no box;
- ``digits``: scikit-learn's bundled 8×8 digits on [0, 1], as images ``(n, 1, 8, 8)`` or flat.

From a local directory (the denoising recipe's readers, standard formats): ``mnist`` and
``cifar10``, images on [0, 1].

A case (thesis §6.3.1, Algorithm 6.1 line 3) is a target test point of class ``t`` that the
clean model classifies correctly, an adversarial class ``y_adv ≠ t``, and ``P = budget·N``
training points of class ``y_adv`` (clean-label: the poisons keep their labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError, is_number

DATASETS = ("blobs", "digits", "mnist", "cifar10")
Split = tuple[Tensor, Tensor, Tensor, Tensor]


def blobs(
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 1000,
    dim: int = 64,
    classes: int = 10,
    spread: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Gaussian blobs ``(x, y, x_test, y_test)``: class means ``spread·N(0, I)`` in ``dim``
    dimensions, each point its class mean plus ``N(0, I)``; balanced labels in shuffled order.
    Drawn in float64 from ``seed`` and then cast, so the points do not depend on ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(classes, dim, generator=g, dtype=torch.float64)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
        return (means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)).to(dtype), y

    x, y = draw(n_train)
    x_test, y_test = draw(n_test)
    return x, y, x_test, y_test


def digits(seed: int = 0, n_test: int = 297, images: bool = True, dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's 1,797 digits on [0, 1] (pixel/16), shuffled by ``seed``, the first
    ``n_test`` the test set: ``(n, 1, 8, 8)`` images, or ``(n, 64)`` with ``images=False``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if not isinstance(n_test, int) or not 0 < n_test < len(bunch.target):
        raise ConfigError("n_test", f"n_test must be > 0 and leave training digits of the 1797, got {n_test}")
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(seed))
    x = (torch.as_tensor(bunch.images, dtype=torch.float64)[:, None] / 16.0).to(dtype)[order]
    x = x if images else x.flatten(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)[order]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def load(dataset: str, root: str | None = None, seed: int = 0) -> tuple[Split, tuple[float, float]]:
    """``(x, y, x_test, y_test)`` of a named dataset and its box ``(lo, hi)`` (the range a
    poisoned input must stay in): ``blobs`` has none (±inf), images lie on [0, 1]."""
    if dataset == "blobs":
        return blobs(seed), (-math.inf, math.inf)
    if dataset == "digits":
        return digits(seed), (0.0, 1.0)
    if dataset in ("mnist", "cifar10"):
        if root is None:
            raise ConfigError("root", f"dataset {dataset!r} needs root, its local directory")
        # imported here: the denoising module pulls in Lightning, the built-in data does not need it
        from bilevel_dist.recipes.data_denoising.data import read_cifar10, read_mnist

        return (read_mnist if dataset == "mnist" else read_cifar10)(root), (0.0, 1.0)
    raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")


BACKDOOR_DATASETS = ("digits", "mnist")


def backdoor_images(dataset: str, root: str | None = None) -> tuple[Tensor, Tensor] | None:
    """The backdoor's images ``(x, x_test)``, ``(n, 1, side, side)`` on [0, 1] (labels dropped):
    ``mnist`` from ``root`` through :func:`load` (the denoising recipe's reader; ``root``
    missing or not an MNIST directory raises :class:`ConfigError` naming ``root``), or ``None``
    for ``digits``, whose split the backdoor draws per seed."""
    if dataset not in BACKDOOR_DATASETS:
        raise ConfigError("dataset", f"unknown dataset {dataset!r}; choose one of {list(BACKDOOR_DATASETS)}")
    if dataset == "digits":
        return None
    (x, _, x_test, _), _ = load(dataset, root)
    return x, x_test


@dataclass(frozen=True)
class Case:
    """One poison-target case: test point ``target`` of class ``label``, to be classified as
    ``adversarial``; ``poisons`` the sorted training indices (all of class ``adversarial``)."""

    target: int
    label: int
    adversarial: int
    poisons: Tensor


def choose_case(
    y: Tensor,
    y_test: Tensor,
    predicted: Tensor | None = None,
    budget: float = 0.01,
    seed: int = 0,
    target: int | None = None,
    adversarial: int | None = None,
    classes: int | None = None,
) -> Case:
    """A case drawn from ``seed``: the target (unless given) uniformly among the test points the
    clean model classifies correctly (``predicted`` its test predictions; all when ``None``), the
    adversarial class (unless given) uniformly among the other classes, and
    ``P = round(budget·N)`` (at least 1) poisons uniformly among the training points of that class.

    Raises :class:`ConfigError` naming ``budget`` (not in (0, 1], or more poisons than the class
    holds), ``target`` (outside the test set) or ``adversarial`` (not a class, or the target's).
    """
    classes = int(max(int(y.max()), int(y_test.max())) + 1) if classes is None else classes
    if not is_number(budget) or not 0 < budget <= 1:
        raise ConfigError("budget", f"the poison budget is a fraction of the training set in (0, 1], got {budget}")
    g = torch.Generator().manual_seed(seed)
    n_test = len(y_test)
    if target is None:
        correct = torch.ones(n_test, dtype=torch.bool) if predicted is None else predicted.cpu() == y_test.cpu()
        candidates = correct.nonzero().flatten()
        if len(candidates) == 0:
            raise ConfigError("target", "the clean model classifies no test point correctly: no target to attack")
        target = int(candidates[torch.randint(len(candidates), (), generator=g)])
    elif isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_test:
        raise ConfigError("target", f"the target index must lie in [0, {n_test}) (the test set), got {target!r}")
    label = int(y_test[target])
    if adversarial is None:
        others = torch.tensor([c for c in range(classes) if c != label])
        adversarial = int(others[torch.randint(len(others), (), generator=g)])
    elif isinstance(adversarial, bool) or not isinstance(adversarial, int) or not 0 <= adversarial < classes:
        raise ConfigError("adversarial", f"the adversarial class must lie in [0, {classes}), got {adversarial!r}")
    if adversarial == label:
        raise ConfigError("adversarial", f"the adversarial class {adversarial} is the target's own class")
    pool = (y.cpu() == adversarial).nonzero().flatten()
    count = max(1, round(budget * len(y)))
    if count > len(pool):
        raise ConfigError(
            "budget", f"budget {budget} asks for {count} poisons but class {adversarial} has {len(pool)} points"
        )
    poisons = pool[torch.randperm(len(pool), generator=g)[:count]].sort().values
    return Case(target=target, label=label, adversarial=adversarial, poisons=poisons)
