"""``POST /classify``: read the query, take a place in the model's line, read the uploads, hand them
to the core pipeline, encode the answer.

This is the hot path: the middleware (service/http/middleware.py) calls :func:`classify` directly,
past FastAPI's router, so the query is validated here rather than declared as FastAPI parameters
(FastAPI's dependency resolution cost the event loop ~0.1 ms per request, a tenth of all it does for
one). The parameters' OpenAPI schema is generated from the very pydantic types that validate them,
and the answer is encoded by the type that ``/openapi.json`` shows (``Classification``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field, TypeAdapter, ValidationError
from starlette.datastructures import QueryParams
from starlette.responses import Response

from service.core.imaging import SUPPORTED_MEDIA_TYPES
from service.core.pipeline import ImageResult
from service.errors import (
    BodyReadTimeout,
    ImageTooLarge,
    InvalidImage,
    InvalidParameter,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
    validation_message,
)
from service.http.schemas import Classification, FileResult, Timings, error_responses
from service.http.uploads import cancel_on_disconnect, read_uploads

PATH = "/classify"

# The query's parameters, defined once: the validation below and the OpenAPI schema both read these.
TOP_K_DEFAULT = 5
ModelName = Annotated[str, Field(title="Model", description="model name, e.g. shufflenet_v2")]
TopK = Annotated[
    int,
    Field(TOP_K_DEFAULT, ge=1, le=1000, title="Top K", description="how many classes to return, best first"),
]
_TOP_K = TypeAdapter(TopK)
Version = Annotated[
    int,
    Field(
        ge=1, title="Version", description="a version of the model (default: the one it serves by default)"
    ),
]
_VERSION = TypeAdapter(Version)

# pydantic-core's compiled serializer for the response type, called directly (TypeAdapter.dump_json
# adds ~0.8 us of Python around it): within ~0.2 us of to_json() on the same dict, ~2.7 us for a top-5
# answer, and the bytes follow the documented schema.
_encode_classification = TypeAdapter(Classification).serializer.to_json


class ClassificationResponse(Response):
    media_type = "application/json"

    def render(self, content: Classification) -> bytes:
        return _encode_classification(content)


def _query_parameter(name: str, adapter: TypeAdapter[Any], *, required: bool) -> dict[str, Any]:
    schema = adapter.json_schema()
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": schema.get("description"),
        "schema": schema,
    }


_IMAGE = {"schema": {"type": "string", "format": "binary"}}

_OPENAPI: dict[str, Any] = {
    "parameters": [
        _query_parameter("model", TypeAdapter(ModelName), required=True),
        _query_parameter("top_k", _TOP_K, required=False),
        _query_parameter("version", _VERSION, required=False),
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

router = APIRouter()


@router.post(
    PATH,
    summary="Classify one image (raw body) or several (multipart `file` parts)",
    openapi_extra=_OPENAPI,
    responses={
        200: {"model": Classification},
        **error_responses(
            InvalidImage,
            Unauthorized,
            UnknownModel,
            BodyReadTimeout,
            PayloadTooLarge,
            ImageTooLarge,
            UnsupportedMediaType,
            InvalidParameter,
            Overloaded,
            ModelUnavailable,
            RequestTimeout,
        ),
    },
)
async def classify(request: Request) -> Response:
    started = time.monotonic()
    model, top_k, version = classify_query(request.query_params)
    request.state.model = model  # the metrics' label (service/http/middleware.py)
    state = request.app.state
    settings = state.settings
    served = state.repository.get(model, version)
    # A place in the model's line before anything is read or decoded: 429 at the door.
    with served.batcher.admit():
        uploads = await read_uploads(
            request,
            settings.max_body_bytes,
            max_files=served.batcher.max_queue_size,
            timeout_s=settings.body_read_timeout_s,
        )
        work = state.pipeline.classify(
            served,
            uploads,
            top_k=top_k,
            deadline=started + settings.request_timeout_s,
            request_id=request.state.request_id,
        )
        results = await cancel_on_disconnect(request, work)
    timings = _timings_ms(results, total_s=time.monotonic() - started)
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        files: list[FileResult] = [{"filename": r.filename, "predictions": r.output} for r in results]
        body: Classification = {
            "model": served.name,
            "version": served.version,
            "backend": served.runtime.name,
            "results": files,
            "timings_ms": timings,
        }
    else:
        body = {
            "model": served.name,
            "version": served.version,
            "backend": served.runtime.name,
            "predictions": results[0].output,
            "timings_ms": timings,
        }
    return ClassificationResponse(body)


def classify_query(query: QueryParams) -> tuple[str, int, int | None]:
    """``model``, ``top_k`` and ``version`` from a /classify query (422 when missing or invalid)."""
    model = query.get("model")
    if model is None:
        raise InvalidParameter("model: Field required")
    return (
        model,
        _parameter(query, "top_k", _TOP_K, TOP_K_DEFAULT),
        _parameter(query, "version", _VERSION, None),
    )


def _parameter(query: QueryParams, name: str, adapter: TypeAdapter[Any], default: Any) -> Any:
    value = query.get(name)
    if value is None:
        return default
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise InvalidParameter(validation_message(exc.errors(), name)) from None


def _timings_ms(results: list[ImageResult], total_s: float) -> Timings:
    # Images of one request decode and queue side by side: each stage lasted as long as its slowest.
    decode_s, queue_s, inference_s = results[0].decode_s, results[0].queue_s, results[0].inference_s
    for result in results[1:]:
        decode_s = max(decode_s, result.decode_s)
        queue_s = max(queue_s, result.queue_s)
        inference_s = max(inference_s, result.inference_s)
    return {
        "decode": round(decode_s * 1000, 3),
        "queue": round(queue_s * 1000, 3),
        "inference": round(inference_s * 1000, 3),
        "total": round(total_s * 1000, 3),
    }
