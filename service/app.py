"""The app factory: wires settings, metrics, models, decode pool and routes into one FastAPI app.

Models load in the background once the lifespan starts, so ``/healthz`` answers during the load
and ``/readyz`` says 503 until every model is ready. Shutdown drains every batcher (queued requests
are still answered) before the runtimes are released. Every error, FastAPI's own included, leaves
as ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import scheduling
from service.config import Settings
from service.core.fair_pool import FairPool
from service.core.metrics import Metrics
from service.core.pipeline import Pipeline
from service.core.repository import ModelRepository, RuntimeLoader, configured_models
from service.core.runtimes import load_runtime
from service.errors import InternalError, ServiceError, error_body, validation_message
from service.http.auth import BearerAuth
from service.http.routes import classify, router
from service.logs import request_id_var

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")

CLASSIFY_PATH = "/classify"
# Codes for the errors Starlette raises itself (unknown route, wrong method, ...).
_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    400: "bad_request",
    413: "payload_too_large",
    401: "unauthorized",
}
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: debug-level access logs
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def create_app(settings: Settings, *, runtime_loader: RuntimeLoader = load_runtime) -> FastAPI:
    """A ready-to-serve app; nothing is loaded until its lifespan starts."""
    names = configured_models(settings)
    metrics = Metrics(names)
    repository = ModelRepository(names, settings, metrics, loader=runtime_loader)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        app.state.pipeline = Pipeline(
            FairPool(decode_pool, settings.decode_workers),
            metrics,
            max_image_pixels=settings.max_image_pixels,
        )
        loading = asyncio.create_task(_load_models(repository, settings), name="load-models")
        try:
            yield
        finally:
            if not loading.done():
                # The model being loaded finishes in its thread; the ones after it are never started.
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await repository.stop(settings.shutdown_grace_s)
            decode_pool.shutdown(wait=False, cancel_futures=True)
            log.info("shutdown complete")

    app = FastAPI(
        title="Efficient-CNN classifier",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: off unless DOCS_ENABLED. The schema
        # itself (/openapi.json) is always there, for clients and the API fuzz tests.
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        debug=False,
        # Prometheus is this service's telemetry; FastAPI's own OpenTelemetry hooks stay off.
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    app.include_router(router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(DirectRoute, method="POST", path=CLASSIFY_PATH, endpoint=classify)
    token = settings.expected_token()
    if token is not None:
        # Inside RequestContext: a 401 still gets its request id, access log line and metrics.
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


async def _load_models(repository: ModelRepository, settings: Settings) -> None:
    await repository.load_all()
    # Only now: threads inherit the policy of the thread that starts them, and the inference threads
    # (started by the load, on this thread) keep the default one.
    if not settings.event_loop_preempts and scheduling.stop_preempting():
        log.info("event loop thread: SCHED_BATCH, it waits for a free core (EVENT_LOOP_PREEMPTS=false)")


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status_code >= 500:
        log.warning(
            "%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.code, exc.message
        )
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI's locations start with where the value was ("query", "path", "body"): dropped.
    errors = [{**error, "loc": tuple(error.get("loc", ()))[1:]} for error in exc.errors()]
    body = error_body("invalid_parameter", validation_message(errors))
    return JSONResponse(body, status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_ERROR_CODES.get(
        exc.status_code, "internal_error" if exc.status_code >= 500 else "http_error"
    )
    message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
    body = error_body(code, str(message))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


class DirectRoute:
    """One route straight to its handler, past FastAPI's router and its per-request machinery.

    FastAPI still declares the route (its OpenAPI entry, its 405 for other methods); requests for it
    skip the exception and exit-stack middleware, route matching and dependency resolution, which
    together cost the event loop ~35% of what it does for a /classify request. The handler takes
    only the Request and validates its own query (service/http/routes.py), so nothing FastAPI would have
    done is lost; its ServiceErrors are answered here as the app's exception handler would.
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
            response = await _service_error(request, exc)
        await response(scope, receive, send)


class RequestContext:
    """Request id, access log, /classify metrics, and the last word on unhandled errors.

    Pure ASGI rather than BaseHTTPMiddleware: it sees the status of every response, FastAPI's
    validation errors included, without wrapping the body stream.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
            if path == CLASSIFY_PATH:
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
