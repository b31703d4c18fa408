"""Structured logging: one JSON object per line (or plain text), each carrying the request id.

The request id lives in a context variable that the HTTP middleware sets, so any log call made
while serving a request (route, decoder, error handler) is tagged without passing it around.

Records are formatted and written by a background thread, in batches: a log call on the event loop
only appends the record to a list. Writing there meant a write system call per access-log line on
the loop, and handing each record to a waiting thread (logging's QueueHandler) a wake-up per line;
on 2 cores, at concurrency 16, either cost the loop ~0.05-0.3 ms of every request. The writer wakes
every 50 ms, and at once for a warning or worse, so nothing important waits.

This module holds the formats and the writer; ``service/process.py`` installs them for the server's
process and ends the writer when the server stops.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from typing import TextIO

from pydantic_core import to_json

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged as a field
# (except uvicorn's ``color_message``, the same text with terminal colour codes).
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
    "request_id",  # written as its own field, when there is one
}


def _request_id(record: logging.LogRecord) -> str | None:
    # Set on the record when it was queued (BackgroundWriter); else the formatting thread's own.
    return getattr(record, "request_id", None) or request_id_var.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _request_id(record)
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return to_json(entry, fallback=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = _request_id(record)
        return f"{text} [request {request_id}]" if request_id else text


class BackgroundWriter(logging.Handler):
    """Keeps each record with what it needs from the logging thread; a thread writes them out."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter, interval_s: float = 0.05) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._stream = stream
        self._interval_s = interval_s
        self._records: collections.deque[logging.LogRecord] = collections.deque()  # appends are atomic
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # Without Handler.handle's lock: the writer holds nothing the logging thread waits for.
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        # The request id is a context variable of the logging thread; the writer has none.
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        # The message is rendered now (cheap) and the JSON later: arguments may change meanwhile.
        record.msg = record.getMessage()
        record.args = None
        self._records.append(record)
        if record.levelno >= logging.WARNING:
            self._wake.set()

    def flush(self) -> None:
        """Write every record appended so far (from any thread; the writer's lock keeps the order)."""
        with self._write_lock:
            lines = []
            while self._records:
                record = self._records.popleft()
                try:
                    lines.append(self.format(record) + "\n")
                except Exception:
                    self.handleError(record)
            if lines:
                try:
                    self._stream.write("".join(lines))
                    self._stream.flush()
                except Exception:
                    pass  # stderr gone (closed pipe): logging must never take the service down

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        super().close()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            self.flush()
