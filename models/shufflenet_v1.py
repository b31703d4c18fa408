"""ShuffleNet v1 (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
Mobile Devices", CVPR 2018, arXiv:1707.01083), Table 1.

A 3x3 stride-2 convolution (24 channels) and a 3x3 stride-2 max-pool, three stages of ShuffleNet
units (Fig. 2b/c) repeated 4/8/4 times, global average pooling and a fully connected layer.
A unit is 1x1 group conv -> BN -> ReLU -> channel shuffle -> 3x3 depthwise conv -> BN -> 1x1 group
conv -> BN; with stride 1 the identity is added, with stride 2 a 3x3 average-pooled shortcut is
concatenated; ReLU last. The bottleneck has a quarter of the unit's output channels, and the first
pointwise conv of Stage 2 is not grouped (its input has only 24 channels).

Knobs: ``groups`` g (Table 1's columns) and ``scale`` s ("ShuffleNet s x", Sec. 4.1.1: every
layer's filters times s).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import ConvBNActivation, channel_shuffle, init_weights, make_divisible

__all__ = ["ShuffleNetV1"]

STAGE_REPEATS = (4, 8, 4)  # Table 1, "Repeat" column of Stage2, Stage3, Stage4
STEM_CHANNELS = 24  # Table 1, Conv1

# Table 1, "Output channels" of Stage2, Stage3 and Stage4 for each number of groups g, chosen so
# that every g costs about 140 MFLOPs at scale 1.
STAGE_OUT_CHANNELS: dict[int, tuple[int, int, int]] = {
    # g: (Stage2, Stage3, Stage4)
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}

# Conv1's width per scale, from the authors' released code (megvii-model/ShuffleNet-Series): the
# stem is scaled for 0.5x and 2x but kept at 24 for 1.5x. The scaled value is rounded up to a
# multiple of g below (12 -> 16 for g = 8, again as the authors did).
STEM_CHANNELS_PER_SCALE: dict[float, int] = {0.5: 12, 1.0: 24, 1.5: 24, 2.0: 48}


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


class ShuffleUnit(nn.Module):
    """Fig. 2b (stride 1: add the identity) and Fig. 2c (stride 2: concat a 3x3 avg-pooled input)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, groups: int, group_first_conv: bool = True
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a stride-1 unit adds its input: in and out channels must agree")
        bottleneck = out_channels // 4
        # With stride 2 the shortcut brings the in_channels: the residual branch makes the rest.
        branch_channels = out_channels - in_channels if stride == 2 else out_channels

        self.stride = stride
        self.groups = groups
        self.gconv1 = ConvBNActivation(in_channels, bottleneck, 1, groups=groups if group_first_conv else 1)
        self.dwconv = ConvBNActivation(bottleneck, bottleneck, 3, stride, groups=bottleneck, activation=None)
        self.gconv2 = ConvBNActivation(bottleneck, branch_channels, 1, groups=groups, activation=None)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gconv1(x)
        out = channel_shuffle(out, self.groups)
        out = self.dwconv(out)
        out = self.gconv2(out)
        if self.stride == 1:
            return self.relu(x + out)
        return self.relu(torch.cat((self.shortcut(x), out), 1))


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 3, scale: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if groups not in STAGE_OUT_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_OUT_CHANNELS)}, got {groups}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")

        # Channel rounding. Each unit splits its channels into g groups, its bottleneck is a quarter
        # of its output, and a stride-2 unit's residual branch makes (out - in) channels, so:
        # - stage outputs are s * Table 1 rounded to the nearest multiple of 4g (make_divisible);
        #   Table 1's own values are multiples of 4g, so scale 1 (and 2) is exact, and so are
        #   g = 3 and g = 8 at every paper scale (the two the authors released);
        # - Conv1 is the authors' width for the scale rounded up to a multiple of g.
        stem = STEM_CHANNELS_PER_SCALE.get(scale, make_divisible(STEM_CHANNELS * scale, 4))
        in_channels = _round_up(stem, groups)

        self.conv1 = ConvBNActivation(3, in_channels, 3, 2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages: list[nn.Sequential] = []
        table = STAGE_OUT_CHANNELS[groups]
        for stage, (repeats, channels) in enumerate(zip(STAGE_REPEATS, table, strict=True)):
            out_channels = make_divisible(channels * scale, 4 * groups)
            units = []
            for i in range(repeats):
                units.append(
                    ShuffleUnit(
                        in_channels,
                        out_channels,
                        stride=2 if i == 0 else 1,
                        groups=groups,
                        group_first_conv=not (stage == 0 and i == 0),
                    )
                )
                in_channels = out_channels
            stages.append(nn.Sequential(*units))
        self.stage2, self.stage3, self.stage4 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = x.mean((2, 3))  # GlobalPool
        return self.fc(x)
