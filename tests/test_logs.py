"""Structured logs: one JSON object per line, tagged with the request being served."""

from __future__ import annotations

import json
import logging

from service.logs import JsonFormatter, TextFormatter, request_id_var


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
