"""The models this server serves: which ones, their versions, manifests, runtimes and batchers, and
their state; and the loads that replace them while they serve.

Every configured model has an entry from the start, in one of five states: ``loading``, ``ready``,
``failed`` (its files are missing, corrupt or disagree with the manifest), ``unavailable`` (the
requested backend cannot run here) or ``unloaded`` (through the repository API). One model failing
never stops the others from serving.

A model's directory may hold numbered versions (``contract/layout.py``). Each version found is loaded
(only the pinned one where ``MODEL_VERSIONS`` pins one); a request that names no version gets the
highest version that is ready, or the pinned one.

A load replaces a model without dropping a request. The versions whose files changed (or that failed
before) are loaded, verified and warmed up beside the ones serving, in the loader thread; then the
name points at the new set in one step on the event loop. A request takes its model and a place in
its batcher's line in the same step (no await between the two), so after the switch no request can
reach a replaced batcher: the requests it already admitted finish on it, and only then is it stopped
and its runtime released. A version that fails to load leaves the one it would have replaced serving,
and the failure is reported (``/models``, the load metrics, the caller's answer). Loads of one model
are serialized, and one asked for while another runs joins it.

A model is served once it is loaded: its batcher is made from its batching policy, and with it where
its images are decoded, once for all its requests (``service/core/pipeline.py`` says why): in its
inference threads when it runs one image at a time, in the decode pool that every batching model
shares otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from contract import layout
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
    UNLOADED = "unloaded"


@dataclass(eq=False)
class ServedModel:
    """One version of a configured model and everything the server knows about it (or, with no
    ``version``, a model none of whose versions is there to serve, and why)."""

    name: str  # as clients spell it, e.g. "mobilenet_v2" or "mobilenet_v2:int8"
    directory: Path
    precision: str
    status: ModelStatus = ModelStatus.LOADING
    reason: str | None = None
    manifest: Manifest | None = None
    runtime: Runtime | None = None
    batcher: Batcher | None = None
    load_seconds: float | None = None
    version: int | None = None
    fingerprint: layout.Fingerprint = ()  # the version's files as they were when it was loaded
    # What it runs with (Settings.for_model): for the backend asked until its runtime has loaded, then
    # for the runtime's.
    settings: ModelSettings | None = None


@dataclass
class LoadHistory:
    """What the loads of one model have done, for /models."""

    loads: int = 0
    failures: int = 0
    last_error: str | None = None  # the last failed load's reason; None once a load succeeds
    last_load_at: float | None = None  # time.time()


class ModelLoadFailed(Exception):
    """Loading stopped; ``status`` says whether the model is broken or its backend is missing."""

    def __init__(self, status: ModelStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class LoadError(Exception):
    """A load or unload that was asked for did not happen, or not wholly: the message says why. What
    was serving before still serves."""


def discover(root: Path) -> list[str]:
    """Model names found in a repository: each model directory, plus its highest version's precision
    builds."""
    names = []
    for name in layout.model_names(root):
        names.append(name)
        directory = list(layout.versions(root / name).values())[-1]
        try:
            manifest = Manifest.load(directory)
        except (OSError, ValidationError):
            continue  # served as failed, with the reason, when it loads
        names.extend(f"{name}:{variant.precision}" for variant in manifest.precisions)
    return names


def configured_models(settings: Settings) -> list[str]:
    """MODELS if set, else every model in the repository, else the four defaults (reported missing)."""
    if settings.models:
        return list(dict.fromkeys(settings.models))
    return discover(settings.model_repository) or list(DEFAULT_MODELS)


class ModelRepository:
    """Loads every configured model in the background, hands out the ready ones, and replaces them
    when asked (:meth:`load`, :meth:`unload`, :meth:`rescan`)."""

    def __init__(
        self,
        names: Iterable[str],
        settings: Settings,
        metrics: Metrics,
        *,
        loader: RuntimeLoader = load_runtime,
        on_released: Callable[[], object] | None = None,
    ) -> None:
        """``on_released`` runs in the loader thread after a replaced version's runtime is released
        (the process gives the freed memory back: service/process.py)."""
        self._settings = settings
        self._metrics = metrics
        self._loader = loader
        self._on_released = on_released
        # The decode pool of the models that batch, made by load_all() and shut down by stop().
        self._decode_executor: ThreadPoolExecutor | None = None
        self._decode_pool: FairPool | None = None
        # Every load runs in this one thread. It is started by the first load, before the process
        # makes the event loop's thread SCHED_BATCH (service/process.py), and the threads a load starts
        # (the runtime's, the batcher's) take its scheduling, not the event loop's.
        self._load_executor = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        # The version each name serves to requests that name none (or why none), and every version.
        self.models: dict[str, ServedModel] = {}
        self._versions: dict[str, dict[int, ServedModel]] = {}
        self.history: dict[str, LoadHistory] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loads: dict[str, asyncio.Task[None]] = {}  # the load running for each name
        self._retiring: dict[asyncio.Task[None], ServedModel] = {}  # replaced versions, draining
        self._stopping = False
        for name in names:
            self._add(name)
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

    def _add(self, name: str) -> None:
        try:
            base, _ = split_precision(name)
        except UnknownModelError as exc:
            entry = ServedModel(
                name, self._settings.model_repository / name, "fp32", ModelStatus.FAILED, str(exc)
            )
        else:
            # MODEL_CONFIG may serve another build under the plain name ([mobilenet_v2] precision = "int8").
            in_force = self._settings.for_model(name, self._settings.backend_for(name))
            entry = ServedModel(
                name, self._settings.model_repository / base, in_force.precision, settings=in_force
            )
        self.models[name] = entry
        self._versions[name] = {}
        self.history[name] = LoadHistory()
        self._locks[name] = asyncio.Lock()
        self._metrics.add_model(name)

    # --- lookup ---------------------------------------------------------------------------------
    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        """The ready model ``name`` (at ``version``, else the one it serves by default); UnknownModel
        (404) or ModelUnavailable (503) otherwise."""
        model = self.models.get(name) if name else None
        if model is None:
            available = ", ".join(self.models) or "(none configured)"
            raise UnknownModel(f"unknown model {shown(name)}; available models: {available}")
        if version is not None:
            versions = self._versions[model.name]
            if version not in versions:
                held = ", ".join(str(v) for v in versions) or "none"
                raise UnknownModel(f"model {model.name} has no version {version}; its versions: {held}")
            model = versions[version]
        if model.status is not ModelStatus.READY or model.batcher is None:
            detail = f": {model.reason}" if model.reason else ""
            label = model.name if version is None else f"{model.name} version {version}"
            raise ModelUnavailable(f"model {label} is {model.status.value}{detail}")
        return model

    def versions(self, name: str) -> list[ServedModel]:
        """Every version of ``name`` the server holds (ready or why not), oldest first."""
        return list(self._versions.get(name, {}).values())

    @property
    def ready(self) -> bool:
        """Every model ready, but those unloaded on purpose."""
        return all(
            model.status in (ModelStatus.READY, ModelStatus.UNLOADED) for model in self.models.values()
        )

    # --- lifecycle ------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load, verify and warm every model, one at a time, off the event loop."""
        workers = self._settings.decode_workers
        # Its threads start with the first decode: none while only one-image-at-a-time models serve.
        self._decode_executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._decode_pool = FairPool(self._decode_executor, workers)
        for name in list(self.models):
            with contextlib.suppress(LoadError):  # logged, and its state says why
                await self.load(name)

    async def load(self, name: str) -> None:
        """Load ``name`` (a model the repository holds, configured or not) or load it anew: the
        versions whose files changed since they were loaded, or that failed, are loaded beside the
        ones serving and replace them; versions gone from the repository are released. Returns once
        the name points at the result. Raises LoadError when a version failed (the one it would have
        replaced still serves) or the repository has no such model."""
        if self._stopping:
            raise LoadError(f"cannot load {shown(name)}: the server is shutting down")
        if name not in self.models:
            held = discover(self._settings.model_repository)
            if name not in held:
                raise LoadError(
                    f"cannot load {shown(name)}: the repository {self._settings.model_repository} "
                    f"has no such model (it holds: {', '.join(held)})"
                )
            self._add(name)
        running = self._loads.get(name)
        if running is None:
            running = self._loads[name] = asyncio.get_running_loop().create_task(
                self._reload(name), name=f"load-{name}"
            )
            running.add_done_callback(functools.partial(self._load_finished, name))
        # A caller that goes away (a client that disconnects) does not stop the load for the others.
        await asyncio.shield(running)

    def _load_finished(self, name: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()  # read here, so that a load every caller gave up on is not reported unread

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: requests already admitted finish, then its runtimes are released.
        It stays listed as ``unloaded`` (and readiness no longer waits for it) until loaded again."""
        model = self.models.get(name)
        if model is None:
            raise LoadError(f"cannot unload {shown(name)}: no such model is loaded")
        async with self._locks[name]:
            retired = list(self._versions[name].values())
            self._versions[name] = {}
            self.models[name] = ServedModel(
                name, model.directory, model.precision, ModelStatus.UNLOADED, "unloaded on request"
            )
            self._metrics.set_ready(name, False)
            self._retire(retired)
        log.info("%s unloaded", name)

    async def rescan(self) -> None:
        """Load anew every model the repository holds (MODELS only, where set), and the models
        loaded after the start, but those unloaded on request. Failures are logged and reported."""
        names = configured_models(self._settings)
        names += [name for name in self.models if name not in names]
        for name in names:
            model = self.models.get(name)
            if model is not None and model.status is ModelStatus.UNLOADED:
                continue
            try:
                await self.load(name)
            except LoadError as exc:
                log.error("rescan: %s", exc)

    async def stop(self, grace_s: float) -> None:
        """Drain every batcher (queued requests are answered), then release the runtimes and the
        decode pool."""
        self._stopping = True
        for task in list(self._loads.values()):
            task.cancel()  # the version being loaded finishes in its thread and is never served
        await asyncio.gather(*self._loads.values(), return_exceptions=True)
        # Replaced versions still draining get the same grace as the others, not their own longer one.
        draining = list(self._retiring.values())
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        serving = [entry for versions in self._versions.values() for entry in versions.values()]
        serving += [entry for entry in draining if entry.status is not ModelStatus.UNLOADED]
        batchers = [entry.batcher for entry in serving if entry.batcher is not None]
        await asyncio.gather(*(batcher.stop(grace_s) for batcher in batchers))
        for entry in serving:
            if entry.runtime is not None:
                entry.runtime.close()
        for name in self.models:
            self._metrics.set_ready(name, False)
        if self._decode_executor is not None:
            self._decode_executor.shutdown(wait=False, cancel_futures=True)
        self._load_executor.shutdown(wait=False, cancel_futures=True)

    # --- one load -------------------------------------------------------------------------------
    async def _reload(self, name: str) -> None:
        async with self._locks[name]:
            try:
                base, _ = split_precision(name)
            except UnknownModelError as exc:
                self._give_up(self.models[name], ModelStatus.FAILED, str(exc))
                raise LoadError(f"cannot load {shown(name)}: {exc}") from None
            model_root = self._settings.model_repository / base
            asked = self._settings.for_model(name, self._settings.backend_for(name))
            on_disk = layout.versions(model_root)
            pinned = self._settings.model_versions.get(name, self._settings.model_versions.get(base))
            wanted = {v: d for v, d in on_disk.items() if pinned is None or v == pinned}
            current = self._versions[name]
            loaded: dict[int, ServedModel] = {}
            failures: list[str] = []
            for version, directory in wanted.items():
                previous = current.get(version)
                files = layout.fingerprint(directory)
                if (
                    previous is not None
                    and previous.status is ModelStatus.READY
                    and previous.fingerprint == files
                ):
                    loaded[version] = previous
                    continue
                candidate = ServedModel(
                    name, directory, asked.precision, version=version, fingerprint=files, settings=asked
                )
                await self._load_version(candidate)
                if candidate.status is ModelStatus.READY:
                    loaded[version] = candidate
                    continue
                failures.append(f"version {version}: {candidate.reason}")
                kept = previous is not None and previous.status is ModelStatus.READY
                loaded[version] = previous if kept else candidate
            # The switch: one step, with no await in it.
            self._versions[name] = loaded
            served = self._choose(name, model_root, loaded, pinned)
            self.models[name] = served
            self._publish(served)
            self._retire([entry for entry in current.values() if entry not in loaded.values()])
            history = self.history[name]
            if not wanted:
                failures.append(_nothing_to_serve(model_root, pinned))
            if failures:
                history.last_error = "; ".join(failures)
                log.error("%s: load failed: %s", name, history.last_error)
                raise LoadError(f"failed to load {name}: {history.last_error}")
            history.last_error = None

    async def _load_version(self, model: ServedModel) -> None:
        """Load, verify, warm up and start one version, in the loader thread; its state says how it went."""
        started = time.monotonic()
        history = self.history[model.name]
        history.loads += 1
        history.last_load_at = time.time()
        loop = asyncio.get_running_loop()
        try:
            manifest, runtime, batcher = await loop.run_in_executor(
                self._load_executor, self._load_and_start, model, loop
            )
        except ModelLoadFailed as exc:
            model.status, model.reason = exc.status, exc.reason
        except Exception as exc:  # a loader bug must not take the other models down
            log.exception("%s version %s: loading failed unexpectedly", model.name, model.version)
            model.status, model.reason = ModelStatus.FAILED, f"{type(exc).__name__}: {exc}"
        else:
            model.manifest, model.runtime, model.batcher = manifest, runtime, batcher
            model.status, model.reason = ModelStatus.READY, None
        model.load_seconds = time.monotonic() - started
        failed = model.status is not ModelStatus.READY
        history.failures += failed
        self._metrics.record_load(model.name, seconds=model.load_seconds, failed=failed)
        if failed:
            log.error("%s version %s %s: %s", model.name, model.version, model.status.value, model.reason)
            return
        assert model.batcher is not None and model.runtime is not None
        log.info(
            "%s version %s ready on %s (%s, weights %s) in %.2f s; batches of up to %d, %.1f ms window, "
            "%d in flight",
            model.name,
            model.version,
            model.runtime.name,
            model.runtime.precision,
            manifest.weights.source,
            model.load_seconds,
            model.batcher.max_batch_size,
            model.batcher.max_queue_delay_s * 1000,
            model.batcher.max_concurrent_batches,
        )

    def _load_and_start(
        self, model: ServedModel, loop: asyncio.AbstractEventLoop
    ) -> tuple[Manifest, Runtime, Batcher]:
        """Blocking, in the loader thread: the version loaded and warmed, its batcher's threads started."""
        manifest, runtime = self._load(model)
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
        batcher.start(loop)
        return manifest, runtime, batcher

    def _choose(
        self, name: str, model_root: Path, versions: dict[int, ServedModel], pinned: int | None
    ) -> ServedModel:
        """The version requests that name none get: the pinned one, else the highest ready one, else
        the highest (which says why it is not ready)."""
        if pinned is not None and pinned in versions:
            return versions[pinned]
        ready = [entry for entry in versions.values() if entry.status is ModelStatus.READY]
        if pinned is None and ready:
            return ready[-1]
        if pinned is None and versions:
            return versions[max(versions)]
        return self._placeholder(name, ModelStatus.FAILED, _nothing_to_serve(model_root, pinned))

    def _placeholder(self, name: str, status: ModelStatus, reason: str) -> ServedModel:
        previous = self.models[name]
        return ServedModel(
            name, previous.directory, previous.precision, status, reason, settings=previous.settings
        )

    def _publish(self, model: ServedModel) -> None:
        """The metrics of the version ``model.name`` now serves by default."""
        if model.status is not ModelStatus.READY or model.runtime is None or model.manifest is None:
            self._metrics.set_ready(model.name, False)
            return
        manifest, runtime, batcher = model.manifest, model.runtime, model.batcher
        assert batcher is not None and model.version is not None
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
            version=model.version,
        )
        self._metrics.track_queue_depth(model.name, lambda: batcher.depth)
        self._metrics.set_ready(model.name, True)

    def _retire(self, entries: Iterable[ServedModel]) -> None:
        """Release replaced versions once the requests they admitted have their answers."""
        for entry in entries:
            if entry.batcher is None and entry.runtime is None:
                continue
            task = asyncio.get_running_loop().create_task(self._release(entry), name=f"retire-{entry.name}")
            self._retiring[task] = entry
            task.add_done_callback(self._retiring.pop)

    async def _release(self, entry: ServedModel) -> None:
        # No admitted request outlives reading its body plus its deadline.
        grace_s = self._settings.body_read_timeout_s + self._settings.request_timeout_s
        if entry.batcher is not None:
            await entry.batcher.drain(grace_s)
        if entry.runtime is not None:
            entry.runtime.close()
        entry.status = ModelStatus.UNLOADED
        if self._on_released is not None:
            await asyncio.get_running_loop().run_in_executor(self._load_executor, self._on_released)
        log.info("%s version %s released", entry.name, entry.version)

    def _give_up(self, model: ServedModel, status: ModelStatus, reason: str) -> None:
        model.status, model.reason = status, reason
        self._metrics.set_ready(model.name, False)
        log.error("%s %s: %s", model.name, status.value, reason)

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


def _nothing_to_serve(model_root: Path, pinned: int | None) -> str:
    if pinned is None:
        return f"no {MANIFEST_FILE} in {model_root} (build it with build_engines.py)"
    held = ", ".join(str(version) for version in layout.versions(model_root)) or "none"
    return f"MODEL_VERSIONS pins version {pinned}, which {model_root} does not hold (it holds: {held})"


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
