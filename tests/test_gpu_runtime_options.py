"""ONNX Runtime's GPU providers as the server sets them up, checked on a machine without a GPU.

The GPU providers are simulated: ``get_available_providers`` claims them and ``InferenceSession`` is
replaced by one that records what it was asked, writes what ONNX Runtime would log, and runs on the
CPU. What is checked is what the server does around the session: the directories it prepares, the
options it passes (TF32 included), the libraries it preloads, and the reason it gives for a fallback.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from contract.manifest import Manifest
from service.config import Settings
from service.core.runtimes import BackendUnavailable, RuntimeOptions, load_runtime
from service.core.runtimes import ort as ort_backend
from service.core.runtimes.native_log import capture_stderr
from tests.fake_repository import write_model

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
# What ONNX Runtime 1.2x logs when the CUDA provider's libraries do not load, as users report it.
CUDA_LOAD_FAILURE = (
    "2026-01-05 21:29:53.926793500 [E:onnxruntime:Default, provider_bridge_ort.cc:1862 "
    "TryGetProviderInfo_CUDA] /onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1539 "
    "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to "
    "load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared "
    "object file: No such file or directory\n"
)


class _ReportedProviders:
    """A real CPU session that reports the providers a GPU session would have."""

    def __init__(self, session: ort.InferenceSession, providers: list[str]) -> None:
        self._session = session
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class SimulatedGpuOnnxRuntime:
    """``InferenceSession`` on a simulated GPU build of ONNX Runtime (no GPU on this machine)."""

    def __init__(self, *, loads: list[str] | None = None, logs: str = "", raises: Exception | None = None):
        self.loads = loads  # the providers the session reports; None: the CPU's only (a fallback)
        self.logs = logs
        self.raises = raises
        self.calls: list[tuple[list, dict]] = []
        self._real = ort.InferenceSession

    def __call__(self, path, options, providers, **kwargs):
        self.calls.append((providers, kwargs))
        if self.logs:
            os.write(2, self.logs.encode())  # where ONNX Runtime's logger writes: file descriptor 2
        if self.raises is not None:
            raise self.raises
        session = self._real(path, options, providers=["CPUExecutionProvider"])
        return _ReportedProviders(session, self.loads) if self.loads else session


@pytest.fixture
def simulated_gpu(monkeypatch):
    """Install a simulated GPU ONNX Runtime; returns a function that sets how it behaves."""
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(GPU_PROVIDERS))
    monkeypatch.delenv(ort_backend.TF32_OVERRIDE_VARIABLE, raising=False)
    preloads: list[int] = []
    monkeypatch.setattr(ort_backend.ort, "preload_dlls", lambda: preloads.append(1), raising=False)
    monkeypatch.setattr(ort_backend, "_preload_done", False)

    def install(**behaviour) -> SimulatedGpuOnnxRuntime:
        fake = SimulatedGpuOnnxRuntime(**behaviour)
        fake.preloads = preloads
        monkeypatch.setattr(ort_backend.ort, "InferenceSession", fake)
        return fake

    return install


@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path / "repo", "mobilenet_v2")


def _load(model_dir, backend, options):
    return load_runtime(model_dir, Manifest.load(model_dir), backend=backend, options=options)


# --- directories -----------------------------------------------------------------------------------
def test_the_tensorrt_provider_gets_its_cache_directories_made_first_under_the_engine_cache(
    simulated_gpu, model_dir, tmp_path
):
    fake = simulated_gpu(loads=GPU_PROVIDERS)
    cache_root = tmp_path / "not" / "yet" / "there"
    runtime = _load(model_dir, "onnxruntime-tensorrt", RuntimeOptions(engine_cache_dir=cache_root))
    assert runtime.name == "onnxruntime-tensorrt"
    assert runtime.run(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 1000)
    ((providers, kwargs),) = fake.calls
    trt_name, trt = providers[0]
    assert trt_name == "TensorrtExecutionProvider"
    sha = Manifest.load(model_dir).onnx.sha256
    base = cache_root / "mobilenet_v2" / "onnxruntime-tensorrt"
    assert trt["trt_engine_cache_path"] == str(base / f"fp32-{sha[:12]}")
    assert trt["trt_timing_cache_path"] == str(base / "timing")
    assert (base / f"fp32-{sha[:12]}").is_dir() and (base / "timing").is_dir()
    assert not (model_dir / "engines").exists(), "nothing is written into the model repository"
    assert kwargs == {"enable_fallback": 0}


def test_an_engine_cache_that_cannot_be_made_leaves_the_backend_unavailable_saying_where(
    simulated_gpu, model_dir, tmp_path
):
    fake = simulated_gpu(loads=GPU_PROVIDERS)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BackendUnavailable, match=r"cannot create its cache directory .*ENGINE_CACHE_DIR"):
        _load(model_dir, "onnxruntime-tensorrt", RuntimeOptions(engine_cache_dir=blocker / "cache"))
    assert fake.calls == [], "no session is tried without its cache"


def test_the_server_puts_the_engine_cache_under_the_scratch_directory_unless_told(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    monkeypatch.delenv("ALLOW_TF32", raising=False)
    default = Settings(scratch_dir=tmp_path)
    assert default.engine_cache_path == tmp_path / "engine-cache" and default.allow_tf32 is False
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ALLOW_TF32", "true")
    settings = Settings(scratch_dir=tmp_path)
    assert settings.engine_cache_path == tmp_path / "cache" and settings.allow_tf32 is True


def test_the_repository_passes_the_cache_and_tf32_settings_to_the_runtime(fake_repo, tmp_path):
    import asyncio

    from service.core.metrics import Metrics
    from service.core.repository import ModelRepository

    seen = []

    def loader(model_dir, manifest, **kwargs):
        seen.append(kwargs["options"])
        return load_runtime(model_dir, manifest, **kwargs)

    settings = Settings(
        model_repository=fake_repo,
        models="mobilenet_v2",
        backend="onnxruntime-cpu",
        scratch_dir=tmp_path,
        allow_tf32=True,
        warmup=False,
    )
    repository = ModelRepository(["mobilenet_v2"], settings, Metrics(["mobilenet_v2"]), loader=loader)
    asyncio.run(repository.load_all())
    asyncio.run(repository.stop(1.0))
    (options,) = seen
    assert options.engine_cache_dir == tmp_path / "engine-cache" and options.allow_tf32 is True


# --- TF32 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allow", [False, True])
def test_tf32_follows_allow_tf32_in_the_cuda_provider_and_the_tensorrt_providers_process(
    simulated_gpu, model_dir, tmp_path, allow
):
    fake = simulated_gpu(loads=GPU_PROVIDERS)
    _load(model_dir, "onnxruntime-tensorrt", RuntimeOptions(engine_cache_dir=tmp_path, allow_tf32=allow))
    ((providers, _),) = fake.calls
    assert dict(providers)["CUDAExecutionProvider"]["use_tf32"] == int(allow)
    assert os.environ.get(ort_backend.TF32_OVERRIDE_VARIABLE) == (None if allow else "0")


def test_a_tf32_override_set_by_the_user_is_kept(simulated_gpu, model_dir, tmp_path, monkeypatch):
    simulated_gpu(loads=GPU_PROVIDERS)
    monkeypatch.setenv(ort_backend.TF32_OVERRIDE_VARIABLE, "1")
    _load(model_dir, "onnxruntime-tensorrt", RuntimeOptions(engine_cache_dir=tmp_path))
    assert os.environ[ort_backend.TF32_OVERRIDE_VARIABLE] == "1"


def test_tf32_choice_has_its_own_engine_directory(tmp_path):
    off, _ = ort_backend.tensorrt_cache_dirs(tmp_path, "m", "fp32", "c" * 64, allow_tf32=False)
    on, _ = ort_backend.tensorrt_cache_dirs(tmp_path, "m", "fp32", "c" * 64, allow_tf32=True)
    changed, _ = ort_backend.tensorrt_cache_dirs(tmp_path, "m", "fp32", "d" * 64, allow_tf32=False)
    assert len({off, on, changed}) == 3, "neither TF32 nor a rebuilt model may reuse another's engine"


# --- libraries ---------------------------------------------------------------------------------------
def test_cuda_libraries_are_preloaded_once_for_gpu_backends_and_never_for_the_cpu(
    simulated_gpu, model_dir, tmp_path
):
    fake = simulated_gpu(loads=["CUDAExecutionProvider", "CPUExecutionProvider"])
    _load(model_dir, "onnxruntime-cpu", RuntimeOptions(engine_cache_dir=tmp_path))
    assert fake.preloads == []
    _load(model_dir, "onnxruntime-cuda", RuntimeOptions(engine_cache_dir=tmp_path))
    _load(model_dir, "onnxruntime-cuda", RuntimeOptions(engine_cache_dir=tmp_path))
    assert fake.preloads == [1]


def test_an_onnxruntime_without_preload_dlls_still_loads(simulated_gpu, model_dir, tmp_path, monkeypatch):
    simulated_gpu(loads=["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.delattr(ort_backend.ort, "preload_dlls")
    assert _load(model_dir, "onnxruntime-cuda", RuntimeOptions(engine_cache_dir=tmp_path)).name == (
        "onnxruntime-cuda"
    )


# --- the reason for a fallback -----------------------------------------------------------------------
def test_a_provider_whose_libraries_do_not_load_is_reported_with_onnxruntimes_own_words(
    simulated_gpu, model_dir, tmp_path, capfd
):
    simulated_gpu(logs=CUDA_LOAD_FAILURE)  # then carries on with the CPU, as ONNX Runtime does
    with pytest.raises(BackendUnavailable) as raised:
        _load(model_dir, "onnxruntime-cuda", RuntimeOptions(engine_cache_dir=tmp_path))
    reason = str(raised.value)
    assert "asked for CUDAExecutionProvider but ONNX Runtime loaded CPUExecutionProvider" in reason
    assert "ONNX Runtime said: " in reason
    assert "libcublasLt.so.12: cannot open shared object file" in reason
    assert "2026-01-05" not in reason and "provider_bridge_ort.cc:1862" not in reason
    assert "libcublasLt.so.12" in capfd.readouterr().err, "the log still reaches standard error"


def test_a_fallback_without_a_logged_reason_says_so(simulated_gpu, model_dir, tmp_path):
    simulated_gpu()
    with pytest.raises(BackendUnavailable, match="ONNX Runtime logged no reason"):
        _load(model_dir, "onnxruntime-cuda", RuntimeOptions(engine_cache_dir=tmp_path))


def test_a_provider_that_throws_is_unavailable_with_the_exception_not_retried_on_the_cpu(
    simulated_gpu, model_dir, tmp_path
):
    error = RuntimeError("TensorRT EP could not deserialize engine from cache: /cache/x.engine")
    fake = simulated_gpu(raises=error)
    with pytest.raises(BackendUnavailable, match=r"could not start TensorrtExecutionProvider: TensorRT EP"):
        _load(model_dir, "onnxruntime-tensorrt", RuntimeOptions(engine_cache_dir=tmp_path))
    assert len(fake.calls) == 1


def test_auto_goes_on_to_the_cpu_after_gpu_providers_that_do_not_load(simulated_gpu, model_dir, tmp_path):
    simulated_gpu(logs=CUDA_LOAD_FAILURE)
    runtime = _load(model_dir, "auto", RuntimeOptions(engine_cache_dir=tmp_path))
    assert runtime.name == "onnxruntime-cpu"


def test_stderr_capture_keeps_the_text_and_passes_it_through(capfd):
    with capture_stderr() as captured:
        os.write(2, b"native line one\n")
        os.write(2, b"native line two\n")
    assert captured.text == "native line one\nnative line two\n"
    assert capfd.readouterr().err == "native line one\nnative line two\n"
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n", "standard error is restored"


def test_onnxruntime_log_lines_are_picked_from_other_output():
    text = (
        "a json log line\n"
        + CUDA_LOAD_FAILURE
        + (
            "2026-01-05 21:29:53.9 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1013 "
            "CreateExecutionProviderInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
            "CUDA 12.*\n"
        )
    )
    messages = ort_backend.ort_log_messages(text)
    assert len(messages) == 2
    assert messages[0].startswith("/onnxruntime_src/") and messages[0].endswith("No such file or directory")
    assert messages[1] == "Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*"
