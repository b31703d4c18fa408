"""``METRICS_PORT``: ``/metrics`` from a second listener, with the main port's cap on request headers.

prometheus-client's own server (``start_http_server``) reads whatever headers a client sends, up to
Python's http.server limits (100 lines of 64 KiB each). This is the same WSGI server and the same
exposition app, with a handler that reads the request line and headers against ``MAX_HEADER_BYTES``
and answers 431 with the service's JSON error body (the bytes the main port's parser writes) once a
client goes over it, then closes the connection. Threads as prometheus-client starts them: one
serving thread, one per scrape, all daemons.
"""

from __future__ import annotations

import socket
import threading
from http import HTTPStatus
from typing import BinaryIO
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from service.errors import OtherHTTPError, generic_error
from service.http.errors import closing_response
from service.http.protocol import headers_too_large_response


class _OverTheCap(Exception):
    pass


class _CappedReader:
    """The connection's reader, seen by the header parser: every line counts against one budget."""

    def __init__(self, rfile: BinaryIO, budget: int) -> None:
        self._rfile = rfile
        self._budget = budget

    def readline(self, limit: int = -1) -> bytes:
        line = self._rfile.readline(self._budget + 1 if limit < 0 else min(limit, self._budget + 1))
        self._budget -= len(line)
        if self._budget < 0:
            raise _OverTheCap
        return line


class _MetricsServer(ThreadingWSGIServer):
    max_header_bytes: int


class _CappedHandler(WSGIRequestHandler):
    server: _MetricsServer

    def parse_request(self) -> bool:
        # raw_requestline has been read by the base class (at most 64 KiB): it counts too.
        cap = self.server.max_header_bytes
        rfile = self.rfile
        self.rfile = _CappedReader(rfile, cap - len(self.raw_requestline))  # type: ignore[assignment]
        try:
            if len(self.raw_requestline) > cap:
                raise _OverTheCap
            return super().parse_request()
        except _OverTheCap:
            self.close_connection = True
            self.wfile.write(headers_too_large_response(cap))
            return False
        finally:
            self.rfile = rfile

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What the base class refuses by itself (a bad request line, too many header lines) in the
        service's JSON error shape rather than Python's HTML page."""
        if code == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
            answer = headers_too_large_response(self.server.max_header_bytes)
        else:
            error = (generic_error(code) or OtherHTTPError)(message or HTTPStatus(code).phrase)
            error.status_code = code  # OtherHTTPError is rendered under the status the server chose
            answer = closing_response(error)
        self.close_connection = True
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged (as prometheus-client's own handler does not)."""


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry, *, max_header_bytes: int
) -> ThreadingWSGIServer:
    """Serve ``registry`` on ``host:port`` from a daemon thread; ``shutdown()`` it at exit."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6, as HOST is

    class Server(_MetricsServer):
        address_family = family

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_CappedHandler)
    server.max_header_bytes = max_header_bytes
    threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True).start()
    return server
