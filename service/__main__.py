"""``python -m service [--host H] [--port P]``: serve with uvicorn (uvloop + httptools), one process.

No reload, no debug: uvicorn's reloader is never on, and FastAPI's debug tracebacks never reach a client.
METRICS_PORT moves ``/metrics`` to a second listener (prometheus_client's, in a thread) for internal
scraping. Temporary files go to SCRATCH_DIR only: the rest of the filesystem may be read-only.

SIGTERM (or Ctrl-C) starts a graceful shutdown: the listening socket closes, requests in flight
get their answers (bounded by SHUTDOWN_GRACE_S), the batchers drain, and the process exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import uvicorn
from prometheus_client import start_http_server

from service.app import create_app
from service.config import ConfigError, load_settings
from service.http.protocol import with_header_deadline
from service.logs import configure_logging

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
    release_large_blocks()
    use_scratch_dir(settings.scratch_path)
    log.info(
        "starting",
        # AUTH_TOKEN is a SecretStr: it dumps as asterisks.
        extra={"settings": settings.model_dump(mode="json")},
    )
    app = create_app(settings)
    metrics_server = None
    if settings.metrics_port is not None:
        try:
            metrics_server, _ = start_http_server(
                settings.metrics_port, settings.host, registry=app.state.metrics.registry
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
        http=with_header_deadline(settings.header_timeout_s),  # httptools, with a deadline on headers
        lifespan="on",
        workers=1,
        reload=False,  # never: a file watcher has no place in a served process
        log_config=None,  # logging is configured above, in the service's format
        access_log=False,  # the app logs each request itself, with its request id
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    server = uvicorn.Server(config)
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


def use_scratch_dir(path: Path) -> None:
    """Send every temporary file of this process (Python's tempfile, and native libraries reading
    TMPDIR) to ``path``: with a read-only root filesystem it is the one writable place."""
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    if not os.access(path, os.W_OK | os.X_OK):
        log.warning("SCRATCH_DIR %s is not a writable directory; temporary files will fail", path)


# glibc's mallopt() parameters: the size from which an allocation gets its own mapping, and how much
# free memory at the top of a heap is kept rather than given back.
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
LARGE_BLOCK_BYTES = 4 * 1024 * 1024
KEPT_FREE_BYTES = 2 * LARGE_BLOCK_BYTES


def release_large_blocks() -> bool:
    """Give every allocation of 4 MiB or more its own mapping, returned to the OS when freed.

    glibc raises its mapping threshold to the largest block freed so far (up to 32 MiB): after one
    huge image (a 1 x 20000 strip resized is ~80 MB), such buffers would come from the decode
    threads' heaps and stay resident once freed (rounds of the hostile corpus: 169 -> 222 MiB). A
    fixed threshold keeps that memory returned. It is 4 MiB, not glibc's initial 128 KiB: the buffers of
    an ordinary photo (a 500x375 decode, its resize, the 224x224 float tensor: 0.2-0.6 MB) then come
    from the heap and are reused; mapping each of them afresh cost MobileNet v2 ~10% of its throughput
    at concurrency 16 and 1.5 ms of decode at concurrency 1 (page faults and unmaps, 2 cores).

    Fixing the threshold also freezes glibc's trim threshold at its initial 128 KiB (glibc keeps it at
    twice the mapping threshold only while it adjusts that itself), so every freed photo buffer at the
    top of a heap was handed back and faulted in again by the next request: ShuffleNet v2 in-process
    at concurrency 2 lost 10% (7.4 -> 8.3 ms of CPU per request). The trim threshold is set to twice
    the mapping threshold, as glibc's own rule would.
    Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
    )


if __name__ == "__main__":
    sys.exit(main())
