"""Runtime backends behind one interface, and the choice between them.

``BACKEND=auto`` takes the best backend that really loads on this machine; any other value takes
exactly that backend or reports it unavailable. A file that is missing or corrupt fails the model
whatever the backend, so ``auto`` does not go on looking after one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from contract.manifest import Manifest
from service.core.runtimes.base import BackendUnavailable, Runtime, RuntimeLoadError, RuntimeOptions

__all__ = [
    "AUTO_ORDER",
    "BackendUnavailable",
    "Runtime",
    "RuntimeLoadError",
    "RuntimeOptions",
    "load_runtime",
]

log = logging.getLogger(__name__)

# Best first: native engines, then ONNX Runtime with the TensorRT, CUDA and CPU providers.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


def load_runtime(
    model_dir: Path,
    manifest: Manifest,
    *,
    backend: str,
    precision: str = "fp32",
    options: RuntimeOptions | None = None,
) -> Runtime:
    """A loaded, verified runtime for the model in ``model_dir`` on ``backend`` (or the best, for auto)."""
    if backend != "auto":
        return _load_one(model_dir, manifest, backend, precision, options)
    skipped = []
    for candidate in AUTO_ORDER:
        try:
            runtime = _load_one(model_dir, manifest, candidate, precision, options)
        except BackendUnavailable as exc:
            skipped.append(f"{candidate}: {exc}")
            continue
        if skipped:
            log.info("%s: auto chose %s; skipped %s", manifest.name, runtime.name, "; ".join(skipped))
        return runtime
    raise BackendUnavailable("no backend loads here: " + "; ".join(skipped))


def _load_one(
    model_dir: Path, manifest: Manifest, backend: str, precision: str, options: RuntimeOptions | None
) -> Runtime:
    if backend == "tensorrt":
        from service.core.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime.load(model_dir, manifest, precision=precision, options=options)
    from service.core.runtimes.ort import PROVIDERS, OrtRuntime

    if backend not in PROVIDERS:
        raise BackendUnavailable(f"unknown backend {backend!r}")
    return OrtRuntime.load(model_dir, manifest, backend=backend, precision=precision, options=options)
