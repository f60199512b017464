"""Classifiers for the denoising recipe, by name; the recipe trains them through
``torch.func.functional_call`` with their parameters as the inner variables.

- ``linear``: softmax regression (Franceschi et al.'s setting);
- ``mnist_cnn``: the authors' MNIST CNN (Conv64-5×5, pool, Conv128-5×5, pool, 512, 256, 10 with
  dropout; 1,389,578 parameters on 28×28 inputs);
- ``cifar_cnn``: a 3-block conv net for 32×32 colour or grey images (the paper's App. E.2 net is
  not published; this one is ours);
- ``wrn28_10``: Wide-ResNet-28-10 (Ren et al.'s 36% CIFAR-10 setting). Its normalisation uses batch
  statistics always (no running averages), which keeps the inner problem a pure function.
"""

from __future__ import annotations

from torch import nn

from bilevel_dist._checks import ConfigError

NAMES = ("linear", "mnist_cnn", "cifar_cnn", "wrn28_10")


def build(name: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    """The classifier ``name`` for inputs of ``shape`` (without the batch axis)."""
    if name == "linear":
        features = 1
        for size in shape:
            features *= size
        return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    if len(shape) != 3 and name != "linear":
        raise ConfigError("model", f"model {name!r} needs image inputs (channels, height, width), got {shape}")
    channels = shape[0]
    if name == "mnist_cnn":
        side = (shape[1] - 4) // 2
        side = (side - 4) // 2
        return nn.Sequential(
            nn.Conv2d(channels, 64, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(64, 128, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
            nn.Linear(128 * side * side, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, classes),
        )  # fmt: skip
    if name == "cifar_cnn":

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                    nn.MaxPool2d(2)]  # fmt: skip

        return nn.Sequential(
            *block(channels, 64), *block(64, 128), *block(128, 256),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(256, classes),
        )  # fmt: skip
    if name == "wrn28_10":
        return WideResNet(channels, classes, depth=28, width=10)
    raise ConfigError("model", f"unknown model {name!r}; choose one of {list(NAMES)}")


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.conv1(nn.functional.relu(self.bn1(x)))
        out = self.conv2(nn.functional.relu(self.bn2(out)))
        return out + (x if self.skip is None else self.skip(x))


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis' WRN-``depth``-``width`` for 32×32 inputs."""

    def __init__(self, channels: int, classes: int, depth: int = 28, width: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)]
        for stage in range(3):
            for i in range(n):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(_Block(cin, widths[stage + 1], (1 if stage == 0 else 2) if i == 0 else 1))
        layers += [_norm(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
