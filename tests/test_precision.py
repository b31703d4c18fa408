"""Reduced-precision builds (builder/precision.py, build_engines.py --precision): real conversions and
quantizations, checked with onnx.checker, run in ONNX Runtime CPU, measured against fp32, and served."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from builder import precision
from contract.manifest import Manifest, sha256_of
from contract.photos import photo_jpeg, write_photos
from service.app import create_app
from service.core.repository import discover
from tests.fake_repository import make_repository
from tests.live_server import serving, serving_settings
from tests.test_api import assert_error

REPO = Path(__file__).resolve().parents[1]
FEW = {"calibration_count": 4, "held_out_count": 4}


@pytest.fixture(scope="module")
def variant_repo(tmp_path_factory) -> Path:
    """The tiny test models, mobilenet_v2 with fp16 and int8 (CPU recipe) builds recorded."""
    root = make_repository(tmp_path_factory.mktemp("variants") / "model_repository")
    model_dir = root / "mobilenet_v2"
    split = precision.split_images(**FEW)
    for kind in ("fp16", "int8"):
        variant = precision.build_variant(model_dir, Manifest.load(model_dir), kind, split=split)
        precision.with_variant(Manifest.load(model_dir), variant).save(model_dir)
    return root


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_variants_are_recorded_with_measured_agreement(variant_repo):
    model_dir = variant_repo / "mobilenet_v2"
    manifest = Manifest.load(model_dir)
    assert [v.precision for v in manifest.precisions] == ["fp16", "int8"]
    for variant in manifest.precisions:
        path = model_dir / variant.onnx.file
        assert variant.onnx.sha256 == sha256_of(path) and variant.onnx.bytes == path.stat().st_size
        assert variant.source_sha256 == manifest.onnx.sha256
        assert 0.0 <= variant.top1_agreement <= 1.0
        assert 0.0 < variant.mean_abs_logit_diff <= variant.max_abs_logit_diff
        assert variant.held_out == "4 generated photos (contract.photos, seeds 20000+)"
    fp16, int8 = manifest.precisions
    assert (fp16.onnx.file, int8.onnx.file) == ("model.fp16.onnx", "model.int8.onnx")
    assert fp16.calibration is None and fp16.recipe is None
    assert int8.recipe == "cpu" and int8.calibration.startswith("MinMax on 4 generated photos")
    # The figures are what running both files gives, not a guess.
    images = precision.generated_images(manifest.preprocessing, 4, precision.HELD_OUT_SEED)
    again = precision.agreement(model_dir / "model.onnx", model_dir / "model.int8.onnx", images)
    assert again.max_abs_logit_diff == pytest.approx(int8.max_abs_logit_diff, rel=1e-6)
    assert again.top1_agreement == int8.top1_agreement


def test_fp16_model_is_float16_inside_with_float32_io(variant_repo):
    path = variant_repo / "mobilenet_v2" / "model.fp16.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})
    assert logits.shape == (3, 1000) and logits.dtype == np.float32


def test_int8_cpu_recipe_is_qdq_with_uint8_activations(variant_repo):
    path = variant_repo / "mobilenet_v2" / "model.int8.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    ops = _ops(path)
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2
    weights = _initializers(path)
    assert any(a.dtype == np.int8 and a.ndim == 2 for a in weights.values()), "per-channel int8 Gemm weights"
    zero_points = [a for name, a in weights.items() if name.endswith("zero_point") and a.dtype == np.uint8]
    assert zero_points, "activations are uint8 with zero points"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})
    assert logits.shape == (2, 1000)


def test_int8_tensorrt_recipe_is_symmetric_with_float_biases(tmp_path):
    model_dir = make_repository(tmp_path, ("shufflenet_v2",)) / "shufflenet_v2"
    manifest = Manifest.load(model_dir)
    split = precision.split_images(**FEW)
    variant = precision.build_variant(model_dir, manifest, "int8", recipe="tensorrt", split=split)
    assert variant.recipe == "tensorrt"
    path = model_dir / "model.int8.onnx"
    weights = _initializers(path)
    zero_points = [a for name, a in weights.items() if "zero_point" in name]
    assert zero_points and all(a.dtype == np.int8 and not a.any() for a in zero_points)
    # Weights keep float values behind a Q/DQ pair; no int32 (bias) tensor feeds a DequantizeLinear.
    assert not any(a.dtype == np.int32 for a in weights.values())
    assert weights["weight"].dtype == np.float32
    graph = onnx.load(str(path)).graph
    quantized_weight = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "weight"]
    assert len(quantized_weight) == 1
    assert precision.run_cpu(path, np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 1000)


def test_int8_options_per_recipe():
    from onnxruntime.quantization import QuantFormat, QuantType

    cpu, trt = precision.int8_options("cpu"), precision.int8_options("tensorrt")
    for options in (cpu, trt):
        assert options["quant_format"] == QuantFormat.QDQ and options["per_channel"] is True
        assert options["weight_type"] == QuantType.QInt8
    assert cpu["activation_type"] == QuantType.QUInt8
    assert trt["activation_type"] == QuantType.QInt8
    assert trt["extra_options"]["ActivationSymmetric"] and not trt["extra_options"]["QuantizeBias"]
    with pytest.raises(ValueError):
        precision.int8_options("gpu")


def test_calibration_directory_is_split_into_calibration_and_held_out(tmp_path):
    write_photos(tmp_path, 12, width=64, height=48)
    (tmp_path / "notes.txt").write_text("not an image")
    split = precision.split_images(tmp_path, calibration_count=100, held_out_count=100)
    assert [p.name for p in split.held_out_files] == ["photo_00004.jpg", "photo_00009.jpg"]
    assert len(split.calibration_files) == 10
    assert not set(split.calibration_files) & set(split.held_out_files)
    assert split.calibration_description == f"10 images from {tmp_path}"
    capped = precision.split_images(tmp_path, calibration_count=3, held_out_count=1)
    assert len(capped.calibration_files) == 3 and len(capped.held_out_files) == 1
    # Too few to hold any out: agreement is measured on generated photos instead.
    small = tmp_path / "small"
    write_photos(small, 2, width=64, height=48)
    assert precision.split_images(small).held_out_files is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(precision.PrecisionError, match="holds no images"):
        precision.split_images(empty)
    with pytest.raises(precision.PrecisionError, match="does not exist"):
        precision.split_images(tmp_path / "missing")


def test_compare_counts_top1_and_differences():
    reference = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]], np.float32)
    candidate = np.array([[0.0, 0.9, 1.0], [2.0, 0.1, 0.0]], np.float32)
    measured = precision.compare(reference, candidate)
    assert measured.images == 2 and measured.top1_agreement == 0.5
    assert measured.max_abs_logit_diff == pytest.approx(0.5)
    assert measured.mean_abs_logit_diff == pytest.approx(0.7 / 6)
    with pytest.raises(precision.PrecisionError, match="non-finite"):
        precision.compare(reference, np.full_like(reference, np.nan))


def test_up_to_date_check_follows_the_source_and_the_recipe(variant_repo):
    model_dir = variant_repo / "mobilenet_v2"
    manifest = Manifest.load(model_dir)
    split = precision.split_images(**FEW)
    assert precision.variant_up_to_date(model_dir, manifest, "int8", "cpu", split)
    assert precision.variant_up_to_date(model_dir, manifest, "fp16", None, split)
    assert not precision.variant_up_to_date(model_dir, manifest, "int8", "tensorrt", split)
    assert not precision.variant_up_to_date(model_dir, manifest, "int8", "cpu", precision.split_images())
    other_source = manifest.model_copy(update={"onnx": manifest.onnx.model_copy(update={"sha256": "0" * 64})})
    assert not precision.variant_up_to_date(model_dir, other_source, "int8", "cpu", split)


def test_discovery_lists_each_precision_build(variant_repo):
    assert discover(variant_repo) == [
        "mobilenet_v2",
        "mobilenet_v2:fp16",
        "mobilenet_v2:int8",
        "shufflenet_v2",
    ]


def test_server_serves_int8_and_fp16_beside_fp32(variant_repo):
    app = create_app(serving_settings(variant_repo))
    jpeg = photo_jpeg(500, 375, seed=3)
    with serving(app) as client:
        assert client.get("/readyz").status_code == 200
        answers = {}
        for name in ("mobilenet_v2", "mobilenet_v2:fp16", "mobilenet_v2:int8"):
            response = client.post(
                "/classify", params={"model": name}, content=jpeg, headers={"Content-Type": "image/jpeg"}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == name and body["backend"] == "onnxruntime-cpu"
            answers[name] = body["predictions"]
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["mobilenet_v2:int8"]["precision"] == "int8"
        assert listed["mobilenet_v2:fp16"]["precision"] == "fp16"
        assert listed["mobilenet_v2"]["precision"] == "fp32"
        assert all(m["status"] == "ready" for m in listed.values())
        detail = client.get("/models/mobilenet_v2:int8").json()
        assert {v["precision"] for v in detail["precisions"]} == {"fp16", "int8"}
        metrics = client.get("/metrics").text
        assert 'model="mobilenet_v2:int8"' in metrics and 'precision="int8"' in metrics
        # fp16 keeps the fp32 ranking on this image; its scores differ only in the low digits.
        assert [p["class_id"] for p in answers["mobilenet_v2:fp16"]] == [
            p["class_id"] for p in answers["mobilenet_v2"]
        ]
        assert_error(
            client.post("/classify", params={"model": "shufflenet_v2:int8"}, content=jpeg),
            404,
            "unknown_model",
        )


def run_build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "build_engines.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_build_engines_writes_fp16_and_int8_models(tmp_path):
    out = tmp_path / "repo"
    name = "shufflenet_v2_0.5x"
    common = ["--models", name, "--weights", "random", "--out", str(out)]
    counts = ["--calibration-count", "4", "--held-out-count", "4"]
    result = run_build(*common, "--precision", "fp16", "int8", *counts)
    assert result.returncode == 0, result.stderr
    assert "real images (--calibration-images DIR) calibrate better" in result.stderr
    model_dir = out / name
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.json",
        "model.onnx",
    ]
    manifest = Manifest.load(model_dir)
    assert [v.precision for v in manifest.precisions] == ["fp16", "int8"]
    images = precision.generated_images(manifest.preprocessing, 2, seed=5)
    reference = precision.run_cpu(model_dir / "model.onnx", images)
    for variant in manifest.precisions:
        path = model_dir / variant.onnx.file
        onnx.checker.check_model(str(path), full_check=True)
        assert precision.run_cpu(path, images).shape == reference.shape
        assert variant.top1_agreement is not None and variant.max_abs_logit_diff is not None
        assert f"{name}:{variant.precision} built" in result.stdout
        assert f"top-1 agreement {variant.top1_agreement:.1%}" in result.stdout
    assert manifest.precisions[1].recipe == "cpu"

    again = run_build(*common, "--precision", "fp16", "int8", *counts)
    assert again.returncode == 0, again.stderr
    assert f"{name}:fp16 up to date" in again.stdout and f"{name}:int8 up to date" in again.stdout
    assert Manifest.load(model_dir) == manifest

    # Other calibration images: the int8 model is rebuilt from them, fp16 is left alone.
    photos = write_photos(tmp_path / "calibration", 6, width=320, height=240, seed=40)
    result = run_build(*common, "--precision", "fp16", "int8", "--calibration-images", str(photos[0].parent))
    assert result.returncode == 0, result.stderr
    int8 = Manifest.load(model_dir).precisions[1]
    assert int8.calibration == f"MinMax on 5 images from {photos[0].parent}"
    assert int8.held_out == f"1 held-out images from {photos[0].parent} (every 5th file)"
    assert f"{name}:int8 built" in result.stdout

    # A forced fp32 rebuild reproduces the same file, so the variants made from it stay listed.
    forced = run_build(*common, "--force")
    assert forced.returncode == 0, forced.stderr
    assert [v.precision for v in Manifest.load(model_dir).precisions] == ["fp16", "int8"]


def test_bad_calibration_directory_is_refused_before_building(tmp_path):
    result = run_build(
        "--models",
        "shufflenet_v2_0.5x",
        "--precision",
        "int8",
        "--calibration-images",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "repo"),
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not (tmp_path / "repo").exists()


def test_without_pytorch_the_exported_models_are_used_as_they_are(tmp_path, monkeypatch, capsys, caplog):
    # The GPU and Jetson images carry exported models but no PyTorch; the build step must still make
    # the precision variants (and engines) from what it finds.
    import importlib.util

    import build_engines

    root = make_repository(tmp_path / "repo", ("mobilenet_v2",))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a)
    )
    argv = ["--models", "mobilenet_v2", "--out", str(root), "--precision", "fp16", "int8"]
    argv += ["--calibration-count", "2", "--held-out-count", "2"]
    assert build_engines.main(argv) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v2  kept" in out and "mobilenet_v2:int8 built" in out
    assert [v.precision for v in Manifest.load(root / "mobilenet_v2").precisions] == ["fp16", "int8"]
    assert build_engines.main(["--models", "shufflenet_v2", "--out", str(root)]) == 1
    assert "PyTorch is not installed to export it" in caplog.text
