"""The model zoo: every servable model name, what network it is and how to feed it.

Torch-free on purpose: the build step and the tests read it, and so may tools that never load a
network. Names follow DESIGN.md's grammar:

    mobilenet_v1_<alpha>_<res>     mobilenet_v1 = mobilenet_v1_1.0_224
    mobilenet_v2_<width>_<res>     mobilenet_v2 = mobilenet_v2_1.0_224
    shufflenet_v1_g<g>_<scale>x    shufflenet_v1 = shufflenet_v1_g3_1.0x
    shufflenet_v2_<scale>x         shufflenet_v2 = shufflenet_v2_1.0x

A reduced-precision build is served as ``<name>:fp16`` or ``<name>:int8``; :func:`split_precision`
separates the suffix, and :func:`parse` accepts both forms.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

DEFAULT_MODELS: tuple[str, ...] = ("mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

# The knob values each paper reports (and, for ShuffleNet v1, the groups of its Table 1).
MOBILENET_V1_WIDTHS = (0.25, 0.5, 0.75, 1.0)
MOBILENET_V1_RESOLUTIONS = (128, 160, 192, 224)
MOBILENET_V2_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_V2_RESOLUTIONS = (96, 128, 160, 192, 224)
SHUFFLENET_V1_GROUPS = (1, 2, 3, 4, 8)
SHUFFLENET_V1_SCALES = (0.5, 1.0, 1.5, 2.0)
SHUFFLENET_V2_SCALES = (0.5, 1.0, 1.5, 2.0)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fraction of the resized image kept by the center crop (resize 256 -> crop 224), as both
# torchvision's and timm's ImageNet evaluation recipes use it.
DEFAULT_CROP_PCT = 0.875


class UnknownModelError(ValueError):
    """The name does not follow the zoo's grammar or names a knob value no paper defines."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: shorter side resized, center crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def for_resolution(cls, crop: int, crop_pct: float = DEFAULT_CROP_PCT, **kwargs) -> Preprocessing:
        return cls(resize=math.floor(crop / crop_pct), crop=crop, **kwargs)

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "color": "RGB",
            "layout": "NCHW",
            "scale": "0..1 then (x - mean) / std",
        }


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
    preprocessing: Preprocessing
    weights: PublishedWeights | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)


# ---------------------------------------------------------------------------------------------
# Published checkpoints. torchvision file names carry the first hex digits of the file's SHA-256.
_TV = "https://download.pytorch.org/models/"
# timm's MobileNet v1 1.0, trained on ImageNet-1k with its "ra4" recipe. The URL is pinned to the hub
# commit that added the file, so its bytes cannot change under us. Its SHA-256 could not be confirmed
# when this was written, so none is pinned (empty): models.weights records the digest seen on the first
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
PUBLISHED: dict[str, PublishedWeights] = {
    "mobilenet_v2_1.0_224": PublishedWeights(_TV + "mobilenet_v2-b0353104.pth", "b0353104", "torchvision"),
    "shufflenet_v2_0.5x": PublishedWeights(
        _TV + "shufflenetv2_x0.5-f707e7126e.pth", "f707e7126e", "torchvision"
    ),
    "shufflenet_v2_1.0x": PublishedWeights(
        _TV + "shufflenetv2_x1-5666bf0f80.pth", "5666bf0f80", "torchvision"
    ),
    "shufflenet_v2_1.5x": PublishedWeights(_TV + "shufflenetv2_x1_5-3c479a10.pth", "3c479a10", "torchvision"),
    "shufflenet_v2_2.0x": PublishedWeights(_TV + "shufflenetv2_x2_0-8be3c8ee.pth", "8be3c8ee", "torchvision"),
    # Global pooling makes the checkpoint resolution-independent: every MobileNet v1 1.0 variant uses it.
    **{f"mobilenet_v1_1.0_{res}": TIMM_MOBILENET_V1_100 for res in MOBILENET_V1_RESOLUTIONS},
}

# MobileNet v1 was trained (TF-slim, and timm's checkpoint above) on inputs scaled to [-1, 1]:
# mean = std = 0.5. timm's checkpoint also resizes bicubically. The other families follow torchvision.
INCEPTION_MEAN_STD = (0.5, 0.5, 0.5)


def _fmt(value: float) -> str:
    return repr(float(value))


def _pick(text: str, allowed: tuple, kind: type, what: str, name: str):
    try:
        value = kind(text)
    except ValueError:
        raise UnknownModelError(f"{name!r}: {what} {text!r} is not a number") from None
    for candidate in allowed:
        if math.isclose(float(candidate), float(value)):
            return candidate
    raise UnknownModelError(f"{name!r}: {what} {text} is not one of {', '.join(map(str, allowed))}")


_NUM = r"(\d+(?:\.\d+)?)"
_GRAMMAR = (
    ("mobilenet_v1", re.compile(rf"mobilenet_v1_{_NUM}_(\d+)")),
    ("mobilenet_v2", re.compile(rf"mobilenet_v2_{_NUM}_(\d+)")),
    ("shufflenet_v1", re.compile(rf"shufflenet_v1_g(\d+)_{_NUM}x")),
    ("shufflenet_v2", re.compile(rf"shufflenet_v2_{_NUM}x")),
)
_ALIASES = {
    "mobilenet_v1": "mobilenet_v1_1.0_224",
    "mobilenet_v2": "mobilenet_v2_1.0_224",
    "shufflenet_v1": "shufflenet_v1_g3_1.0x",
    "shufflenet_v2": "shufflenet_v2_1.0x",
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
    variant = _ALIASES.get(base, base)
    for family, pattern in _GRAMMAR:
        match = pattern.fullmatch(variant)
        if match:
            return _SPEC_BUILDERS[family](base, *match.groups())
    raise UnknownModelError(
        f"{name!r} is not a model name; expected one of {', '.join(DEFAULT_MODELS)} or a variant such as "
        "mobilenet_v1_0.75_192, mobilenet_v2_0.5_160, shufflenet_v1_g8_0.5x, shufflenet_v2_2.0x"
    )


def _mobilenet_v1(name: str, alpha: str, res: str) -> ModelSpec:
    width = _pick(alpha, MOBILENET_V1_WIDTHS, float, "width multiplier", name)
    resolution = _pick(res, MOBILENET_V1_RESOLUTIONS, int, "resolution", name)
    variant = f"mobilenet_v1_{_fmt(width)}_{resolution}"
    return ModelSpec(
        name,
        variant,
        "mobilenet_v1",
        {"width_multiplier": width},
        resolution,
        Preprocessing.for_resolution(
            resolution, mean=INCEPTION_MEAN_STD, std=INCEPTION_MEAN_STD, interpolation="bicubic"
        ),
        PUBLISHED.get(variant),
    )


def _mobilenet_v2(name: str, width_text: str, res: str) -> ModelSpec:
    width = _pick(width_text, MOBILENET_V2_WIDTHS, float, "width multiplier", name)
    resolution = _pick(res, MOBILENET_V2_RESOLUTIONS, int, "resolution", name)
    variant = f"mobilenet_v2_{_fmt(width)}_{resolution}"
    return ModelSpec(
        name,
        variant,
        "mobilenet_v2",
        {"width_multiplier": width},
        resolution,
        Preprocessing.for_resolution(resolution),
        PUBLISHED.get(variant),
    )


def _shufflenet_v1(name: str, groups_text: str, scale_text: str) -> ModelSpec:
    groups = _pick(groups_text, SHUFFLENET_V1_GROUPS, int, "groups", name)
    scale = _pick(scale_text, SHUFFLENET_V1_SCALES, float, "scale", name)
    variant = f"shufflenet_v1_g{groups}_{_fmt(scale)}x"
    return ModelSpec(
        name,
        variant,
        "shufflenet_v1",
        {"groups": groups, "scale": scale},
        224,
        Preprocessing.for_resolution(224),
        PUBLISHED.get(variant),
    )


def _shufflenet_v2(name: str, scale_text: str) -> ModelSpec:
    scale = _pick(scale_text, SHUFFLENET_V2_SCALES, float, "scale", name)
    variant = f"shufflenet_v2_{_fmt(scale)}x"
    return ModelSpec(
        name,
        variant,
        "shufflenet_v2",
        {"scale": scale},
        224,
        Preprocessing.for_resolution(224),
        PUBLISHED.get(variant),
    )


_SPEC_BUILDERS = {
    "mobilenet_v1": _mobilenet_v1,
    "mobilenet_v2": _mobilenet_v2,
    "shufflenet_v1": _shufflenet_v1,
    "shufflenet_v2": _shufflenet_v2,
}


def all_variants() -> list[str]:
    """Every full variant name the grammar admits, family by family."""
    names = [f"mobilenet_v1_{_fmt(a)}_{r}" for a in MOBILENET_V1_WIDTHS for r in MOBILENET_V1_RESOLUTIONS]
    names += [f"mobilenet_v2_{_fmt(w)}_{r}" for w in MOBILENET_V2_WIDTHS for r in MOBILENET_V2_RESOLUTIONS]
    names += [f"shufflenet_v1_g{g}_{_fmt(s)}x" for g in SHUFFLENET_V1_GROUPS for s in SHUFFLENET_V1_SCALES]
    names += [f"shufflenet_v2_{_fmt(s)}x" for s in SHUFFLENET_V2_SCALES]
    return names


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order."""
    text = resources.files("contract").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(labels) == 1000, f"imagenet_classes.txt has {len(labels)} labels, expected 1000"
    return labels
