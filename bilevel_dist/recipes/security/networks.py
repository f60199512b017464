"""The victims' architectures of the thesis's image protocol (App. 6.B.2): ResNet-18 with the
CIFAR stem (a 3×3 convolution, no max pool) and the 6-layer ConvNet. Both use batch norm, so
their victims train one after another (``train_victims(vectorise=False)``), as on a GPU."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bilevel_dist._checks import ConfigError

NETWORKS = ("mlp", "convnet", "resnet18")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.shortcut(x)).relu()


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (He et al.'s CIFAR variant, as in the thesis's code): 11.2 M
    parameters at 10 classes and 3 channels."""

    def __init__(self, classes: int = 10, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        inputs = width
        for stage, outputs in enumerate(widths):
            stride = 1 if stage == 0 else 2
            layers += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """The thesis's 6-layer ConvNet: five 3×3 convolutions (widths 64, 128, 128, 256, 256) with
    batch norm and ReLU, a 3×3 max pool after each of the last two, and a linear layer (2304
    inputs at 32×32)."""

    def __init__(self, classes: int = 10, channels: int = 3, side: int = 32, width: int = 64) -> None:
        super().__init__()
        widths = [width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        inputs = channels
        for i, outputs in enumerate(widths):
            layers += [nn.Conv2d(inputs, outputs, 3, 1, 1), nn.BatchNorm2d(outputs), nn.ReLU()]
            if i >= len(widths) - 2:
                layers.append(nn.MaxPool2d(3))
                side //= 3
            inputs = outputs
        if side < 1:
            raise ValueError("the ConvNet's two 3×3 max pools need images of at least 9×9")
        layers += [nn.Flatten(), nn.Linear(inputs * side * side, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(
    sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU, dtype: torch.dtype | None = None
) -> Callable[[], nn.Module]:
    """A factory of ``Flatten``-``Linear``-``activation`` stacks of ``sizes`` (none after the last),
    built in ``dtype`` (default: the default dtype; the initialisation draws depend on it)."""

    def factory() -> nn.Module:
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)

    return factory


def classifier(network: str, shape: Sequence[int], classes: int, widths: Sequence[int] = (128, 128)) -> Callable:
    """A factory of ``network`` for inputs of ``shape`` (one example's) and ``classes`` outputs:
    ``mlp`` (hidden ``widths``), or ``convnet``/``resnet18`` for images ``(C, H, W)``."""
    if network not in NETWORKS:
        raise ConfigError("network", f"unknown network {network!r}; choose one of {list(NETWORKS)}")
    if network == "mlp":
        return mlp([math.prod(shape), *widths, classes])
    if len(shape) != 3:
        raise ConfigError("network", f"{network} needs images (C, H, W), the data are vectors of shape {tuple(shape)}")
    channels, side = shape[0], shape[-1]
    if network == "convnet":
        if side < 9:
            raise ConfigError("network", f"the ConvNet's two 3×3 max pools need images of at least 9×9, got {side}")
        return lambda: ConvNet(classes, channels, side)
    return lambda: ResNet18(classes, channels)


def uses_batch_norm(factory: Callable[[], nn.Module]) -> bool:
    """Whether the factory's model updates running statistics in training (no ``vmap`` of victims)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in factory().modules())
