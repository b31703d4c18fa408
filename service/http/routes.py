"""The routes besides /classify (service/http/classify.py): the models, the probes, the metrics and the
page. Each reads the repository's state and answers it; none does work of its own."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.repository import ModelRepository, ModelStatus, ServedModel
from service.errors import InvalidParameter, NotFound, NotReady, Unauthorized, UnknownModel, shown
from service.http.errors import error_response
from service.http.schemas import (
    Health,
    ModelEntry,
    ModelList,
    ModelReadiness,
    Readiness,
    describe_errors,
    error_responses,
)

router = APIRouter()

# A model unloaded on request is not waited for.
_SETTLED = (ModelStatus.READY.value, ModelStatus.UNLOADED.value)


@router.get("/models", responses={200: {"model": ModelList}, **error_responses(Unauthorized)})
async def list_models(request: Request) -> JSONResponse:
    repository = request.app.state.repository
    return JSONResponse(
        {"models": [describe(repository, model, detail=False) for model in repository.models.values()]}
    )


@router.get(
    "/models/{name}",
    responses={
        200: {"model": ModelEntry},
        # InvalidParameter: what FastAPI's validation of the path would answer, in the error shape.
        **error_responses(Unauthorized, UnknownModel, NotFound, InvalidParameter),
    },
)
async def get_model(request: Request, name: str) -> JSONResponse:
    repository = request.app.state.repository
    model = repository.models.get(name)
    if model is None:
        raise UnknownModel(f"unknown model {shown(name)}; available models: {', '.join(repository.models)}")
    return JSONResponse(describe(repository, model, detail=True))


@router.get("/healthz", responses={200: {"model": Health}, **error_responses()})
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness},
        **error_responses(),
        NotReady.status_code: {"model": Readiness, "description": describe_errors(NotReady)},
    },
)
async def readyz(request: Request) -> JSONResponse:
    repository = request.app.state.repository
    models: dict[str, ModelReadiness] = {
        model.name: {"status": model.status.value, **({"reason": model.reason} if model.reason else {})}
        for model in repository.models.values()
    }
    if repository.ready:
        return JSONResponse({"ready": True, "models": models})
    waiting = [
        f"{name} ({entry['status']})" for name, entry in models.items() if entry["status"] not in _SETTLED
    ]
    return error_response(NotReady("not ready: " + ", ".join(waiting)), ready=False, models=models)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"},
        **error_responses(Unauthorized, NotFound),
    },
)
async def metrics(request: Request) -> Response:
    if request.app.state.settings.metrics_port is not None:
        # Served on METRICS_PORT only (service/__main__.py), for scrapers on the internal network.
        raise StarletteHTTPException(404)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(_index_html())


def describe(repository: ModelRepository, model: ServedModel, *, detail: bool) -> dict:
    """What /models says about a model: manifest facts and runtime state of the version it serves by
    default, its versions and its loads (labels only in detail)."""
    entry: dict = {"name": model.name, "status": model.status.value}
    if model.reason:
        entry["reason"] = model.reason
    entry["version"] = model.version
    entry["versions"] = [_describe_version(version) for version in repository.versions(model.name)]
    history = repository.history[model.name]
    loads: dict = {"loads": history.loads, "failures": history.failures}
    if history.last_error:
        loads["last_error"] = history.last_error
    if history.last_load_at is not None:
        loads["last_load_at"] = round(history.last_load_at, 3)
    entry["loads"] = loads
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


def _describe_version(model: ServedModel) -> dict:
    entry: dict = {"version": model.version, "status": model.status.value}
    if model.reason:
        entry["reason"] = model.reason
    if model.runtime is not None:
        entry["backend"] = model.runtime.name
    if model.load_seconds is not None:
        entry["load_seconds"] = round(model.load_seconds, 3)
    return entry


@cache
def _index_html() -> str:
    return resources.files("service").joinpath("static/index.html").read_text(encoding="utf-8")
