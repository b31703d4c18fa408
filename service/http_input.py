"""Request bodies -> the image files in them, read as a stream under a hard size cap.

The cap applies to the bytes actually received, whatever Content-Length says: a client that
declares too much is refused before anything is read, one that declares little (or nothing, with
chunked encoding) and sends more is cut off as soon as the running total passes the cap. So the
server never holds more than ``max_body_bytes`` of one request.

Two body shapes are accepted: a raw image (any Content-Type; the decoder sniffs the bytes), or
``multipart/form-data`` whose ``file`` parts are the images, parsed incrementally as chunks arrive.
A multipart Content-Type without a boundary cannot be parsed at all: that is a 415 (the declared
media type is unusable), while a body that does not follow its own boundary is a 400 invalid_image.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import InvalidImage, InvalidParameter, PayloadTooLarge, UnsupportedMediaType

FILE_FIELD = "file"
# Part headers are tiny; these bounds stop a body made of endless headers.
_MAX_PART_HEADERS = 16
_MAX_PART_HEADER_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    """One image as the client sent it."""

    filename: str | None
    data: bytes
    content_type: str | None  # as declared (for a raw body, the request's Content-Type); may lie


async def read_uploads(request: Request, max_body_bytes: int) -> list[Upload]:
    """The images in the request body: one for a raw body, one per ``file`` part for multipart."""
    _refuse_declared_length(request.headers.get("content-length"), max_body_bytes)
    media_type, params = parse_options_header(request.headers.get("content-type"))
    chunks = _capped_stream(request, max_body_bytes)
    if media_type == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise UnsupportedMediaType("multipart/form-data needs a boundary parameter in its Content-Type")
        return await _read_multipart(chunks, boundary)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
    if not body:
        raise InvalidImage(
            "the request body is empty: send the image bytes, or multipart/form-data with a file part"
        )
    return [Upload(None, bytes(body), media_type.decode("latin-1") or None)]


def _refuse_declared_length(header: str | None, max_body_bytes: int) -> None:
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError:
        return  # the HTTP server has already rejected a malformed Content-Length
    if declared > max_body_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {max_body_bytes}")


async def _capped_stream(request: Request, max_body_bytes: int) -> AsyncIterator[bytes]:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body_bytes:
                raise PayloadTooLarge(f"the body is over the limit of {max_body_bytes} bytes")
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise InvalidImage("the client disconnected before sending the whole body") from None


async def _read_multipart(chunks: AsyncIterator[bytes], boundary: bytes) -> list[Upload]:
    collector = _PartCollector()
    parser = MultipartParser(
        boundary,
        collector.callbacks(),
        max_header_count=_MAX_PART_HEADERS,
        max_header_size=_MAX_PART_HEADER_BYTES,
    )
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidImage(f"malformed multipart body: {exc}") from None
    if not collector.ended:
        raise InvalidImage("malformed multipart body: it ends before its closing boundary")
    if not collector.uploads:
        raise InvalidParameter(f"the multipart body has no part named {FILE_FIELD!r}")
    return collector.uploads


class _PartCollector:
    """Callbacks for the streaming parser: keeps the data of ``file`` parts, skips other fields."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._data: bytearray | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._data = None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition.get(b"name") == FILE_FIELD.encode():
            self._data = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data.extend(data[start:end])

    def _part_end(self) -> None:
        if self._data is None:
            return
        _, disposition = parse_options_header(self._headers.get(b"content-disposition"))
        filename = disposition.get(b"filename")
        content_type, _ = parse_options_header(self._headers.get(b"content-type"))
        self.uploads.append(
            Upload(
                filename=filename.decode("utf-8", "replace") if filename is not None else None,
                data=bytes(self._data),
                content_type=content_type.decode("latin-1") or None,
            )
        )
        self._data = None

    def _end(self) -> None:
        self.ended = True
