"""The error table (service/errors.py) and what is derived from it: the documented error responses
of /openapi.json, the codes of the framework's own errors, the one renderer of error bodies
(service/http/errors.py), and /classify's query limits and answer, each defined once."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
from pydantic_core import to_json
from starlette.datastructures import QueryParams

from service import errors
from service.app import create_app
from service.errors import ERRORS, ServiceError, generic_error
from service.http import classify, protocol
from tests.live_server import serving_settings

SERVICE = Path(__file__).resolve().parents[1] / "service"
RENDERER = SERVICE / "http" / "errors.py"
# The Open Inference Protocol's errors have that protocol's own shape, rendered in one place too.
OIP_RENDERER = SERVICE / "oip" / "http.py"
# Rows no operation documents: 405 answers a method the path has no operation for, 499 is never
# sent, and http_error names a framework error that none of the routes raises.
UNDOCUMENTED = {"method_not_allowed", "client_disconnected", "http_error"}
DOCUMENTED_CODE = re.compile(r"^- `(\w+)`: \S", re.MULTILINE)


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict:
    return create_app(serving_settings(tmp_path_factory.mktemp("nothing"))).openapi()


def error_responses(openapi: dict):
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    yield f"{method.upper()} {path} {status}", int(status), response


def test_every_error_class_is_one_row_of_the_table():
    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, ServiceError) and cls is not ServiceError
    ]
    assert sorted(cls.__name__ for cls in classes) == sorted(cls.__name__ for cls in ERRORS.values())
    for code, cls in ERRORS.items():
        assert cls.code == code and 400 <= cls.status_code < 600 and cls.description.strip(), cls
    with pytest.raises(TypeError, match="invalid_image"):
        type("Again", (ServiceError,), {"code": "invalid_image", "description": "a second row"})


def test_every_documented_error_response_names_codes_of_its_status_from_the_table(openapi):
    documented = set()
    for where, status, response in error_responses(openapi):
        codes = DOCUMENTED_CODE.findall(response["description"])
        assert codes, where
        for code in codes:
            assert code in ERRORS and ERRORS[code].status_code == status, (where, code)
        schema = response["content"]["application/json"]["schema"]["$ref"]
        assert schema.rsplit("/", 1)[1] in {"ErrorBody", "Readiness"}, where
        documented |= set(codes)
    assert documented == set(ERRORS) - UNDOCUMENTED


def test_the_error_body_schema_allows_exactly_the_tables_codes(openapi):
    code = openapi["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert code["enum"] == list(ERRORS)


def test_documented_headers_follow_their_rows(openapi):
    classify_errors = openapi["paths"]["/classify"]["post"]["responses"]
    assert classify_errors["429"]["headers"]["Retry-After"]["required"] is True
    assert classify_errors["401"]["headers"]["WWW-Authenticate"]["required"] is True


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "bad_request"),
        (401, "unauthorized"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (413, "payload_too_large"),
        (500, "internal_error"),
    ],
)
def test_the_frameworks_own_errors_take_the_generic_row_of_their_status(status, code):
    row = generic_error(status)
    assert row is not None and row.code == code


def test_no_module_but_the_renderer_builds_an_error_body():
    """A dict literal with an "error" key, a ``dict(error=...)`` or bytes holding ``"error":`` anywhere
    in service/ outside service/http/errors.py would be a second place that shapes error bodies."""
    offenders = []
    for path in sorted(SERVICE.rglob("*.py")):
        if path in (RENDERER, OIP_RENDERER):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict) and any(
                isinstance(key, ast.Constant) and key.value == "error" for key in node.keys
            ):
                offenders.append(f"{path.relative_to(SERVICE)}:{node.lineno} dict literal")
            elif isinstance(node, ast.Call) and any(keyword.arg == "error" for keyword in node.keywords):
                if isinstance(node.func, ast.Name) and node.func.id == "dict":
                    offenders.append(f"{path.relative_to(SERVICE)}:{node.lineno} dict(error=...)")
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, bytes) and b'"error"' in node.value
            ):
                offenders.append(f"{path.relative_to(SERVICE)}:{node.lineno} bytes literal")
    assert not offenders


@pytest.mark.parametrize(
    ("canned", "status", "code"),
    [(protocol._MALFORMED_RESPONSE, 400, "bad_request"), (protocol._TIMEOUT_RESPONSE, 408, "header_timeout")],
)
def test_the_parsers_canned_answers_are_whole_json_error_responses(canned, status, code):
    head, _, body = canned.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith(f"HTTP/1.1 {status} ")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    payload = json.loads(body)
    assert set(payload) == {"error"} and payload["error"]["code"] == code and payload["error"]["message"]
    assert ERRORS[code].status_code == status


def test_top_k_limits_are_read_by_both_the_validation_and_the_schema(openapi):
    parameters = {p["name"]: p for p in openapi["paths"]["/classify"]["post"]["parameters"]}
    assert parameters["model"]["required"] is True and parameters["top_k"]["required"] is False
    schema = parameters["top_k"]["schema"]
    assert schema["type"] == "integer"
    low, high, default = schema["minimum"], schema["maximum"], schema["default"]
    assert classify.classify_query(QueryParams({"model": "m"})) == ("m", default, None)
    for top_k in (low, high):
        query = QueryParams({"model": "m", "top_k": str(top_k)})
        assert classify.classify_query(query) == ("m", top_k, None)
    for top_k in (low - 1, high + 1):
        with pytest.raises(errors.InvalidParameter, match="top_k"):
            classify.classify_query(QueryParams({"model": "m", "top_k": str(top_k)}))
    with pytest.raises(errors.InvalidParameter, match="model"):
        classify.classify_query(QueryParams({"top_k": "3"}))


def test_the_version_parameter_is_validated_and_documented(openapi):
    parameters = {p["name"]: p for p in openapi["paths"]["/classify"]["post"]["parameters"]}
    assert parameters["version"]["required"] is False
    assert parameters["version"]["schema"]["minimum"] == 1
    assert classify.classify_query(QueryParams({"model": "m", "version": "3"})) == ("m", 5, 3)
    for version in ("0", "-1", "two", "1.5"):
        with pytest.raises(errors.InvalidParameter, match="version"):
            classify.classify_query(QueryParams({"model": "m", "version": version}))


def test_the_classification_is_encoded_by_its_documented_type(openapi):
    answer = {
        "model": "mobilenet_v2",
        "version": 2,
        "backend": "onnxruntime-cpu",
        "predictions": [
            {"class_id": 281 + i, "label": "tabby, tabby cat", "score": 0.5 / (i + 1)} for i in range(5)
        ],
        "timings_ms": {"decode": 1.25, "queue": 0.5, "inference": 2.75, "total": 4.875},
    }
    response = classify.ClassificationResponse(answer)
    assert response.body == to_json(answer)  # the bytes a client gets, unchanged
    assert response.headers["content-type"] == "application/json"
    documented = openapi["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]
    assert documented["schema"]["$ref"].endswith("/Classification")
    schema = openapi["components"]["schemas"]["Classification"]
    assert set(schema["properties"]) == {
        "model",
        "version",
        "backend",
        "predictions",
        "results",
        "timings_ms",
    }
    assert set(schema["required"]) == {"model", "version", "backend", "timings_ms"}
