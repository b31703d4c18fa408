"""The app factory: wires settings, metrics, the model repository, the routes, the middleware and
the error handlers into one FastAPI app.

Models load in the background once the lifespan starts, so ``/healthz`` answers during the load
and ``/readyz`` says 503 until every model is ready. Shutdown drains every batcher (queued requests
are still answered) before the runtimes are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from service.config import Settings
from service.core.metrics import Metrics
from service.core.pipeline import Pipeline
from service.core.repository import ModelRepository, RuntimeLoader, configured_models
from service.core.runtimes import load_runtime
from service.http import classify, routes
from service.http.auth import BearerAuth
from service.http.errors import install_error_handlers
from service.http.middleware import DirectRoute, RequestContext
from service.oip.http import OipRoutes

log = logging.getLogger("service")


def create_app(
    settings: Settings,
    *,
    runtime_loader: RuntimeLoader = load_runtime,
    on_models_loaded: Callable[[], None] | None = None,
    serve_grpc: bool = False,
    rescan_on_sighup: bool = False,
    on_runtime_released: Callable[[], object] | None = None,
) -> FastAPI:
    """A ready-to-serve app; nothing is loaded until its lifespan starts. ``on_models_loaded`` is
    called on the event loop's thread once every model has loaded (or failed to). ``serve_grpc``: the
    lifespan also serves the Open Inference Protocol over gRPC on GRPC_PORT, in the same event loop
    (``app.state.grpc_server``). ``rescan_on_sighup``: SIGHUP makes the repository load anew every model
    whose files changed (the process's main thread only). ``on_runtime_released``: called (in the loader
    thread) after a replaced model's runtime is released."""
    names = configured_models(settings)
    metrics = Metrics(names)
    repository = ModelRepository(
        names, settings, metrics, loader=runtime_loader, on_released=on_runtime_released
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pipeline = Pipeline(metrics)
        grpc_server = None
        if serve_grpc:
            # Imported here: an app without gRPC (tests, tools) never loads the gRPC stack.
            from service.oip.grpc import OipGrpcServer

            grpc_server = OipGrpcServer(settings, repository, app.state.pipeline, metrics)
            await grpc_server.start()  # a port that cannot be bound fails the startup
        app.state.grpc_server = grpc_server
        loading = asyncio.create_task(_load_models(repository, on_models_loaded), name="load-models")
        rescans: set[asyncio.Task[None]] = set()
        if rescan_on_sighup:

            def rescan() -> None:
                log.info("SIGHUP: rescanning the model repository")
                task = asyncio.get_running_loop().create_task(_rescan(loading, repository), name="rescan")
                rescans.add(task)
                task.add_done_callback(rescans.discard)

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, rescan)
        try:
            yield
        finally:
            if rescan_on_sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if grpc_server is not None:
                # Its calls in flight are answered before the batchers stop. (python -m service has
                # already refused new calls since the moment the HTTP port closed.)
                await grpc_server.stop(settings.shutdown_grace_s)
            if not loading.done():
                # The model being loaded finishes in its thread; the ones after it are never started.
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await repository.stop(settings.shutdown_grace_s)
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
    app.include_router(classify.router)
    app.include_router(routes.router)
    install_error_handlers(app)
    # Middleware added last runs first: RequestContext, then BearerAuth, then DirectRoute, then OipRoutes
    # (the Open Inference Protocol's /v2 routes: /classify never passes through it).
    app.add_middleware(OipRoutes, settings=settings, metrics=metrics, repository=repository)
    app.add_middleware(DirectRoute, method="POST", path=classify.PATH, endpoint=classify.classify)
    token = settings.expected_token()
    if token is not None:
        # Inside RequestContext: a 401 still gets its request id, access log line and metrics.
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(RequestContext, metrics=metrics, metrics_path=classify.PATH)
    return app


async def _rescan(loading: asyncio.Task[None], repository: ModelRepository) -> None:
    await asyncio.shield(loading)  # a rescan during the first load waits for it to finish
    await repository.rescan()


async def _load_models(repository: ModelRepository, on_models_loaded: Callable[[], None] | None) -> None:
    await repository.load_all()
    if on_models_loaded is not None:
        on_models_loaded()
