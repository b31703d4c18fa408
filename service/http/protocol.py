"""uvicorn's httptools protocol with a deadline on each request's headers, and JSON for its errors.

uvicorn closes a kept-alive connection that stays idle after a response (``timeout_keep_alive``),
but not one that never sends a request, nor one that sends its headers a byte at a time (a
slow-loris client): each holds a socket and a file descriptor for as long as it likes, and enough
of them lock everyone else out. Here the complete headers of every request must arrive within
``HEADER_TIMEOUT_S`` of the connection opening, or of the request's first byte on a kept-alive
connection; past that the client gets 408 and the connection is closed. (The body has its own
deadline, ``BODY_READ_TIMEOUT_S``, enforced by the app: service/http/uploads.py.)

The request line and headers together may take at most ``MAX_HEADER_BYTES`` (16 KiB by default, as
common proxies allow): a request over it gets 431 and the connection is closed, on every route. They
are counted as sent without optional whitespace (``NAME: VALUE\r\n`` per header), once the parser has
them all; a client that keeps sending header bytes far past the cap is refused before then, so that
the server never holds more than the cap and a read's worth of one request's headers.

A request the HTTP parser cannot read (a bad request line, header or chunk size; Content-Length and
chunked together) never reaches the app: uvicorn answers it 400 itself, in plain text. Here that
answer has the JSON error body every other error of the service has.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import BadRequest, HeadersTooLarge, HeaderTimeout
from service.http.errors import closing_response

DEFAULT_MAX_HEADER_BYTES = 16 * 1024
# Bytes beyond the request line and headers that one read may also carry (the start of the body, a
# pipelined request): headers still incomplete past MAX_HEADER_BYTES plus this much are over the cap.
_READ_SLACK_BYTES = 64 * 1024
# What the parser leaves out of the count: the spaces and "\r\n" of the request line, and the final
# "\r\n"; each header line adds ": " and "\r\n" to its name and value.
_REQUEST_LINE_EXTRA = len(b" ") + len(b" HTTP/1.1\r\n") + len(b"\r\n")
_HEADER_LINE_EXTRA = len(b": \r\n")

_TIMEOUT_RESPONSE = closing_response(HeaderTimeout("the request headers did not arrive in time"))
_MALFORMED_RESPONSE = closing_response(BadRequest("malformed HTTP request: it cannot be parsed as HTTP/1.1"))


def headers_too_large_response(max_header_bytes: int) -> bytes:
    return closing_response(
        HeadersTooLarge(
            f"the request line and headers are over the limit of {max_header_bytes} bytes (MAX_HEADER_BYTES)"
        )
    )


class _HeadersTooLarge(Exception):
    """Raised from a parser callback: the parser stops, and the connection is answered 431."""


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """One connection, whose requests' headers must each arrive within ``header_timeout_s`` and take at
    most ``max_header_bytes``."""

    _header_deadline: asyncio.TimerHandle | None = None
    _refusal: bytes | None = None  # the answer to write instead of uvicorn's 400, once decided
    _reading_headers = False
    _header_bytes_read = 0  # bytes read since the current request began, while its headers are incomplete

    def __init__(
        self,
        *args: Any,
        header_timeout_s: float,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        **kwargs: Any,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_headers:
            # The whole read is counted, though part of it may precede the request: hence the slack.
            self._header_bytes_read += len(data)
            if self._header_bytes_read > self.max_header_bytes + _READ_SLACK_BYTES:
                self._refuse(headers_too_large_response(self.max_header_bytes))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._header_bytes_read = 0
        if self._header_deadline is None:  # a further request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._reading_headers = False
        size = len(self.url) + len(self.parser.get_method()) + _REQUEST_LINE_EXTRA
        for name, value in self.headers:
            size += len(name) + len(value) + _HEADER_LINE_EXTRA
        if size > self.max_header_bytes:
            self._refusal = headers_too_large_response(self.max_header_bytes)
            raise _HeadersTooLarge  # the parser stops here; uvicorn then calls send_400_response()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own version answers in plain text; ``msg`` is its fixed "Invalid HTTP request".
        self._refuse(self._refusal or _MALFORMED_RESPONSE)

    def _refuse(self, response: bytes) -> None:
        self._disarm()
        self._reading_headers = False
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


def with_header_deadline(
    timeout_s: float, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> Callable[..., HeaderDeadlineProtocol]:
    """The protocol factory to hand uvicorn (``Config(http=...)``), with this header deadline and cap:
    uvicorn calls whatever it is given with the connection's keyword arguments, as it would a class."""
    return functools.partial(
        HeaderDeadlineProtocol, header_timeout_s=timeout_s, max_header_bytes=max_header_bytes
    )
