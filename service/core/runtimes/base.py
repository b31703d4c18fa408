"""The runtime interface: what the batcher needs from any backend, and how a load fails.

A runtime turns a float32 NCHW batch into logits and nothing else: it knows no images, no HTTP
and no queue. Each backend lives in its own module behind this interface.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

ExecutionMode = Literal["sequential", "parallel"]
# The engine cache's folder under the scratch (or temporary) directory when ENGINE_CACHE_DIR is unset.
DEFAULT_ENGINE_CACHE_NAME = "engine-cache"


@runtime_checkable
class Runtime(Protocol):
    """A loaded, verified model that can run a batch."""

    name: str  # the backend that really runs, e.g. "onnxruntime-cpu"
    precision: str  # "fp32", "fp16" or "int8"
    input_name: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for an (N, 3, H, W) float32 batch. Blocks: call it off the event loop."""
        ...

    def close(self) -> None:
        """Release the session; ``run`` must not be called afterwards."""
        ...


@dataclass(frozen=True)
class RuntimeOptions:
    """Backend-independent knobs, taken from the settings."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    execution_mode: ExecutionMode = "sequential"
    # The largest batch the batcher may hand over (MAX_BATCH_SIZE); None: the backend's own default.
    # GPU backends size their optimization profiles from it.
    max_batch_size: int | None = None
    # Where GPU backends may write (ONNX Runtime's TensorRT engine and timing caches): ENGINE_CACHE_DIR.
    # None: ``engine-cache`` under the system's temporary directory, as the server's default is under
    # its scratch directory.
    engine_cache_dir: Path | None = None
    # ALLOW_TF32: fp32 work on the GPU may round its inputs to TF32 (a 10-bit mantissa) for speed. Off, an
    # fp32 model computes in fp32 there as on the CPU, so the two can be compared closely.
    allow_tf32: bool = False

    @property
    def engine_cache_root(self) -> Path:
        if self.engine_cache_dir is not None:
            return self.engine_cache_dir
        return Path(tempfile.gettempdir()) / DEFAULT_ENGINE_CACHE_NAME


class RuntimeLoadError(Exception):
    """The model cannot be served: its file is missing or corrupt, or disagrees with its manifest."""


class BackendUnavailable(RuntimeLoadError):
    """The requested backend cannot run on this machine (no GPU, no TensorRT, missing provider)."""
