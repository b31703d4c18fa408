"""TensorRT and GPU backends: every decision that needs no GPU, run here; the real libraries, where present.

Engine naming and selection, TensorRT 10 vs 11 build plans, profile shapes, ONNX Runtime provider
options, refusal of a silent CPU fallback, and the errors a machine without TensorRT gives. Tests that
need TensorRT or a GPU skip, saying so, where those are absent. Where a GPU cannot exist, the runtime's
buffer handling runs against a simulated TensorRT and CUDA (names say "simulated").
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from builder import host
from builder import tensorrt as trtb
from contract.gpu import GpuDevice, device_slug
from contract.manifest import Engine, Manifest, TensorSpec
from service.app import create_app
from service.core.runtimes import BackendUnavailable, RuntimeLoadError, RuntimeOptions, load_runtime
from service.core.runtimes import ort as ort_backend
from service.core.runtimes import tensorrt as trt_backend
from tests.fake_repository import make_repository, write_model
from tests.live_server import serving, serving_settings
from tests.test_api import assert_error

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT is not installed on this machine")
L4 = GpuDevice("NVIDIA L4", "8.9")


# --- versions and build plans -----------------------------------------------------------------------
def test_versions_are_read_and_checked():
    assert trtb.version_tuple("10.8.0.43") == (10, 8, 0, 43)
    assert trtb.version_tuple("11.4.1.post1") == (11, 4, 1)
    assert trtb.check_version("10.3.0") == 10 and trtb.check_version("11.0.0.1") == 11
    with pytest.raises(trtb.TensorRTBuildError, match=r"TensorRT 8\.6\.1 is not supported"):
        trtb.check_version("8.6.1")
    with pytest.raises(trtb.TensorRTBuildError):
        trtb.version_tuple("unknown")


@pytest.mark.parametrize(
    ("version", "precision", "onnx_file", "flags"),
    [
        ("10.8.0.43", "fp32", "model.onnx", ()),
        ("10.8.0.43", "fp16", "model.onnx", ("FP16",)),
        ("10.8.0.43", "int8", "model.int8.onnx", ("INT8", "FP16")),
        ("11.4.0.106", "fp32", "model.onnx", ()),
        ("11.4.0.106", "fp16", "model.fp16.onnx", ()),
        ("11.4.0.106", "int8", "model.int8.onnx", ()),
    ],
)
def test_tensorrt_10_sets_precision_flags_and_11_takes_precision_from_the_onnx(
    version, precision, onnx_file, flags
):
    plan = trtb.plan_build(version, precision, max_batch=32, int8_recipe="tensorrt")
    assert plan.onnx_file == onnx_file
    assert plan.builder_flags == flags
    assert plan.strongly_typed is version.startswith("11")
    assert plan.profile == trtb.Profile(1, 16, 32, 2)
    assert plan.workspace_bytes == 1024 * 1024 * 1024 and plan.dla_core is None


def test_int8_from_the_cpu_recipe_is_refused_for_tensorrt():
    with pytest.raises(trtb.TensorRTBuildError, match="cannot build: rebuild it for TensorRT"):
        trtb.plan_build("10.8.0", "int8", max_batch=8, int8_recipe="cpu")


def test_dla_plans():
    plan = trtb.plan_build("10.3.0", "fp16", max_batch=8, dla_core=1, contexts=1)
    assert plan.builder_flags == ("FP16", "GPU_FALLBACK")
    assert plan.profile == trtb.Profile(8, 8, 8, 1), "DLA has no dynamic shapes"
    assert plan.dla_core == 1
    int8 = trtb.plan_build("10.3.0", "int8", max_batch=4, dla_core=0, int8_recipe="tensorrt")
    assert int8.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    with pytest.raises(trtb.TensorRTBuildError, match="DLA runs fp16 and int8 only"):
        trtb.plan_build("10.3.0", "fp32", max_batch=8, dla_core=0)
    with pytest.raises(trtb.TensorRTBuildError, match="no DLA support on Jetson"):
        trtb.plan_build("11.2.0", "fp16", max_batch=8, dla_core=0)
    restored = trtb.plan_build("11.4.1", "fp16", max_batch=8, dla_core=0)
    assert restored.builder_flags == ("GPU_FALLBACK",) and restored.onnx_file == "model.fp16.onnx"


@pytest.mark.parametrize(
    ("version", "problem"),
    [("10.3.0", False), ("10.13.3.9", False), ("11.0.0", True), ("11.4.0.106", True), ("11.4.1", False)],
)
def test_dla_support_is_read_from_the_tensorrt_version(version, problem):
    message = trtb.dla_problem(version)
    assert (message is not None) is problem
    if problem:
        assert f"TensorRT {version} has no DLA support on Jetson" in message
        assert "build without --dla-core" in message


def test_build_with_dla_on_a_tensorrt_without_it_is_refused_before_anything_is_built(monkeypatch):
    import build_engines

    args = build_engines.parse_args(["--models", "mobilenet_v2", "--target", "jetson", "--dla-core", "0"])
    monkeypatch.setattr(host, "on_jetson", lambda: True)
    monkeypatch.setattr(host, "tensorrt_problem", lambda: None)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.2.0"))
    (problem,) = host.check_target(args, ["mobilenet_v2"])
    assert "TensorRT 11.2.0 has no DLA support on Jetson" in problem
    without_dla = build_engines.parse_args(["--models", "mobilenet_v2", "--target", "jetson"])
    assert host.check_target(without_dla, ["mobilenet_v2"]) == []


@pytest.mark.parametrize("version", ["10.8.0.43", "11.4.0.106"])
def test_fp32_engines_are_built_with_tf32_cleared_unless_allowed(version):
    fp32 = trtb.plan_build(version, "fp32", max_batch=8)
    assert fp32.cleared_flags == ("TF32",)
    assert trtb.plan_build(version, "fp32", max_batch=8, allow_tf32=True).cleared_flags == ()
    for precision in ("fp16", "int8"):
        plan = trtb.plan_build(version, precision, max_batch=8, int8_recipe="tensorrt")
        assert plan.cleared_flags == (), "reduced precision keeps TensorRT's own choice"


def test_allow_tf32_is_read_from_the_environment_as_the_server_reads_it():
    assert trtb.tf32_allowed({}) is False
    for value in ("true", "1", "YES", "on"):
        assert trtb.tf32_allowed({"ALLOW_TF32": value}) is True
    for value in ("false", "0", "no", "off", ""):
        assert trtb.tf32_allowed({"ALLOW_TF32": value}) is False
    with pytest.raises(trtb.TensorRTBuildError, match="ALLOW_TF32='maybe': use true or false"):
        trtb.tf32_allowed({"ALLOW_TF32": "maybe"})


class _FakeDpkg:
    def __init__(self, stdout: str, returncode: int = 0):
        self.stdout, self.returncode = stdout, returncode
        self.argv = None

    def __call__(self, argv, **kwargs):
        self.argv = argv
        return types.SimpleNamespace(stdout=self.stdout, returncode=self.returncode)


@pytest.fixture
def no_jetson_signs(tmp_path, monkeypatch):
    """A machine with none of the signs (paths that do not exist, no dpkg-query)."""
    monkeypatch.setattr(host, "NV_TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    monkeypatch.setattr(host, "DEVICE_TREE_MODEL", tmp_path / "device-tree-model")
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    return tmp_path


def test_jetson_is_recognised_inside_a_container_by_the_l4t_release_file(no_jetson_signs):
    assert not host.on_jetson()
    (no_jetson_signs / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n")
    assert host.jetson_evidence() == str(no_jetson_signs / "nv_tegra_release")


def test_jetson_is_recognised_by_the_installed_l4t_core_package(no_jetson_signs, monkeypatch):
    dpkg = _FakeDpkg("install ok installed|36.4.3-20250107174145")
    monkeypatch.setattr(host.shutil, "which", lambda name: "/usr/bin/dpkg-query")
    monkeypatch.setattr(host.subprocess, "run", dpkg)
    assert host.jetson_evidence() == "package nvidia-l4t-core 36.4.3-20250107174145"
    assert dpkg.argv[-1] == "nvidia-l4t-core"
    monkeypatch.setattr(host.subprocess, "run", _FakeDpkg("deinstall ok config-files|36.4.3"))
    assert not host.on_jetson(), "a removed package is no sign"
    monkeypatch.setattr(host.subprocess, "run", _FakeDpkg("", returncode=1))
    assert not host.on_jetson()


def test_jetson_is_recognised_by_the_device_tree_where_it_is_visible(no_jetson_signs):
    (no_jetson_signs / "device-tree-model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert host.jetson_evidence().endswith("NVIDIA Jetson AGX Orin Developer Kit")
    (no_jetson_signs / "device-tree-model").write_text("Raspberry Pi 5 Model B\x00")
    assert not host.on_jetson()


def test_profiles():
    assert trtb.batch_profile(64) == trtb.Profile(1, 16, 64, 2)
    assert trtb.batch_profile(8, contexts=3) == trtb.Profile(1, 8, 8, 3)
    assert trtb.batch_profile(4, dla=True) == trtb.Profile(4, 4, 4, 2)
    assert trtb.Profile(1, 16, 64, 2).shapes((3, 224, 224)) == (
        (1, 3, 224, 224),
        (16, 3, 224, 224),
        (64, 3, 224, 224),
    )
    with pytest.raises(ValueError):
        trtb.batch_profile(0)


def test_engine_names_carry_everything_that_makes_an_engine_valid():
    profile = trtb.batch_profile(32)
    assert (
        trtb.engine_file_name("fp16", profile, "10.8.0.43", L4)
        == "fp16_b1-16-32x2_trt10.8.0.43_nvidia-l4_sm89.plan"
    )
    orin = GpuDevice("Orin (nvgpu)", "8.7")
    name = trtb.engine_file_name("int8", trtb.batch_profile(8, dla=True), "10.3.0", orin, dla_core=1)
    assert name == "int8_b8-8-8x2_trt10.3.0_orin-nvgpu_sm87_dla1.plan"
    assert device_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
    assert trtb.timing_cache_name("11.4.0", L4) == "timing_trt11.4.0_nvidia-l4_sm89.cache"


def test_the_jetson_command_repeats_what_was_asked():
    command = trtb.jetson_command(
        ["mobilenet_v2", "shufflenet_v2"], ["fp16", "int8"], 8, 0, Path("/data/cal")
    )
    assert command == (
        "python build_engines.py --target jetson --models mobilenet_v2 shufflenet_v2 "
        "--precision fp16 int8 --max-batch 8 --dla-core 0 --calibration-images /data/cal"
    )


# --- engine selection at load time ------------------------------------------------------------------
def _engine(precision="fp16", version="10.8.0.43", device=L4, dla=None, max_batch=32, name=None) -> Engine:
    profile = trtb.batch_profile(max_batch, dla=dla is not None)
    return Engine(
        file=name or f"engines/{trtb.engine_file_name(precision, profile, version, device, dla)}",
        precision=precision,
        tensorrt_version=version,
        device_name=device.name,
        compute_capability=device.compute_capability,
        min_batch=profile.min,
        opt_batch=profile.opt,
        max_batch=profile.max,
        dla_core=dla,
        sha256="0" * 64,
        profiles=profile.count,
    )


L4_HERE = GpuDevice("NVIDIA L4", "8.9")


def _select(engines, precision="fp16", version="10.8.0.43", device=L4_HERE):
    return trt_backend.select_engine(
        engines, model="mobilenet_v2", precision=precision, trt_version=version, device=device
    )


def test_engine_selection_says_why_nothing_fits():
    with pytest.raises(
        BackendUnavailable, match=r"no int8 TensorRT engine .*engines built: fp16.*--precision int8"
    ):
        _select([_engine()], precision="int8")
    with pytest.raises(
        BackendUnavailable, match=r"built with TensorRT 10\.8\.0\.43, this is TensorRT 10\.9\.0"
    ):
        _select([_engine()], version="10.9.0")
    h100 = GpuDevice("NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(BackendUnavailable, match=r"built for NVIDIA L4 \(sm 8\.9\), this GPU is NVIDIA H100"):
        _select([_engine()], device=h100)


def test_engine_selection_prefers_the_same_gpu_then_the_gpu_over_dla_then_the_largest_batch():
    same_arch = GpuDevice("NVIDIA GeForce RTX 4090", "8.9")
    other = _engine(device=same_arch, max_batch=64)
    small, large = _engine(max_batch=8), _engine(max_batch=64)
    dla = _engine(dla=0, max_batch=64)
    assert _select([other, small]) is small
    assert _select([dla, small, large]) is large
    assert _select([other]) is other  # same compute capability: usable, with a warning
    assert _select([dla]) is dla


def test_slices_split_large_batches_and_pad_static_profiles():
    assert trt_backend.slices(10, 1, 4) == [(0, 4, 4), (4, 4, 4), (8, 2, 2)]
    assert trt_backend.slices(3, 8, 8) == [(0, 3, 8)]
    assert trt_backend.slices(0, 1, 4) == []
    with pytest.raises(ValueError):
        trt_backend.slices(3, 5, 4)


# --- what a machine without TensorRT or a GPU says --------------------------------------------------
@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_native_backend_is_unavailable_and_says_what_to_install(tmp_path):
    model_dir = write_model(tmp_path, "mobilenet_v2")
    with pytest.raises(
        BackendUnavailable, match=r"tensorrt Python package is not installed.*install TensorRT"
    ):
        load_runtime(model_dir, Manifest.load(model_dir), backend="tensorrt")


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_backend_tensorrt_reports_every_model_unavailable_and_the_server_stays_up(tmp_path):
    root = make_repository(tmp_path / "repo")
    app = create_app(serving_settings(root, backend="tensorrt"))
    with serving(app) as client:
        assert client.get("/healthz").status_code == 200
        readyz = client.get("/readyz")
        assert readyz.status_code == 503
        states = readyz.json()["models"]
        for name in ("mobilenet_v2", "shufflenet_v2"):
            assert states[name]["status"] == "unavailable"
            assert "backend tensorrt" in states[name]["reason"]
            assert "tensorrt Python package is not installed" in states[name]["reason"]
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert (
            listed["mobilenet_v2"]["status"] == "unavailable"
            and "tensorrt" in listed["mobilenet_v2"]["reason"]
        )
        error = assert_error(
            client.post(
                "/classify",
                params={"model": "mobilenet_v2"},
                content=b"x",
                headers={"Content-Type": "image/jpeg"},
            ),
            503,
            "model_unavailable",
        )
        assert "tensorrt" in error["message"]
        metrics = client.get("/metrics").text
        assert 'classifier_model_ready{model="mobilenet_v2"} 0.0' in metrics
    # The same repository under BACKEND=auto skips TensorRT and serves on what really loads.
    app = create_app(serving_settings(root, backend="auto"))
    with serving(app) as client:
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["mobilenet_v2"]["status"] == "ready"
        expected = (
            "onnxruntime-cuda"
            if "CUDAExecutionProvider" in ort.get_available_providers()
            else "onnxruntime-cpu"
        )
        assert listed["mobilenet_v2"]["backend"] == expected


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_a_per_model_tensorrt_override_makes_that_model_unavailable_and_the_others_serve(fake_repo):
    """BACKEND=onnxruntime-cpu,mobilenet_v2=tensorrt: mobilenet_v2 is unavailable, with the reason,
    everywhere a user looks; shufflenet_v2 serves on the CPU."""
    from contract.photos import photo_jpeg

    settings = serving_settings(fake_repo, backend="onnxruntime-cpu, mobilenet_v2=tensorrt")
    assert settings.backend_for("mobilenet_v2") == "tensorrt"
    assert settings.backend_for("shufflenet_v2") == "onnxruntime-cpu"
    with serving(create_app(settings)) as client:
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["mobilenet_v2"]["status"] == "unavailable"
        assert "backend tensorrt" in listed["mobilenet_v2"]["reason"]
        assert "tensorrt Python package is not installed" in listed["mobilenet_v2"]["reason"]
        assert (listed["shufflenet_v2"]["status"], listed["shufflenet_v2"]["backend"]) == (
            "ready",
            "onnxruntime-cpu",
        )
        readyz = client.get("/readyz")
        assert readyz.status_code == 503
        assert "mobilenet_v2 (unavailable)" in readyz.json()["error"]["message"]
        assert readyz.json()["models"]["mobilenet_v2"]["reason"] == listed["mobilenet_v2"]["reason"]
        jpeg = photo_jpeg(64, 48, seed=3)
        headers = {"Content-Type": "image/jpeg"}
        error = assert_error(
            client.post("/classify", params={"model": "mobilenet_v2"}, content=jpeg, headers=headers),
            503,
            "model_unavailable",
        )
        assert "tensorrt" in error["message"]
        served = client.post("/classify", params={"model": "shufflenet_v2"}, content=jpeg, headers=headers)
        assert served.status_code == 200, served.text
        assert served.json()["backend"] == "onnxruntime-cpu"


def test_build_target_checks_name_what_is_missing(monkeypatch):
    import build_engines

    args = build_engines.parse_args(["--models", "mobilenet_v2", "--target", "gpu", "--precision", "fp16"])
    monkeypatch.setattr(host, "tensorrt_problem", lambda: "TensorRT missing (install it)")
    monkeypatch.setattr(host, "nvidia_gpu_present", lambda: False)
    problems = host.check_target(args, ["mobilenet_v2"])
    assert problems[0] == "TensorRT missing (install it)"
    assert problems[1].startswith("no NVIDIA GPU found")
    jetson = build_engines.parse_args(["--models", "mobilenet_v2", "--target", "jetson", "--dla-core", "1"])
    monkeypatch.setattr(host, "on_jetson", lambda: False)
    (only,) = host.check_target(jetson, ["mobilenet_v2"])
    assert "must be built on the Jetson itself" in only and only.endswith("--max-batch 32 --dla-core 1")


# --- ONNX Runtime GPU providers ---------------------------------------------------------------------
SPEC = TensorSpec(name="input", shape=["batch", 3, 224, 224])


def test_tensorrt_provider_options(tmp_path):
    engines, timing = ort_backend.tensorrt_cache_dirs(
        tmp_path, "mobilenet_v2", "int8", "ab" * 32, allow_tf32=False
    )
    cache = tmp_path / "mobilenet_v2" / "onnxruntime-tensorrt"
    assert (engines, timing) == (cache / "int8-abababababab", cache / "timing")
    options = ort_backend.tensorrt_options(engines, timing, SPEC, "int8", RuntimeOptions())
    assert options == {
        "device_id": 0,
        "trt_max_workspace_size": 1 << 30,
        "trt_fp16_enable": False,
        "trt_int8_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache / "int8-abababababab"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache / "timing"),
        "trt_profile_min_shapes": "input:1x3x224x224",
        "trt_profile_opt_shapes": "input:16x3x224x224",
        "trt_profile_max_shapes": "input:64x3x224x224",
    }
    bigger = ort_backend.tensorrt_options(engines, timing, SPEC, "fp16", RuntimeOptions(max_batch_size=128))
    assert bigger["trt_profile_max_shapes"] == "input:128x3x224x224"
    assert bigger["trt_fp16_enable"] is True and bigger["trt_int8_enable"] is False


def test_provider_lists_follow_the_backend(tmp_path):
    def names(backend):
        return [
            name
            for name, _ in ort_backend.provider_options(
                backend,
                model="mobilenet_v2",
                onnx_sha256="0" * 64,
                input_spec=SPEC,
                precision="fp32",
                options=RuntimeOptions(engine_cache_dir=tmp_path),
            )
        ]

    assert names("onnxruntime-tensorrt") == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert names("onnxruntime-cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert names("onnxruntime-cpu") == ["CPUExecutionProvider"]
    assert ort_backend.cuda_options() == {
        "device_id": 0,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": 0,
    }


def test_onnxruntime_tensorrt_refuses_an_int8_model_quantized_for_the_cpu(tmp_path):
    from contract.manifest import OnnxFile, PrecisionVariant

    model_dir = write_model(tmp_path, "mobilenet_v2")
    manifest = Manifest.load(model_dir)
    variant = PrecisionVariant(
        precision="int8", onnx=OnnxFile(sha256="0" * 64, bytes=1, opset=17), recipe="cpu"
    )
    manifest = manifest.model_copy(update={"precisions": [variant]})
    with pytest.raises(
        BackendUnavailable, match=r"TensorRT cannot build; rebuild it with build_engines\.py --target gpu"
    ):
        ort_backend._check_int8_recipe(manifest, "onnxruntime-tensorrt", "int8")
    ort_backend._check_int8_recipe(manifest, "onnxruntime-cuda", "int8")  # CUDA runs Q/DQ as it is


def test_simulated_cuda_provider_that_fell_back_to_cpu_is_refused_no_gpu_here(tmp_path, monkeypatch):
    # ONNX Runtime drops a provider whose libraries fail to load and carries on with the CPU; here
    # that is simulated (no GPU exists on this machine) by a session that reports only the CPU.
    model_dir = write_model(tmp_path, "mobilenet_v2")
    real_session = ort.InferenceSession
    asked = {}

    def session_that_fell_back(path, options, providers, **kwargs):
        asked["providers"], asked["kwargs"] = providers, kwargs
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort_backend.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort_backend.ort, "InferenceSession", session_that_fell_back)
    with pytest.raises(
        BackendUnavailable,
        match="asked for CUDAExecutionProvider but ONNX Runtime loaded CPUExecutionProvider",
    ):
        load_runtime(
            model_dir,
            Manifest.load(model_dir),
            backend="onnxruntime-cuda",
            options=RuntimeOptions(engine_cache_dir=tmp_path / "cache"),
        )
    assert asked["providers"][0] == ("CUDAExecutionProvider", ort_backend.cuda_options())
    assert asked["kwargs"] == {"enable_fallback": 0}, "ONNX Runtime must not retry quietly on the CPU"


# --- the native runtime's buffers, against a simulated TensorRT and CUDA -----------------------------
class _SimulatedCuda:
    """The few cuda-python runtime calls the backend makes, on host memory (no GPU here)."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.buffers = {}
        self.freed = []
        self.streams = 0

    def _alloc(self, nbytes):
        buffer = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(buffer)
        self.buffers[address] = buffer
        return 0, address

    cudaMallocHost = _alloc
    cudaMalloc = _alloc

    def cudaFreeHost(self, address):
        self.freed.append(address)
        return (0,)

    cudaFree = cudaFreeHost

    def cudaStreamCreate(self):
        self.streams += 1
        return 0, 1000 + self.streams

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaGetErrorString(self, err):
        return 0, b"simulated"


class _SimulatedContext:
    """Logits[i, c] = sum of image i + c: each image's row is recognisable after the round trip."""

    def __init__(self, log):
        self.log = log
        self.addresses = {}
        self.shape = None

    def set_optimization_profile_async(self, index, stream):
        self.log.append(("profile", index))
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def set_input_shape(self, name, shape):
        self.shape = shape
        return True

    def execute_async_v3(self, stream):
        n = self.shape[0]
        per = int(np.prod(self.shape[1:]))
        images = np.ctypeslib.as_array((ctypes.c_float * (n * per)).from_address(self.addresses["input"]))
        logits = np.ctypeslib.as_array((ctypes.c_float * (n * 5)).from_address(self.addresses["logits"]))
        logits[:] = (images.reshape(n, per).sum(axis=1)[:, None] + np.arange(5)).ravel()
        self.log.append(("run", n))
        return True


class _SimulatedEngine:
    def __init__(self, profile, log):
        self.profile, self.log = profile, log
        self.num_io_tensors = 2
        self.num_optimization_profiles = 2

    def get_tensor_name(self, i):
        return ["input", "logits"][i]

    def get_tensor_mode(self, name):
        return "in" if name == "input" else "out"

    def get_tensor_dtype(self, name):
        return "float"

    def get_tensor_profile_shape(self, name, index):
        low, opt, high = self.profile
        return [(low, 3, 2, 2), (opt, 3, 2, 2), (high, 3, 2, 2)]

    def create_execution_context(self):
        return _SimulatedContext(self.log)


@pytest.mark.parametrize(("profile", "runs"), [((1, 2, 4), [4, 4, 2]), ((4, 4, 4), [4, 4, 4])])
def test_simulated_tensorrt_runtime_buffers_slicing_and_padding_no_gpu_here(profile, runs, monkeypatch):
    trt = types.SimpleNamespace(
        __version__="10.8.0.43",
        nptype=lambda dtype: np.float32,
        TensorIOMode=types.SimpleNamespace(INPUT="in"),
        DataType=types.SimpleNamespace(FLOAT="float", HALF="half"),
    )
    cuda = _SimulatedCuda()
    log = []
    manifest = types.SimpleNamespace(
        input=TensorSpec(name="input", shape=["batch", 3, 2, 2]),
        output=TensorSpec(name="logits", shape=["batch", 5]),
        labels=["a"] * 5,
    )
    engine = _SimulatedEngine(profile, log)
    trt_backend.check_io(engine, trt, manifest)
    record = _engine(max_batch=4)
    monkeypatch.setattr(trt_backend, "cuda_check", lambda result: result[1] if len(result) > 1 else None)
    runtime = trt_backend.TensorRTRuntime(trt, cuda, engine, record, manifest, "fp16")
    assert ("profile", 0) in log and ("profile", 1) in log, "one context per profile"
    batch = np.arange(10 * 12, dtype=np.float32).reshape(10, 3, 2, 2)
    logits = runtime.run(batch)
    expected = batch.reshape(10, -1).sum(axis=1)[:, None] + np.arange(5)
    np.testing.assert_allclose(logits, expected)
    assert [n for kind, n in log if kind == "run"] == runs
    runtime.close()
    assert len(cuda.freed) == 8, "pinned and device buffers of both contexts are released"
    with pytest.raises(RuntimeError, match="closed"):
        runtime.run(batch)


class _BlockingContext(_SimulatedContext):
    """Holds every run inside execute until ``release`` is set: a batch in flight on the simulated GPU."""

    def __init__(self, log, started, release):
        super().__init__(log)
        self.started, self.release = started, release

    def execute_async_v3(self, stream):
        self.started.set()
        self.release.wait(10)
        return super().execute_async_v3(stream)


class _BlockingEngine(_SimulatedEngine):
    def __init__(self, log):
        super().__init__((1, 2, 4), log)
        self.started, self.release = threading.Event(), threading.Event()

    def create_execution_context(self):
        return _BlockingContext(self.log, self.started, self.release)


def _simulated_runtime(engine, monkeypatch):
    trt = types.SimpleNamespace(__version__="10.8.0.43", nptype=lambda dtype: np.float32)
    manifest = types.SimpleNamespace(
        input=TensorSpec(name="input", shape=["batch", 3, 2, 2]),
        output=TensorSpec(name="logits", shape=["batch", 5]),
        labels=["a"] * 5,
    )
    monkeypatch.setattr(trt_backend, "cuda_check", lambda result: result[1] if len(result) > 1 else None)
    cuda = _SimulatedCuda()
    return trt_backend.TensorRTRuntime(trt, cuda, engine, _engine(max_batch=4), manifest, "fp32"), cuda


def _in_thread(function):
    result = {}

    def target():
        try:
            result["value"] = function()
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_simulated_tensorrt_close_waits_for_the_batch_in_flight_no_gpu_here(monkeypatch):
    engine = _BlockingEngine([])
    runtime, cuda = _simulated_runtime(engine, monkeypatch)
    batch = np.ones((3, 3, 2, 2), np.float32)
    running, ran = _in_thread(lambda: runtime.run(batch))
    assert engine.started.wait(5)
    closing, _ = _in_thread(runtime.close)
    closing.join(0.3)
    assert closing.is_alive(), "close() returned while a batch was still running"
    assert cuda.freed == [], "buffers freed under a running batch"
    engine.release.set()
    running.join(5)
    closing.join(5)
    assert not closing.is_alive()
    np.testing.assert_allclose(ran["value"], np.full((3, 1), 12.0) + np.arange(5))
    assert len(cuda.freed) == 8
    with pytest.raises(RuntimeError, match="closed"):
        runtime.run(batch)


def test_simulated_tensorrt_close_gives_up_on_a_stuck_batch_after_its_bound_no_gpu_here(monkeypatch, caplog):
    engine = _BlockingEngine([])
    runtime, cuda = _simulated_runtime(engine, monkeypatch)
    runtime.close_wait_s = 0.2
    running, _ = _in_thread(lambda: runtime.run(np.ones((1, 3, 2, 2), np.float32)))
    assert engine.started.wait(5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=trt_backend.__name__):
        runtime.close()
    waited = time.monotonic() - started
    assert 0.2 <= waited < 2.0
    assert len(cuda.freed) == 8, "freed anyway once the bound has passed"
    assert "1 batch(es) still running" in caplog.text
    engine.release.set()
    running.join(5)
    runtime.close()  # a second close is a no-op


def test_simulated_tensorrt_batch_waiting_for_a_context_is_refused_once_closed_no_gpu_here(monkeypatch):
    engine = _BlockingEngine([])
    runtime, _ = _simulated_runtime(engine, monkeypatch)
    runtime.close_wait_s = 0.1
    batch = np.ones((1, 3, 2, 2), np.float32)
    first, _ = _in_thread(lambda: runtime.run(batch))
    second, _ = _in_thread(lambda: runtime.run(batch))
    assert engine.started.wait(5)
    time.sleep(0.1)  # both contexts busy; a third batch waits for one
    waiting, waited = _in_thread(lambda: runtime.run(batch))
    time.sleep(0.1)
    runtime.close()
    waiting.join(5)
    assert not waiting.is_alive() and "closed" in str(waited["error"])
    engine.release.set()
    first.join(5)
    second.join(5)


def test_an_engine_with_other_tensors_is_refused():
    trt = types.SimpleNamespace(
        TensorIOMode=types.SimpleNamespace(INPUT="in"),
        DataType=types.SimpleNamespace(FLOAT="float", HALF="half"),
    )
    manifest = types.SimpleNamespace(
        input=TensorSpec(name="images", shape=["batch", 3, 2, 2]),
        output=TensorSpec(name="logits", shape=["batch", 5]),
    )
    with pytest.raises(RuntimeLoadError, match="the manifest says 'images'"):
        trt_backend.check_io(_SimulatedEngine((1, 1, 1), []), trt, manifest)


# --- with the real libraries (skipped where they are absent) -----------------------------------------
@needs_tensorrt
def test_the_plan_uses_flags_this_tensorrt_has():
    import tensorrt as trt

    for precision in ("fp32", "fp16", "int8"):
        plan = trtb.plan_build(trt.__version__, precision, max_batch=8, int8_recipe="tensorrt")
        for flag in (*plan.builder_flags, *plan.cleared_flags):
            assert hasattr(trt.BuilderFlag, flag), f"TensorRT {trt.__version__} has no BuilderFlag.{flag}"


@needs_tensorrt
def test_engine_build_and_native_runtime_agree_with_onnxruntime_cpu(tmp_path):
    try:
        device = host.detect_device()
    except trtb.TensorRTBuildError as exc:
        pytest.skip(f"no usable GPU here: {exc}")
    import tensorrt as trt

    model_dir = write_model(tmp_path, "mobilenet_v2")
    manifest = Manifest.load(model_dir)
    plan = trtb.plan_build(trt.__version__, "fp32", max_batch=8)
    built = trtb.build_engine(model_dir, manifest, plan, device, timing_cache_dir=tmp_path / "cache")
    trtb.with_engine(manifest, built.record).save(model_dir)
    assert (tmp_path / "cache" / trtb.timing_cache_name(trt.__version__, device)).is_file()
    runtime = load_runtime(model_dir, Manifest.load(model_dir), backend="tensorrt")
    batch = np.random.default_rng(0).normal(size=(11, 3, 32, 32)).astype(np.float32)
    reference = load_runtime(model_dir, Manifest.load(model_dir), backend="onnxruntime-cpu").run(batch)
    np.testing.assert_allclose(runtime.run(batch), reference, atol=1e-2)
    runtime.close()


# --- make gpu-selftest ---------------------------------------------------------------------------------
def test_gpu_selftest_procedure_runs_on_the_cpu_backend_and_fails_loudly_without_a_gpu(tmp_path, capsys):
    from benchmarks import gpu_selftest

    root = make_repository(tmp_path / "repo", ("mobilenet_v2",))
    common = ["--repository", str(root), "--models", "mobilenet_v2", "--no-build", "--precisions", "fp32"]
    common += ["--batch-sizes", "1", "3", "--seconds", "0.05", "--images", "4"]
    code = gpu_selftest.main([*common, "--backends", "onnxruntime-cpu", "--out", str(tmp_path / "cpu.json")])
    out = capsys.readouterr().out
    assert code == 0 and "SELF-TEST PASSED" in out
    assert "mobilenet_v2  onnxruntime-cpu  ok      100.0%" in out
    # The next step it points to: the configuration for this machine, measured.
    assert f"python -m benchmarks.tune --repository {root} --models mobilenet_v2" in out
    report = __import__("json").loads((tmp_path / "cpu.json").read_text())
    (result,) = report["results"]
    assert set(result["speed"]) == {"1", "3"} and result["speed"]["3"]["images_per_s"] > 0
    if HAVE_TENSORRT:
        return
    code = gpu_selftest.main([*common, "--backends", "tensorrt", "--out", str(tmp_path / "trt.json")])
    out = capsys.readouterr().out
    assert code == 1 and "SELF-TEST FAILED" in out and "tensorrt did not run any model" in out
    assert "tensorrt Python package is not installed" in out


def test_gpu_selftest_verdict_is_one_line_per_backend_and_precision_with_the_bars_used(tmp_path, capsys):
    from benchmarks import gpu_selftest

    root = make_repository(tmp_path / "repo", ("mobilenet_v2", "shufflenet_v2"))
    out = tmp_path / "selftest.json"
    argv = ["--repository", str(root), "--models", "mobilenet_v2", "shufflenet_v2", "--no-build"]
    argv += ["--precisions", "fp32", "--backends", "onnxruntime-cpu", "--batch-sizes", "1", "8", "32", "64"]
    argv += ["--seconds", "0.02", "--images", "4", "--out", str(out)]
    assert gpu_selftest.main(argv) == 0
    screen = capsys.readouterr().out
    verdict_header = next(line for line in screen.splitlines() if line.startswith("backend "))
    assert "img/s b1/b8/b32/b64" in verdict_header and "p50 ms b1/b8/b32/b64" in verdict_header
    (line,) = [row for row in screen.splitlines() if row.startswith("onnxruntime-cpu  fp32")]
    assert "2/2" in line and "100.0%" in line and " <= " in line and line.endswith("agrees")
    assert "fp32 top-1 >= 99% and max|diff| <= 0.001 x max|logit|" in screen
    report = __import__("json").loads(out.read_text())
    assert report["passed"] is True and report["problems"] == []
    (row,) = report["verdict"]
    assert (row["backend"], row["precision"], row["loaded"], row["agreed"]) == (
        "onnxruntime-cpu",
        "fp32",
        2,
        2,
    )
    assert set(row["median_speed"]) == {"1", "8", "32", "64"}
    assert row["worst_logit_tolerance"] > 0 and row["logit_rtol"] == 1e-3
    assert {r["model"] for r in report["results"]} == {"mobilenet_v2", "shufflenet_v2"}
    assert all(r["agrees"] is True and r["logit_tolerance"] > 0 for r in report["results"])


def test_gpu_selftest_fails_fp32_on_logits_beyond_the_tolerance_and_only_reports_fp16():
    from benchmarks import gpu_selftest as st

    reference = np.array([[10.0, 1.0], [0.0, 5.0]])
    results = []
    for backend, precision, top1, diff in [
        ("onnxruntime-cuda", "fp32", 1.0, 0.05),  # every top-1 agrees, but TF32-sized logit drift
        ("onnxruntime-cuda", "fp16", 0.9, 0.05),
    ]:
        result = st.Result(
            "mobilenet_v2", backend, precision, "ok", speed={1: {"images_per_s": 9.0, "p50_ms": 1.0}}
        )
        st.judge(result, top1, diff, reference)
        results.append(result)
    results.append(st.Result("mobilenet_v2", "tensorrt", "fp32", "unavailable", reason="no TensorRT here"))
    assert results[0].logit_tolerance == pytest.approx(0.01) and results[0].agrees is False
    rows = st.verdict_rows(results, [1])
    assert [row["status"] for row in rows] == ["DISAGREES", "differs", "unavailable"]
    screen = st.format_verdict(rows, [1])
    assert "5.0e-02 <= 1.0e-02" in screen and "tensorrt fp32: mobilenet_v2: no TensorRT here" in screen
    problems = st.verdict(results, ["onnxruntime-cuda", "tensorrt"])
    assert any(
        "disagrees with ONNX Runtime CPU: top-1 100.0%" in p and "tolerance 1.0e-02" in p for p in problems
    )
    assert not any("fp16" in p for p in problems)
    assert "tensorrt did not run any model" in problems
