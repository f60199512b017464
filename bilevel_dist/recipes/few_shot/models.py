"""Backbones: ``body`` (the representation) and ``head`` (the last linear layer).

BatchNorm layers keep no running statistics (``track_running_stats=False``): every forward pass
normalises with the statistics of the batch it sees, and the recipe runs the network on one task
at a time (vmapped over the meta-batch), so statistics are per task, at meta-training and at
meta-test alike: what MAML's and learn2learn's reference implementations do (transductive
batch norm). Running averages would mix tasks, and could not be updated inside ``vmap``.
"""

from __future__ import annotations

import torch
from torch import nn

from bilevel_dist._checks import ConfigError

NAMES = ("mlp", "conv4", "resnet12")


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class Backbone(nn.Module):
    """``head(body(x))``; ``features`` is the width of ``body``'s output."""

    def __init__(self, body: nn.Module, features: int, outputs: int) -> None:
        super().__init__()
        self.body, self.features = body, features
        self.head = nn.Linear(features, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp(outputs: int = 1, hidden: int = 40) -> Backbone:
    """MAML's sinusoid regressor 1-40-40-1 (ReLU)."""
    body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return Backbone(body, hidden, outputs)


def conv4(input_shape: tuple[int, ...], outputs: int, width: int = 64) -> Backbone:
    """Conv-4 (Vinyals et al.; MAML's Omniglot network): four blocks of 3×3 convolution with
    ``width`` channels, batch norm, ReLU and 2×2 max-pooling (ceil mode, so 8×8 digits reach a
    1×1 map), flattened."""
    channels, layers = input_shape[0], []
    for _ in range(4):
        layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(width), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        channels = width
    body = nn.Sequential(*layers, nn.Flatten())
    return Backbone(body, _width(body, input_shape), outputs)


class _ResidualBlock(nn.Module):
    """Three 3×3 convolutions with batch norm and leaky ReLU, a 1×1 projected shortcut, then
    2×2 max-pooling."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        convs = []
        for i in range(3):
            convs += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=1, bias=False), _norm(width)]
            if i < 2:
                convs.append(nn.LeakyReLU(0.1))
        self.convs = nn.Sequential(*convs)
        self.shortcut = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), _norm(width))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(x) + self.shortcut(x))


def resnet12(input_shape: tuple[int, ...], outputs: int, widths: tuple[int, ...] = (64, 160, 320, 640)) -> Backbone:
    """The standard ResNet-12 of few-shot learning (Lee et al. 2019, MetaOptNet; learn2learn's
    ``ResNet12``): four residual blocks of widths 64-160-320-640, global average pooling. The
    Penalty paper's App. E network is not specified closely enough to rebuild, so this is the
    one used."""
    blocks, channels = [], input_shape[0]
    for width in widths:
        blocks.append(_ResidualBlock(channels, width))
        channels = width
    body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(body, widths[-1], outputs)


def _width(body: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(2, *input_shape)).shape[1])


def build(name: str, input_shape: tuple[int, ...], outputs: int, width: int = 64) -> Backbone:
    """The backbone ``name`` for inputs of ``input_shape`` and ``outputs`` scores."""
    if name == "mlp":
        return mlp(outputs)
    if name == "conv4":
        return conv4(input_shape, outputs, width)
    if name == "resnet12":
        return resnet12(input_shape, outputs)
    raise ConfigError("backbone", f"unknown backbone {name!r}; choose one of {list(NAMES)}")
