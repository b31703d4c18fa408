"""ShuffleNet v2 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018, arXiv:1807.11164), Table 5.

A 3x3 stride-2 convolution and a 3x3 stride-2 max-pool, three stages of units repeated 4/8/4 times,
a 1x1 convolution, global average pooling and a fully connected layer. The basic unit (Fig. 3c)
splits the channels in two: one half passes untouched, the other goes through 1x1 conv -> 3x3
depthwise conv -> 1x1 conv (equal widths, guideline G1); the halves are concatenated and shuffled
with two groups. The down-sampling unit (Fig. 3d) drops the split: both branches see the whole
input, one of them a 3x3 stride-2 depthwise conv and a 1x1 conv, and the output channels double.

Module layout follows torchvision's ``shufflenetv2.py`` (``conv1``, ``maxpool``, ``stage2`` ..
``stage4`` of units with ``branch1``/``branch2``, ``conv5``, ``fc``), so its ImageNet weights load
unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import ConvBNActivation, channel_shuffle

__all__ = ["ShuffleNetV2"]

STAGE_REPEATS = (4, 8, 4)  # Table 5, "Repeat" column of Stage2, Stage3, Stage4

# Table 5, "Output channels" per scale.
# Columns: Conv1, Stage2, Stage3, Stage4, Conv5.
STAGE_OUT_CHANNELS: dict[float, tuple[int, int, int, int, int]] = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class InvertedResidual(nn.Module):
    """Fig. 3c (stride 1: channel split) and Fig. 3d (stride 2: both branches, channels doubled)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if out_channels % 2:
            raise ValueError(f"output channels must be even (two branches), got {out_channels}")
        branch_channels = out_channels // 2
        if stride == 1 and in_channels != 2 * branch_channels:
            raise ValueError("a stride-1 unit keeps its width: in and out channels must agree")
        self.stride = stride

        if stride == 2:
            self.branch1 = nn.Sequential(
                _depthwise(in_channels, stride),
                nn.BatchNorm2d(in_channels),
                _pointwise(in_channels, branch_channels),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(inplace=True),
            )
        self.branch2 = nn.Sequential(
            _pointwise(in_channels if stride == 2 else branch_channels, branch_channels),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(inplace=True),
            _depthwise(branch_channels, stride),
            nn.BatchNorm2d(branch_channels),
            _pointwise(branch_channels, branch_channels),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # channel split
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, scale: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if scale not in STAGE_OUT_CHANNELS:
            raise ValueError(f"scale must be one of {sorted(STAGE_OUT_CHANNELS)}, got {scale}")
        conv1, *stage_channels, conv5 = STAGE_OUT_CHANNELS[scale]

        self.conv1 = ConvBNActivation(3, conv1, 3, 2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = conv1
        stages: list[nn.Sequential] = []
        for repeats, out_channels in zip(STAGE_REPEATS, stage_channels, strict=True):
            units = [InvertedResidual(in_channels, out_channels, 2)]
            units += [InvertedResidual(out_channels, out_channels, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = ConvBNActivation(in_channels, conv5, 1)
        self.fc = nn.Linear(conv5, num_classes)
        self.num_features = conv5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean((2, 3))  # GlobalPool
        return self.fc(x)
