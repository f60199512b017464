"""Episodes: N-way K-shot classification tasks drawn from a pool of classes, and sinusoid
regression tasks (Finn et al. 2017, §5.1).

A task depends only on ``(seed, split, step, slot)``: its generator is seeded from those four
numbers, so a resumed or multi-process run draws exactly the tasks of an uninterrupted
single-process one, whichever rank draws them. Draws are float32 whatever the default dtype
(which changes what ``torch.rand`` draws), and so are the tasks' tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError

SPLITS = ("train", "val", "test")
_MIX = 1_000_003  # a prime: the four numbers of a task mix into one seed without collisions in practice


def task_generator(seed: int, split: str, step: int, slot: int) -> torch.Generator:
    """The generator of one task: a function of ``(seed, split, step, slot)`` only."""
    value = seed
    for part in (SPLITS.index(split), step, slot):
        value = (value * _MIX + part) % (2**62)
    return torch.Generator().manual_seed(value)


@dataclass
class ClassPool:
    """Samples grouped by class: ``images[c, i]`` is sample ``i`` of class ``c`` (every class has
    as many samples); ``names[c]`` says where class ``c`` comes from."""

    images: Tensor
    names: list[str]

    def __post_init__(self) -> None:
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"{len(self.names)} class names for {self.images.shape[0]} classes")

    @property
    def classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]


@dataclass
class Episode:
    """One task's support and query sets (labels ``0..N-1`` in the task's own class order) and
    the pool's class ids of its ``N`` classes."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor


def check_episode_shape(pool: ClassPool, split: str, ways: int, shots: int, queries: int) -> None:
    """Clear errors for tasks a split cannot supply."""
    if ways > pool.classes:
        raise ConfigError("ways", f"ways={ways} exceeds the {pool.classes} classes of the {split} split")
    if shots + queries > pool.per_class:
        raise ConfigError(
            "shots",
            f"shots={shots} plus queries={queries} exceeds the {pool.per_class} samples per class of the {split} split",
        )


def draw_episode(pool: ClassPool, ways: int, shots: int, queries: int, generator: torch.Generator) -> Episode:
    """``ways`` classes at random, then ``shots + queries`` distinct samples of each."""
    classes = torch.randperm(pool.classes, generator=generator)[:ways]
    picks = torch.rand(ways, pool.per_class, generator=generator, dtype=torch.float32).argsort(1)[:, : shots + queries]
    samples = pool.images[classes[:, None], picks]  # (ways, shots + queries, *shape)
    labels = torch.arange(ways)[:, None].expand(ways, shots + queries)
    shape = samples.shape[2:]
    support, query = samples[:, :shots], samples[:, shots:]
    return Episode(
        support.reshape(ways * shots, *shape),
        labels[:, :shots].reshape(-1),
        query.reshape(ways * queries, *shape),
        labels[:, shots:].reshape(-1),
        classes,
    )


@dataclass
class Sinusoid:
    """Regression tasks ``y = A sin(x − φ)``, ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``, ``x ~ U[−5, 5]``
    (MAML's paper). Splits differ only by their seeds: tasks are continuous, never repeated."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    inputs: tuple[float, float] = (-5.0, 5.0)

    def draw(self, shots: int, queries: int, generator: torch.Generator) -> Episode:
        """A task with ``shots`` support and ``queries`` query points."""
        amplitude, phase = (
            lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float32)
            for lo, hi in (self.amplitude, self.phase)
        )
        lo, hi = self.inputs
        x = lo + (hi - lo) * torch.rand(shots + queries, 1, generator=generator, dtype=torch.float32)
        y = amplitude * torch.sin(x - phase)
        return Episode(x[:shots], y[:shots], x[shots:], y[shots:], torch.stack([amplitude, phase]))


def rotated_digits(per_class: int = 170) -> dict[str, ClassPool]:
    """scikit-learn's 8×8 digits, each digit at 0/90/180/270° one class: 40 classes.

    Split rule (fixed): class ``(d, r)`` of digit ``d`` at rotation ``r·90°`` goes to meta-test
    when ``d ∈ {8, 9}``, to meta-val when ``d ∈ {6, 7}``, to meta-train otherwise; so meta-train
    has 24 classes, meta-val 8 and meta-test 8 (room for 5-way tasks), and no digit's rotations
    leak across splits. Each
    class keeps its first ``per_class`` samples (the rarest digit has 174), pixel values in
    ``[0, 1]``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    counts = torch.bincount(y)
    if per_class > int(counts.min()):
        rarest = int(counts.min())
        raise ConfigError("per_class", f"per_class={per_class} exceeds the {rarest} samples of the rarest digit")
    split_of = {d: "test" if d in (8, 9) else "val" if d in (6, 7) else "train" for d in range(10)}
    pools: dict[str, tuple[list[Tensor], list[str]]] = {s: ([], []) for s in SPLITS}
    for d in range(10):
        base = x[y == d][:per_class]
        for r in range(4):
            images, names = pools[split_of[d]]
            images.append(torch.rot90(base, r, dims=(1, 2)).unsqueeze(1))  # (per_class, 1, 8, 8)
            names.append(f"digit{d}_rot{90 * r}")
    return {s: ClassPool(torch.stack(images), names) for s, (images, names) in pools.items()}
