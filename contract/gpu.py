"""The GPU as both sides see it: which card this is, and the batch GPU serving is tuned for.

The build names TensorRT engines after the GPU that built them and the server picks the engine made
for its own GPU, so both identify it with the same probe: cuda-python's runtime API, imported only
when asked (the CPU image has no CUDA). Torch-free, like the rest of this package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The batch a GPU serves by default (the server's GPU MAX_BATCH_SIZE) and so the one TensorRT profiles
# are tuned for: both the engine build and ONNX Runtime's TensorRT provider use it as "opt".
GPU_OPT_BATCH = 16


class GpuProbeError(RuntimeError):
    """CUDA is installed but cannot describe a GPU here; the message says what it reported."""


@dataclass(frozen=True)
class GpuDevice:
    """A GPU by name and compute capability: what makes a TensorRT engine valid on it."""

    name: str
    compute_capability: str  # "8.9"

    @property
    def slug(self) -> str:
        return device_slug(self.name)

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


def device_slug(name: str) -> str:
    """A file-name-safe GPU name: ``"NVIDIA GeForce RTX 4090"`` -> ``nvidia-geforce-rtx-4090``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def import_cudart():
    """cuda-python's runtime API module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6).

    ImportError when cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def cuda_check(result):
    """Unpack a cuda-python call's ``(error, *values)``; raise RuntimeError on an error."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        detail = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        raise RuntimeError(f"CUDA error {err}: {detail}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device(cudart=None) -> GpuDevice:
    """GPU 0 as CUDA describes it. ImportError without cuda-python; GpuProbeError without a GPU."""
    cudart = cudart or import_cudart()
    try:
        count = cuda_check(cudart.cudaGetDeviceCount())
    except RuntimeError as exc:
        raise GpuProbeError(f"CUDA cannot see a GPU here ({exc})") from exc
    if not count:
        raise GpuProbeError("CUDA reports no GPU on this machine")
    try:
        props = cuda_check(cudart.cudaGetDeviceProperties(0))
    except RuntimeError as exc:
        raise GpuProbeError(f"CUDA cannot describe GPU 0 ({exc})") from exc
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuDevice(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")
