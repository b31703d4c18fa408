"""What the server changes for its whole process, applied by ``python -m service`` and nowhere else.

``create_app()`` builds an app and leaves the process as it found it, so tests (and anything else
embedding the app) can build many in one process. Everything that outlives one app, or reaches past
it, is here, for ``service/__main__.py`` to apply:

* where logs go: every logger to stderr through one background writer, stopped (its records written
  out) when the server stops, and the logging module's per-record work trimmed;
* how glibc's allocator returns large blocks (:func:`release_large_blocks`);
* the one directory temporary files may go to (:func:`use_scratch_dir`);
* the event loop thread's scheduling policy once the models are loaded (:func:`stop_preempting`).

The number of CPUs the pools are sized from is read in ``service/core/cpus.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import tempfile
from pathlib import Path

from service.logs import BackgroundWriter, JsonFormatter, TextFormatter

log = logging.getLogger("service")


# --- logging ----------------------------------------------------------------------------------------
def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (uvicorn's included) to stderr in the chosen format, written off-thread.

    Replaces the writer a previous call installed; :func:`stop_logging` ends it.
    """
    stop_logging()
    # No record says where it was made or by which thread or process (the formats use none of it):
    # the logging HOWTO's optimisations, for the access line of every request.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    writer = BackgroundWriter(sys.stderr, JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [writer]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def stop_logging() -> None:
    """Write out every waiting record and stop the writer thread that :func:`configure_logging`
    installed (the root logger holds it: no other record of it is kept)."""
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if isinstance(handler, BackgroundWriter)]:
        root.removeHandler(handler)
        handler.close()


# --- memory -----------------------------------------------------------------------------------------
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
    Returns False, having logged why, where the C library is not glibc (musl has no mallopt) or
    refuses: the server then runs with the allocator's defaults. The parameters are glibc's on every
    architecture (x86-64 and arm64 alike).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError) as exc:
        log.warning("C library %s has no mallopt (%s): large blocks keep the allocator's defaults", name, exc)
        return False
    if mallopt is None:
        log.warning("no C library found to tune: large blocks keep the allocator's defaults")
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)):
        log.warning("%s refused mallopt: large blocks keep the allocator's defaults", name)
        return False
    return True


def return_freed_memory() -> bool:
    """Hand the free pages of every heap back to the OS (glibc's ``malloc_trim``), after a replaced
    model's runtime is released.

    A runtime's session and the threads that ran it leave their memory free but resident in the
    heaps of threads that are gone, where only a trim of every heap reaches it (glibc trims the top
    of the main heap alone by itself): ShuffleNet v2 reloaded 50 times under requests grew the
    server's RSS by 46 MiB without it. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return False
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


# --- files ------------------------------------------------------------------------------------------
def use_scratch_dir(path: Path) -> None:
    """Send every temporary file of this process (Python's tempfile, and native libraries reading
    TMPDIR) to ``path``: with a read-only root filesystem it is the one writable place."""
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    if not os.access(path, os.W_OK | os.X_OK):
        log.warning("SCRATCH_DIR %s is not a writable directory; temporary files will fail", path)


# --- scheduling -------------------------------------------------------------------------------------
def stop_preempting() -> bool:
    """Mark the calling thread, the event loop's once the models are loaded, ``SCHED_BATCH``.

    Under full load every core runs an inference thread, and the event loop thread wakes for each
    request that arrives and each answer that comes back. Linux lets a waking thread preempt a
    running one at once (the default policy, SCHED_OTHER), so every wake-up interrupted an inference
    thread mid-run: two context switches and a cold cache per event, and the loop handling one event
    per wake-up. Marked SCHED_BATCH, the loop thread does not preempt when it wakes: it runs as soon
    as a core comes free (an inference thread waiting for the GIL, or at the end of a time slice) and
    then handles every event that has arrived in the meantime. When a core is idle (light load) a
    waking SCHED_BATCH thread takes it at once, so a lone request waits no longer.

    Measured on 2 cores at concurrency 16, alternating rounds, three inference threads per model (the
    CPU default), ShuffleNet v1: with the loop preempting, 233-245 req/s, 0.53-0.55 ms of the loop's
    CPU per request and 1.9-2.4% of the cores idle; with the loop waiting its turn, 258-259 req/s,
    0.41-0.46 ms and 1.4-1.6% (two of three rounds; the third was disturbed). Against the previous
    defaults (two threads, a preempting loop): ShuffleNet v1 229.5 -> 249.9 req/s (median of 3),
    ShuffleNet v2 and MobileNet v2 +2-7% a round. p50 at concurrency 1 unchanged. With two inference
    threads, the loop waiting its turn left cores idle (3.5-4.9%) and gained nothing.

    Only once the models are loaded: threads inherit the policy of the thread that starts them, and
    the inference threads, started by the load on this thread, keep the default one. Returns False
    where the platform has no SCHED_BATCH (not Linux) or refuses the change.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        log.info("this platform has no SCHED_BATCH: the event loop thread keeps the default policy")
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError as exc:  # a seccomp profile that forbids it, say: serve on, as before
        log.warning("cannot make the event loop thread SCHED_BATCH: %s", exc)
        return False
    log.info("event loop thread: SCHED_BATCH, it waits for a free core (EVENT_LOOP_PREEMPTS=false)")
    return True
