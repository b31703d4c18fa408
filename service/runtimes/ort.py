"""ONNX Runtime backend (CPU, CUDA and TensorRT execution providers): the only module that
configures an ``InferenceSession``.

ONNX Runtime quietly drops a provider it cannot load and runs on CPU instead; the session's
actual providers are compared with the ones asked for, and a mismatch is reported as the backend
being unavailable rather than served by something else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest, OnnxFile, TensorSpec, sha256_of
from service.runtimes.base import BackendUnavailable, RuntimeLoadError, RuntimeOptions

log = logging.getLogger(__name__)

# Backend name -> providers to ask for, best first. The first one is the one that must really load.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-cpu": ("CPUExecutionProvider",),
}
_BACKEND_OF_PROVIDER = {providers[0]: backend for backend, providers in PROVIDERS.items()}
_ORT_TYPE = {"float32": "tensor(float)", "float16": "tensor(float16)"}
_NUMPY_OF_ORT_TYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtRuntime:
    """One verified ``InferenceSession``; ``run`` is thread-safe, as ONNX Runtime's ``run`` is."""

    def __init__(self, session: ort.InferenceSession, backend: str, precision: str) -> None:
        self._session = session
        self.name = backend
        self.precision = precision
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.providers = tuple(session.get_providers())
        # An fp16 export may take float16 input: the batcher always hands over float32.
        self._input_dtype = _NUMPY_OF_ORT_TYPE[session.get_inputs()[0].type]

    @classmethod
    def load(
        cls,
        model_dir: Path,
        manifest: Manifest,
        *,
        backend: str,
        precision: str = "fp32",
        options: RuntimeOptions | None = None,
    ) -> OrtRuntime:
        """Load ``model_dir``'s ONNX file for ``precision`` on ``backend``, checked against the manifest."""
        if backend not in PROVIDERS:
            raise BackendUnavailable(f"{backend} is not an ONNX Runtime backend")
        wanted = PROVIDERS[backend]
        if wanted[0] not in ort.get_available_providers():
            raise BackendUnavailable(
                f"{backend} needs {wanted[0]}, which this onnxruntime build does not have "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        onnx_file, input_spec = _onnx_file_for(manifest, precision)
        path = Path(model_dir) / onnx_file.file
        _verify_file(path, onnx_file)
        try:
            session = ort.InferenceSession(
                str(path), _session_options(options or RuntimeOptions()), providers=list(wanted)
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise RuntimeLoadError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        actual = session.get_providers()
        if not actual or actual[0] != wanted[0]:
            raise BackendUnavailable(
                f"{backend} asked for {wanted[0]} but ONNX Runtime loaded {', '.join(actual) or 'nothing'}"
            )
        _verify_signature(session, input_spec, manifest.output, exact_dtype=precision == "fp32")
        return cls(session, _BACKEND_OF_PROVIDER[actual[0]], precision)

    def run(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: batch.astype(self._input_dtype, copy=False)}
        (logits,) = self._session.run([self.output_name], feed)
        return logits.astype(np.float32, copy=False)

    def close(self) -> None:
        # Dropping the last reference frees the session; there is no explicit release in the API.
        self._session = None  # type: ignore[assignment]


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if options.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # warnings about unused initialisers etc. are noise at serving time
    return so


def _onnx_file_for(manifest: Manifest, precision: str) -> tuple[OnnxFile, TensorSpec]:
    if precision == "fp32":
        return manifest.onnx, manifest.input
    for variant in manifest.precisions:
        if variant.precision == precision:
            # Names and shapes are the fp32 model's; only the element type may differ.
            return variant.onnx, manifest.input
    built = ", ".join(["fp32", *(v.precision for v in manifest.precisions)])
    raise RuntimeLoadError(f"{manifest.name} has no {precision} build (built: {built})")


def _verify_file(path: Path, expected: OnnxFile) -> None:
    if not path.is_file():
        raise RuntimeLoadError(f"{path} is missing")
    size = path.stat().st_size
    if size != expected.bytes:
        raise RuntimeLoadError(f"{path.name} is {size} bytes, the manifest says {expected.bytes}")
    digest = sha256_of(path)
    if digest != expected.sha256:
        raise RuntimeLoadError(
            f"{path.name} sha256 {digest[:12]}... does not match the manifest's {expected.sha256[:12]}..."
        )


def _verify_signature(
    session: ort.InferenceSession, input_spec: TensorSpec, output_spec: TensorSpec, *, exact_dtype: bool
) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise RuntimeLoadError(f"the model has {len(inputs)} inputs, expected 1 ({input_spec.name})")
    if len(outputs) < 1:
        raise RuntimeLoadError("the model has no outputs")
    _check_tensor("input", inputs[0], input_spec, exact_dtype=exact_dtype)
    _check_tensor("output", outputs[0], output_spec, exact_dtype=exact_dtype)


def _check_tensor(kind: str, actual: ort.NodeArg, spec: TensorSpec, *, exact_dtype: bool) -> None:
    if actual.name != spec.name:
        raise RuntimeLoadError(f"{kind} is named {actual.name!r}, the manifest says {spec.name!r}")
    if len(actual.shape) != len(spec.shape):
        raise RuntimeLoadError(f"{kind} {spec.name} has shape {actual.shape}, the manifest says {spec.shape}")
    for axis, (got, want) in enumerate(zip(actual.shape, spec.shape, strict=True)):
        if isinstance(want, str):
            # A dynamic axis in the manifest must be dynamic in the graph too: a batch axis fixed to 1
            # would fail at the first batch of 2, long after /readyz said yes.
            if isinstance(got, int):
                raise RuntimeLoadError(
                    f"{kind} {spec.name} axis {axis} is fixed to {got}, the manifest says {want!r}"
                )
        elif got != want:
            raise RuntimeLoadError(
                f"{kind} {spec.name} has shape {actual.shape}, the manifest says {spec.shape}"
            )
    if actual.type not in _NUMPY_OF_ORT_TYPE or (exact_dtype and actual.type != _ORT_TYPE[spec.dtype]):
        raise RuntimeLoadError(f"{kind} {spec.name} is {actual.type}, the manifest says {spec.dtype}")
