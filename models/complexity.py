"""Analytic cost of a network per image, counted the way the papers count it.

Only convolutions and fully connected layers are counted; BN, activations, pooling, additions,
concatenations and channel shuffles are free:

- ``flops``: multiply-adds, ``k*k*(Cin/groups)*Cout*Hout*Wout`` per convolution (bias ignored) and
  ``in*out`` per fully connected layer.
- ``params``: learnable parameters of the whole module (conv and FC weights and biases, BN gamma and
  beta); buffers such as BN running statistics are not parameters.
- ``memory_access_cost``: elements read and written, summed over conv/FC layers as input feature map
  + output feature map + weights (bias included). For a 1x1 convolution this is ShuffleNet v2's
  ``MAC = hw(c1 + c2) + c1*c2`` (Sec. 2, G1), here applied to every layer.
- ``fp32_bytes``: 4 bytes per parameter.

Shapes are read from one forward pass on a single image with hooks on every ``Conv2d`` and
``Linear``, so the counts follow the module actually built rather than a separate description of it.
The pass runs on the module's device (a module on PyTorch's "meta" device works: only shapes
propagate) with one intra-op thread: a single small image gains nothing from more, and on a busy
machine idle threads spinning for work cost far more than the convolutions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache

import torch
from torch import nn

__all__ = ["Complexity", "LayerCost", "count", "count_module", "layer_costs", "layer_costs_for"]


@dataclass(frozen=True)
class Complexity:
    flops: int
    params: int
    memory_access_cost: int
    fp32_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class LayerCost:
    """One conv or FC layer: where it is, what it computes, and its share of the cost."""

    name: str  # qualified module name, e.g. "stage2.0.branch2.3"
    kind: str  # "conv" (groups = 1), "group_conv", "depthwise_conv" or "linear"
    in_shape: tuple[int, ...]  # per image (no batch axis)
    out_shape: tuple[int, ...]
    kernel_size: tuple[int, int] | None
    stride: tuple[int, int] | None
    groups: int
    flops: int
    params: int  # weight and bias elements of this layer
    memory_access_cost: int

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups == 1:
        return "conv"
    if module.groups == module.in_channels == module.out_channels:
        return "depthwise_conv"
    return "group_conv"


def _layer_cost(name: str, module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> LayerCost:
    in_shape = tuple(inp.shape[1:])
    out_shape = tuple(out.shape[1:])
    weights = module.weight.numel()
    bias = module.bias.numel() if module.bias is not None else 0
    if isinstance(module, nn.Conv2d):
        # weight is Cout x Cin/groups x k x k: one multiply-add per weight per output position.
        out_h, out_w = out_shape[-2:]
        flops = weights * out_h * out_w
        kernel, stride, groups = tuple(module.kernel_size), tuple(module.stride), module.groups
    else:
        # weight is out x in; leading axes other than the batch (none here) repeat the product.
        positions = out[0].numel() // module.out_features
        flops = weights * positions
        kernel, stride, groups = None, None, 1
    params = weights + bias
    mac = inp[0].numel() + out[0].numel() + params
    return LayerCost(name, _kind(module), in_shape, out_shape, kernel, stride, groups, flops, params, mac)


def layer_costs(module: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerCost]:
    """Per-layer cost of ``module`` on one image of ``input_shape`` (C, H, W), in execution order."""
    rows: list[LayerCost] = []
    handles = []

    def hook(name: str):
        def record(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            rows.append(_layer_cost(name, mod, args[0], output))

        return record

    for name, mod in module.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            handles.append(mod.register_forward_hook(hook(name)))
    # The module's own device; on "meta" only shapes are computed, which is all the count needs.
    tensor = next(module.parameters(), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    was_training = module.training
    threads = torch.get_num_threads()
    try:
        module.eval()
        torch.set_num_threads(1)
        with torch.no_grad():
            module(torch.zeros((1, *input_shape), device=device))
    finally:
        torch.set_num_threads(threads)
        for handle in handles:
            handle.remove()
        module.train(was_training)
    return rows


def count_module(module: nn.Module, input_shape: tuple[int, int, int]) -> Complexity:
    """The cost of ``module`` on one image of ``input_shape`` (C, H, W)."""
    rows = layer_costs(module, input_shape)
    params = sum(p.numel() for p in module.parameters())
    return Complexity(
        flops=sum(r.flops for r in rows),
        params=params,
        memory_access_cost=sum(r.memory_access_cost for r in rows),
        fp32_bytes=4 * params,
    )


def _built(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """Zoo model ``name`` and its input shape."""
    import models

    spec = models.parse(name)
    return models.create(spec.variant), spec.input_shape


@cache
def _count_variant(variant: str) -> Complexity:
    return count_module(*_built(variant))


def count(name: str) -> Complexity:
    """The cost of zoo model ``name`` (any spelling the zoo accepts) at its own resolution."""
    import models

    return _count_variant(models.parse(name).variant)


def layer_costs_for(name: str) -> list[LayerCost]:
    """:func:`layer_costs` of zoo model ``name`` at its own resolution."""
    return layer_costs(*_built(name))
