"""A reusable ResNet backbone in plain torch (He et al. 2016), with torchvision-compatible layer names.

Depths 18 / 34 use basic blocks, 50 / 101 bottleneck blocks. Parameter names follow torchvision
(``conv1``, ``bn1``, ``layer1`` .. ``layer4``, inside blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and
``downsample.0/1``), so a torchvision ImageNet ``state_dict`` loads into ``ResNet(depth, width=64)``
(``strict=False`` to skip ``fc``). Differences from torchvision, all optional: any number of input
channels, a base ``width`` other than 64, and a configurable stem stride (the LiDAR BEV model uses a
lighter stem so that small grids keep resolution).

The backbone returns the feature maps of ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32 with the
default stem) for a decoder to use; camera pre-training reuses it on images.
"""

from __future__ import annotations

import torch
from torch import nn

#: Blocks per stage for each supported depth, and whether the depth uses bottleneck blocks.
DEPTHS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def init_convs_and_norms(module: nn.Module) -> None:
    """torchvision's initialisation of a convolutional backbone: every convolution Kaiming-normal
    (fan-out, ReLU), every batch norm weight 1 and bias 0 (in module order)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "ResNet v1.5"), 1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet feature extractor.

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: channels of the input (3 for images, height bins + features for a LiDAR BEV).
        width: channels of the stem and of ``layer1``'s planes (torchvision: 64); stages double it.
        stem_stride: total stride of the stem: 4 (torchvision: stride-2 conv1 + max pool), 2 (no pool)
            or 1 (stride-1 conv1, no pool).

    Attributes:
        out_channels: channels of the ``layer1`` .. ``layer4`` outputs.
        strides: their strides relative to the input.
    """

    def __init__(self, depth: int = 18, in_channels: int = 3, width: int = 64, stem_stride: int = 4) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        layers, bottleneck = DEPTHS[depth]
        block = Bottleneck if bottleneck else BasicBlock
        self.depth = depth
        self.conv1 = nn.Conv2d(
            in_channels, width, kernel_size=7, stride=1 if stem_stride == 1 else 2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_stride == 4 else nn.Identity()
        self._cin = width
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.out_channels = tuple(width * m * block.expansion for m in (1, 2, 4, 8))
        self.strides = tuple(stem_stride * s for s in (1, 2, 4, 8))
        init_convs_and_norms(self)
        # Zero-init the last BN of each residual branch: every block starts as the identity.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._cin != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._cin, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self._cin, planes, stride, downsample)]
        self._cin = planes * block.expansion
        layers += [block(self._cin, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``layer1`` .. ``layer4`` for an input (B, in_channels, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats
