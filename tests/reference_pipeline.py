"""A plain reference for the server's preprocessing, written for clarity rather than speed.

Full decode with Pillow (no draft/DCT scaling), EXIF orientation by ImageOps.exif_transpose,
RGB conversion (16-bit samples keep their high byte), torchvision's Resize(int) of the shorter
side with Pillow's antialiased filter, torchvision's CenterCrop, then (x / 255 - mean) / std in
float32, CHW. The server's tensor must equal this one exactly wherever it decodes the same
pixels, and stay within a stated bound where it decodes a JPEG at reduced scale.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps

from contract.manifest import PreprocessingSpec
from service.core.imaging import DRAFT_MIN_FACTOR

# Where the server decodes a large JPEG at reduced scale (service.core.imaging.DRAFT_MIN_FACTOR), its
# tensor may differ from this one by at most these, in normalised units (one 8-bit level is
# 1 / 255 / std ~= 0.017 for the ImageNet std). Measured worst cases over 24 photos of 1024 to 4096
# pixels, qualities 75-95, 4:2:0 and 4:4:4, every EXIF orientation: 0.17 and 0.0065.
DRAFT_MAX_ABS_DIFF = 0.3
DRAFT_MEAN_ABS_DIFF = 0.015

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def reference_image(data: bytes) -> Image.Image:
    """The upright RGB image the preprocessing starts from (first frame, full resolution)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    with contextlib.suppress(Exception):  # unreadable EXIF: keep the stored orientation
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(values, 0, 65535) // 256).astype(np.uint8))
    return img.convert("RGB")


def reference_tensor(data: bytes, spec: PreprocessingSpec) -> np.ndarray:
    """float32 (3, crop, crop) for the image in ``data``, normalised as ``spec`` says."""
    img = reference_image(data)

    width, height = img.size
    if width <= height:
        size = (spec.resize, int(spec.resize * height / width))
    else:
        size = (int(spec.resize * width / height), spec.resize)
    img = img.resize(size, RESAMPLE[spec.interpolation])

    top = round((size[1] - spec.crop) / 2.0)
    left = round((size[0] - spec.crop) / 2.0)
    img = img.crop((left, top, left + spec.crop, top + spec.crop))

    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def decodes_at_reduced_scale(data: bytes, spec: PreprocessingSpec) -> bool:
    """Whether the server DCT-scales this image (a JPEG with room for at least a 1/2 scale)."""
    img = Image.open(io.BytesIO(data))
    return img.format in ("JPEG", "MPO") and min(img.size) // 2 >= DRAFT_MIN_FACTOR * spec.resize


def assert_matches_reference(tensor: np.ndarray, data: bytes, spec: PreprocessingSpec) -> None:
    """``tensor`` equals the reference exactly, or within the draft bound where that path is taken."""
    expected = reference_tensor(data, spec)
    assert tensor.shape == expected.shape == (3, spec.crop, spec.crop)
    assert tensor.dtype == np.float32
    if not decodes_at_reduced_scale(data, spec):
        assert np.array_equal(tensor, expected), f"max abs diff {np.abs(tensor - expected).max()}"
        return
    diff = np.abs(tensor.astype(np.float64) - expected)
    assert diff.max() <= DRAFT_MAX_ABS_DIFF, f"max abs diff {diff.max()} > {DRAFT_MAX_ABS_DIFF}"
    assert diff.mean() <= DRAFT_MEAN_ABS_DIFF, f"mean abs diff {diff.mean()} > {DRAFT_MEAN_ABS_DIFF}"
