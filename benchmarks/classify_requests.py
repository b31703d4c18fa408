"""What the load generator sends: the images, and every ``POST /classify`` request built in advance.

Each request's complete bytes (head and body) are built once per level, so sending one costs the
generator a single write: its CPU per request stays small next to the server's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


@dataclass(frozen=True)
class Image:
    name: str
    data: bytes
    content_type: str


def generated_images(count: int = 8, width: int = 500, height: int = 375) -> list[Image]:
    """``count`` distinct deterministic JPEG photos (seeds 0..count-1)."""
    from contract.photos import photo_jpeg

    return [
        Image(f"photo_{seed}.jpg", photo_jpeg(width, height, seed), "image/jpeg") for seed in range(count)
    ]


def folder_images(folder: Path) -> list[Image]:
    """Every JPEG, PNG and WebP file directly in ``folder``, by name."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no .jpg/.jpeg/.png/.webp images in {folder}")
    return [Image(p.name, p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()]) for p in paths]


def build_requests(
    host: str, model: str, images: Sequence[Image], *, top_k: int = 5, files_per_request: int = 1
) -> list[bytes]:
    """The complete bytes of one request per image (or per group of images, as multipart)."""
    target = f"/classify?model={quote(model, safe='')}&top_k={top_k}"
    requests = []
    for i in range(len(images)):
        if files_per_request == 1:
            image = images[i]
            body, content_type = image.data, image.content_type
        else:
            group = [images[(i + j) % len(images)] for j in range(files_per_request)]
            body, content_type = _multipart(group)
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nUser-Agent: benchmarks.load\r\n\r\n"
        )
        requests.append(head.encode("latin-1") + body)
    return requests


def _multipart(images: Sequence[Image]) -> tuple[bytes, str]:
    boundary = "benchmarks-load-7d1f0c"
    parts = []
    for image in images:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n'
            f"Content-Type: {image.content_type}\r\n\r\n".encode("latin-1")
            + image.data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode("latin-1")
    return body, f"multipart/form-data; boundary={boundary}"
