"""service.core.imaging against the plain reference pipeline, and its behaviour on hostile input."""

from __future__ import annotations

import contextlib
import io
import struct
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contract.manifest import PreprocessingSpec
from contract.photos import encode, make_corpus, make_photo, photo_jpeg, png_rgb16, with_orientation
from service.core.imaging import SUPPORTED_MEDIA_TYPES, preprocess, sniff_media_type
from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType
from tests.reference_pipeline import (
    DRAFT_MEAN_ABS_DIFF,
    assert_matches_reference,
    decodes_at_reduced_scale,
    reference_tensor,
)

IMAGENET = PreprocessingSpec(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LIMIT = 40_000_000
CORPUS = make_corpus()


def png_header(width: int, height: int) -> bytes:
    """A well-formed PNG that declares ``width`` x ``height`` but carries only a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def png(img: Image.Image) -> bytes:
    return encode(img, "PNG")


# -- agreement with the reference ---------------------------------------------------------------


def test_corpus_covers_the_acceptance_list() -> None:
    assert len(CORPUS) >= 20
    names = {name for name, _, _ in CORPUS}
    assert {"photo_4000x3000.jpg", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png"} <= names
    assert {"exif_orientation_6.jpg", "photo.webp", "pixel_1x1.png", "pixel_1x1.jpg"} <= names
    assert {content_type for _, _, content_type in CORPUS} == set(SUPPORTED_MEDIA_TYPES)


@pytest.mark.parametrize(("name", "data", "content_type"), CORPUS, ids=[item[0] for item in CORPUS])
def test_corpus_matches_reference(name: str, data: bytes, content_type: str) -> None:
    tensor = preprocess(data, IMAGENET, LIMIT)
    assert tensor.flags.c_contiguous
    assert np.isfinite(tensor).all()
    assert_matches_reference(tensor, data, IMAGENET)


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessingSpec(
            resize=232, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
        ),
        PreprocessingSpec(resize=73, crop=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ],
    ids=["bicubic-232-224", "bilinear-73-64"],
)
def test_other_specs_match_reference(spec: PreprocessingSpec) -> None:
    for name, data, _ in CORPUS:
        if name != "photo_4000x3000.jpg":
            assert_matches_reference(preprocess(data, spec, LIMIT), data, spec)


def test_large_jpeg_takes_the_reduced_decode_and_small_photos_do_not() -> None:
    big, small = photo_jpeg(4000, 3000, 7), photo_jpeg(500, 375, 1)
    assert decodes_at_reduced_scale(big, IMAGENET) and not decodes_at_reduced_scale(small, IMAGENET)
    assert not np.array_equal(preprocess(big, IMAGENET, LIMIT), reference_tensor(big, IMAGENET))
    assert np.array_equal(preprocess(small, IMAGENET, LIMIT), reference_tensor(small, IMAGENET))


def test_preprocess_is_thread_safe() -> None:
    items = [data for _, data, _ in CORPUS if len(data) < 300_000]
    expected = [preprocess(data, IMAGENET, LIMIT) for data in items]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda data: preprocess(data, IMAGENET, LIMIT), items))
    assert all(np.array_equal(a, b) for a, b in zip(results, expected, strict=True))


# -- EXIF orientation ---------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_equals_the_prerotated_image(orientation: int) -> None:
    stored = make_photo(640, 480, seed=40)
    rotated_jpeg = with_orientation(stored, orientation)
    # The same decoded pixels, transposed by hand and stored losslessly without a tag.
    pixels = Image.open(io.BytesIO(rotated_jpeg)).convert("RGB")
    # EXIF 6 means "turn 90 degrees clockwise to display": Pillow's ROTATE_270 (it counts CCW).
    t = Image.Transpose
    method = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE}
    method |= {6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90}
    upright = png(pixels.transpose(method[orientation]))
    if orientation in (5, 6, 7, 8):
        assert Image.open(io.BytesIO(upright)).size == (480, 640)

    result = preprocess(rotated_jpeg, IMAGENET, LIMIT)
    assert np.array_equal(result, preprocess(upright, IMAGENET, LIMIT))
    assert not np.array_equal(result, preprocess(png(pixels), IMAGENET, LIMIT))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_keeps_draft_geometry(orientation: int) -> None:
    # 1023x771 at 1/4 scale leaves a partial last column and row; the resize must use the region
    # that holds picture wherever the orientation moved it, so the error does not grow.
    spec = PreprocessingSpec(resize=64, crop=56, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    stored = make_photo(1023, 771, seed=41)

    def error(data: bytes) -> float:
        assert decodes_at_reduced_scale(data, spec)
        return float(np.abs(preprocess(data, spec, LIMIT) - reference_tensor(data, spec)).mean())

    upright_error = error(with_orientation(stored, 1))
    assert upright_error <= DRAFT_MEAN_ABS_DIFF
    assert error(with_orientation(stored, orientation)) <= 1.1 * upright_error + 1e-6


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 16,  # garbage after the header
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # first IFD far beyond the block
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00\x00\x00\x00\x00",
    ],
    ids=["garbage", "bad-offset", "orientation-9"],
)
def test_broken_exif_is_ignored(exif: bytes) -> None:
    photo = make_photo(480, 360, seed=42)
    plain = encode(photo, "JPEG", quality=90)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt block
        broken = encode(photo, "JPEG", quality=90, exif=exif)
        result = preprocess(broken, IMAGENET, LIMIT)
        expected = reference_tensor(broken, IMAGENET)
    assert np.array_equal(result, preprocess(plain, IMAGENET, LIMIT))
    assert np.array_equal(result, expected)


# -- pixel modes --------------------------------------------------------------------------------


def test_16_bit_maps_the_full_range() -> None:
    levels = np.arange(256, dtype=np.uint16).repeat(4).reshape(32, 32)
    wide = png(Image.fromarray(levels * 257))
    narrow = png(Image.fromarray(levels.astype(np.uint8)))
    assert Image.open(io.BytesIO(wide)).mode == "I;16"
    assert np.array_equal(preprocess(wide, IMAGENET, LIMIT), preprocess(narrow, IMAGENET, LIMIT))

    white16 = png(Image.fromarray(np.full((10, 10), 65535, np.uint16)))
    white8 = png(Image.new("L", (10, 10), 255))
    assert np.array_equal(preprocess(white16, IMAGENET, LIMIT), preprocess(white8, IMAGENET, LIMIT))

    # Mid-gray stays mid-gray (clipping at 255 would make it white).
    gray16 = png(Image.fromarray(np.full((10, 10), 128 * 257, np.uint16)))
    gray8 = png(Image.new("L", (10, 10), 128))
    assert np.array_equal(preprocess(gray16, IMAGENET, LIMIT), preprocess(gray8, IMAGENET, LIMIT))


def test_16_bit_rgb_and_32_bit_integer_images() -> None:
    photo = make_photo(64, 48, seed=43)
    high = np.asarray(photo, dtype=np.uint16)
    rgb16 = png_rgb16(high * 256 + 255)
    assert np.array_equal(preprocess(rgb16, IMAGENET, LIMIT), preprocess(png(photo), IMAGENET, LIMIT))

    values = np.array([[-5, 0, 256, 32896], [65535, 70000, 1 << 30, 512]], dtype=np.int32)
    tiff = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "I"
    expected = png(Image.fromarray(np.array([[0, 0, 1, 128], [255, 255, 255, 2]], dtype=np.uint8)))
    assert np.array_equal(preprocess(tiff, IMAGENET, LIMIT), preprocess(expected, IMAGENET, LIMIT))


def test_cmyk_jpeg_keeps_its_colours() -> None:
    photo = make_photo(500, 375, seed=44)
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    result = preprocess(cmyk, IMAGENET, LIMIT)
    assert np.array_equal(result, reference_tensor(cmyk, IMAGENET))
    rgb = preprocess(encode(photo, "JPEG", quality=95), IMAGENET, LIMIT)
    assert np.abs(result - rgb).mean() < 0.05  # inverted or swapped channels would be ~1


def test_alpha_is_dropped_not_composited() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    assert np.array_equal(
        preprocess(png(rgba), IMAGENET, LIMIT), preprocess(png(rgba.convert("RGB")), IMAGENET, LIMIT)
    )


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert np.array_equal(preprocess(gif, IMAGENET, LIMIT), preprocess(png(frames[0]), IMAGENET, LIMIT))


@pytest.mark.parametrize("resize", [256, 64], ids=["full-decode", "reduced-decode"])
def test_multi_picture_jpeg_uses_the_first_picture(resize: int) -> None:
    first, second = make_photo(1200, 900, seed=46), make_photo(1200, 900, seed=47)
    mpo = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert sniff_media_type(mpo, None) == "image/jpeg"
    spec = PreprocessingSpec(resize=resize, crop=resize - 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert decodes_at_reduced_scale(mpo, spec) == (resize == 64)
    assert_matches_reference(preprocess(mpo, spec, LIMIT), mpo, spec)


# -- size limits --------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_without_allocating() -> None:
    bomb = png_header(50_000, 50_000)
    assert len(bomb) < 200
    assert sniff_media_type(bomb, "image/png") == "image/png"
    images_before = Image.core.get_stats()["new_count"]
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as raised:
            preprocess(bomb, IMAGENET, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert raised.value.status_code == 413
    assert "50000x50000" in raised.value.message
    assert peak < 20 * 2**20
    assert Image.core.get_stats()["new_count"] == images_before  # Pillow allocated no image


def test_pixel_limit_is_inclusive() -> None:
    data = photo_jpeg(500, 375, 1)
    assert preprocess(data, IMAGENET, 500 * 375).shape == (3, 224, 224)
    with pytest.raises(ImageTooLarge):
        preprocess(data, IMAGENET, 500 * 375 - 1)


def test_extreme_aspect_ratio_is_refused_before_the_resize_allocates() -> None:
    # 200k pixels, but its shorter side resized to 256 would be 256 x 51.2M pixels.
    strip = png_header(1, 200_000)
    with pytest.raises(ImageTooLarge, match="resized"):
        preprocess(strip, IMAGENET, LIMIT)


def test_pillow_global_limit_does_not_interfere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a DecompressionBombWarning
        assert preprocess(photo_jpeg(500, 375, 1), IMAGENET, LIMIT).shape == (3, 224, 224)
        with pytest.raises(ImageTooLarge):
            preprocess(png_header(50_000, 50_000), IMAGENET, LIMIT)


# -- invalid and unsupported input --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["photo_500x375.jpg", "photo_640x480_progressive.jpg", "rgba.png", "photo.webp"]
)
def test_truncated_images_are_invalid(name: str) -> None:
    data = next(item for n, item, _ in CORPUS if n == name)
    cuts = [3, 10, 100, 1000, len(data) // 3, len(data) // 2, len(data) - 1000]
    if name.endswith(".jpg"):
        cuts += [len(data) - 100, len(data) - 2]  # even without just the end-of-image marker
    for cut in cuts:
        with pytest.raises(InvalidImage) as raised:
            preprocess(data[:cut], IMAGENET, LIMIT)
        assert raised.value.status_code == 400
        assert 0 < len(raised.value.message) < 300


@pytest.mark.parametrize("declared", [None, "image/jpeg", "application/octet-stream"])
def test_random_bytes_are_invalid(declared: str | None) -> None:
    noise = b"\x00\x01" + np.random.default_rng(0).bytes(5000)
    with pytest.raises(InvalidImage):
        sniff_media_type(noise, declared)
    with pytest.raises(InvalidImage):
        preprocess(noise, IMAGENET, LIMIT)
    # Behind a valid signature the decoder finds the garbage.
    with pytest.raises(InvalidImage):
        preprocess(b"\xff\xd8\xff\xe0" + noise, IMAGENET, LIMIT)
    with pytest.raises(InvalidImage):
        preprocess(b"\x89PNG\r\n\x1a\n" + noise, IMAGENET, LIMIT)


@pytest.mark.parametrize("declared", [None, "", "image/jpeg", "application/octet-stream"])
def test_empty_body_is_invalid(declared: str | None) -> None:
    with pytest.raises(InvalidImage):
        sniff_media_type(b"", declared)
    with pytest.raises(InvalidImage):
        preprocess(b"", IMAGENET, LIMIT)


SVG = b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9"/>'
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


@pytest.mark.parametrize(
    "data",
    [
        SVG,
        b'\xef\xbb\xbf  <svg xmlns="http://www.w3.org/2000/svg"/>',
        b"\n<!DOCTYPE svg><svg/>",
        HEIC,
        HEIC.replace(b"ftypheic", b"ftypheix"),
        HEIC.replace(b"ftypheic", b"ftypmif1"),
        HEIC.replace(b"ftypheic", b"ftypavif"),
    ],
    ids=["svg-xml", "svg-bom", "svg-doctype", "heic", "heix", "mif1", "avif"],
)
@pytest.mark.parametrize("declared", [None, "application/octet-stream", "image/png"])
def test_svg_and_heif_are_unsupported(data: bytes, declared: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as raised:
        sniff_media_type(data, declared)
    assert raised.value.status_code == 415
    with pytest.raises(UnsupportedMediaType):
        preprocess(data, IMAGENET, LIMIT)


@pytest.mark.parametrize(
    "declared",
    ["text/plain", "application/json", "image/svg+xml", "image/heic", "multipart/form-data", "TEXT/HTML"],
)
def test_unsupported_declarations(declared: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        sniff_media_type(photo_jpeg(), declared)
    with pytest.raises(UnsupportedMediaType):
        sniff_media_type(b"", declared)


@pytest.mark.parametrize(("name", "data", "content_type"), CORPUS, ids=[item[0] for item in CORPUS])
def test_sniffing(name: str, data: bytes, content_type: str) -> None:
    assert sniff_media_type(data, None) == content_type
    assert sniff_media_type(data, "application/octet-stream") == content_type
    assert sniff_media_type(data, content_type + "; charset=binary") == content_type
    assert sniff_media_type(data, content_type.upper()) == content_type
    # The bytes decide, whatever image type was declared.
    other = "image/png" if content_type != "image/png" else "image/jpeg"
    assert sniff_media_type(data, other) == content_type


# -- fuzzing ------------------------------------------------------------------------------------

SMALL = PreprocessingSpec(resize=32, crop=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_tiny = make_photo(24, 18, seed=45)
SEEDS = [
    encode(_tiny, "JPEG", quality=80),
    encode(_tiny, "JPEG", quality=80, progressive=True),
    png(_tiny),
    png(_tiny.quantize(16)),
    encode(_tiny, "GIF"),
    encode(_tiny, "WEBP", quality=80),
    encode(_tiny, "BMP"),
    encode(_tiny, "TIFF"),
]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_service_errors(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some of what it is fed
        for declared in (None, "application/octet-stream"):
            with contextlib.suppress(ServiceError):
                sniff_media_type(data, declared)
        try:
            tensor = preprocess(data, SMALL, 1_000_000)
        except ServiceError:
            return
    assert tensor.shape == (3, 28, 28) and tensor.dtype == np.float32


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_service_errors(data: bytes) -> None:
    _only_service_errors(data)


MAGIC = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"BM",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
]


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=4096))
def test_arbitrary_bytes_behind_a_signature_raise_only_service_errors(magic: bytes, data: bytes) -> None:
    _only_service_errors(magic + data)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if action == "set":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[position:]
        if not data:
            break
    return bytes(data)


@FUZZ
@given(mutated_images())
def test_mutated_images_raise_only_service_errors(data: bytes) -> None:
    _only_service_errors(data)
