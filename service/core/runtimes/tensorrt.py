"""Native TensorRT backend: a serialized engine from ``build_engines.py --target gpu|jetson``, run
through TensorRT's name-based tensor API with cuda-python buffers (no PyTorch, no PyCUDA).

Loading refuses, with the reason, anything that would not run as built:

* no ``tensorrt`` or no ``cuda-python`` module, or no GPU: the backend is unavailable;
* no engine of this precision in the manifest, or none built with this TensorRT version for this GPU's
  compute capability (an engine is not portable across either): unavailable, saying what was built
  and the command that builds the right one;
* an engine file whose size or SHA-256 differs from the manifest, one that TensorRT cannot deserialize
  (``deserialize_cuda_engine`` returns None), or whose tensors are not the manifest's: failed.

Execution: one execution context per optimization profile (the build makes identical profiles so that
that many batches can run at once), each with its own CUDA stream, pinned host buffers and device
buffers sized for the profile's largest batch. ``run`` takes a free context, copies in, sets the
input shape, enqueues ``execute_async_v3`` and copies out on that stream, then synchronises. A batch
above the profile's maximum runs in slices; one below a static profile's minimum (DLA) is padded.

Not verified on a GPU here: written against TensorRT 10/11's Python API reference and the cuda-python
runtime bindings; ``make gpu-selftest`` checks it against ONNX Runtime CPU on real hardware.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.gpu import GpuDevice, GpuProbeError, cuda_check, cuda_device, import_cudart
from contract.manifest import Engine, FileMismatch, Manifest, verify_file
from service.core.runtimes.base import BackendUnavailable, RuntimeLoadError, RuntimeOptions

log = logging.getLogger(__name__)

BACKEND = "tensorrt"

# ---------------------------------------------------------------------------------------------
# Pure logic: which engine, how to slice a batch


def select_engine(
    engines: Sequence[Engine], *, model: str, precision: str, trt_version: str, device: GpuDevice
) -> Engine:
    """The engine to serve ``precision`` with this TensorRT on this GPU; BackendUnavailable saying why not.

    An engine must come from exactly this TensorRT version and this compute capability. Among those, one
    built on a GPU of the same name is preferred (TensorRT warns that a plan built on another model of
    the same architecture may run slower), then a GPU engine over a DLA one, then the largest batch.
    """
    build = f"build_engines.py --target gpu --models {model} --precision {precision}"
    of_precision = [e for e in engines if e.precision == precision]
    if not of_precision:
        built = ", ".join(sorted({e.precision for e in engines})) or "none"
        raise BackendUnavailable(
            f"no {precision} TensorRT engine was built for {model} (engines built: {built}); run {build}"
        )
    same_version = [e for e in of_precision if e.tensorrt_version == trt_version]
    if not same_version:
        versions = ", ".join(sorted({e.tensorrt_version for e in of_precision}))
        raise BackendUnavailable(
            f"the {precision} engines of {model} were built with TensorRT {versions}, this is TensorRT "
            f"{trt_version}: an engine runs only on the version that built it; run {build}"
        )
    usable = [e for e in same_version if e.compute_capability == device.compute_capability]
    if not usable:
        built_for = ", ".join(sorted({f"{e.device_name} (sm {e.compute_capability})" for e in same_version}))
        raise BackendUnavailable(
            f"the {precision} engines of {model} were built for {built_for}, this GPU is {device.name} "
            f"(sm {device.compute_capability}); run {build} on this machine"
        )
    usable.sort(key=lambda e: (e.device_name != device.name, e.dla_core is not None, -e.max_batch))
    chosen = usable[0]
    if chosen.device_name != device.name:
        log.warning(
            "%s: engine %s was built on %s, running on %s (same compute capability)",
            model,
            chosen.file,
            chosen.device_name,
            device.name,
        )
    return chosen


def slices(batch: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """``(start, count, run_as)`` per enqueue: slices of at most ``max_batch``, each run padded to at
    least ``min_batch`` (a static DLA profile accepts exactly its own batch)."""
    if batch < 1:
        return []
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"bad profile {min_batch}..{max_batch}")
    out = []
    for start in range(0, batch, max_batch):
        count = min(max_batch, batch - start)
        out.append((start, count, max(count, min_batch)))
    return out


# ---------------------------------------------------------------------------------------------
# Imports and the device: each missing piece is "unavailable", with what to install


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            f"the tensorrt Python package is not installed ({exc}); install TensorRT 10 or 11 "
            "(pip install '.[gpu]', or JetPack's python3-libnvinfer)"
        ) from exc
    return tensorrt


def _import_cudart():
    try:
        return import_cudart()
    except ImportError as exc:
        raise BackendUnavailable(
            f"cuda-python is not installed ({exc}); the native TensorRT backend moves buffers with it "
            "(pip install cuda-python)"
        ) from exc


def _check(result):
    return cuda_check(result)


def current_device(cudart) -> GpuDevice:
    try:
        return cuda_device(cudart)
    except GpuProbeError as exc:
        raise BackendUnavailable(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# The runtime


class _Slot:
    """One execution context with its own stream and buffers; used by one batch at a time."""

    def __init__(self, runtime: TensorRTRuntime, engine, index: int) -> None:
        self.cudart = runtime._cudart
        self.context = None
        self.stream = None
        self._allocations: list[tuple[str, int]] = []
        try:
            self._set_up(runtime, engine, index)
        except Exception:
            self.free()
            raise

    def _set_up(self, runtime: TensorRTRuntime, engine, index: int) -> None:
        trt, cudart = runtime._trt, runtime._cudart
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeLoadError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = _check(cudart.cudaStreamCreate())
        if not self.context.set_optimization_profile_async(index, int(self.stream)):
            raise RuntimeLoadError(f"TensorRT refused optimization profile {index}")
        _check(cudart.cudaStreamSynchronize(self.stream))
        profile_min, _, profile_max = engine.get_tensor_profile_shape(runtime.input_name, index)
        self.min_batch, self.max_batch = int(profile_min[0]), int(profile_max[0])
        self.sample_shape = tuple(int(d) for d in profile_max[1:])
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(runtime.input_name)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(runtime.output_name)))
        self.classes = runtime.classes
        in_count = self.max_batch * int(np.prod(self.sample_shape))
        out_count = self.max_batch * self.classes
        self.host_in = self._pinned(in_count, self.input_dtype)
        self.host_out = self._pinned(out_count, self.output_dtype)
        self.device_in = self._device(in_count * self.input_dtype.itemsize)
        self.device_out = self._device(out_count * self.output_dtype.itemsize)
        # The addresses never change, so they are bound once.
        for name, address in ((runtime.input_name, self.device_in), (runtime.output_name, self.device_out)):
            if not self.context.set_tensor_address(name, address):
                raise RuntimeLoadError(f"TensorRT refused the buffer for tensor {name!r}")

    def _pinned(self, count: int, dtype: np.dtype) -> np.ndarray:
        address = int(_check(self.cudart.cudaMallocHost(count * dtype.itemsize)))
        self._allocations.append(("host", address))
        buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(address)
        return np.frombuffer(buffer, dtype=dtype, count=count)

    def _device(self, nbytes: int) -> int:
        address = int(_check(self.cudart.cudaMalloc(nbytes)))
        self._allocations.append(("device", address))
        return address

    def run(self, runtime: TensorRTRuntime, batch: np.ndarray, out: np.ndarray) -> None:
        cudart = self.cudart
        per_in = int(np.prod(self.sample_shape))
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for start, count, run_as in slices(len(batch), self.min_batch, self.max_batch):
            host_in = self.host_in[: run_as * per_in].reshape(run_as, *self.sample_shape)
            host_in[:count] = batch[start : start + count]
            if run_as > count:
                host_in[count:] = 0
            if not self.context.set_input_shape(runtime.input_name, (run_as, *self.sample_shape)):
                raise RuntimeError(f"TensorRT refused input shape {(run_as, *self.sample_shape)}")
            in_bytes = run_as * per_in * self.input_dtype.itemsize
            out_bytes = run_as * self.classes * self.output_dtype.itemsize
            host_in_ptr = self.host_in.ctypes.data
            host_out_ptr = self.host_out.ctypes.data
            _check(cudart.cudaMemcpyAsync(self.device_in, host_in_ptr, in_bytes, h2d, self.stream))
            if not self.context.execute_async_v3(int(self.stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            _check(cudart.cudaMemcpyAsync(host_out_ptr, self.device_out, out_bytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            logits = self.host_out[: run_as * self.classes].reshape(run_as, self.classes)
            out[start : start + count] = logits[:count]

    def free(self) -> None:
        cudart = self.cudart
        self.context = None
        for kind, address in reversed(self._allocations):
            (cudart.cudaFreeHost if kind == "host" else cudart.cudaFree)(address)
        self._allocations.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None


class TensorRTRuntime:
    """A deserialized engine and a pool of execution contexts; ``run`` is thread-safe."""

    name = BACKEND
    # How long close() waits for batches still running before it frees their buffers regardless: a
    # batch takes milliseconds, so one still running after this is stuck, and shutdown must go on.
    close_wait_s = 5.0

    def __init__(self, trt, cudart, engine, record: Engine, manifest: Manifest, precision: str) -> None:
        self._trt = trt
        self._cudart = cudart
        self._engine = engine
        self.record = record
        self.precision = precision
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name
        self.classes = len(manifest.labels)
        self.providers = (f"TensorRT {trt.__version__}",)
        self._trt_runtime = None  # set by load(): the engine must not outlive the runtime that made it
        self._slots: list[_Slot] = []
        # A slot is in the queue while no batch uses it; after close(), a None wakes a batch that waits.
        self._free: queue.Queue[_Slot | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        try:
            for index in range(max(1, min(engine.num_optimization_profiles, record.profiles))):
                slot = _Slot(self, engine, index)
                self._slots.append(slot)
                self._free.put(slot)
        except Exception:
            self.close()
            raise

    @classmethod
    def load(
        cls,
        model_dir: Path,
        manifest: Manifest,
        *,
        precision: str = "fp32",
        options: RuntimeOptions | None = None,
    ) -> TensorRTRuntime:
        trt = _import_tensorrt()
        cudart = _import_cudart()
        device = current_device(cudart)
        record = select_engine(
            manifest.engines,
            model=manifest.name,
            precision=precision,
            trt_version=trt.__version__,
            device=device,
        )
        path = Path(model_dir) / record.file
        try:
            verify_file(path, record.sha256, record.bytes)
        except FileMismatch as exc:
            raise RuntimeLoadError(str(exc)) from exc
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeLoadError(
                f"TensorRT {trt.__version__} could not deserialize {record.file} (see the TensorRT log): "
                "rebuild it with build_engines.py on this machine"
            )
        check_io(engine, trt, manifest)
        instance = cls(trt, cudart, engine, record, manifest, precision)
        instance._trt_runtime = runtime
        log.info(
            "%s: TensorRT engine %s, %d execution context(s)",
            manifest.name,
            record.file,
            len(instance._slots),
        )
        return instance

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the TensorRT runtime is closed")
        out = np.empty((len(batch), self.classes), dtype=np.float32)
        slot = self._free.get()
        if self._closed:  # closed while this batch waited: pass the wake-up on to the next waiter
            self._free.put(slot)
            raise RuntimeError("the TensorRT runtime is closed")
        try:
            slot.run(self, batch, out)
        finally:
            self._free.put(slot)
        return out

    def close(self) -> None:
        """Free every context and buffer once the batches in flight have finished (at most
        ``close_wait_s``; then they are freed anyway, and the stuck batches are logged)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Holding every slot means no batch is using one; new batches are refused from here on.
            deadline = time.monotonic() + self.close_wait_s
            held = 0
            while held < len(self._slots):
                try:
                    self._free.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                held += 1
            if held < len(self._slots):
                log.warning(
                    "TensorRT runtime closed with %d batch(es) still running after %.1f s; freeing their "
                    "buffers anyway",
                    len(self._slots) - held,
                    self.close_wait_s,
                )
            for slot in self._slots:
                slot.free()
            self._slots.clear()
            self._engine = None
            self._free.put(None)


def check_io(engine, trt, manifest: Manifest) -> None:
    """The engine's tensors must be the manifest's: one float input and one float output, by name."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
    if inputs != [manifest.input.name] or outputs != [manifest.output.name]:
        raise RuntimeLoadError(
            f"the engine's tensors are inputs {inputs}, outputs {outputs}; the manifest says "
            f"{manifest.input.name!r} -> {manifest.output.name!r}"
        )
    allowed = {trt.DataType.FLOAT, trt.DataType.HALF}
    for name in (*inputs, *outputs):
        if engine.get_tensor_dtype(name) not in allowed:
            raise RuntimeLoadError(f"tensor {name!r} is {engine.get_tensor_dtype(name)}, expected float")
