"""Small built-in models for the digits data (and any small image data).

Layers have readable names (``fc1``, ``conv2``) because they become the rows of every
result table. The models take ``(N, C, H, W)`` images; the defaults fit digits
``(N, 1, 8, 8)`` with 10 classes.

>>> import torch
>>> digits_cnn()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
>>> [n for n, m in digits_mlp().named_modules() if isinstance(m, torch.nn.Linear)]
['fc1', 'fc2', 'fc3']
>>> digits_resnet()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

__all__ = ["BUILTIN_MODELS", "DigitsCNN", "DigitsMLP", "DigitsResNet", "digits_cnn", "digits_mlp", "digits_resnet"]


class DigitsMLP(nn.Module):
    """Flatten, then three linear layers: ``fc1`` (pixels -> hidden), ``fc2``, ``fc3`` (-> classes)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (N, C*H*W)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a pool to 4x4, and two linear layers (``conv1 conv2 fc1 fc2``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        # Adaptive pooling makes the classifier independent of the image size; on 8x8 it is a 2x2 max pool.
        self.pool = nn.AdaptiveMaxPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv1(x))  # (N, width, H, W)
        x = self.pool(self.act(self.conv2(x)))  # (N, 2*width, 4, 4)
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class DigitsResNet(nn.Module):
    """A torchvision-style ResNet sized for 8x8 images: a 3x3 stem and two stages of one ``BasicBlock``.

    Layers: ``conv1`` (stem, stride 1, no max pool: 8x8 is already small), ``layer1.0``
    (``width`` channels, 8x8), ``layer2.0`` (``2 * width`` channels, stride 2 to 4x4, with a
    1x1 ``downsample.0`` shortcut), global average pooling and ``fc``. Blocks are
    torchvision's own ``BasicBlock``, so the residual additions and batch norms are those
    of ``torchvision.models.resnet18``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2, downsample=shortcut))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, width, H, W)
        x = self.layer2(self.layer1(x))  # (N, 2*width, H/2, W/2)
        return self.fc(self.avgpool(x).flatten(1))


def digits_mlp(in_channels: int = 1, num_classes: int = 10, image_size: Sequence[int] = (8, 8)) -> nn.Module:
    """The MLP for ``in_channels`` x ``image_size`` images (digits by default).

    >>> digits_mlp().fc1.in_features
    64
    """
    return DigitsMLP(in_channels * math.prod(image_size), num_classes)


def digits_cnn(in_channels: int = 1, num_classes: int = 10, image_size: Sequence[int] = (8, 8)) -> nn.Module:
    """The CNN for ``in_channels`` x ``image_size`` images (digits by default).

    >>> digits_cnn(in_channels=3, num_classes=5).fc2.out_features
    5
    """
    return DigitsCNN(in_channels, num_classes)


def digits_resnet(in_channels: int = 1, num_classes: int = 10, image_size: Sequence[int] = (8, 8)) -> nn.Module:
    """The residual CNN for ``in_channels`` images of any size (global pooling before ``fc``).

    >>> [n for n, m in digits_resnet().named_modules() if isinstance(m, nn.Conv2d)][-1]
    'layer2.0.downsample.0'
    """
    return DigitsResNet(in_channels, num_classes)


BUILTIN_MODELS = {"digits_mlp": digits_mlp, "digits_cnn": digits_cnn, "digits_resnet": digits_resnet}
