"""``python -m service [--host H] [--port P]``: serve with uvicorn (uvloop + httptools), one process.

SIGTERM (or Ctrl-C) starts a graceful shutdown: the listening socket closes, requests in flight
get their answers (bounded by SHUTDOWN_GRACE_S), the batchers drain, and the process exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import signal
import sys

import uvicorn

from service.app import create_app
from service.config import ConfigError, load_settings
from service.http_protocol import with_header_deadline
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
    log.info(
        "starting",
        extra={"settings": settings.model_dump(mode="json")},
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=with_header_deadline(settings.header_timeout_s),  # httptools, with a deadline on headers
        lifespan="on",
        workers=1,
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
    server.run()
    if not server.started:
        return 3  # startup failed (port in use, lifespan error); uvicorn has logged why
    return 0


# glibc's mallopt() parameter for the size from which allocations get their own mapping.
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 128 * 1024


def release_large_blocks() -> bool:
    """Give every allocation of 128 KiB or more its own mapping, returned to the OS when freed.

    glibc starts there too, but raises the threshold to the largest block freed so far (up to
    32 MiB): after one big image, later decode and resize buffers come from the decode threads' heaps
    and may stay resident once freed. A fixed threshold keeps the server's memory at its floor, for a
    mapping per large buffer (rounds of the hostile corpus: 104 MiB flat, against 105 -> 107 MiB
    without it). Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


if __name__ == "__main__":
    sys.exit(main())
