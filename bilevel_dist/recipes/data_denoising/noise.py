"""Label-noise generators, seeded: ``corrupt(labels, rate, kind, classes, seed)``.

``flip``: a ``rate`` fraction of the labels, chosen at random, become a uniformly random
*different* class (Mehra & Hamm §3.2, Franceschi et al.); ``uniform``: each label is replaced with
probability ``rate`` by a uniformly random class, possibly its own (Ren et al.'s "uniform flip",
e.g. 36% on CIFAR-10), so about ``rate·(C−1)/C`` of the labels change.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError
from bilevel_dist.label_noise import flip_labels

KINDS = ("flip", "uniform")


def corrupt(labels: Tensor, rate: float, kind: str, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Noisy labels and the mask of the samples whose label changed."""
    if kind not in KINDS:
        raise ConfigError("noise_type", f"noise_type must be one of {list(KINDS)}, got {kind!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError("noise", f"noise must be a rate in [0, 1), got {rate!r}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "flip":
        return flip_labels(labels, rate, classes, gen)
    replace = torch.rand(labels.shape, generator=gen) < rate
    noisy = torch.where(replace, torch.randint(0, classes, labels.shape, generator=gen), labels)
    return noisy, noisy != labels
