"""Structured logs: one JSON object per line, tagged with the request being served."""

from __future__ import annotations

import io
import json
import logging
import time

from service.logs import BackgroundWriter, JsonFormatter, TextFormatter, request_id_var


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("service.test", logging.INFO, __file__, 1, message, args or ("world",), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_the_request_id_and_extra_fields():
    token = request_id_var.set("req-1")
    try:
        line = JsonFormatter().format(record(status=200, color_message="\x1b[1mx"))
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert (
        entry["message"] == "hello world" and entry["level"] == "info" and entry["logger"] == "service.test"
    )
    assert entry["request_id"] == "req-1" and entry["status"] == 200
    assert "color_message" not in entry and "\n" not in line


def test_outside_a_request_there_is_no_request_id():
    assert "request_id" not in json.loads(JsonFormatter().format(record()))
    assert "[request" not in TextFormatter().format(record())


def test_the_background_writer_keeps_order_and_request_ids_and_writes_everything_on_close():
    stream = io.StringIO()
    writer = BackgroundWriter(stream, JsonFormatter(), interval_s=60)  # only a warning or close writes
    logger = logging.getLogger("service.test.writer")
    logger.addHandler(writer)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        token = request_id_var.set("req-7")
        try:
            for i in range(50):
                logger.info("line %d", i)
        finally:
            request_id_var.reset(token)
        assert stream.getvalue() == ""  # nothing written on the logging thread
        logger.warning("now")
        deadline = time.monotonic() + 5
        while "now" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        logger.info("last")
    finally:
        logger.removeHandler(writer)
        writer.close()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["message"] for e in entries] == [f"line {i}" for i in range(50)] + ["now", "last"]
    assert {e.get("request_id") for e in entries[:50]} == {"req-7"}
    assert "request_id" not in entries[-1]
