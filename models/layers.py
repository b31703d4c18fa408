"""Building blocks shared by the four families: channel rounding, conv-BN-activation, channel shuffle.

Everything here exports to ONNX with a symbolic batch axis: no layer reads the batch size as a
Python int.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBNActivation", "channel_shuffle", "init_weights", "make_divisible"]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (torchvision's and TF-slim's rule).

    The result is never below ``min_value`` (default: ``divisor``) and, should rounding down lose
    more than 10% of ``value``, it steps up by one ``divisor``.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNActivation(nn.Sequential):
    """``Conv2d`` (no bias, "same" padding) -> ``BatchNorm2d`` -> activation.

    Children are numbered ``0`` (conv), ``1`` (BN) and ``2`` (activation), the layout of
    torchvision's ``Conv2dNormActivation``, so state-dict keys read ``<name>.0.weight`` and
    ``<name>.1.running_mean``. ``activation=None`` leaves the activation out (a linear layer).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{in_channels} -> {out_channels} channels do not split into {groups} groups")
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups (ShuffleNet v1, Sec. 3.1, Fig. 1).

    Channels ``[a0 a1 | b0 b1 | c0 c1]`` (3 groups of 2) become ``[a0 b0 c0 a1 b1 c1]``: reshape to
    (groups, channels per group), transpose, flatten. The batch axis is left as ``-1`` so that an
    ONNX export keeps it symbolic.
    """
    if groups == 1:
        return x
    channels, height, width = x.shape[1:]
    x = x.reshape(-1, groups, channels // groups, height, width)
    x = x.transpose(1, 2)
    return x.reshape(-1, channels, height, width)


def init_weights(module: nn.Module) -> None:
    """torchvision's initialisation for these networks: He (fan-out) convs, unit BN, small FC."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
