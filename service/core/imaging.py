"""Request bytes -> model input: format sniffing, safe decoding and the manifest's preprocessing.

Torch-free (numpy + Pillow). The semantics are torchvision's ImageNet evaluation transform on a
PIL image, which ``tests/reference_pipeline.py`` restates plainly and the tests hold this module to:

* only JPEG, PNG, WebP, BMP, GIF and TIFF are opened, each by its own Pillow plugin (the format
  is sniffed from the bytes, so no other decoder, e.g. Ghostscript for EPS, is ever reached);
* the pixel count is checked from the header, before anything is decoded, and so is the size of
  the resized intermediate (a 1 x 100000 strip is small, but its shorter side resized to 256 is not);
* the first frame of an animated image; EXIF orientation applied (a broken EXIF block is ignored);
* every mode becomes RGB: alpha is dropped, not composited (what ``convert("RGB")`` does, and what
  torchvision-trained models saw); 16-bit samples keep their high byte (Pillow's own conversion
  clips them at 255, which turns a 16-bit photo white);
* the shorter side is resized to ``spec.resize`` (longer side ``int(resize * long / short)``) with
  Pillow's antialiased filter, then a ``spec.crop`` square is cut from the centre at torchvision's
  offsets, scaled to 0..1 and normalised with the manifest's mean and std, as float32 CHW.

The one departure from a plain full decode: a JPEG whose shorter side is at least
``2 * DRAFT_MIN_FACTOR * spec.resize`` is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling
(Pillow's draft mode), which skips most of the decoding work (a 4000x3000 photo: ~3x faster);
the result stays within the bound the tests state. Everything else is bit-identical to the
reference, including the normalisation (a lookup table computed with the reference arithmetic).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from contract.manifest import PreprocessingSpec
from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType

JPEG, PNG, WEBP = "image/jpeg", "image/png", "image/webp"
BMP, GIF, TIFF = "image/bmp", "image/gif", "image/tiff"
SUPPORTED_MEDIA_TYPES = (JPEG, PNG, WEBP, BMP, GIF, TIFF)

# Declarations a client may send with an image body; the bytes decide what it really is.
_ACCEPTED_DECLARATIONS = {
    *SUPPORTED_MEDIA_TYPES,
    "application/octet-stream",
    # Aliases that browsers and old tools still send.
    "image/jpg",
    "image/pjpeg",
    "image/x-png",
    "image/x-ms-bmp",
    "image/x-bmp",
}

# Image formats recognised by their bytes that this service does not decode (415, not 400).
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}

# Each format's Pillow plugin, called directly rather than through Image.open(): Image.open() runs
# Pillow's process-wide decompression-bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error
# above twice that) before the caller sees the size. The limit here is ``max_image_pixels``, checked
# from the same header, and Pillow's global setting is left alone for any other code in the process.
_OPENERS: dict[str, Callable[[io.BytesIO], ImageFile.ImageFile]] = {
    JPEG: JpegImagePlugin.jpeg_factory,
    PNG: PngImagePlugin.PngImageFile,
    WEBP: WebPImagePlugin.WebPImageFile,
    BMP: BmpImagePlugin.BmpImageFile,
    GIF: GifImagePlugin.GifImageFile,
    TIFF: TiffImagePlugin.TiffImageFile,
}

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

# A JPEG is DCT-scaled only while its scaled shorter side stays at least this many times the resize
# target, so the antialiased resize still averages >= 2 decoded pixels into each output pixel.
DRAFT_MIN_FACTOR = 2

_T = Image.Transpose
# EXIF orientation -> the transposition that displays the stored pixels upright (as in
# ImageOps.exif_transpose), and for each: (swaps axes, stored origin lands right, lands bottom).
_ORIENTATION = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE}
_ORIENTATION |= {6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_ORIGIN_MOVES = {
    _T.FLIP_LEFT_RIGHT: (False, True, False),
    _T.ROTATE_180: (False, True, True),
    _T.FLIP_TOP_BOTTOM: (False, False, True),
    _T.TRANSPOSE: (True, False, False),
    _T.ROTATE_270: (True, True, False),
    _T.TRANSVERSE: (True, True, True),
    _T.ROTATE_90: (True, False, True),
}

_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def sniff_media_type(data: bytes, declared: str | None) -> str:
    """The media type of ``data`` from its magic bytes; one of :data:`SUPPORTED_MEDIA_TYPES`.

    ``declared`` (a Content-Type, parameters allowed) must be one of the supported image types,
    ``application/octet-stream`` or absent, else :class:`UnsupportedMediaType`. The bytes decide the
    type; recognisable but unsupported images (SVG, HEIF/HEIC/AVIF) are also
    :class:`UnsupportedMediaType`; empty or unrecognisable bytes are :class:`InvalidImage`.
    """
    if declared:
        media_type = declared.split(";", 1)[0].strip().lower()
        if media_type and media_type not in _ACCEPTED_DECLARATIONS:
            raise UnsupportedMediaType(
                f"unsupported content type {media_type!r}: send JPEG, PNG, WebP, BMP, GIF or TIFF"
            )
    if not data:
        raise InvalidImage("empty image body")
    sniffed = _magic(data)
    if sniffed is not None:
        return sniffed
    head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<?xml", b"<svg", b"<!doctype svg")):
        raise UnsupportedMediaType("SVG is not supported: send JPEG, PNG, WebP, BMP, GIF or TIFF")
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        raise UnsupportedMediaType("HEIF/HEIC/AVIF is not supported: send JPEG, PNG, WebP, BMP, GIF or TIFF")
    raise InvalidImage("not an image this service decodes (JPEG, PNG, WebP, BMP, GIF or TIFF)")


def _magic(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF and BigTIFF
        return TIFF
    if data.startswith(b"BM"):
        return BMP
    return None


def preprocess(data: bytes, spec: PreprocessingSpec, max_image_pixels: int) -> np.ndarray:
    """Decode ``data`` and return the model input: float32, C-contiguous, ``(3, crop, crop)``.

    Raises :class:`ImageTooLarge` when the header's width x height, or that of the image resized
    to ``spec.resize`` on its shorter side, exceeds ``max_image_pixels`` (nothing has been decoded
    by then), :class:`InvalidImage` for anything that does not decode
    (truncated, corrupt, or Pillow failing in any other way), and whatever :func:`sniff_media_type`
    raises for bytes that are not a supported image.
    """
    opener = _OPENERS[sniff_media_type(data, None)]
    try:
        img = opener(io.BytesIO(data))
        _check_size(img.size, spec.resize, max_image_pixels)
        rgb, full_size, box = _decode(img, spec.resize)
        pixels = _resize_and_crop(rgb, full_size, box, spec)
    except ServiceError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check on frames or tiles of the file
        raise ImageTooLarge(str(exc)) from exc
    except Exception as exc:  # Pillow signals bad data with many types (OSError, SyntaxError, ...)
        raise InvalidImage(f"cannot decode image: {str(exc)[:200] or type(exc).__name__}") from exc
    return _normalise(pixels, spec.mean, spec.std)


def _check_size(size: tuple[int, int], resize: int, max_image_pixels: int) -> None:
    width, height = size
    if width * height > max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}"
        )
    resized = _resized_size(size, resize)
    if resized[0] * resized[1] > max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height}: resized to {resized[0]}x{resized[1]} it would exceed "
            f"the limit of {max_image_pixels} pixels"
        )


def _resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    # torchvision's Resize(int): the shorter side becomes `resize`, the longer one keeps the ratio
    # (truncated).
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _decode(img: ImageFile.ImageFile, resize: int) -> tuple[Image.Image, tuple[int, int], tuple | None]:
    """Decode the first frame upright in RGB.

    Returns the image, the full-resolution (width, height) it stands for, and, when the JPEG was
    DCT-scaled, the box of the returned image that holds the picture (the last row and column of
    a scaled image cover a partial block), which the resize samples so the geometry matches the full decode.
    """
    full_size = img.size
    box = _draft(img, resize) if isinstance(img, JpegImagePlugin.JpegImageFile) else None
    img.load()
    method = _orientation(img)
    if method is not None:
        img = img.transpose(method)
        swap, right, bottom = _ORIGIN_MOVES[method]
        if swap:
            full_size = full_size[::-1]
        if box is not None:
            width, height = (box[3], box[2]) if swap else (box[2], box[3])
            left = img.width - width if right else 0
            top = img.height - height if bottom else 0
            box = (left, top, left + width, top + height)
    return _to_rgb(img), full_size, box


def _draft(img: JpegImagePlugin.JpegImageFile, resize: int) -> tuple[float, float, float, float] | None:
    """Ask libjpeg for the coarsest DCT scaling that leaves >= DRAFT_MIN_FACTOR x resize pixels."""
    width, height = img.size
    for scale in (8, 4, 2):
        if min(width, height) // scale >= DRAFT_MIN_FACTOR * resize:
            # Requesting exactly size / scale makes Pillow choose this scale.
            drafted = img.draft(None, (width // scale, height // scale))
            return drafted[1] if drafted else None
    return None


def _orientation(img: Image.Image) -> Image.Transpose | None:
    try:
        return _ORIENTATION.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block: show the pixels as stored
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_MODES:
        # 16-bit samples (mode "I" is taken to hold them too): keep the high byte. Pillow's
        # convert() would clip at 255 instead. Same as Pillow's 16-bit RGB PNG decoding.
        values = np.asarray(img)
        if img.mode == "I":
            values = np.clip(values, 0, 65535)
        img = Image.fromarray((values >> 8).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_and_crop(
    img: Image.Image, full_size: tuple[int, int], box: tuple | None, spec: PreprocessingSpec
) -> np.ndarray:
    # The target follows from the full-resolution size, even when a DCT-scaled image is resampled.
    target = _resized_size(full_size, spec.resize)
    img = img.resize(target, _RESAMPLE[spec.interpolation], box=box)
    # torchvision's CenterCrop offsets (round half to even, as Python's round()).
    left = round((target[0] - spec.crop) / 2.0)
    top = round((target[1] - spec.crop) / 2.0)
    # Only the crop is copied out of the resized image: pasted into a crop-sized image (areas outside
    # the resized image stay black, as in a crop). Cropping in numpy would first copy the whole
    # resized image out in 64 KB pieces (a 1 x 20000 strip resized to 36 x 720000: 100 MB through a
    # decode thread's heap, which glibc then kept: +64 MiB resident per decode thread,
    # tests/test_hostile_input.py). Not Image.crop(): it runs Pillow's process-wide decompression-bomb
    # check on the box, which the limit any other code in the process sets (Image.MAX_IMAGE_PIXELS)
    # would then turn against a 224 x 224 crop; the image was held to max_image_pixels before decoding.
    cropped = Image.new(img.mode, (spec.crop, spec.crop))
    cropped.paste(img, (-left, -top))
    return np.asarray(cropped)


@functools.lru_cache(maxsize=32)
def _lookup_table(mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    # The reference arithmetic in float32 -- (v / 255 - mean) / std -- evaluated once for each of
    # the 256 byte values per channel; gathering from it is bit-identical and faster.
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (values[None, :] - mean32) / std32
    table.flags.writeable = False
    return table


def _normalise(pixels: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    table = _lookup_table(tuple(mean), tuple(std))
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):
        # mode="clip": with the default "raise", numpy buffers ``out`` (six times slower here); byte
        # indices are always within the 256-entry table, so clipping never changes a value.
        np.take(table[channel], pixels[:, :, channel], out=out[channel], mode="clip")
    return out
