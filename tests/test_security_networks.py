"""The victims' architectures of the image protocol: the published sizes and shapes."""

import pytest
import torch

from bilevel_dist.recipes.security.networks import ConvNet, ResNet18, mlp, uses_batch_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_has_the_cifar_variants_parameter_count_and_shapes():
    model = ResNet18(classes=10, channels=3)
    assert count(model) == 11_173_962  # He et al.'s CIFAR ResNet-18 at 10 classes
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_has_2304_features_at_32x32_and_refuses_tiny_images():
    model = ConvNet(classes=10, channels=3, side=32)
    assert model.net[-1].in_features == 2304  # the thesis's "64,128,128,256,256,2304"
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert ConvNet(classes=10, channels=1, side=28)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="9×9"):
        ConvNet(side=8)


def test_batch_norm_is_detected_so_victims_train_one_after_another():
    assert uses_batch_norm(lambda: ResNet18(width=4)) and uses_batch_norm(lambda: ConvNet(width=4))
    assert not uses_batch_norm(mlp([64, 16, 10]))
    assert count(mlp([64, 16, 10])()) == 64 * 16 + 16 + 16 * 10 + 10
