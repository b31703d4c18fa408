"""MobileNet v1/v2 and ShuffleNet v1/v2, written from their papers, with their analytic cost.

``models.create(name)`` builds a network in eval mode; ``models.adapt_state_dict(name, sd)`` turns a
published checkpoint (torchvision or timm layout) into one ``create(name)`` loads strictly.
Which class builds which family is the zoo's table (:data:`contract.zoo.FAMILIES`); the zoo is
torch-free, and this module imports torch (through the family's module) only when a network is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from contract.zoo import DEFAULT_MODELS, FAMILIES, ModelSpec, UnknownModelError, parse

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_MODELS",
    "ModelSpec",
    "UnknownModelError",
    "adapt_state_dict",
    "constructor",
    "create",
    "parse",
]


def constructor(family: str) -> type[nn.Module]:
    """The ``nn.Module`` class of ``family``, as the zoo's table names it (``"module:Class"``)."""
    module_name, _, class_name = FAMILIES[family].constructor.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create(name: str, num_classes: int = 1000) -> nn.Module:
    """The network ``name`` (any zoo spelling), randomly initialised, in eval mode."""
    spec = parse(name)
    module = constructor(spec.family)(**spec.knobs, num_classes=num_classes)
    return module.eval()


def adapt_state_dict(name: str, state_dict: dict) -> dict:
    """A published checkpoint's state dict in the layout ``create(name)`` loads strictly."""
    from models.checkpoints import adapt_state_dict as _adapt

    return _adapt(name, state_dict)
