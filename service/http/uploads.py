"""Request bodies -> the image files in them, read as a stream under a hard size cap.

The cap applies to the bytes actually received, whatever Content-Length says: a client that
declares too much is refused before anything is read, one that declares little (or nothing, with
chunked encoding) and sends more is cut off as soon as the running total passes the cap. So the
server never holds more than ``max_body_bytes`` of one request.

Two body shapes are accepted: a raw image (any Content-Type; the decoder sniffs the bytes), or
``multipart/form-data`` whose ``file`` parts are the images, parsed incrementally as chunks arrive.
A multipart Content-Type without a usable boundary cannot be parsed at all: that is a 415 (the
declared media type is unusable), while a body that does not follow its own boundary is a 400
invalid_image. A body with more ``file`` parts than ``max_files`` is a 413 as soon as the one too
many begins.

Slow clients: the whole body must arrive within ``timeout_s`` of the request's headers, however it
trickles in (408). A client that goes away mid-upload, or while its request is being served, gets
:class:`ClientDisconnected` (counted as 499): :func:`cancel_on_disconnect` cancels the work it was
waiting for, so nothing is decoded or run for nobody. Every error raised before the body was read
to its end asks for the connection to be closed, since the rest of the body is never read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import Receive

from service.core.pipeline import Upload
from service.errors import (
    BodyReadTimeout,
    ClientDisconnected,
    InvalidImage,
    InvalidParameter,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

T = TypeVar("T")

FILE_FIELD = "file"
# Part headers are tiny; these bounds stop a body made of endless headers.
_MAX_PART_HEADERS = 16
_MAX_PART_HEADER_BYTES = 8 * 1024


async def read_uploads(
    request: Request, max_body_bytes: int, *, max_files: int, timeout_s: float
) -> list[Upload]:
    """The images in the request body: one for a raw body, one per ``file`` part for multipart."""
    body = _Body(request.receive, max_body_bytes)
    try:
        _refuse_declared_length(request.headers.get("content-length"), max_body_bytes)
        media_type, params = parse_options_header(request.headers.get("content-type"))
        parser = None
        if media_type == b"multipart/form-data":
            collector = _PartCollector(max_files)
            parser = _multipart_parser(params.get(b"boundary"), collector)
        try:
            async with asyncio.timeout(timeout_s):
                if parser is not None:
                    return await _read_multipart(body.chunks(), parser, collector)
                return [await _read_raw(body.chunks(), media_type)]
        except TimeoutError:
            raise _too_slow(timeout_s) from None
    except ServiceError as exc:
        if not body.complete:
            # The rest of the body stays unread: only a fresh connection can carry the next request.
            exc.headers.setdefault("Connection", "close")
        raise


async def read_body(
    receive: Receive, content_length: str | None, max_body_bytes: int, timeout_s: float
) -> bytes:
    """The whole body (any media type), under the same cap and deadline as an upload's: raises
    PayloadTooLarge, BodyReadTimeout or ClientDisconnected."""
    _refuse_declared_length(content_length, max_body_bytes)
    body = _Body(receive, max_body_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            parts = [chunk async for chunk in body.chunks()]
    except TimeoutError:
        raise _too_slow(timeout_s) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_slow(timeout_s: float) -> BodyReadTimeout:
    return BodyReadTimeout(f"the body did not arrive within {timeout_s:g} s (BODY_READ_TIMEOUT_S)")


async def _read_raw(chunks: AsyncIterator[bytes], media_type: bytes) -> Upload:
    parts = [chunk async for chunk in chunks]
    if not parts:
        raise InvalidImage(
            "the request body is empty: send the image bytes, or multipart/form-data with a file part"
        )
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return Upload(None, data, media_type.decode("latin-1") or None)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it and raise ClientDisconnected.

    Call it once the body has been read: the next ASGI message can then only be the disconnect.
    Cancelling the work gives its queue places back, so the batcher skips it and no runtime runs it.
    The work runs in the caller's task, cancelled as asyncio.timeout() does it (one watcher task per
    request, rather than a task for the work and a wait on both: this is every request's path).
    """
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        await _disconnected(request)
        disconnected = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        # Our own cancellation, and nobody else's (a server shutdown must still cancel this task).
        if disconnected and task.uncancel() == 0:
            raise ClientDisconnected("the client disconnected before its answer was ready") from None
        raise
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _refuse_declared_length(header: str | None, max_body_bytes: int) -> None:
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError:
        return  # the HTTP server has already rejected a malformed Content-Length
    if declared > max_body_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {max_body_bytes} (MAX_BODY_BYTES)")


class _Body:
    """The request body as a stream of chunks under the size cap; ``complete`` once all arrived."""

    def __init__(self, receive: Receive, max_body_bytes: int) -> None:
        self._receive = receive
        self._max_body_bytes = max_body_bytes
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        # The ASGI messages themselves, not Starlette's request.stream(): one generator fewer on
        # every request's path, and a disconnect is seen as itself.
        received = 0
        receive = self._receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self._max_body_bytes:
                raise PayloadTooLarge(
                    f"the body is over the limit of {self._max_body_bytes} bytes (MAX_BODY_BYTES)"
                )
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        self.complete = True


def _multipart_parser(boundary: bytes | None, collector: _PartCollector) -> MultipartParser:
    if not boundary:
        raise UnsupportedMediaType("multipart/form-data needs a boundary parameter in its Content-Type")
    try:
        return MultipartParser(
            boundary,
            collector.callbacks(),
            max_header_count=_MAX_PART_HEADERS,
            max_header_size=_MAX_PART_HEADER_BYTES,
        )
    except FormParserError as exc:  # e.g. a boundary over the parser's 256-byte limit
        raise UnsupportedMediaType(f"unusable multipart boundary: {exc}") from None


async def _read_multipart(
    chunks: AsyncIterator[bytes], parser: MultipartParser, collector: _PartCollector
) -> list[Upload]:
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

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
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
            if len(self.uploads) >= self.max_files:
                raise PayloadTooLarge(
                    f"more than {self.max_files} {FILE_FIELD!r} parts in one request; "
                    f"the limit is {self.max_files} (the model's queue size)"
                )
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
