"""ONNX Runtime backend (CPU, CUDA and TensorRT execution providers): the only module that
configures an ``InferenceSession``.

ONNX Runtime quietly drops a provider it cannot load and runs on CPU instead; the session's
actual providers are compared with the ones asked for, and a mismatch is reported as the backend
being unavailable rather than served by something else. (The session option
``session.disable_cpu_ep_fallback`` is not used for this: the CUDA provider deliberately places
shape arithmetic on the CPU, so it would refuse every model with a Reshape of a computed shape.)

When a GPU provider does not come up, the reason is ONNX Runtime's own: a provider that throws while
it is created raises (the session is made with ``enable_fallback=0``, so ONNX Runtime does not quietly
retry on other providers), and one whose libraries do not load is only written to ONNX Runtime's log
on standard error, which is captured while the session is made (:mod:`.native_log`) and quoted.

GPU provider options (:func:`provider_options`), from ONNX Runtime's TensorRT and CUDA provider
documentation and the providers' option parsers (``tensorrt_execution_provider_info.cc``,
``cuda_execution_provider_info.cc``):

* TensorRT: engine and timing caches (``trt_engine_cache_path``, ``trt_timing_cache_path``) under
  ENGINE_CACHE_DIR, never in the model repository, which may be read-only. The provider creates only
  the last level of those paths and fails otherwise, so every directory is made first. An engine is
  built at the first load and reused while the model, TensorRT and GPU stay the same; the provider
  does not notice a changed model file at the same path, so the engine directory is named after the
  file's SHA-256 (and TF32, which the provider does not key its cache on either). Explicit profile
  shapes for the batch axis (1, ``GPU_OPT_BATCH``, max(64, MAX_BATCH_SIZE)) so that no batch size
  triggers a rebuild, a workspace cap, and ``trt_fp16_enable`` / ``trt_int8_enable`` matching the
  precision (TensorRT 10 needs the int8 flag to build a Q/DQ model; TensorRT 11 takes the types from
  the graph). An int8 model quantized with the CPU recipe (uint8 activations) cannot be built by
  TensorRT and is refused up front.
* TF32: the TensorRT provider has no option for it (its option list has none; ONNX Runtime issue
  26029 asks for one) and TensorRT's builder allows TF32 by default, so with ALLOW_TF32 off the
  process's ``NVIDIA_TF32_OVERRIDE`` is set to ``0`` before the first such session (unless already
  set): TensorRT, cuBLAS and cuDNN read it and then keep fp32 in fp32. It applies to the whole
  process, which ALLOW_TF32 does anyway.
* CUDA: device 0, exhaustive cuDNN convolution search (the warm-up runs every batch size once, so the
  search is paid before ``/readyz``), an arena that grows by what is asked, and ``use_tf32`` (ONNX
  Runtime 1.18 and later: TF32 in cuBLAS GEMMs and cuDNN convolutions; on by default) set from
  ALLOW_TF32.
* Libraries: ``onnxruntime.preload_dlls()`` (ONNX Runtime 1.21 and later) runs once before the first
  GPU session, so that the CUDA and cuDNN wheels installed beside onnxruntime-gpu are found without
  them being on the loader's path. CPU serving never calls it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.gpu import GPU_OPT_BATCH
from contract.manifest import FileMismatch, Manifest, OnnxFile, TensorSpec, verify_file
from service.core.runtimes.base import BackendUnavailable, RuntimeLoadError, RuntimeOptions
from service.core.runtimes.native_log import capture_stderr

log = logging.getLogger(__name__)

# Backend name -> providers to ask for, best first. The first one is the one that must really load.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-cpu": ("CPUExecutionProvider",),
}
_BACKEND_OF_PROVIDER = {providers[0]: backend for backend, providers in PROVIDERS.items()}
TRT_MIN_PROFILE_MAX_BATCH = 64
TRT_WORKSPACE_BYTES = 1 << 30
# Under ENGINE_CACHE_DIR/<model>/: the TensorRT provider's engines (one directory per model file,
# precision and TF32 choice) and its timing cache (shared by them).
TENSORRT_CACHE_DIR = "onnxruntime-tensorrt"
TIMING_CACHE_DIR = "timing"
# The providers' options that name directories they write to.
_DIRECTORY_OPTIONS = ("trt_engine_cache_path", "trt_timing_cache_path")
TF32_OVERRIDE_VARIABLE = "NVIDIA_TF32_OVERRIDE"
# An ONNX Runtime log line: "<time> [E:onnxruntime:<logger>, <file>:<line> <function>] <message>".
_ORT_LOG_LINE = re.compile(r"\[[EFW]:onnxruntime:[^\]]*\]\s*(?P<message>.*\S)")
_preload_lock = threading.Lock()
_preload_done = False
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
        _check_int8_recipe(manifest, backend, precision)
        path = Path(model_dir) / onnx_file.file
        try:
            verify_file(path, onnx_file.sha256, onnx_file.bytes)
        except FileMismatch as exc:
            raise RuntimeLoadError(str(exc)) from exc
        options = options or RuntimeOptions()
        providers = provider_options(
            backend,
            model=manifest.name,
            onnx_sha256=onnx_file.sha256,
            input_spec=input_spec,
            precision=precision,
            options=options,
        )
        if backend == "onnxruntime-cpu":
            try:
                session = ort.InferenceSession(str(path), _session_options(options), providers=providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
                raise RuntimeLoadError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        else:
            session = _gpu_session(path, backend, providers, options)
        _verify_signature(session, input_spec, manifest.output, exact_dtype=precision == "fp32")
        return cls(session, _BACKEND_OF_PROVIDER[session.get_providers()[0]], precision)

    def run(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: batch.astype(self._input_dtype, copy=False)}
        (logits,) = self._session.run([self.output_name], feed)
        return logits.astype(np.float32, copy=False)

    def close(self) -> None:
        # Dropping the last reference frees the session; there is no explicit release in the API.
        self._session = None  # type: ignore[assignment]


def provider_options(
    backend: str,
    *,
    model: str,
    onnx_sha256: str,
    input_spec: TensorSpec,
    precision: str,
    options: RuntimeOptions,
) -> list[tuple[str, dict[str, object]]]:
    """``(provider, options)`` pairs for ``InferenceSession(providers=...)``, best provider first."""
    result: list[tuple[str, dict[str, object]]] = []
    for provider in PROVIDERS[backend]:
        if provider == "TensorrtExecutionProvider":
            engines, timing = tensorrt_cache_dirs(
                options.engine_cache_root, model, precision, onnx_sha256, allow_tf32=options.allow_tf32
            )
            result.append((provider, tensorrt_options(engines, timing, input_spec, precision, options)))
        elif provider == "CUDAExecutionProvider":
            result.append((provider, cuda_options(allow_tf32=options.allow_tf32)))
        else:
            result.append((provider, {}))
    return result


def tensorrt_cache_dirs(
    root: Path, model: str, precision: str, onnx_sha256: str, *, allow_tf32: bool
) -> tuple[Path, Path]:
    """(engine cache, timing cache) directories of the TensorRT provider for one model file."""
    base = Path(root) / model / TENSORRT_CACHE_DIR
    tf32 = "-tf32" if allow_tf32 else ""
    return base / f"{precision}-{onnx_sha256[:12]}{tf32}", base / TIMING_CACHE_DIR


def tensorrt_options(
    engine_cache: Path, timing_cache: Path, input_spec: TensorSpec, precision: str, options: RuntimeOptions
) -> dict[str, object]:
    max_batch = max(TRT_MIN_PROFILE_MAX_BATCH, options.max_batch_size or 0)
    sample = "x".join(str(d) for d in input_spec.shape[1:])

    def shapes(batch: int) -> str:
        return f"{input_spec.name}:{batch}x{sample}"

    return {
        "device_id": 0,
        "trt_max_workspace_size": TRT_WORKSPACE_BYTES,
        "trt_fp16_enable": precision == "fp16",
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing_cache),
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(min(GPU_OPT_BATCH, max_batch)),
        "trt_profile_max_shapes": shapes(max_batch),
    }


def cuda_options(*, allow_tf32: bool = False) -> dict[str, object]:
    return {
        "device_id": 0,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": int(allow_tf32),
    }


def provider_directories(providers: list[tuple[str, dict[str, object]]]) -> list[Path]:
    """The directories the providers will write to, as their options name them."""
    return [
        Path(str(settings[name]))
        for _, settings in providers
        for name in _DIRECTORY_OPTIONS
        if settings.get(name)
    ]


def _gpu_session(
    path: Path, backend: str, providers: list[tuple[str, dict[str, object]]], options: RuntimeOptions
) -> ort.InferenceSession:
    """A session on ``backend``'s GPU provider, or BackendUnavailable with ONNX Runtime's reason."""
    wanted = providers[0][0]
    for directory in provider_directories(providers):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(
                f"{backend} cannot create its cache directory {directory} ({exc}): point ENGINE_CACHE_DIR "
                "at a writable directory"
            ) from exc
    _prepare_gpu_process(backend, options)
    with capture_stderr() as native_log:
        try:
            # The file's digest was checked, so what fails here is the provider (or its libraries):
            # unavailable, so that BACKEND=auto goes on to the next backend.
            session = ort.InferenceSession(
                str(path), _session_options(options), providers=providers, enable_fallback=0
            )
        except Exception as exc:
            raise BackendUnavailable(f"{backend}: ONNX Runtime could not start {wanted}: {exc}") from exc
    actual = session.get_providers()
    if not actual or actual[0] != wanted:
        messages = ort_log_messages(native_log.text)
        said = f"ONNX Runtime said: {'; '.join(messages)}" if messages else "ONNX Runtime logged no reason"
        raise BackendUnavailable(
            f"{backend} asked for {wanted} but ONNX Runtime loaded {', '.join(actual) or 'nothing'}; {said}"
        )
    return session


def ort_log_messages(text: str) -> list[str]:
    """The messages of ONNX Runtime's warning and error lines in ``text``, without time and source."""
    return [match["message"] for match in map(_ORT_LOG_LINE.search, text.splitlines()) if match]


def _prepare_gpu_process(backend: str, options: RuntimeOptions) -> None:
    """What the process needs before a GPU session: the CUDA libraries found, TF32 as configured."""
    global _preload_done
    with _preload_lock:
        if not _preload_done:
            _preload_done = True
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                try:
                    preload()
                except Exception as exc:  # it looks in fixed places; the session then says what is missing
                    log.warning("onnxruntime.preload_dlls() failed: %s", exc)
    if backend == "onnxruntime-tensorrt" and not options.allow_tf32:
        os.environ.setdefault(TF32_OVERRIDE_VARIABLE, "0")


def _check_int8_recipe(manifest: Manifest, backend: str, precision: str) -> None:
    if precision != "int8" or backend != "onnxruntime-tensorrt":
        return
    variant = next((v for v in manifest.precisions if v.precision == "int8"), None)
    if variant is not None and variant.recipe == "cpu":
        raise BackendUnavailable(
            f"{manifest.name}:int8 was quantized for ONNX Runtime's CPU kernels (uint8 activations with "
            "zero points), which TensorRT cannot build; rebuild it with build_engines.py --target gpu "
            f"--models {manifest.name} --precision int8"
        )


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
