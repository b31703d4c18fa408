"""What ``/openapi.json`` says about each route: the raw-image and multipart request bodies of
``/classify``, every response body, and every error a route can return, in the one error shape.

The handlers build their JSON by hand (``JSONResponse``); these models only document it, and the
API fuzz test (tests/test_fuzz.py) holds the server's answers to them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.imaging import SUPPORTED_MEDIA_TYPES


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_image, unknown_model, overloaded")
    message: str = Field(description="what went wrong, for a person")


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


class Prediction(BaseModel):
    class_id: int
    label: str
    score: float = Field(ge=0, le=1)


class Timings(BaseModel):
    decode: float
    queue: float
    inference: float
    total: float


class FileResult(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class Classification(BaseModel):
    """A raw-body request answers with ``predictions``; a multipart one with ``results``, one per file."""

    model: str
    backend: str
    predictions: list[Prediction] | None = None
    results: list[FileResult] | None = None
    timings_ms: Timings


class ModelEntry(BaseModel):
    """Manifest facts and runtime state; the detail view adds labels, tensors and tool versions."""

    model_config = ConfigDict(extra="allow")
    name: str
    status: str = Field(description="loading, ready, failed or unavailable")
    reason: str | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]


class ModelReadiness(BaseModel):
    status: str
    reason: str | None = None


class Readiness(BaseModel):
    """200 when every model is ready; 503 (with an ``error``) naming those that are not."""

    ready: bool
    models: dict[str, ModelReadiness]
    error: ErrorDetail | None = None


class Health(BaseModel):
    status: str


_IMAGE = {"schema": {"type": "string", "format": "binary"}}

TOP_K_DEFAULT, TOP_K_MAX = 5, 1000

CLASSIFY_REQUEST: dict[str, Any] = {
    # Written out because the route reads its query itself (service/http/routes.py says why).
    "parameters": [
        {
            "name": "model",
            "in": "query",
            "required": True,
            "description": "model name, e.g. shufflenet_v2",
            "schema": {"type": "string", "title": "Model"},
        },
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "description": "how many classes to return",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": TOP_K_MAX,
                "default": TOP_K_DEFAULT,
                "title": "Top K",
            },
        },
    ],
    "requestBody": {
        "required": True,
        "description": "the image bytes (the type is sniffed from them), or multipart/form-data "
        "with one or more `file` parts",
        "content": {
            **{media_type: _IMAGE for media_type in (*SUPPORTED_MEDIA_TYPES, "application/octet-stream")},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                },
            },
        },
    },
}

_ERRORS = {
    400: "invalid_image: not decodable, truncated, empty, or a malformed multipart body",
    401: "unauthorized: AUTH_TOKEN (or AUTH_TOKEN_FILE) is set and the request has no valid "
    "'Authorization: Bearer <token>' header (with WWW-Authenticate: Bearer)",
    404: "unknown_model (the message lists the served models), or no such route",
    408: "body_timeout: the body did not arrive within BODY_READ_TIMEOUT_S; the connection closes",
    413: "payload_too_large (body over MAX_BODY_BYTES, or more files than the queue holds) or "
    "image_too_large (pixels over MAX_IMAGE_PIXELS, from the header)",
    415: "unsupported_media_type: a declared type or recognised format this service does not decode",
    422: "invalid_parameter: a query parameter out of range or missing, or no `file` part",
    429: "overloaded: the model's places are all taken; retry after Retry-After seconds",
    500: "internal_error: inference failed (the message carries an error id to find in the log)",
    503: "model_unavailable: the model is not loaded, failed, or the server is stopping",
    504: "timeout: the request deadline (REQUEST_TIMEOUT_S) passed before its batch ran",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries for these error status codes, each with the error body's schema."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in status_codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _ERRORS[status]}
        if status == 429:
            entry["headers"] = _RETRY_AFTER
        responses[status] = entry
    return responses
