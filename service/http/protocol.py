"""uvicorn's httptools protocol with a deadline on each request's headers, and JSON for its errors.

uvicorn closes a kept-alive connection that stays idle after a response (``timeout_keep_alive``),
but not one that never sends a request, nor one that sends its headers a byte at a time (a
slow-loris client): each holds a socket and a file descriptor for as long as it likes, and enough
of them lock everyone else out. Here the complete headers of every request must arrive within
``HEADER_TIMEOUT_S`` of the connection opening, or of the request's first byte on a kept-alive
connection; past that the client gets 408 and the connection is closed. (The body has its own
deadline, ``BODY_READ_TIMEOUT_S``, enforced by the app: service/http/uploads.py.)

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

from service.errors import BadRequest, HeaderTimeout
from service.http.errors import closing_response

_TIMEOUT_RESPONSE = closing_response(HeaderTimeout("the request headers did not arrive in time"))
_MALFORMED_RESPONSE = closing_response(BadRequest("malformed HTTP request: it cannot be parsed as HTTP/1.1"))


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """One connection, whose requests' headers must each arrive within ``header_timeout_s``."""

    _header_deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        self.header_timeout_s = header_timeout_s
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:  # a further request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own version answers in plain text; ``msg`` is its fixed "Invalid HTTP request".
        self.transport.write(_MALFORMED_RESPONSE)
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


def with_header_deadline(timeout_s: float) -> Callable[..., HeaderDeadlineProtocol]:
    """The protocol factory to hand uvicorn (``Config(http=...)``), with this header deadline: uvicorn
    calls whatever it is given with the connection's keyword arguments, as it would a class."""
    return functools.partial(HeaderDeadlineProtocol, header_timeout_s=timeout_s)
