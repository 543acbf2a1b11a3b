"""Classifiers used by the benchmarks. Each normalises its [0, 1] input itself and ends in one ``nn.Linear``
head whose input are the penultimate features used by feature distillation."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

__all__ = ["SmallCNN", "ResNet18CIFAR", "make_classifier", "CLASSIFIERS"]

#: the names :func:`make_classifier` builds (``ExperimentConfig.classifier`` accepts these)
CLASSIFIERS = ("small_cnn", "wide_cnn", "resnet18")


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv blocks + a hidden layer (``feature_dim``) + a linear head: ~99% on MNIST, fast on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        self.normalize = _Normalize([0.5] * in_channels, [0.5] * in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


class ResNet18CIFAR(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), 512-d features, as in the reference."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.normalize = _Normalize([0.5] * in_channels, [0.25] * in_channels)
        net = resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def make_classifier(name: str, *, num_classes: int, image_shape: Sequence[int]) -> nn.Module:
    """``small_cnn``, ``wide_cnn`` (the same net at twice the channels and features: about 3.7x its work per
    image) or ``resnet18`` for images of ``image_shape`` (C, H, W)."""
    c, h, _ = image_shape
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, in_channels=c, image_size=h)
    if name == "wide_cnn":
        return SmallCNN(num_classes=num_classes, in_channels=c, image_size=h, width=64, feature_dim=256)
    if name == "resnet18":
        return ResNet18CIFAR(num_classes=num_classes, in_channels=c)
    names = ", ".join(repr(n) for n in CLASSIFIERS[:-1]) + f" or {CLASSIFIERS[-1]!r}"
    raise ValueError(f"classifier={name!r}; expected {names}")
