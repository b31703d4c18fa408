"""build_engines.py end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import build_engines
import models
from builder import host, weights
from builder.onnx_model import PARITY_TOLERANCE
from builder.staleness import up_to_date
from contract import layout, zoo
from contract.manifest import Manifest, WeightsProvenance, sha256_of

REPO = Path(__file__).resolve().parents[1]
MODELS = ["shufflenet_v2_0.5x", "mobilenet_v1_0.25_128"]  # the two quickest to export


def run_build(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "build_engines.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("repo") / "model_repository"
    return out, run_build("--models", *MODELS, "--weights", "random", "--out", str(out))


@pytest.mark.slow
def test_build_writes_valid_manifests(repository):
    out, result = repository
    assert result.returncode == 0, result.stderr
    for name in MODELS:
        model_dir = out / name
        assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.onnx"]
        manifest = Manifest.load(model_dir)
        spec = zoo.parse(name)
        assert manifest.name == name
        assert manifest.variant == spec.variant
        assert manifest.family == spec.family
        assert manifest.knobs == spec.knobs
        assert manifest.input_size == spec.resolution
        assert manifest.input.name == "input"
        assert manifest.input.shape == ["batch", 3, spec.resolution, spec.resolution]
        assert manifest.output.name == "logits"
        assert manifest.output.shape == ["batch", 1000]
        assert manifest.preprocessing == spec.preprocessing
        assert manifest.flops > 0 and manifest.params > 0 and manifest.memory_access_cost > 0
        assert manifest.fp32_bytes == 4 * manifest.params
        assert manifest.weights.source == "random"
        assert manifest.labels == list(zoo.imagenet_labels())
        assert manifest.onnx.sha256 == sha256_of(model_dir / "model.onnx")
        assert manifest.onnx.bytes == (model_dir / "model.onnx").stat().st_size
        assert manifest.parity_max_abs_diff <= PARITY_TOLERANCE
        assert {"torch", "onnx", "onnxruntime", "python"} <= set(manifest.tools)
        assert manifest.created_at
    # The closing table names every model.
    for name in MODELS:
        assert name in result.stdout
    assert "RANDOM" in result.stdout


@pytest.mark.slow
def test_second_run_is_up_to_date_and_force_rebuilds(repository):
    out, first = repository
    assert first.returncode == 0, first.stderr
    before = _mtimes(out)

    again = run_build("--models", *MODELS, "--weights", "random", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert (again.stdout + again.stderr).count("up to date") >= len(MODELS)
    assert _mtimes(out) == before, "an up-to-date build must not rewrite anything"

    sha_before = Manifest.load(out / MODELS[0]).onnx.sha256
    forced = run_build("--models", MODELS[0], "--weights", "random", "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    after = _mtimes(out)
    assert after[f"{MODELS[0]}/model.onnx"] != before[f"{MODELS[0]}/model.onnx"]
    assert after[f"{MODELS[0]}/model.json"] != before[f"{MODELS[0]}/model.json"]
    assert after[f"{MODELS[1]}/model.json"] == before[f"{MODELS[1]}/model.json"]
    # Random initialisation is seeded, so a forced rebuild reproduces the same file.
    assert sha256_of(out / MODELS[0] / "model.onnx") == sha_before
    assert Manifest.load(out / MODELS[0]).onnx.sha256 == sha_before


@pytest.mark.slow
def test_weights_from_a_local_file_are_exported_and_recorded(tmp_path):
    name = MODELS[0]
    torch.manual_seed(123)
    module = weights.calibrate_batchnorm(models.create(name), zoo.parse(name).input_shape, seed=123)
    checkpoint = tmp_path / "finetuned.pth"
    torch.save({"model": {f"module.{k}": v for k, v in module.state_dict().items()}, "epoch": 9}, checkpoint)
    out = tmp_path / "repo"

    result = run_build("--models", name, "--weights", str(checkpoint), "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(out / name)
    assert manifest.weights.source == "file"
    assert manifest.weights.path == str(checkpoint.resolve())
    assert manifest.weights.sha256 == sha256_of(checkpoint)
    # The exported network is the checkpoint's, not a random one.
    x = torch.randn(2, *zoo.parse(name).input_shape)
    session = ort.InferenceSession(str(out / name / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(logits - module(x).numpy()).max() <= PARITY_TOLERANCE


@pytest.mark.slow
def test_up_to_date_notices_changed_inputs(repository):
    out, first = repository
    assert first.returncode == 0, first.stderr
    model_dir = out / MODELS[1]
    manifest = Manifest.load(model_dir)
    args = (model_dir, manifest.variant, manifest.weights, manifest.onnx.opset, manifest.tools)
    assert up_to_date(*args)

    other_weights = WeightsProvenance(source="file", path="/x.pth", sha256="0" * 64)
    assert not up_to_date(model_dir, manifest.variant, other_weights, *args[3:])
    assert not up_to_date(model_dir, manifest.variant, manifest.weights, 17, manifest.tools)
    assert not up_to_date(*args[:4], {**manifest.tools, "torch": "0.0"})
    assert not up_to_date(model_dir, "mobilenet_v1_0.5_128", *args[2:])
    assert not up_to_date(out / "missing", *args[1:])


def test_unknown_model_fails_with_the_zoo_message(tmp_path):
    result = run_build("--models", "mobilenet_v3", "--weights", "random", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "is not a model name" in result.stderr
    assert not any(tmp_path.iterdir())

    result = run_build("--models", "shufflenet_v1_g5_1.0x", "--weights", "random", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "groups 5 is not one of" in result.stderr


def test_gpu_target_names_what_is_missing(tmp_path):
    result = run_build("--models", "shufflenet_v2", "--target", "gpu", "--out", str(tmp_path))
    assert result.returncode != 0
    message = result.stderr
    assert any(what in message for what in ("'tensorrt' is not importable", "no NVIDIA GPU found")), message
    assert not any(tmp_path.iterdir())


def test_jetson_target_elsewhere_says_where_to_build(tmp_path):
    if host.on_jetson():
        pytest.skip("running on a Jetson")
    result = run_build("--models", "mobilenet_v2", "--target", "jetson", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "must be built on the Jetson itself" in result.stderr
    assert "python build_engines.py --target jetson --models mobilenet_v2" in result.stderr


def test_dla_core_needs_the_jetson_target(tmp_path):
    result = run_build("--models", "mobilenet_v2", "--dla-core", "0", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--dla-core needs --target jetson" in result.stderr
    assert not any(tmp_path.iterdir())


def test_model_selection():
    assert build_engines.select_models(["mobilenet_v2", "mobilenet_v2", "shufflenet_v1"]) == [
        "mobilenet_v2",
        "shufflenet_v1",
    ]
    assert build_engines.select_models(["all"]) == zoo.all_variants()
    assert build_engines.parse_args([]).models == list(zoo.DEFAULT_MODELS)
    with pytest.raises(zoo.UnknownModelError):
        build_engines.select_models(["mobilenet_v2:int8"])


def test_parity_failure_fails_the_build_and_publishes_nothing(tmp_path, monkeypatch, capsys):
    from builder import export

    def fake_export(module, spec, path, opset=export.DEFAULT_OPSET):
        Path(path).write_bytes(b"onnx")
        return Path(path)

    monkeypatch.setattr(export, "export_onnx", fake_export)
    monkeypatch.setattr(export, "parity", lambda module, path, batch_sizes=(1, 4): 0.5)
    code = build_engines.main(
        ["--models", "shufflenet_v2_0.5x", "--weights", "random", "--out", str(tmp_path)]
    )
    assert code != 0
    assert list((tmp_path / "shufflenet_v2_0.5x").iterdir()) == []
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_version_writes_a_numbered_directory(tmp_path):
    name, out = MODELS[0], tmp_path / "repo"
    result = run_build("--models", name, "--weights", "random", "--out", str(out), "--version", "2")
    assert result.returncode == 0, result.stderr
    assert str(out / name / "2") in result.stdout + result.stderr
    assert sorted(p.name for p in (out / name / "2").iterdir()) == ["model.json", "model.onnx"]
    assert layout.versions(out / name) == {2: out / name / "2"}
    manifest = Manifest.load(out / name / "2")
    assert manifest.name == name and manifest.onnx.sha256 == sha256_of(out / name / "2" / "model.onnx")


def test_version_must_be_a_positive_integer(capsys):
    assert build_engines.parse_args(["--version", "3"]).version == 3
    assert build_engines.parse_args([]).version is None
    for bad in ("0", "-3", "two"):
        with pytest.raises(SystemExit) as exit_info:
            build_engines.parse_args(["--version", bad])
        assert exit_info.value.code == 2 and "--version" in capsys.readouterr().err
