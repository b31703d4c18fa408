"""Deterministic "photos" the project makes itself, for tests, load generation and int8 calibration.

Nothing is downloaded: :func:`make_photo` paints photo-like content (a smooth colour field, a few
shapes, grain and sensor noise) from a seeded RNG, so JPEG compresses it the way it compresses
photographs and a resize has real detail to average. :func:`make_corpus` covers the formats and
pixel modes the server must accept.

CLI: ``python -m contract.photos DIR --count N`` writes N JPEGs to DIR.
"""

from __future__ import annotations

import argparse
import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

JPEG, PNG, WEBP = "image/jpeg", "image/png", "image/webp"
BMP, GIF, TIFF = "image/bmp", "image/gif", "image/tiff"

Corpus = list[tuple[str, bytes, str]]


def make_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of ``width`` x ``height`` that looks (to a codec and a resampler) like a photo."""
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {width}x{height}")
    rng = np.random.default_rng(seed)

    # Low-frequency colour field (sky, walls, lighting): a tiny random grid blown up with bicubic.
    grid = rng.integers(20, 236, size=(3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)

    # A few objects with hard edges: what makes JPEG and the antialiasing filter work.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * width)
        y0, y1 = sorted(rng.uniform(-0.2, 1.2, 2) * height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            points = rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * (width, height)
            draw.polygon([(float(x), float(y)) for x, y in points], fill=colour)

    # Texture at two scales (~16 px blotches and ~3 px grain: random grids, upsampled) plus
    # per-pixel sensor noise; the fine detail gives a JPEG a photo's bit rate (~100 KB at 500x375).
    pixels = np.asarray(img, dtype=np.int16)
    for cell, amplitude in ((16, 24), (2, 18)):
        shape = (height // cell + 2, width // cell + 2)
        grid = rng.integers(128 - amplitude, 129 + amplitude, shape, dtype=np.uint8)
        layer = Image.fromarray(grid, "L").resize((width, height), Image.Resampling.BILINEAR)
        pixels += (np.asarray(layer, dtype=np.int16) - 128)[:, :, None]
    pixels += rng.integers(-8, 9, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """``img`` saved in Pillow format ``fmt`` ("JPEG", "PNG", ...), as bytes."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


@functools.cache
def photo_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """A baseline 4:2:0 JPEG of :func:`make_photo` (the shape of a typical ImageNet validation photo)."""
    return encode(make_photo(width, height, seed), "JPEG", quality=quality)


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one) from (h, w, 3) uint16."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = pixels.astype(">u2").reshape(height, width * 3).view(np.uint8)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()  # filter byte 0 on each row
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def with_orientation(img: Image.Image, orientation: int, quality: int = 90) -> bytes:
    """``img`` as stored pixels in a JPEG whose EXIF orientation tag says how to display them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=quality, exif=exif.tobytes())


@functools.cache
def _corpus() -> tuple[tuple[str, bytes, str], ...]:
    photo = make_photo(320, 240, seed=100)
    items: list[tuple[str, bytes, str]] = []

    # JPEG photos: the common case, at sizes on both sides of the draft (DCT-scaling) threshold.
    for width, height, seed in [
        (500, 375, 1),
        (375, 500, 2),
        (224, 224, 3),
        (640, 480, 4),
        (1024, 768, 5),
        (2048, 1536, 6),
        (4000, 3000, 7),
    ]:
        items.append((f"photo_{width}x{height}.jpg", photo_jpeg(width, height, seed), JPEG))
    items.append(
        ("photo_640x480_progressive.jpg", encode(make_photo(640, 480, 8), "JPEG", progressive=True), JPEG)
    )
    photo_444 = encode(make_photo(1600, 1200, 9), "JPEG", quality=80, subsampling=0)
    items.append(("photo_1600x1200_444.jpg", photo_444, JPEG))

    # Alpha, palette, grayscale, bilevel: every mode that has to become RGB.
    alpha = np.linspace(0, 255, photo.width, dtype=np.uint8)[None, :].repeat(photo.height, axis=0)
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(alpha, "L"))
    items.append(("rgba.png", encode(rgba, "PNG"), PNG))
    items.append(("rgba_lossless.webp", encode(rgba, "WEBP", lossless=True), WEBP))
    items.append(("la.png", encode(rgba.convert("LA"), "PNG"), PNG))
    palette = photo.quantize(64)
    items.append(("palette.png", encode(palette, "PNG"), PNG))
    items.append(("palette_transparent.png", encode(palette, "PNG", transparency=0), PNG))
    items.append(("gray.png", encode(photo.convert("L"), "PNG"), PNG))
    items.append(("gray.jpg", encode(make_photo(500, 375, 10).convert("L"), "JPEG", quality=90), JPEG))
    items.append(("bilevel.png", encode(photo.convert("1"), "PNG"), PNG))
    items.append(("cmyk.jpg", encode(make_photo(500, 375, 11).convert("CMYK"), "JPEG", quality=90), JPEG))

    # 16 bits per channel: must map 0..65535 onto 0..255, not clip at 255.
    ramp = np.linspace(0, 65535, 300 * 200, dtype=np.float64).reshape(200, 300).astype(np.uint16)
    items.append(("gray16.png", encode(Image.fromarray(ramp), "PNG"), PNG))
    low_bytes = np.random.default_rng(15).integers(0, 256, (photo.height, photo.width, 3), dtype=np.uint16)
    rgb16 = np.asarray(photo, dtype=np.uint16) * 256 + low_bytes
    items.append(("rgb16.png", png_rgb16(rgb16), PNG))

    # EXIF orientation: stored landscape pixels displayed rotated or flipped.
    for orientation in (6, 3, 8):
        stored = make_photo(640, 480, 20 + orientation)
        items.append((f"exif_orientation_{orientation}.jpg", with_orientation(stored, orientation), JPEG))

    # The other container formats.
    items.append(("photo.webp", encode(make_photo(500, 375, 12), "WEBP", quality=85), WEBP))
    items.append(("photo.bmp", encode(photo, "BMP"), BMP))
    frames = [make_photo(200, 150, 30), make_photo(200, 150, 31)]
    items.append(("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), GIF))
    items.append(("photo.tif", encode(photo, "TIFF", compression="tiff_lzw"), TIFF))

    # Degenerate geometry.
    items.append(("pixel_1x1.png", encode(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG"), PNG))
    items.append(("pixel_1x1.jpg", encode(Image.new("RGB", (1, 1), (20, 130, 250)), "JPEG"), JPEG))
    items.append(("tall_20x2000.jpg", encode(make_photo(20, 2000, 13), "JPEG", quality=90), JPEG))
    items.append(("wide_2000x20.png", encode(make_photo(2000, 20, 14), "PNG"), PNG))
    return tuple(items)


def make_corpus() -> Corpus:
    """(filename, bytes, content type) for every kind of image the server must accept; cached."""
    return list(_corpus())


def write_photos(
    directory: str | Path,
    count: int,
    width: int = 500,
    height: int = 375,
    quality: int = 90,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` distinct JPEG photos (seeds ``seed .. seed + count - 1``) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"photo_{i:05d}.jpg"
        path.write_bytes(encode(make_photo(width, height, seed + i), "JPEG", quality=quality))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_photos(args.directory, args.count, args.width, args.height, args.quality, args.seed)
    print(f"wrote {len(paths)} JPEGs ({args.width}x{args.height}) to {args.directory}")


if __name__ == "__main__":
    main()
