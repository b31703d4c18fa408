"""What the reliability tests and the soak run throw at the server: models with a known cost, the
hostile request corpus, and the resident memory of a server process.

Nothing here is a test; ``tests/test_hostile_input.py``, ``test_overload.py``, ``test_faults.py``
and ``tests/soak.py`` share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from contract.manifest import Manifest, sha256_of
from contract.photos import encode, make_photo, photo_jpeg
from tests.fake_repository import NUM_CLASSES, OPSET, TINY_RESOLUTION, write_model


# --- a model that costs what the test says -------------------------------------------------------
def write_heavy_model(
    root: Path, name: str, *, conv_layers: int = 4, channels: int = 128, seed: int = 0
) -> Path:
    """``root/name`` as the tiny test classifier made slow: ``conv_layers`` 3x3 convolutions of
    ``channels`` channels on the 32x32 input run before the classifier head (at 128 channels each is
    ~150 M multiply-adds, ~2 ms on one core of the test box: four take ~8 ms). The manifest is the
    tiny model's, re-hashed.
    """
    directory = write_model(root, name, seed=seed)
    rng = np.random.default_rng(seed)
    size = TINY_RESOLUTION
    initializers, nodes = [], []
    current, width = "input", 3
    for layer in range(conv_layers):
        weight = rng.normal(0, (2.0 / (9 * width)) ** 0.5, (channels, width, 3, 3)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes.append(helper.make_node("Conv", [current, f"w{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"]))
        current, width = f"r{layer}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    head = rng.normal(0, 1, (width, NUM_CLASSES)).astype(np.float32)
    initializers.append(numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("MatMul", ["flat", "head"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "heavy_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx_path = directory / "model.onnx"
    onnx.save(model, str(onnx_path))
    manifest = Manifest.load(directory)
    onnx_file = manifest.onnx.model_copy(
        update={"sha256": sha256_of(onnx_path), "bytes": onnx_path.stat().st_size}
    )
    manifest.model_copy(update={"onnx": onnx_file}).save(directory)
    return directory


# --- resident memory -------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux: VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


MIB = 1024 * 1024


# --- the hostile corpus ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One hostile request and the answer the service documents for it."""

    name: str
    status: int
    code: str | None  # the error code; None for a 200
    body: bytes = b""
    content_type: str | None = "image/jpeg"
    query: str = "model=mobilenet_v2"
    headers: dict[str, str] = field(default_factory=dict)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header that declares ``width`` x ``height`` and carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def gif_declaring(width: int, height: int) -> bytes:
    """A tiny GIF whose logical screen says ``width`` x ``height``."""
    small = encode(Image.new("P", (8, 8)), "GIF")
    return small[:6] + struct.pack("<HH", width, height) + small[10:]


def jpeg_declaring(width: int, height: int) -> bytes:
    """A 64x48 JPEG whose start-of-frame says ``width`` x ``height``."""
    data = bytearray(encode(make_photo(64, 48, seed=1), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header says ``width`` x ``height`` (each at most 16384)."""
    data = bytearray(encode(make_photo(64, 48, seed=1), "WEBP", lossless=True))
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    """An 8x8 TIFF whose ImageWidth/ImageLength tags say ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag = struct.unpack("<H", data[entry : entry + 2])[0]
        if tag in (256, 257):  # written as one LONG each
            data[entry + 2 : entry + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    return bytes(data)


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"hostile-boundary") -> tuple[bytes, str]:
    """A multipart body from raw (part headers, part data) pairs; returns (body, content type)."""
    body = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return body + b"--" + boundary + b"--\r\n", f"multipart/form-data; boundary={boundary.decode()}"


def file_part(
    data: bytes, filename: bytes = b"a.jpg", content_type: bytes = b"image/jpeg"
) -> tuple[bytes, bytes]:
    head = b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"'
    return head + b"\r\nContent-Type: " + content_type, data


def hostile_cases(max_queue_size: int) -> list[Case]:
    """The corpus: every case with its status and error code, for the tiny 32x32 test models
    (resize 36: a 1 x 20000 strip resized to 36 on its shorter side stays under the pixel limit).
    """
    jpeg = photo_jpeg(160, 120, seed=7)
    photo = make_photo(96, 72, seed=8)
    png = encode(photo, "PNG")
    webp = encode(photo, "WEBP", quality=80)
    gif = encode(photo, "GIF")
    rng = np.random.default_rng(7)
    cases: list[Case] = []

    def add(
        name: str,
        status: int,
        code: str | None,
        body: bytes = b"",
        content_type: str | None = "image/jpeg",
        **kw,
    ) -> None:
        cases.append(Case(name, status, code, body, content_type, **kw))

    # Random bytes under every image content type, and none.
    for content_type in (
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/tiff",
        "application/octet-stream",
        None,
    ):
        add(f"random-bytes-as-{content_type}", 400, "invalid_image", rng.bytes(4096), content_type)
    # Truncated and corrupted images at many cut points.
    for label, data, content_type in (
        ("jpeg", jpeg, "image/jpeg"),
        ("png", png, "image/png"),
        ("webp", webp, "image/webp"),
        ("gif", gif, "image/gif"),
    ):
        for fraction in (0.02, 0.1, 0.3, 0.6, 0.9):
            add(
                f"truncated-{label}-{fraction}",
                400,
                "invalid_image",
                data[: int(len(data) * fraction)],
                content_type,
            )
        for fraction in (0.3, 0.7):
            corrupted = bytearray(data)
            start = int(len(corrupted) * fraction) if label != "png" else 16  # PNG: break the IHDR CRC
            corrupted[start : start + 64] = rng.bytes(64)
            add(f"corrupted-{label}-{fraction}", *_corrupted_answer(label), bytes(corrupted), content_type)
    # Empty bodies.
    add("zero-bytes-jpeg", 400, "invalid_image", b"", "image/jpeg")
    add("zero-bytes-untyped", 400, "invalid_image", b"", None)
    add("zero-bytes-multipart-part", 400, "invalid_image", *multipart([file_part(b"")]))
    # Wrong content types: the declaration is refused before the bytes are looked at.
    for content_type in (
        "text/plain",
        "text/html",
        "application/json",
        "image/svg+xml",
        "image/heic",
        "video/mp4",
        "application/x-www-form-urlencoded",
    ):
        add(f"declared-{content_type}", 415, "unsupported_media_type", jpeg, content_type)
    add("content-type-garbage", 415, "unsupported_media_type", jpeg, '}{;;;=="; boundary')
    # Polyglots: the leading signature decides.
    add("jpeg-then-zip", 200, None, jpeg + b"PK\x03\x04" + rng.bytes(512))
    add("png-then-html", 200, None, png + b"<html><script>alert(1)</script></html>", "image/png")
    add(
        "gif-header-with-script",
        400,
        "invalid_image",
        b"GIF89a/*" + b"\0" * 8 + b"*/=1;alert(1);",
        "image/gif",
    )
    add("html-declared-jpeg", 400, "invalid_image", b"<html><body>hello</body></html>", "image/jpeg")
    add(
        "pdf",
        400,
        "invalid_image",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n",
        "application/octet-stream",
    )
    add("zip", 400, "invalid_image", b"PK\x03\x04" + rng.bytes(256), "application/octet-stream")
    # Decompression bombs: huge declared dimensions, refused from the header.
    add("png-65535x65535", 413, "image_too_large", png_declaring(65535, 65535), "image/png")
    add("png-1x4000000000", 413, "image_too_large", png_declaring(1, 4_000_000_000), "image/png")
    add("gif-65535x65535", 413, "image_too_large", gif_declaring(65535, 65535), "image/gif")
    add("webp-16384x16384", 413, "image_too_large", webp_declaring(16384, 16384), "image/webp")
    add("jpeg-65500x65500", 413, "image_too_large", jpeg_declaring(65500, 65500))
    add("tiff-100000x100000", 413, "image_too_large", tiff_declaring(100_000, 100_000), "image/tiff")
    add("png-1x2000000-strip", 413, "image_too_large", png_declaring(1, 2_000_000), "image/png")
    # Geometry at the edges: decodable, so classified.
    add("1x1-png", 200, None, encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "image/png")
    add("1x20000-png", 200, None, encode(Image.new("RGB", (1, 20000), (9, 99, 9)), "PNG"), "image/png")
    add("20000x1-jpeg", 200, None, encode(Image.new("RGB", (20000, 1), (99, 9, 9)), "JPEG"))
    # Formats and modes that must decode.
    frames = [make_photo(48, 36, seed=s) for s in (1, 2, 3)]
    add(
        "animated-gif",
        200,
        None,
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "image/gif",
    )
    add(
        "animated-webp",
        200,
        None,
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "image/webp",
    )
    add(
        "multi-page-tiff",
        200,
        None,
        encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "image/tiff",
    )
    ramp16 = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    add("16-bit-tiff", 200, None, encode(Image.fromarray(ramp16), "TIFF"), "image/tiff")
    add(
        "float-tiff",
        200,
        None,
        encode(Image.fromarray(rng.random((48, 64)).astype(np.float32), "F"), "TIFF"),
        "image/tiff",
    )
    add("cmyk-jpeg", 200, None, encode(photo.convert("CMYK"), "JPEG"))
    add("ycck-jpeg", 200, None, _ycck_jpeg(photo))
    add("huge-icc-jpeg", 200, None, encode(photo, "JPEG", icc_profile=rng.bytes(1 << 20)))
    add("huge-exif-jpeg", 200, None, encode(photo, "JPEG", exif=b"Exif\0\0" + rng.bytes(65000)))
    # A metadata bomb: Pillow refuses a text chunk that inflates past its 1 MB cap.
    add("png-ztxt-bomb", 400, "invalid_image", _png_with_text(png, 64 << 20), "image/png")
    # Unsupported formats, recognised by their bytes.
    add(
        "svg-octet-stream",
        415,
        "unsupported_media_type",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        "application/octet-stream",
    )
    add("svg-declared-png", 415, "unsupported_media_type", b"<svg></svg>", "image/png")
    add(
        "heic-bytes",
        415,
        "unsupported_media_type",
        b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + rng.bytes(200),
        None,
    )
    add(
        "avif-bytes",
        415,
        "unsupported_media_type",
        b"\0\0\0\x1cftypavif\0\0\0\0avifmif1" + rng.bytes(200),
        "image/jpeg",
    )
    # Multipart shapes.
    add(
        "multipart-hundreds-of-parts",
        413,
        "payload_too_large",
        *multipart([file_part(png)] * (max_queue_size + 200)),
    )
    add(
        "multipart-thousands-of-other-fields",
        200,
        None,
        *multipart([(b'Content-Disposition: form-data; name="note"', b"x")] * 3000 + [file_part(jpeg)]),
    )
    add("multipart-missing-boundary", 415, "unsupported_media_type", jpeg, "multipart/form-data")
    add("multipart-empty-boundary", 415, "unsupported_media_type", jpeg, "multipart/form-data; boundary=")
    add(
        "multipart-boundary-too-long",
        415,
        "unsupported_media_type",
        jpeg,
        "multipart/form-data; boundary=" + "b" * 5000,
    )
    add(
        "multipart-wrong-boundary",
        400,
        "invalid_image",
        multipart([file_part(jpeg)], b"one")[0],
        "multipart/form-data; boundary=two",
    )
    add(
        "multipart-never-closed",
        400,
        "invalid_image",
        multipart([file_part(jpeg)])[0][:-24],
        multipart([])[1],
    )
    add(
        "multipart-no-file-part",
        422,
        "invalid_parameter",
        *multipart([(b'Content-Disposition: form-data; name="image"', jpeg)]),
    )
    add("multipart-non-utf8-filename", 200, None, *multipart([file_part(jpeg, b"\xff\xfe\xc3(\x80.jpg")]))
    add("multipart-traversal-filename", 200, None, *multipart([file_part(jpeg, b"../../etc/passwd")]))
    add(
        "multipart-endless-part-headers",
        400,
        "invalid_image",
        *multipart([(b"\r\n".join([b"X-H: v"] * 100), jpeg)]),
    )
    nested = multipart([file_part(jpeg)], b"inner")[0]
    for depth in range(20):
        nested = multipart(
            [file_part(nested, content_type=f"multipart/mixed; boundary=b{depth}".encode())],
            f"b{depth + 1}".encode(),
        )[0]
    add("multipart-deeply-nested", 415, "unsupported_media_type", nested, "multipart/form-data; boundary=b20")
    add(
        "multipart-part-declares-html",
        415,
        "unsupported_media_type",
        *multipart([file_part(jpeg, content_type=b"text/html")]),
    )
    # The query string.
    add("unknown-model", 404, "unknown_model", jpeg, query="model=resnet50")
    add("model-path-traversal", 404, "unknown_model", jpeg, query="model=../../etc/passwd")
    add("model-encoded-traversal", 404, "unknown_model", jpeg, query="model=..%2F..%2Fetc%2Fpasswd")
    add("model-very-long", 404, "unknown_model", jpeg, query="model=" + "m" * 8000)
    add("model-empty", 404, "unknown_model", jpeg, query="model=")
    add("model-nul", 404, "unknown_model", jpeg, query="model=mobilenet_v2%00")
    add("model-missing", 422, "invalid_parameter", jpeg, query="")
    add("model-case", 404, "unknown_model", jpeg, query="model=MOBILENET_V2")
    for top_k in (
        "0",
        "-1",
        "1001",
        "99999999999999999999999",
        "abc",
        "",
        "2.5",
        "1e3",
        "0x10",
        "NaN",
        "inf",
        "true",
        "%EF%BC%95",
        "x" * 4000,
    ):
        add(f"top_k={top_k[:24]}", 422, "invalid_parameter", jpeg, query=f"model=mobilenet_v2&top_k={top_k}")
    return cases


def _corrupted_answer(label: str) -> tuple[int, str | None]:
    # Lossy JPEG and WebP data carry no checksum: garbage in the middle decodes into garbage pixels,
    # and an answer is right. PNG has CRCs, and a GIF's LZW stream breaks on garbage.
    return (200, None) if label in ("jpeg", "webp") else (400, "invalid_image")


def _ycck_jpeg(img: Image.Image) -> bytes:
    """An Adobe YCCK JPEG: Pillow writes CMYK as Adobe-marked CMYK; libjpeg can re-encode as YCCK."""
    buffer = io.BytesIO()
    img.convert("CMYK").save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    adobe = data.find(b"Adobe")
    if adobe >= 0:
        data[adobe + 11] = 2  # transform flag: YCCK (the pixels are then read as YCCK: still decodable)
    return bytes(data)


def _png_with_text(png: bytes, size: int) -> bytes:
    """``png`` with a compressed text chunk that inflates to ``size`` bytes (Pillow caps what it keeps)."""
    text = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * size, 9))
    return png[:33] + text + png[33:]


# --- a lean HTTP/1.1 client ------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


class _NothingReceived(Exception):
    """The connection failed before a single byte of the answer came back."""


class RawClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a load generator that costs the box far
    less CPU than a full client library, so the server under test gets the cores.

    Reconnects after a ``Connection: close`` answer or a dropped connection; a request whose connection
    drops before the whole answer arrived raises ``ConnectionError`` (the caller counts it as lost).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Reply:
        started = time.monotonic()
        reused = self._writer is not None
        try:
            return await self._exchange(method, target, body, headers, started)
        except _NothingReceived:
            if not reused:
                raise ConnectionError(f"{method} {target}: the connection closed before any answer") from None
        # A kept-alive connection the server had closed meanwhile (its idle timeout): the request
        # never reached it, so sending it again on a fresh connection is safe.
        return await self._exchange(method, target, body, headers, started)

    async def _exchange(
        self, method: str, target: str, body: bytes, headers: dict[str, str] | None, started: float
    ) -> Reply:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        try:
            self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await self._writer.drain()
            head = await self._reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            if isinstance(exc, OSError) or not exc.partial:
                raise _NothingReceived from exc
            raise ConnectionError(f"{method} {target}: {exc!r}") from exc
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                parsed[name.strip().lower()] = value.strip()
        try:
            payload = await self._reader.readexactly(int(parsed.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise ConnectionError(f"{method} {target}: {exc!r}") from exc
        if parsed.get("connection", "").lower() == "close":
            await self.close()
        return Reply(int(status_line.split(" ", 2)[1]), parsed, payload, time.monotonic() - started)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
