"""``extras:resnet_small``: a residual network sized for 28×28 and 32×32 images.

torchvision's ResNets are built for 224×224 inputs: their 7×7 stride-2 stem and max-pool shrink a
28×28 digit to 7×7 before the first residual block. This one keeps full resolution in the stem
(one 3×3 convolution, no pooling) and halves it once per later stage, as in the CIFAR ResNets of
He et al. (2016): ``widths: [16, 32, 64]`` with ``blocks: 3`` is their ResNet-20.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runner.plugin_api import ModelRequest, SpecError

DEFAULT_WIDTHS = (16, 32, 64)
OPTIONS = ("widths", "blocks", "dropout")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a shortcut (a 1×1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """``stem`` → ``layer1`` … ``layerN`` → global average pool → ``fc`` (the classification head).

    The children are named like torchvision's ResNets, so strategies can train ``head``,
    ``{last: 1}`` (``fc`` and ``layerN``) or patterns such as ``layer3.*``.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = DEFAULT_WIDTHS,
                 blocks: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        previous = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            stage = [BasicBlock(previous if i == 0 else width, width, stride if i == 0 else 1) for i in range(blocks)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            previous = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(previous, num_classes)
        self.num_stages = len(widths)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def _checked_options(options: dict[str, Any]) -> tuple[tuple[int, ...], int, float]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SpecError(f"model.options: extras:resnet_small takes {', '.join(OPTIONS)}; unknown: {', '.join(unknown)}")
    widths = options.get("widths", DEFAULT_WIDTHS)
    if not isinstance(widths, (list, tuple)) or not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise SpecError(f"model.options.widths must be a non-empty list of positive integers, got {widths!r}")
    blocks = options.get("blocks", 1)
    if not isinstance(blocks, int) or blocks < 1:
        raise SpecError(f"model.options.blocks must be a positive integer, got {blocks!r}")
    dropout = options.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise SpecError(f"model.options.dropout must be in [0, 1), got {dropout!r}")
    return tuple(widths), blocks, float(dropout)


def build_resnet_small(request: ModelRequest) -> ResNetSmall:
    """A small ResNet for ``request.input_shape`` images (any size; 28×28 to 64×64 is its range).

    Options: ``widths`` (channels per stage, default ``[16, 32, 64]``), ``blocks`` (residual blocks
    per stage, default 1) and ``dropout`` before the head (default 0).
    """
    if request.weights is not None:
        raise SpecError(
            f"model.weights: extras:resnet_small has no named weights ({request.weights!r}); use {{file: …}} or {{run: …}}"
        )
    widths, blocks, dropout = _checked_options(dict(request.options))
    return ResNetSmall(request.input_shape[0], request.num_classes, widths, blocks, dropout)
