"""What native libraries write to the process's standard error while a call runs, kept as text.

ONNX Runtime reports why it could not create an execution provider (a CUDA or TensorRT library that
does not load, say) only through its own logger, which writes to file descriptor 2, then carries on
without that provider. :func:`capture_stderr` records that text so that the reason can go into the
model's status. Everything written meanwhile still reaches the real standard error as it arrives (a
thread copies it through), so the server's own log lines are neither lost nor held back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_CHUNK = 65536
_JOIN_S = 5.0
# One capture at a time: file descriptor 2 is the process's, not a thread's.
_capturing = threading.Lock()


class CapturedText:
    """The text written to standard error during a :func:`capture_stderr` block (complete on exit)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")


@contextlib.contextmanager
def capture_stderr() -> Iterator[CapturedText]:
    """Copy what is written to file descriptor 2 inside the block into the yielded object's ``text``."""
    captured = CapturedText()
    with _capturing:
        sys.stderr.flush()
        original = os.dup(2)
        forward_to = os.dup(2)  # the forwarder's own copy, which it closes when done
        read_end, write_end = os.pipe()
        forwarder = threading.Thread(
            target=_forward, args=(read_end, forward_to, captured._chunks), name="stderr-capture", daemon=True
        )
        forwarder.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)  # the pipe's last writer is gone: the forwarder reads to the end and stops
            os.close(original)
            forwarder.join(_JOIN_S)
            # A child process started inside the block may still hold the pipe: its forwarder then runs on.
            if not forwarder.is_alive():
                os.close(read_end)


def _forward(read_end: int, destination: int, chunks: list[bytes]) -> None:
    try:
        while data := os.read(read_end, _CHUNK):
            chunks.append(data)
            with contextlib.suppress(OSError):  # a closed standard error must not stop the capture
                view = memoryview(data)
                while view:
                    view = view[os.write(destination, view) :]
    finally:
        os.close(destination)
