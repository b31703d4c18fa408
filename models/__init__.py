"""MobileNet v1/v2 and ShuffleNet v1/v2, written from their papers, with their analytic cost.

``models.create(name)`` builds a network in eval mode; ``models.adapt_state_dict(name, sd)`` turns a
published checkpoint (torchvision or timm layout) into one ``create(name)`` loads strictly.
The zoo (:mod:`contract.zoo`) is torch-free; this module imports torch lazily so that importing
``contract.zoo`` never pulls it in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from contract.zoo import DEFAULT_MODELS, ModelSpec, UnknownModelError, parse

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DEFAULT_MODELS", "ModelSpec", "UnknownModelError", "adapt_state_dict", "create", "parse"]


def _constructor(family: str):
    if family == "mobilenet_v1":
        from models.mobilenet_v1 import MobileNetV1 as cls
    elif family == "mobilenet_v2":
        from models.mobilenet_v2 import MobileNetV2 as cls
    elif family == "shufflenet_v1":
        from models.shufflenet_v1 import ShuffleNetV1 as cls
    elif family == "shufflenet_v2":
        from models.shufflenet_v2 import ShuffleNetV2 as cls
    else:  # pragma: no cover - the zoo's grammar admits only the four families
        raise UnknownModelError(family)
    return cls


def create(name: str, num_classes: int = 1000) -> nn.Module:
    """The network ``name`` (any zoo spelling), randomly initialised, in eval mode."""
    spec = parse(name)
    module = _constructor(spec.family)(**spec.knobs, num_classes=num_classes)
    return module.eval()


def adapt_state_dict(name: str, state_dict: dict) -> dict:
    """A published checkpoint's state dict in the layout ``create(name)`` loads strictly."""
    from models.weights import adapt_state_dict as _adapt

    return _adapt(name, state_dict)
