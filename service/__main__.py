"""``python -m service [--host H] [--port P]``: serve with uvicorn (uvloop + httptools), one process.

No reload, no debug: uvicorn's reloader is never on, and FastAPI's debug tracebacks never reach a client.
METRICS_PORT moves ``/metrics`` to a second listener (service/http/metrics_port.py, in a thread) for internal
scraping. This is the one place the process itself is set up (logging, memory, SCRATCH_DIR for
temporary files, the event loop's scheduling): ``service/process.py``.

The Open Inference Protocol over gRPC is served on GRPC_PORT by the same process, in the same event
loop (``service/oip/grpc.py``).

SIGHUP rescans the model repository: every model whose files changed is loaded anew beside the one
serving and replaces it without dropping a request (``service/core/repository.py``).

SIGTERM (or Ctrl-C) starts a graceful shutdown: the listening sockets close (HTTP and gRPC at the same
moment: a new gRPC call gets UNAVAILABLE), requests and calls in flight get their answers (bounded by
SHUTDOWN_GRACE_S), the batchers drain, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.config import ConfigError, Settings, load_settings
from service.http.metrics_port import start_metrics_server
from service.http.protocol import with_header_deadline
from service.process import (
    configure_logging,
    release_large_blocks,
    return_freed_memory,
    stop_logging,
    stop_preempting,
    use_scratch_dir,
)

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="address to bind (default: HOST, else 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to bind (default: PORT, else 8000)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        print(f"python -m service: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        release_large_blocks()
        use_scratch_dir(settings.scratch_path)
        log.info(
            "starting",
            # AUTH_TOKEN is a SecretStr: it dumps as asterisks.
            extra={"settings": settings.model_dump(mode="json")},
        )
        return serve(settings)
    finally:
        stop_logging()  # every record written out before the process exits


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or Ctrl-C; the exit status."""
    app = create_app(
        settings,
        on_models_loaded=None if settings.event_loop_preempts else stop_preempting,
        serve_grpc=True,
        rescan_on_sighup=True,
        on_runtime_released=return_freed_memory,
    )
    metrics_server = None
    if settings.metrics_port is not None:
        try:
            metrics_server = start_metrics_server(
                settings.host,
                settings.metrics_port,
                app.state.metrics.registry,
                max_header_bytes=settings.max_header_bytes,
            )
        except OSError as exc:
            log.error("cannot serve /metrics on %s:%d: %s", settings.host, settings.metrics_port, exc)
            return 3
        log.info("/metrics on %s:%d (not on port %d)", settings.host, settings.metrics_port, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with a deadline on the headers and a cap on their size
        http=with_header_deadline(settings.header_timeout_s, settings.max_header_bytes),
        lifespan="on",
        workers=1,
        reload=False,  # never: a file watcher has no place in a served process
        log_config=None,  # main() has configured logging, in the service's format
        access_log=False,  # the app logs each request itself, with its request id
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    server = _server_closing_grpc_with_http(config, app)
    # uvicorn re-raises the signal it caught once it has shut down, which under the default SIGTERM
    # disposition would kill the process with -15 after a clean shutdown. A no-op handler here (the
    # one uvicorn restores) turns that into an ordinary exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    if not server.started:
        return 3  # startup failed (port in use, lifespan error); uvicorn has logged why
    return 0


def _server_closing_grpc_with_http(config: uvicorn.Config, app: FastAPI) -> uvicorn.Server:
    """uvicorn's server, which also stops the app's gRPC server from taking new calls the moment it
    closes the HTTP port: otherwise gRPC would take them until the app's lifespan ends, after the HTTP
    requests have drained. The lifespan's end then waits for the gRPC calls in flight. (The class is
    made here, from whatever ``uvicorn.Server`` is when the server is made, so that it can be replaced.)"""

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            grpc_server = getattr(app.state, "grpc_server", None)
            if grpc_server is not None:
                grpc_server.refuse_new_calls(config.timeout_graceful_shutdown)
            await super().shutdown(sockets)

    return Server(config)


if __name__ == "__main__":
    sys.exit(main())
