"""The response bodies, as the types ``/openapi.json`` shows, and the documented errors of each route.

``Classification`` is what ``/classify`` encodes its answer with (service/http/classify.py), so the
schema and the bytes cannot drift apart. The other bodies are built by their routes as plain dicts
of these shapes; the API fuzz test (tests/test_fuzz.py) holds every answer to its schema. Every
error is ``{"error": {"code": ..., "message": ...}}``, its code one of the table's
(service/errors.py), from which the error responses below are derived.
"""

from __future__ import annotations

from typing import (
    Annotated,
    Any,
    NotRequired,  # pydantic needs these on Python < 3.12
)

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from service.errors import (
    ERRORS,
    BadRequest,
    HeadersTooLarge,
    HeaderTimeout,
    InternalError,
    Overloaded,
    ServiceError,
    Unauthorized,
)


class ErrorDetail(TypedDict):
    code: Annotated[str, Field(description="machine-readable", json_schema_extra={"enum": list(ERRORS)})]
    message: Annotated[str, Field(description="what went wrong, for a person")]


class ErrorBody(TypedDict):
    """Every error: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


class Prediction(TypedDict):
    class_id: int
    label: str
    score: Annotated[float, Field(ge=0, le=1)]


class Timings(TypedDict):
    decode: float
    queue: float
    inference: float
    total: float


class FileResult(TypedDict):
    filename: str | None
    predictions: list[Prediction]


class Classification(TypedDict):
    """A raw-body request answers with ``predictions``; a multipart one with ``results``, one per file."""

    model: str
    version: Annotated[int, Field(description="the version of the model that answered")]
    backend: str
    predictions: NotRequired[list[Prediction]]
    results: NotRequired[list[FileResult]]
    timings_ms: Timings


class ModelVersion(TypedDict):
    version: int
    status: str
    reason: NotRequired[str]
    backend: NotRequired[str]
    load_seconds: NotRequired[float]


class LoadCounts(TypedDict):
    """The model's loads since the start (every version's), and the last failure's reason until a
    load succeeds."""

    loads: int
    failures: int
    last_error: NotRequired[str]
    last_load_at: NotRequired[float]


class ModelEntry(BaseModel):
    """Manifest facts and runtime state; the detail view adds labels, tensors and tool versions."""

    model_config = ConfigDict(extra="allow")
    name: str
    status: str = Field(description="loading, ready, failed, unavailable or unloaded")
    reason: str | None = None
    version: int | None = Field(None, description="the version served to requests that name none")
    versions: list[ModelVersion] = Field(default_factory=list, description="every version held, oldest first")
    loads: LoadCounts | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]


class ModelReadiness(TypedDict):
    status: str
    reason: NotRequired[str]


class Readiness(TypedDict):
    """200 when every model is ready; 503 (with an ``error``) naming those that are not."""

    ready: bool
    models: dict[str, ModelReadiness]
    error: NotRequired[ErrorDetail]


class Health(TypedDict):
    status: str


# Errors any request can meet, whatever its route: the HTTP parser's own (a malformed request, headers
# too slow) and the last-resort 500.
_ANY_REQUEST: tuple[type[ServiceError], ...] = (BadRequest, HeaderTimeout, HeadersTooLarge, InternalError)

_HEADERS: dict[type[ServiceError], dict[str, Any]] = {
    Overloaded: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
    Unauthorized: {
        "WWW-Authenticate": {
            "description": 'the Bearer challenge (with error="invalid_token" for a wrong token)',
            "required": True,
            "schema": {"type": "string"},
        }
    },
}


def error_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries of a route that can answer these errors (and those any request can):
    one per status, in the error body's schema, naming each code with its description."""
    by_status: dict[int, list[type[ServiceError]]] = {}
    for error in (*errors, *_ANY_REQUEST):
        rows = by_status.setdefault(error.status_code, [])
        if error not in rows:
            rows.append(error)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, rows in sorted(by_status.items()):
        entry: dict[str, Any] = {"model": ErrorBody, "description": describe_errors(*rows)}
        headers = {name: spec for row in rows for name, spec in _HEADERS.get(row, {}).items()}
        if headers:
            entry["headers"] = headers
        responses[status] = entry
    return responses


def describe_errors(*errors: type[ServiceError]) -> str:
    """An OpenAPI response's description: a list of the error codes it carries, each with its meaning."""
    return "\n".join(f"- `{error.code}`: {error.description}" for error in errors)
