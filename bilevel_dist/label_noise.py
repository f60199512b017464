"""Seeded label noise for data-cleaning problems and recipes: :func:`flip_labels`."""

from __future__ import annotations

import torch
from torch import Tensor


def flip_labels(labels: Tensor, rate: float, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Replaces a ``rate`` fraction of labels (chosen at random) by a uniformly random *different*
    class; returns the noisy labels and the mask of flipped samples."""
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate must lie in [0, 1), got {rate}")
    flipped = torch.zeros(labels.shape[0], dtype=torch.bool)
    flipped[torch.randperm(labels.shape[0], generator=generator)[: int(rate * labels.shape[0])]] = True
    shift = torch.randint(1, classes, labels.shape, generator=generator)
    return torch.where(flipped, (labels + shift) % classes, labels), flipped
