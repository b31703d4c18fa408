"""Published checkpoints' state dicts mapped onto this package's modules (``models.adapt_state_dict``).

Our MobileNet v2 and ShuffleNet v2 keep torchvision's key layout, so their checkpoints load as they are;
MobileNet v1 loads timm's ``mobilenetv1_*`` layout through a key mapping checked tensor by tensor. Where
the checkpoints come from, and how they are fetched and verified, is the build's business
(``builder.weights``). Nothing here imports torch: only ``models.create`` does, for the target layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from contract.zoo import parse


class WeightsError(RuntimeError):
    """Base class: the requested weights cannot be used."""


class StateDictMismatch(WeightsError, KeyError):
    """A state dict cannot be mapped onto the module's layout."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------
# Unwrapping and mapping


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # Training scripts save {"state_dict": ...} or {"model": ...}; DataParallel adds "module.".
    while True:
        for wrapper in ("state_dict", "model"):
            inner = state_dict.get(wrapper)
            if isinstance(inner, Mapping) and not any(hasattr(v, "shape") for v in state_dict.values()):
                state_dict = inner
                break
        else:
            break
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not hasattr(value, "shape"):
            raise StateDictMismatch(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


_BN_BUFFER = ".num_batches_tracked"


def _fill_batch_counters(state_dict: dict[str, Any], target: Mapping[str, Any]) -> None:
    # Checkpoints saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked, and a state dict copied
    # out of them loses the version metadata that lets BatchNorm excuse its absence. It does not affect
    # inference, so fill it in.
    for key, value in target.items():
        if key.endswith(_BN_BUFFER) and key not in state_dict:
            prefix = key[: -len(_BN_BUFFER)]
            if prefix + ".running_mean" in state_dict:
                state_dict[key] = value.new_zeros(())


def _check_shapes(
    pairs: list[tuple[str, str]], source: Mapping[str, Any], target: Mapping[str, Any], name: str
):
    for src_key, dst_key in pairs:
        have, want = tuple(source[src_key].shape), tuple(target[dst_key].shape)
        if have != want:
            where = src_key if src_key == dst_key else f"{src_key} -> {dst_key}"
            raise StateDictMismatch(
                f"{name}: {where} has shape {list(have)}, the module expects {list(want)}"
            )


_TIMM_V1_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.(conv_dw|bn1|conv_pw|bn2)\.(\w+)")
_TIMM_V1_LAYER = {"conv_dw": 0, "bn1": 1, "conv_pw": 2, "bn2": 3}
_TENSOR_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}


def _timm_v1_order(key: str) -> tuple:
    """Forward order of a timm ``mobilenetv1_*`` key (a checkpoint's own dict order is not trusted)."""
    leaf = key.rsplit(".", 1)[-1]
    tensor = _TENSOR_ORDER.get(leaf, 9)
    if key.startswith("conv_stem."):
        return (0, 0, 0, 0, tensor)
    if key.startswith("bn1."):
        return (0, 0, 0, 1, tensor)
    match = _TIMM_V1_BLOCK.fullmatch(key)
    if match:
        stage, block, layer, _ = match.groups()
        return (1, int(stage), int(block), _TIMM_V1_LAYER[layer], tensor)
    if key.startswith("classifier."):
        return (2, 0, 0, 0, tensor)
    raise StateDictMismatch(f"mobilenet_v1: {key!r} is not a key of timm's mobilenetv1 layout")


def _map_timm_mobilenet_v1(source: dict[str, Any], target: Mapping[str, Any], name: str) -> dict[str, Any]:
    """timm ``mobilenetv1_100`` keys -> ours: both list the same tensors in the same forward order.

    Matched by position (batch counters aside, which older checkpoints may lack) and checked by shape, so
    any structural difference is reported with the offending key instead of loading garbage.
    """
    src = sorted((k for k in source if not k.endswith(_BN_BUFFER)), key=_timm_v1_order)
    dst = [k for k in target if not k.endswith(_BN_BUFFER)]
    if len(src) != len(dst):
        raise StateDictMismatch(
            f"{name}: the timm checkpoint has {len(src)} tensors (batch counters aside), "
            f"the module expects {len(dst)}; first unmatched: "
            f"{(src[len(dst)] if len(src) > len(dst) else dst[len(src)])!r}"
        )
    pairs = list(zip(src, dst, strict=True))
    _check_shapes(pairs, source, target, name)
    out = {dst_key: source[src_key] for src_key, dst_key in pairs}
    owner = {s.rsplit(".", 1)[0]: d.rsplit(".", 1)[0] for s, d in pairs}
    for key in source:
        if key.endswith(_BN_BUFFER):
            module = owner.get(key[: -len(_BN_BUFFER)])
            if module is None or module + _BN_BUFFER not in target:
                raise StateDictMismatch(f"{name}: cannot place timm key {key!r} in the module")
            out[module + _BN_BUFFER] = source[key]
    return out


def _looks_timm_mobilenet_v1(state_dict: Mapping[str, Any]) -> bool:
    return "conv_stem.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict)


def adapt_state_dict(name: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` (a checkpoint, possibly wrapped) in the layout ``models.create(name)`` loads strictly.

    Identity for our own layout, which is torchvision's for MobileNet v2 and ShuffleNet v2; the key
    mapping of timm's ``mobilenetv1_*`` for MobileNet v1. Any key that cannot be placed, or a shape that
    differs, raises :class:`StateDictMismatch` naming it.
    """
    import models

    spec = parse(name)
    target = models.create(spec.variant).state_dict()
    source = _unwrap(state_dict)

    if spec.family == "mobilenet_v1" and set(source) != set(target) and _looks_timm_mobilenet_v1(source):
        mapped = _map_timm_mobilenet_v1(source, target, spec.variant)
    else:
        mapped = dict(source)
    _fill_batch_counters(mapped, target)

    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in mapped if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        raise StateDictMismatch(f"{spec.variant}: state dict does not match the module: {'; '.join(parts)}")
    _check_shapes([(k, k) for k in target], mapped, target, spec.variant)
    return {key: mapped[key] for key in target}
