"""The ONNX Runtime backend against tiny real ONNX files: loading, verification, the truth about providers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from contract.manifest import Manifest, TensorSpec
from service.core.runtimes import BackendUnavailable, RuntimeLoadError, RuntimeOptions, load_runtime
from service.core.runtimes.ort import OrtRuntime
from tests.fake_repository import corrupt, write_model


@pytest.fixture
def model_dir(tmp_path):
    return write_model(tmp_path, "mobilenet_v2")


def load(model_dir, backend="onnxruntime-cpu", **kwargs):
    return load_runtime(model_dir, Manifest.load(model_dir), backend=backend, **kwargs)


def test_cpu_runtime_runs_batches_like_single_images(model_dir):
    runtime = load(model_dir, options=RuntimeOptions(intra_op_threads=1, inter_op_threads=1))
    assert (runtime.name, runtime.precision, runtime.input_name) == ("onnxruntime-cpu", "fp32", "input")
    assert runtime.providers == ("CPUExecutionProvider",)
    batch = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    logits = runtime.run(batch)
    assert logits.shape == (5, 1000) and logits.dtype == np.float32
    singles = np.concatenate([runtime.run(batch[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(logits, singles, rtol=1e-5, atol=1e-5)
    runtime.close()


def test_parallel_execution_mode_loads(model_dir):
    runtime = load(
        model_dir, options=RuntimeOptions(intra_op_threads=2, inter_op_threads=2, execution_mode="parallel")
    )
    assert runtime.run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 1000)


def test_auto_takes_the_best_backend_that_really_loads(model_dir):
    runtime = load(model_dir, backend="auto")
    available = ort.get_available_providers()
    expected = "onnxruntime-cuda" if "CUDAExecutionProvider" in available else "onnxruntime-cpu"
    if "TensorrtExecutionProvider" in available:
        expected = runtime.name  # depends on the GPU stack; the point is below
    assert runtime.name == expected
    assert isinstance(runtime, OrtRuntime) and runtime.providers[0] != ""


@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"])
def test_a_gpu_backend_that_cannot_run_here_is_unavailable_not_replaced(model_dir, backend):
    provider = {
        "onnxruntime-cuda": "CUDAExecutionProvider",
        "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    }
    if provider.get(backend) in ort.get_available_providers():
        pytest.skip(f"{backend} is available on this machine")  # only where a GPU stack is installed
    with pytest.raises(BackendUnavailable) as refused:
        load(model_dir, backend=backend)
    assert ("tensorrt" in str(refused.value).lower()) or ("CUDA" in str(refused.value))


def test_a_corrupt_file_fails_on_its_digest(model_dir):
    corrupt(model_dir)
    with pytest.raises(RuntimeLoadError, match="sha256"):
        load(model_dir)


def test_a_missing_file_fails(model_dir):
    (model_dir / "model.onnx").unlink()
    with pytest.raises(RuntimeLoadError, match="missing"):
        load(model_dir)


def test_a_corrupt_file_fails_in_auto_too(model_dir):
    corrupt(model_dir)
    with pytest.raises(RuntimeLoadError) as failed:
        load(model_dir, backend="auto")
    assert not isinstance(failed.value, BackendUnavailable)


def _rewrite(model_dir, **changes):
    manifest = Manifest.load(model_dir).model_copy(update=changes)
    manifest.save(model_dir)


def test_an_input_name_the_manifest_does_not_state_fails(model_dir):
    _rewrite(model_dir, input=TensorSpec(name="data", shape=["batch", 3, 32, 32]))
    with pytest.raises(RuntimeLoadError, match="named 'input'"):
        load(model_dir)


def test_an_input_shape_the_manifest_does_not_state_fails(model_dir):
    _rewrite(model_dir, input=TensorSpec(name="input", shape=["batch", 3, 64, 64]))
    with pytest.raises(RuntimeLoadError, match="shape"):
        load(model_dir)


def test_a_fixed_batch_axis_fails_where_the_manifest_says_dynamic(tmp_path):
    model_dir = write_model(tmp_path, "shufflenet_v2", fixed_batch=True)
    with pytest.raises(RuntimeLoadError, match="fixed to 1"):
        load(model_dir)


def test_a_precision_that_was_not_built_fails(model_dir):
    with pytest.raises(RuntimeLoadError, match="no int8 build"):
        load(model_dir, precision="int8")
