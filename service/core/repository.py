"""The models this server serves: which ones, their manifests, runtimes and batchers, and their state.

Every configured model has an entry from the start, in one of four states: ``loading``, ``ready``,
``failed`` (its files are missing, corrupt or disagree with the manifest) or ``unavailable`` (the
requested backend cannot run here). One model failing never stops the others from serving.

A model is served once it is loaded: its batcher is made from its batching policy, and with it where
its images are decoded, once for all its requests (``service/core/pipeline.py`` says why): in its
inference threads when it runs one image at a time, in the decode pool that every batching model
shares otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from contract.manifest import MANIFEST_FILE, Manifest
from contract.zoo import DEFAULT_MODELS, UnknownModelError, split_precision
from service.config import ModelSettings, Settings
from service.core.batcher import Batcher
from service.core.fair_pool import FairPool
from service.core.metrics import Metrics
from service.core.pipeline import ClassifierStages
from service.core.runtimes import BackendUnavailable, Runtime, RuntimeLoadError, RuntimeOptions, load_runtime
from service.errors import ModelUnavailable, UnknownModel, shown

log = logging.getLogger(__name__)

RuntimeLoader = Callable[..., Runtime]  # load_runtime's signature; tests wrap it


class ModelStatus(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"


@dataclass(eq=False)
class ServedModel:
    """One configured model and everything the server knows about it."""

    name: str  # as clients spell it, e.g. "mobilenet_v2" or "mobilenet_v2:int8"
    directory: Path
    precision: str
    status: ModelStatus = ModelStatus.LOADING
    reason: str | None = None
    manifest: Manifest | None = None
    runtime: Runtime | None = None
    batcher: Batcher | None = None
    load_seconds: float | None = None
    # What it runs with (Settings.for_model): for the backend asked until its runtime has loaded, then
    # for the runtime's.
    settings: ModelSettings | None = None


class ModelLoadFailed(Exception):
    """Loading stopped; ``status`` says whether the model is broken or its backend is missing."""

    def __init__(self, status: ModelStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def discover(root: Path) -> list[str]:
    """Model names found in a repository: each directory with a manifest, plus its precision builds."""
    names = []
    if not root.is_dir():
        return names
    for directory in sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file()):
        names.append(directory.name)
        try:
            manifest = Manifest.load(directory)
        except (OSError, ValidationError):
            continue  # served as failed, with the reason, when it loads
        names.extend(f"{directory.name}:{variant.precision}" for variant in manifest.precisions)
    return names


def configured_models(settings: Settings) -> list[str]:
    """MODELS if set, else every model in the repository, else the four defaults (reported missing)."""
    if settings.models:
        return list(dict.fromkeys(settings.models))
    return discover(settings.model_repository) or list(DEFAULT_MODELS)


class ModelRepository:
    """Loads every configured model once, in the background, and hands out the ready ones."""

    def __init__(
        self,
        names: Iterable[str],
        settings: Settings,
        metrics: Metrics,
        *,
        loader: RuntimeLoader = load_runtime,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._loader = loader
        # The decode pool of the models that batch, made by load_all() and shut down by stop().
        self._decode_executor: ThreadPoolExecutor | None = None
        self._decode_pool: FairPool | None = None
        self.models: dict[str, ServedModel] = {}
        for name in names:
            try:
                base, _ = split_precision(name)
            except UnknownModelError as exc:
                self.models[name] = ServedModel(
                    name, settings.model_repository / name, "fp32", ModelStatus.FAILED, str(exc)
                )
                continue
            # MODEL_CONFIG may serve another build under the plain name ([mobilenet_v2] precision = "int8").
            in_force = settings.for_model(name, settings.backend_for(name))
            self.models[name] = ServedModel(
                name, settings.model_repository / base, in_force.precision, settings=in_force
            )
        unused = [name for name in settings.backend_overrides if name not in self.models]
        if unused:
            log.warning(
                "BACKEND names models that are not served: %s (served: %s)",
                ", ".join(unused),
                ", ".join(self.models) or "none",
            )
        tables = settings.model_config_file.sections if settings.model_config_file is not None else {}
        if unused_tables := [name for name in tables if name not in self.models]:
            log.warning(
                "MODEL_CONFIG %s has tables for models that are not served: %s (served: %s)",
                settings.model_config_file,
                ", ".join(unused_tables),
                ", ".join(self.models) or "none",
            )

    # --- lookup ---------------------------------------------------------------------------------
    def get(self, name: str | None) -> ServedModel:
        """The ready model ``name``; UnknownModel (404) or ModelUnavailable (503) otherwise."""
        model = self.models.get(name) if name else None
        if model is None:
            available = ", ".join(self.models) or "(none configured)"
            raise UnknownModel(f"unknown model {shown(name)}; available models: {available}")
        if model.status is not ModelStatus.READY or model.batcher is None:
            detail = f": {model.reason}" if model.reason else ""
            raise ModelUnavailable(f"model {model.name} is {model.status.value}{detail}")
        return model

    @property
    def ready(self) -> bool:
        return all(model.status is ModelStatus.READY for model in self.models.values())

    # --- lifecycle ------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load, verify and warm every model, one at a time, off the event loop."""
        workers = self._settings.decode_workers
        # Its threads start with the first decode: none while only one-image-at-a-time models serve.
        self._decode_executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._decode_pool = FairPool(self._decode_executor, workers)
        for model in self.models.values():
            if model.status is not ModelStatus.LOADING:
                self._give_up(model, model.status, model.reason or "")
                continue
            started = time.monotonic()
            try:
                manifest, runtime = await asyncio.to_thread(self._load, model)
            except ModelLoadFailed as exc:
                self._give_up(model, exc.status, exc.reason)
                continue
            except Exception as exc:  # a loader bug must not take the other models down
                log.exception("%s: loading failed unexpectedly", model.name)
                self._give_up(model, ModelStatus.FAILED, f"{type(exc).__name__}: {exc}")
                continue
            self._serve(model, manifest, runtime, time.monotonic() - started)

    async def stop(self, grace_s: float) -> None:
        """Drain every batcher (queued requests are answered), then release the runtimes and the
        decode pool."""
        batchers = [model.batcher for model in self.models.values() if model.batcher is not None]
        await asyncio.gather(*(batcher.stop(grace_s) for batcher in batchers))
        for model in self.models.values():
            if model.runtime is not None:
                model.runtime.close()
            self._metrics.set_ready(model.name, False)
        if self._decode_executor is not None:
            self._decode_executor.shutdown(wait=False, cancel_futures=True)

    def _load(self, model: ServedModel) -> tuple[Manifest, Runtime]:
        """Blocking: manifest, runtime, warm-up. Raises ModelLoadFailed with a reason a user can act on."""
        if not (model.directory / MANIFEST_FILE).is_file():
            raise ModelLoadFailed(
                ModelStatus.FAILED,
                f"no {MANIFEST_FILE} in {model.directory} (build it with build_engines.py)",
            )
        try:
            manifest = Manifest.load(model.directory)
        except (OSError, ValidationError) as exc:
            raise ModelLoadFailed(ModelStatus.FAILED, f"{MANIFEST_FILE} is unreadable: {exc}") from exc
        model.manifest = manifest
        _check_manifest(model, manifest)
        settings = self._settings
        backend = settings.backend_for(model.name)
        asked = settings.for_model(model.name, backend)
        options = RuntimeOptions(
            intra_op_threads=asked.intra_op_threads,
            inter_op_threads=asked.inter_op_threads,
            execution_mode=asked.execution_mode,
            max_batch_size=asked.max_batch_size_asked,
            engine_cache_dir=settings.engine_cache_path,
            allow_tf32=settings.allow_tf32,
        )
        try:
            runtime = self._loader(
                model.directory,
                manifest,
                backend=backend,
                precision=model.precision,
                options=options,
            )
        except BackendUnavailable as exc:
            raise ModelLoadFailed(ModelStatus.UNAVAILABLE, f"backend {backend}: {exc}") from exc
        except RuntimeLoadError as exc:
            raise ModelLoadFailed(ModelStatus.FAILED, str(exc)) from exc
        model.settings = settings.for_model(model.name, runtime.name)
        if settings.warmup:
            try:
                _warm_up(runtime, manifest, model.settings.batching.max_batch_size)
            except Exception as exc:
                runtime.close()
                raise ModelLoadFailed(ModelStatus.FAILED, f"warm-up failed: {exc}") from exc
        return manifest, runtime

    def _serve(self, model: ServedModel, manifest: Manifest, runtime: Runtime, load_seconds: float) -> None:
        policy = self._settings.for_model(model.name, runtime.name).batching
        batcher = Batcher(
            model.name,
            runtime,
            ClassifierStages(manifest, max_image_pixels=self._settings.max_image_pixels),
            max_batch_size=policy.max_batch_size,
            max_queue_delay_ms=policy.max_queue_delay_ms,
            max_queue_size=self._settings.max_queue_size,
            max_concurrent_batches=policy.max_concurrent_batches,
            prepare_pool=self._decode_pool if policy.max_batch_size > 1 else None,
            metrics=self._metrics,
        )
        batcher.start()
        model.runtime, model.batcher, model.load_seconds = runtime, batcher, load_seconds
        model.status, model.reason = ModelStatus.READY, None
        self._metrics.model_loaded(
            model.name,
            family=manifest.family,
            backend=runtime.name,
            precision=runtime.precision,
            weights=manifest.weights.source,
            input_size=manifest.input_size,
            flops=manifest.flops,
            params=manifest.params,
            memory_access_cost=manifest.memory_access_cost,
            load_seconds=load_seconds,
        )
        self._metrics.track_queue_depth(model.name, lambda: batcher.depth)
        self._metrics.set_ready(model.name, True)
        log.info(
            "%s ready on %s (%s, weights %s) in %.2f s; batches of up to %d, %.1f ms window, %d in flight",
            model.name,
            runtime.name,
            runtime.precision,
            manifest.weights.source,
            load_seconds,
            policy.max_batch_size,
            policy.max_queue_delay_ms,
            policy.max_concurrent_batches,
        )

    def _give_up(self, model: ServedModel, status: ModelStatus, reason: str) -> None:
        model.status, model.reason = status, reason
        self._metrics.set_ready(model.name, False)
        log.error("%s %s: %s", model.name, status.value, reason)


def _check_manifest(model: ServedModel, manifest: Manifest) -> None:
    base, _ = split_precision(model.name)
    if manifest.name != base:
        raise ModelLoadFailed(
            ModelStatus.FAILED, f"{model.directory}/{MANIFEST_FILE} describes {manifest.name!r}, not {base!r}"
        )
    crop = manifest.preprocessing.crop
    if list(manifest.input.shape[1:]) != [3, crop, crop]:
        raise ModelLoadFailed(
            ModelStatus.FAILED,
            f"input shape {manifest.input.shape} does not fit the preprocessing's {crop}x{crop} crop",
        )
    classes = manifest.output.shape[-1]
    if classes != len(manifest.labels):
        raise ModelLoadFailed(
            ModelStatus.FAILED,
            f"the output has {classes} classes but the manifest lists {len(manifest.labels)} labels",
        )


def _warm_up(runtime: Runtime, manifest: Manifest, max_batch_size: int) -> None:
    """Run every batch size the batcher can form, so no request pays for a first-shape allocation."""
    crop = manifest.preprocessing.crop
    classes = len(manifest.labels)
    for size in range(1, max_batch_size + 1):
        logits = runtime.run(np.zeros((size, 3, crop, crop), dtype=np.float32))
        if logits.shape != (size, classes):
            raise RuntimeLoadError(
                f"batch of {size} gave logits of shape {logits.shape}, expected ({size}, {classes})"
            )
