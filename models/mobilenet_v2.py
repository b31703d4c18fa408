"""MobileNet v2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
arXiv:1801.04381), Table 2.

A 3x3 stride-2 convolution, seventeen inverted-residual bottlenecks (1x1 expansion -> 3x3 depthwise
-> 1x1 linear projection, Table 1 and Fig. 4d; identity shortcut when stride is 1 and the channel
count is kept), a 1x1 convolution to 1280 channels, global average pooling and a classifier.
ReLU6 throughout, no activation after the projection ("linear bottleneck").

The width multiplier rounds every channel count to a multiple of 8; the last convolution stays at
1280 channels for widths up to 1 (Sec. 6.1) and grows with wider networks. Module layout and
initialisation follow torchvision's ``mobilenet_v2`` so that its ImageNet weights load unchanged:
``features.N.conv...`` and ``classifier.1`` (after a dropout of 0.2).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import ConvBNActivation, init_weights, make_divisible

__all__ = ["MobileNetV2"]

STEM_CHANNELS = 32  # Table 2, row 1: conv2d, c = 32, s = 2
LAST_CHANNELS = 1280  # Table 2, "conv2d 1x1", c = 1280
DROPOUT = 0.2

# Table 2, the "bottleneck" rows.
# Columns: t = expansion factor, c = output channels, n = repeats, s = stride of the first repeat
# (the others have stride 1).
INVERTED_RESIDUAL_SETTING: list[tuple[int, int, int, int]] = [
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    """Table 1: 1x1 conv to t*k channels + ReLU6, 3x3 depthwise (stride s) + ReLU6, 1x1 linear to k'."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels

        layers: list[nn.Module] = []
        if expand_ratio != 1:  # the first bottleneck (t = 1) has no expansion layer
            layers.append(ConvBNActivation(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if width_multiplier <= 0:
            raise ValueError(f"width multiplier must be positive, got {width_multiplier}")

        in_channels = make_divisible(STEM_CHANNELS * width_multiplier, 8)
        last_channels = make_divisible(LAST_CHANNELS * max(1.0, width_multiplier), 8)

        layers: list[nn.Module] = [ConvBNActivation(3, in_channels, 3, 2, activation=nn.ReLU6)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(c * width_multiplier, 8)
            for i in range(n):
                layers.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        layers.append(ConvBNActivation(in_channels, last_channels, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(last_channels, num_classes))
        self.num_features = last_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean((2, 3))  # Table 2, "avgpool 7x7": global, whatever the input resolution
        return self.classifier(x)
