"""How an image becomes a network's input: the one description the zoo, the manifest and the server share.

The zoo derives it from a family's rule and a resolution, the build writes it into ``model.json``, and
the server's imaging applies exactly what the manifest says.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fraction of the resized image kept by the center crop (resize 256 -> crop 224), as both
# torchvision's and timm's ImageNet evaluation recipes use it.
DEFAULT_CROP_PCT = 0.875

Interpolation = Literal["bilinear", "bicubic"]


# Shorter side resized, square center crop, RGB scaled to 0..1, then normalised per channel. (A comment,
# not a docstring: pydantic would copy a docstring into the manifest's JSON schema.)
class PreprocessingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: int = Field(gt=0, description="shorter side after resizing, pixels")
    crop: int = Field(gt=0, description="side of the square center crop, pixels")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bilinear"
    color: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    scale: str = "0..1 then (x - mean) / std"

    @classmethod
    def for_resolution(
        cls,
        crop: int,
        *,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        interpolation: Interpolation = "bilinear",
        crop_pct: float = DEFAULT_CROP_PCT,
    ) -> PreprocessingSpec:
        """The evaluation recipe for a ``crop`` x ``crop`` input: resize to ``crop / crop_pct`` first."""
        return cls(
            resize=math.floor(crop / crop_pct), crop=crop, mean=mean, std=std, interpolation=interpolation
        )
