"""The two pure-ASGI layers around the app: what every request gets, and /classify's short way in.

:class:`RequestContext` is the outermost: request id, access log, /classify's metrics, and the last
word on an unhandled exception (a JSON 500). :class:`DirectRoute` is the innermost: it hands one
route's requests straight to its endpoint.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.metrics import Metrics
from service.errors import InternalError, ServiceError
from service.http.errors import error_response, service_error_response
from service.logs import request_id_var

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")

_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: debug-level access logs
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class DirectRoute:
    """One route straight to its handler, past FastAPI's router and its per-request machinery.

    FastAPI still declares the route (its OpenAPI entry, its 405 for other methods); requests for it
    skip the exception and exit-stack middleware, route matching and dependency resolution, which
    together cost the event loop ~35% of what it does for a /classify request. The handler takes
    only the Request and validates its own query (service/http/classify.py), so nothing FastAPI would
    have done is lost; its ServiceErrors are rendered here as the app's exception handler renders them.
    """

    def __init__(
        self,
        app: ASGIApp,
        method: str,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
    ) -> None:
        self.app = app
        self.method = method
        self.path = path
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request)
        except ServiceError as exc:
            response = service_error_response(request, exc)
        await response(scope, receive, send)


class RequestContext:
    """Request id, access log, the metrics of one route (``metrics_path``), and the last word on
    unhandled errors.

    Pure ASGI rather than BaseHTTPMiddleware: it sees the status of every response, FastAPI's
    validation errors included, without wrapping the body stream.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, metrics_path: str) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_path = metrics_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = _request_id(scope)
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("unhandled error (error %s)", error_id)
            status = 500
            if not response_started:
                response = error_response(
                    InternalError(f"internal error (error {error_id}, request {request_id})")
                )
                await response(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - started
            path = scope.get("path", "")
            if path == self.metrics_path:
                # The route records the model it read; a request refused before it got there is
                # labelled from its query string.
                state = scope["state"]
                model = state["model"] if "model" in state else _query_model(scope)
                self.metrics.observe_request(model, status, seconds)
            access_log.log(
                logging.DEBUG if path in _QUIET_PATHS else logging.INFO,
                "%s %s %d %.1f ms",
                scope.get("method", "?"),
                path,
                status,
                seconds * 1000,
                extra={
                    "method": scope.get("method"),
                    "path": path,
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                },
            )
            request_id_var.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return new_request_id()


def new_request_id() -> str:
    """32 random hex digits, like a uuid4's, from Python's generator: uuid4() reads os.urandom, a
    system call that gives up the GIL on the event loop (and waits to get it back) for every
    request. An id has to be unique, not unguessable."""
    return f"{random.getrandbits(128):032x}"


def _query_model(scope: Scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model")
    return values[0] if values else None
