"""Triton's model repository extension, for both front doors: the index of the repository's models,
and loading or unloading one of them (``service/core/repository.py`` does the work).

Off unless ``REPOSITORY_API=true``; behind the bearer token like every other ``/v2`` route. A load
replaces the model without dropping a request, and answers once the model's name points at the new
version; one that fails leaves what served before serving and answers INVALID (HTTP 400), as Triton
does, with the reason. Triton's load parameters that upload a model or override its configuration
(``config``, ``file:...``) are refused: a model comes from the repository only.
"""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.core.repository import LoadError, ModelRepository, ModelStatus, discover
from service.errors import shown
from service.oip.infer import Kind, OipError

# The extension's model states.
_STATE = {
    ModelStatus.LOADING: "LOADING",
    ModelStatus.READY: "READY",
    ModelStatus.FAILED: "UNAVAILABLE",
    ModelStatus.UNAVAILABLE: "UNAVAILABLE",
    ModelStatus.UNLOADED: "UNAVAILABLE",
}


def check_enabled(settings: Settings) -> None:
    if not settings.repository_api:
        raise OipError(
            Kind.FORBIDDEN, "the model repository API is off: start the server with REPOSITORY_API=true"
        )


def index(repository: ModelRepository, settings: Settings, *, ready_only: bool) -> list[dict[str, str]]:
    """One entry per version the server holds, one per model that has none (with the reason), and one
    (name only) per model the repository holds that was never loaded."""
    entries: list[dict[str, str]] = []
    for name, model in repository.models.items():
        versions = repository.versions(name) or [model]
        for entry in versions:
            if ready_only and entry.status is not ModelStatus.READY:
                continue
            item = {"name": name}
            if entry.version is not None:
                item["version"] = str(entry.version)
            item["state"] = _STATE[entry.status]
            item["reason"] = entry.reason or ""
            entries.append(item)
    if not ready_only:
        entries += [
            {"name": name} for name in discover(settings.model_repository) if name not in repository.models
        ]
    return entries


def check_parameters(document: dict[str, Any]) -> None:
    """A load or unload's body: ``{}`` or ``{"parameters": {...}}`` with no parameter this server
    cannot honour (it loads from the repository only, and has no dependents to unload)."""
    unknown = set(document) - {"parameters"}
    if unknown:
        raise OipError(Kind.INVALID, f"unexpected field(s): {', '.join(sorted(map(shown, unknown)))}")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise OipError(Kind.INVALID, "'parameters' must be an object")
    refused = [key for key in parameters if key != "unload_dependents"]
    if refused:
        raise OipError(
            Kind.INVALID,
            f"parameter(s) {', '.join(map(shown, refused))} not supported: models load from the repository "
            "directory only (build_engines.py writes it)",
        )


async def load(repository: ModelRepository, name: str) -> None:
    try:
        await repository.load(name)
    except LoadError as exc:
        raise OipError(Kind.INVALID, str(exc)) from None


async def unload(repository: ModelRepository, name: str) -> None:
    try:
        await repository.unload(name)
    except LoadError as exc:
        raise OipError(Kind.INVALID, str(exc)) from None
