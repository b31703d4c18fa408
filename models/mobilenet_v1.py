"""MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", 2017, arXiv:1704.04861), Table 1.

A 3x3 stride-2 convolution, thirteen depthwise-separable blocks (3x3 depthwise conv and 1x1
pointwise conv, each followed by BN and ReLU6, Fig. 3), global average pooling and one fully
connected layer. The width multiplier alpha (Sec. 3.2) thins every layer; the resolution
multiplier (Sec. 3.3) is the input size alone, since the global pooling makes the network
resolution-agnostic.

ReLU6 rather than the paper's ReLU: the published TF-slim and timm checkpoints were trained with it.

State-dict layout: ``features.0`` is the stem (``ConvBNActivation``: ``.0`` conv, ``.1`` BN), then
``features.1`` .. ``features.13`` are the blocks, each ``.0`` depthwise and ``.1`` pointwise
``ConvBNActivation``; ``classifier`` is the ``Linear``. Tensor for tensor, in order and in shape,
this is timm's ``mobilenetv1_100`` (``conv_stem``, ``bn1``, ``blocks.S.B.{conv_dw,bn1,conv_pw,bn2}``,
``classifier``), which :mod:`models.checkpoints` maps onto it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import ConvBNActivation, init_weights, make_divisible

__all__ = ["MobileNetV1"]

STEM_CHANNELS = 32  # Table 1, row 1: "Conv / s2, 3x3x3x32"
LAST_CHANNELS = 1024

# Table 1, the rows "Conv dw / s" + "Conv / s1" folded into depthwise-separable blocks, grouped as
# runs of identical blocks (the grouping timm uses for its stages).
# Columns: c = output channels of the pointwise conv, n = blocks in the run, s = stride of the
# first block's depthwise conv (the others have stride 1).
# The paper's second-to-last row prints "Conv dw / s2" on a 7x7 input whose output stays 7x7: a
# typo, the stride is 1 (as in TF-slim and timm).
BLOCKS: list[tuple[int, int, int]] = [
    # c, n, s
    (64, 1, 1),
    (128, 2, 2),
    (256, 2, 2),
    (512, 6, 2),
    (LAST_CHANNELS, 2, 2),
]


class DepthwiseSeparable(nn.Sequential):
    """Fig. 3, right: 3x3 depthwise conv -> BN -> ReLU6 -> 1x1 conv -> BN -> ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            ConvBNActivation(in_channels, in_channels, 3, stride, groups=in_channels, activation=nn.ReLU6),
            ConvBNActivation(in_channels, out_channels, 1, activation=nn.ReLU6),
        )


class MobileNetV1(nn.Module):
    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if width_multiplier <= 0:
            raise ValueError(f"width multiplier must be positive, got {width_multiplier}")

        # Every Table 1 width times 0.25, 0.5, 0.75 or 1 is already a multiple of 8, so rounding to
        # multiples of 8 (timm's rule) changes nothing at the paper's widths and keeps other widths
        # hardware-friendly.
        def width(channels: int) -> int:
            return make_divisible(channels * width_multiplier, 8)

        in_channels = width(STEM_CHANNELS)
        layers: list[nn.Module] = [ConvBNActivation(3, in_channels, 3, 2, activation=nn.ReLU6)]
        for c, n, s in BLOCKS:
            out_channels = width(c)
            for i in range(n):
                layers.append(DepthwiseSeparable(in_channels, out_channels, s if i == 0 else 1))
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean((2, 3))  # "Avg Pool / s1, Pool 7x7": global, whatever the input resolution
        return self.classifier(x)
