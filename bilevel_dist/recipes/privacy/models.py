"""The attacked networks of the Inverting Gradients thesis (ch. 5), as ``nn.Module`` builders.

- ``convnet``: the thesis's ConvNet of width ``D`` (its code's layer list: 8 3×3 convolutions
  of widths D, 2D, 2D, 4D, 4D, 4D, max-pool 3, 4D, 4D, max-pool 3, each with batch norm and ReLU,
  then a linear layer), for 32×32 inputs;
- ``lenet``: Zhu et al.'s LeNet (three sigmoid 5×5 convolutions of 12 channels with strides 2,
  2, 1, then a linear layer; weights uniform in [−0.5, 0.5]);
- ``resnet18``: the CIFAR ResNet-18 (3×3 stem, four stages of two basic blocks, base width
  ``width``), for a GPU;
- ``linear``, ``mlp``, ``cnn``: the federated recipe's networks (so that a global model it
  trained can be audited); the first two start with a biased linear layer, whose input is
  recovered exactly (thesis Prop. 5.1).

The attack evaluates the networks in eval mode, as the thesis's code does: batch norm uses its
running statistics, so a replayed local step is a function of the parameters alone.
"""

from __future__ import annotations

import torch
from torch import nn

from bilevel_dist._checks import ConfigError
from bilevel_dist.recipes.federated.module import build_model as federated_model

NAMES = ("convnet", "lenet", "resnet18", "linear", "mlp", "cnn")


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def convnet(channels: int, side: int, classes: int, width: int) -> nn.Sequential:
    d = width
    layers = [*_conv(channels, d), *_conv(d, 2 * d), *_conv(2 * d, 2 * d), *_conv(2 * d, 4 * d)]
    layers += [*_conv(4 * d, 4 * d), *_conv(4 * d, 4 * d), nn.MaxPool2d(3), *_conv(4 * d, 4 * d)]
    layers += [*_conv(4 * d, 4 * d), nn.MaxPool2d(3), nn.Flatten()]
    pooled = side // 3 // 3
    if pooled < 1:
        raise ConfigError("model", f"the ConvNet needs inputs of at least 9×9 pixels, got {side}×{side}")
    return nn.Sequential(*layers, nn.Linear(4 * d * pooled * pooled, classes))


def lenet(channels: int, side: int, classes: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(12 * (-(-side // 4)) ** 2, classes),
    )  # fmt: skip
    for p in net.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return net


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(channels: int, classes: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        cout = width * 2**stage
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def build(name: str, input_shape: tuple[int, ...], classes: int, width: int = 16, seed: int = 0) -> nn.Module:
    """Network ``name`` for ``(channels, height, width)`` inputs, initialised from ``seed``, in
    eval mode (``width``: the federated networks' hidden units)."""
    if name not in NAMES:
        raise ConfigError("model", f"unknown model {name!r}; choose one of {list(NAMES)}")
    channels, side = input_shape[0], input_shape[-1]
    ambient = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):  # CPU draws only: no CUDA context on every GPU
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)  # the same draws whatever the ambient dtype
        try:
            if name == "convnet":
                net: nn.Module = convnet(channels, side, classes, width)
            elif name == "lenet":
                net = lenet(channels, side, classes)
            elif name == "resnet18":
                net = resnet18(channels, classes, width)
            else:
                net = federated_model(name, tuple(input_shape), classes, hidden=width)
        finally:
            torch.set_default_dtype(ambient)
    return net.eval()
