"""The model zoo: one table of model families, and every servable name derived from it.

Torch-free on purpose: the build step, the server and the tests read it, and so may tools that never
load a network. Each family is one :class:`Family` entry in :data:`FAMILIES`: its name grammar, its knobs
and their allowed values, the variant its default alias stands for, the class that builds it, how its
input is preprocessed and which published checkpoints it can load. Names:

    mobilenet_v1_<alpha>_<res>     mobilenet_v1 = mobilenet_v1_1.0_224
    mobilenet_v2_<width>_<res>     mobilenet_v2 = mobilenet_v2_1.0_224
    shufflenet_v1_g<g>_<scale>x    shufflenet_v1 = shufflenet_v1_g3_1.0x
    shufflenet_v2_<scale>x         shufflenet_v2 = shufflenet_v2_1.0x

A reduced-precision build is served as ``<name>:fp16`` or ``<name>:int8``; :func:`split_precision`
separates the suffix, and :func:`parse` accepts both forms.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources

from contract.preprocessing import (
    DEFAULT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Interpolation,
    PreprocessingSpec,
)

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
# The knob that sets the input size rather than a constructor argument.
RESOLUTION = "resolution"

# The knob values each paper reports (and, for ShuffleNet v1, the groups of its Table 1).
MOBILENET_V1_WIDTHS = (0.25, 0.5, 0.75, 1.0)
MOBILENET_V1_RESOLUTIONS = (128, 160, 192, 224)
MOBILENET_V2_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_V2_RESOLUTIONS = (96, 128, 160, 192, 224)
SHUFFLENET_V1_GROUPS = (1, 2, 3, 4, 8)
SHUFFLENET_V1_SCALES = (0.5, 1.0, 1.5, 2.0)
SHUFFLENET_V2_SCALES = (0.5, 1.0, 1.5, 2.0)

# MobileNet v1 was trained (TF-slim, and timm's checkpoint below) on inputs scaled to [-1, 1]:
# mean = std = 0.5. timm's checkpoint also resizes bicubically. The other families follow torchvision.
INCEPTION_MEAN_STD = (0.5, 0.5, 0.5)


class UnknownModelError(ValueError):
    """The name does not follow the zoo's grammar or names a knob value no paper defines."""


@dataclass(frozen=True)
class PublishedWeights:
    """A published ImageNet checkpoint our module can load (through ``adapt_state_dict``)."""

    url: str
    # Either the full SHA-256 of the file or the prefix that torchvision puts in file names.
    sha256: str
    layout: str  # "torchvision" or "timm": which key mapping adapt_state_dict applies
    note: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One servable variant: its name, its family and knobs, its input and its preprocessing."""

    name: str  # as the user spells it (a default alias or the full variant name)
    variant: str  # the full, canonical spelling
    family: str
    knobs: dict = field(hash=False)  # constructor keyword arguments of the family's module
    resolution: int
    preprocessing: PreprocessingSpec
    weights: PublishedWeights | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)


@dataclass(frozen=True)
class Knob:
    """One axis of a family's names: a placeholder of its grammar and the values a paper reports."""

    key: str  # the grammar's placeholder; the constructor's keyword argument unless it is RESOLUTION
    label: str  # how error messages call it
    kind: type  # int or float: how the name spells it and how it is read back
    values: tuple  # allowed values, in the order all_variants() lists them


@dataclass(frozen=True)
class PreprocessingRule:
    """A family's evaluation recipe; the crop follows the variant's resolution."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Interpolation = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT

    def for_resolution(self, resolution: int) -> PreprocessingSpec:
        return PreprocessingSpec.for_resolution(
            resolution, mean=self.mean, std=self.std, interpolation=self.interpolation, crop_pct=self.crop_pct
        )


@dataclass(frozen=True)
class Family:
    """Everything the project knows about one network family, in one place."""

    name: str  # also the family's default alias
    grammar: str  # full variant names, with a {key} placeholder per knob
    knobs: tuple[Knob, ...]  # in grammar order, which is also the order their errors are reported in
    default: str  # the variant the alias stands for
    example: str  # a variant quoted when a name is not understood
    # "module:Class" of the nn.Module, imported only by models.create (this package stays torch-free).
    constructor: str
    preprocessing: PreprocessingRule
    weights: Mapping[str, PublishedWeights] = field(default_factory=dict, hash=False)  # by variant
    resolution: int = 224  # the input size of a family whose names carry none

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        parts = []
        for literal, key, _, _ in string.Formatter().parse(self.grammar):
            parts.append(re.escape(literal))
            if key is not None:
                parts.append(r"(\d+)" if self._knob(key).kind is int else r"(\d+(?:\.\d+)?)")
        return re.compile("".join(parts))

    def _knob(self, key: str) -> Knob:
        return next(k for k in self.knobs if k.key == key)

    def variant_name(self, values: Mapping[str, float | int]) -> str:
        """The canonical spelling of the variant with these knob values."""
        return self.grammar.format(**{k.key: _spell(values[k.key], k.kind) for k in self.knobs})

    def variants(self) -> list[str]:
        """Every variant of the family, the first knob varying slowest."""
        keys = [k.key for k in self.knobs]
        return [
            self.variant_name(dict(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(k.values for k in self.knobs))
        ]

    def spec(self, name: str, texts: Sequence[str]) -> ModelSpec:
        """The spec of ``name``, whose variant matched :attr:`pattern` with these knob texts."""
        values = {
            knob.key: _pick(text, knob.values, knob.kind, knob.label, name)
            for knob, text in zip(self.knobs, texts, strict=True)
        }
        variant = self.variant_name(values)
        resolution = values.pop(RESOLUTION, self.resolution)
        return ModelSpec(
            name,
            variant,
            self.name,
            values,
            resolution,
            self.preprocessing.for_resolution(resolution),
            self.weights.get(variant),
        )


def _spell(value: float | int, kind: type) -> str:
    return repr(float(value)) if kind is float else str(value)


def _pick(text: str, allowed: tuple, kind: type, what: str, name: str):
    try:
        value = kind(text)
    except ValueError:
        raise UnknownModelError(f"{name!r}: {what} {text!r} is not a number") from None
    for candidate in allowed:
        if math.isclose(float(candidate), float(value)):
            return candidate
    raise UnknownModelError(f"{name!r}: {what} {text} is not one of {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------------------------------------
# Published checkpoints. torchvision file names carry the first hex digits of the file's SHA-256.
_TV = "https://download.pytorch.org/models/"
# timm's MobileNet v1 1.0, trained on ImageNet-1k with its "ra4" recipe. The URL is pinned to the hub
# commit that added the file, so its bytes cannot change under us. Its SHA-256 could not be confirmed
# when this was written, so none is pinned (empty): builder.weights records the digest seen on the first
# download beside the cached file (trust on first use), re-checks it on every later use and writes it
# into every manifest built from it. Pin it here once confirmed.
TIMM_MOBILENET_V1_100 = PublishedWeights(
    url=(
        "https://huggingface.co/timm/mobilenetv1_100.ra4_e3600_r224_in1k/resolve/"
        "dda9ab42e23f3061aa191630817df76e8fe9cace/pytorch_model.bin"
    ),
    sha256="",
    layout="timm",
    note="timm mobilenetv1_100.ra4_e3600_r224_in1k; trained with bicubic resize and mean=std=0.5",
)


def _torchvision(file: str, digest: str) -> PublishedWeights:
    return PublishedWeights(_TV + file, digest, "torchvision")


_WIDTH = "width_multiplier"

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="mobilenet_v1",
            grammar="mobilenet_v1_{width_multiplier}_{resolution}",
            knobs=(
                Knob(_WIDTH, "width multiplier", float, MOBILENET_V1_WIDTHS),
                Knob(RESOLUTION, "resolution", int, MOBILENET_V1_RESOLUTIONS),
            ),
            default="mobilenet_v1_1.0_224",
            example="mobilenet_v1_0.75_192",
            constructor="models.mobilenet_v1:MobileNetV1",
            preprocessing=PreprocessingRule(INCEPTION_MEAN_STD, INCEPTION_MEAN_STD, "bicubic"),
            # Global pooling makes the checkpoint resolution-independent: every 1.0 variant uses it.
            weights={f"mobilenet_v1_1.0_{res}": TIMM_MOBILENET_V1_100 for res in MOBILENET_V1_RESOLUTIONS},
        ),
        Family(
            name="mobilenet_v2",
            grammar="mobilenet_v2_{width_multiplier}_{resolution}",
            knobs=(
                Knob(_WIDTH, "width multiplier", float, MOBILENET_V2_WIDTHS),
                Knob(RESOLUTION, "resolution", int, MOBILENET_V2_RESOLUTIONS),
            ),
            default="mobilenet_v2_1.0_224",
            example="mobilenet_v2_0.5_160",
            constructor="models.mobilenet_v2:MobileNetV2",
            preprocessing=PreprocessingRule(),
            weights={"mobilenet_v2_1.0_224": _torchvision("mobilenet_v2-b0353104.pth", "b0353104")},
        ),
        Family(
            name="shufflenet_v1",
            grammar="shufflenet_v1_g{groups}_{scale}x",
            knobs=(
                Knob("groups", "groups", int, SHUFFLENET_V1_GROUPS),
                Knob("scale", "scale", float, SHUFFLENET_V1_SCALES),
            ),
            default="shufflenet_v1_g3_1.0x",
            example="shufflenet_v1_g8_0.5x",
            constructor="models.shufflenet_v1:ShuffleNetV1",
            preprocessing=PreprocessingRule(),
        ),
        Family(
            name="shufflenet_v2",
            grammar="shufflenet_v2_{scale}x",
            knobs=(Knob("scale", "scale", float, SHUFFLENET_V2_SCALES),),
            default="shufflenet_v2_1.0x",
            example="shufflenet_v2_2.0x",
            constructor="models.shufflenet_v2:ShuffleNetV2",
            preprocessing=PreprocessingRule(),
            weights={
                "shufflenet_v2_0.5x": _torchvision("shufflenetv2_x0.5-f707e7126e.pth", "f707e7126e"),
                "shufflenet_v2_1.0x": _torchvision("shufflenetv2_x1-5666bf0f80.pth", "5666bf0f80"),
                "shufflenet_v2_1.5x": _torchvision("shufflenetv2_x1_5-3c479a10.pth", "3c479a10"),
                "shufflenet_v2_2.0x": _torchvision("shufflenetv2_x2_0-8be3c8ee.pth", "8be3c8ee"),
            },
        ),
    )
}

# Derived from the table; nothing below registers a family.
DEFAULT_MODELS: tuple[str, ...] = tuple(FAMILIES)
ALIASES: dict[str, str] = {family.name: family.default for family in FAMILIES.values()}
PUBLISHED: dict[str, PublishedWeights] = {
    variant: weights for family in FAMILIES.values() for variant, weights in family.weights.items()
}


def split_precision(name: str) -> tuple[str, str]:
    """``"mobilenet_v2:int8"`` -> ``("mobilenet_v2", "int8")``; no suffix means fp32."""
    base, sep, precision = name.partition(":")
    if not sep:
        return name, "fp32"
    if precision not in PRECISIONS:
        raise UnknownModelError(f"{name!r}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return base, precision


@cache
def parse(name: str) -> ModelSpec:
    """The spec of a model name (a precision suffix is accepted and ignored here)."""
    base, _ = split_precision(name.strip())
    variant = ALIASES.get(base, base)
    for family in FAMILIES.values():
        match = family.pattern.fullmatch(variant)
        if match:
            return family.spec(base, match.groups())
    examples = ", ".join(family.example for family in FAMILIES.values())
    raise UnknownModelError(
        f"{name!r} is not a model name; expected one of {', '.join(DEFAULT_MODELS)} or a variant such as "
        f"{examples}"
    )


def all_variants() -> list[str]:
    """Every full variant name the grammar admits, family by family."""
    return [variant for family in FAMILIES.values() for variant in family.variants()]


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order."""
    text = resources.files("contract").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(labels) == 1000, f"imagenet_classes.txt has {len(labels)} labels, expected 1000"
    return labels
