"""HTTP routes: validate, delegate, encode. The work happens in the pipeline and the repository."""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import to_json
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.pipeline import ImageResult
from service.core.repository import ServedModel
from service.errors import InvalidParameter, UnknownModel, error_body, shown, validation_message
from service.http.schemas import (
    CLASSIFY_REQUEST,
    TOP_K_DEFAULT,
    TOP_K_MAX,
    Classification,
    Health,
    ModelEntry,
    ModelList,
    Readiness,
    error_responses,
)
from service.http.uploads import cancel_on_disconnect, read_uploads

router = APIRouter()


class FastJSONResponse(JSONResponse):
    """JSON encoded by pydantic-core (compiled) rather than the json module: a fifth of the time,
    and every /classify answer is encoded on the event loop."""

    def render(self, content: object) -> bytes:
        return to_json(content)


@router.post(
    "/classify",
    summary="Classify one image (raw body) or several (multipart `file` parts)",
    openapi_extra=CLASSIFY_REQUEST,
    responses={
        200: {"model": Classification},
        **error_responses(400, 401, 404, 408, 413, 415, 422, 429, 500, 503, 504),
    },
)
async def classify(request: Request) -> JSONResponse:
    started = time.monotonic()
    model, top_k = classify_query(request.query_params)
    request.state.model = model  # the metrics' label (service/app.py, RequestContext)
    state = request.app.state
    settings = state.settings
    served = state.repository.get(model)
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
    total_s = time.monotonic() - started
    body: dict = {"model": served.name, "backend": served.runtime.name}
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
    if not multipart:
        body["predictions"] = results[0].predictions
    else:
        body["results"] = [{"filename": r.filename, "predictions": r.predictions} for r in results]
    body["timings_ms"] = _timings_ms(results, total_s)
    return FastJSONResponse(body)


# The query of every /classify request is read here rather than declared as FastAPI parameters:
# FastAPI's dependency resolution cost the event loop ~0.1 ms per request (a tenth of all it does
# for one), and this is the hot path. The same pydantic validation gives the same answers.
_TOP_K = TypeAdapter(Annotated[int, Field(ge=1, le=TOP_K_MAX)])


def classify_query(query: QueryParams) -> tuple[str, int]:
    """``model`` and ``top_k`` from a /classify query (422 when missing or invalid)."""
    model = query.get("model")
    if model is None:
        raise InvalidParameter("model: Field required")
    top_k = query.get("top_k")
    if top_k is None:
        return model, TOP_K_DEFAULT
    try:
        return model, _TOP_K.validate_python(top_k)
    except ValidationError as exc:
        raise InvalidParameter(validation_message(exc.errors(), "top_k")) from None


@router.get("/models", responses={200: {"model": ModelList}, **error_responses(401)})
async def list_models(request: Request) -> JSONResponse:
    models = request.app.state.repository.models.values()
    return JSONResponse({"models": [describe(model, detail=False) for model in models]})


@router.get("/models/{name}", responses={200: {"model": ModelEntry}, **error_responses(401, 404)})
async def get_model(request: Request, name: str) -> JSONResponse:
    repository = request.app.state.repository
    model = repository.models.get(name)
    if model is None:
        raise UnknownModel(f"unknown model {shown(name)}; available models: {', '.join(repository.models)}")
    return JSONResponse(describe(model, detail=True))


@router.get("/healthz", responses={200: {"model": Health}})
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz", responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "not ready"}}
)
async def readyz(request: Request) -> JSONResponse:
    repository = request.app.state.repository
    models = {
        model.name: {"status": model.status.value, **({"reason": model.reason} if model.reason else {})}
        for model in repository.models.values()
    }
    if repository.ready:
        return JSONResponse({"ready": True, "models": models})
    waiting = [f"{name} ({entry['status']})" for name, entry in models.items() if entry["status"] != "ready"]
    message = "not ready: " + ", ".join(waiting)
    return JSONResponse(
        {**error_body("not_ready", message), "ready": False, "models": models},
        status_code=503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
)
async def metrics(request: Request) -> Response:
    if request.app.state.settings.metrics_port is not None:
        # Served on METRICS_PORT only (service/__main__.py), for scrapers on the internal network.
        raise StarletteHTTPException(404)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(_index_html())


def describe(model: ServedModel, *, detail: bool) -> dict:
    """What /models says about a model: manifest facts and runtime state (labels only in detail)."""
    entry: dict = {"name": model.name, "status": model.status.value}
    if model.reason:
        entry["reason"] = model.reason
    if model.runtime is not None:
        entry["backend"] = model.runtime.name
        entry["precision"] = model.runtime.precision
    else:
        entry["precision"] = model.precision
    manifest = model.manifest
    if manifest is not None:
        entry |= {
            "variant": manifest.variant,
            "family": manifest.family,
            "input_size": manifest.input_size,
            "flops": manifest.flops,
            "params": manifest.params,
            "memory_access_cost": manifest.memory_access_cost,
            "weights": manifest.weights.model_dump(exclude_none=True),
            "preprocessing": manifest.preprocessing.model_dump(),
            "num_classes": len(manifest.labels),
        }
    if model.load_seconds is not None:
        entry["load_seconds"] = round(model.load_seconds, 3)
    if model.batcher is not None:
        batcher = model.batcher
        entry["batching"] = {
            "max_batch_size": batcher.max_batch_size,
            "max_queue_delay_ms": batcher.max_queue_delay_s * 1000,
            "max_queue_size": batcher.max_queue_size,
            "max_concurrent_batches": batcher.max_concurrent_batches,
            "capacity": batcher.capacity,
            "in_progress": batcher.in_progress,
            "queue_depth": batcher.depth,
        }
    if detail and manifest is not None:
        entry |= {
            "knobs": manifest.knobs,
            "input": manifest.input.model_dump(),
            "output": manifest.output.model_dump(),
            "onnx": manifest.onnx.model_dump(),
            "precisions": [variant.model_dump(exclude_none=True) for variant in manifest.precisions],
            "fp32_bytes": manifest.fp32_bytes,
            "parity_max_abs_diff": manifest.parity_max_abs_diff,
            "tools": manifest.tools,
            "created_at": manifest.created_at,
            "labels": manifest.labels,
        }
        providers = getattr(model.runtime, "providers", None)
        if providers:
            entry["providers"] = list(providers)
    return entry


def _timings_ms(results: list[ImageResult], total_s: float) -> dict[str, float]:
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


@cache
def _index_html() -> str:
    return resources.files("service").joinpath("static/index.html").read_text(encoding="utf-8")
