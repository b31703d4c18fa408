"""Coverage-guided fuzzing of the decode path with atheris: ``python -m tests.fuzz_decode -runs=N``.

Feeds arbitrary bytes, and mutations of small valid images of every supported format, to
``sniff_media_type`` and ``preprocess``; anything but a ServiceError (or a wrong-shaped tensor) is a
crash, and libFuzzer exits non-zero with the input that caused it. tests/test_fuzz.py runs it with
a bounded number of runs; run it longer by hand with any libFuzzer flag (-max_total_time=600 ...).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["service", "PIL"]):
    from contract.manifest import PreprocessingSpec
    from service.core.imaging import preprocess, sniff_media_type
    from service.errors import ServiceError

SPEC = PreprocessingSpec(resize=32, crop=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
MAX_PIXELS = 1_000_000


def one_input(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for declared in (None, "application/octet-stream", "image/png"):
            with contextlib.suppress(ServiceError):
                sniff_media_type(data, declared)
        try:
            tensor = preprocess(data, SPEC, MAX_PIXELS)
        except ServiceError:
            return
    if tensor.shape != (3, 28, 28) or str(tensor.dtype) != "float32":
        raise AssertionError(f"preprocess returned {tensor.shape} {tensor.dtype}")


def seed_corpus(directory: Path) -> None:
    """Tiny valid images of every format: the mutations start from real structure."""
    from PIL import Image

    from contract.photos import encode, make_photo

    photo = make_photo(24, 18, seed=45)
    samples = {
        "a.jpg": encode(photo, "JPEG", quality=80),
        "p.jpg": encode(photo, "JPEG", quality=80, progressive=True),
        "a.png": encode(photo, "PNG"),
        "q.png": encode(photo.quantize(16), "PNG"),
        "a.gif": encode(photo, "GIF"),
        "a.webp": encode(photo, "WEBP", quality=80),
        "l.webp": encode(photo, "WEBP", lossless=True),
        "a.bmp": encode(photo, "BMP"),
        "a.tif": encode(photo, "TIFF"),
        "g16.tif": encode(Image.new("I;16", (12, 9), 40000), "TIFF"),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
    }
    for name, data in samples.items():
        (directory / name).write_bytes(data)


def main(argv: list[str]) -> None:
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-decode-"))
    seed_corpus(corpus)
    atheris.Setup([argv[0], *argv[1:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
