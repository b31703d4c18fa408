"""ONNX export: every knob of every family exports to one checked file with a dynamic batch axis that
agrees with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import models
from builder import export, weights
from contract import zoo
from models.layers import channel_shuffle

# The four defaults, then at least one other value of every knob of every family.
VARIANTS = [
    "mobilenet_v1",
    "mobilenet_v2",
    "shufflenet_v1",
    "shufflenet_v2",
    "mobilenet_v1_0.5_160",  # width, resolution
    "mobilenet_v2_0.75_192",  # width, resolution
    "shufflenet_v1_g8_0.5x",  # groups, scale
    "shufflenet_v1_g1_1.0x",  # groups = 1 (no shuffle, no grouped convs)
    "shufflenet_v2_0.5x",  # scale
]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """Each variant exported once, for all the checks below."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        # Calibrated statistics keep the random network's logits at unit scale, so parity means something.
        module = weights.calibrate_batchnorm(models.create(name), zoo.parse(name).input_shape)
        out[name] = (module, export.export_onnx(module, zoo.parse(name), root / name / "model.onnx"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_export_is_one_checked_file_with_a_dynamic_batch(exported, name):
    _, path = exported[name]
    spec = zoo.parse(name)
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"], "no side files, no leftovers"
    assert export.external_data_files(path) == []
    inputs, outputs = export.input_output_shapes(path)
    assert inputs == ["batch", 3, spec.resolution, spec.resolution]
    assert outputs == ["batch", 1000]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_export_agrees_with_pytorch_at_batch_1_and_4(exported, name):
    module, path = exported[name]
    with torch.no_grad():
        scale = module(torch.randn(2, *zoo.parse(name).input_shape)).abs().max().item()
    assert scale > 1e-2, "logits near zero would make any runtime look in agreement"
    for batch in (1, 4):
        assert export.parity(module, path, batch_sizes=(batch,)) <= TOLERANCE


@pytest.mark.slow
def test_shufflenet_batch_stays_dynamic_beyond_the_example(exported):
    # The export example has batch 2; channel shuffle reshapes must not have frozen it.
    module, path = exported["shufflenet_v1_g8_0.5x"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 224, 224)
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    assert logits.shape == (7, 1000)
    with torch.no_grad():
        assert np.abs(logits - module(x).numpy()).max() <= TOLERANCE


class _Shuffler(nn.Module):
    """Small enough to export in a second: grouped conv, channel shuffle, pooling, FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.group = nn.Conv2d(12, 12, 1, groups=3)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channel_shuffle(torch.relu(self.conv(x)), 3)
        x = torch.relu(self.bn(self.group(x)))
        return self.fc(x.mean((2, 3)))


def test_export_of_a_small_module(tmp_path):
    spec = zoo.parse("shufflenet_v2_0.5x")
    module = _Shuffler().eval()
    path = export.export_onnx(module, spec, tmp_path / "m" / "model.onnx")
    assert export.input_output_shapes(path) == (["batch", 3, 224, 224], ["batch", 1000])
    assert export.parity(module, path, batch_sizes=(1, 3, 4)) <= TOLERANCE
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]


def test_parity_detects_a_different_model(tmp_path):
    spec = zoo.parse("shufflenet_v2_0.5x")
    torch.manual_seed(0)
    path = export.export_onnx(_Shuffler().eval(), spec, tmp_path / "model.onnx")
    torch.manual_seed(1)
    assert export.parity(_Shuffler().eval(), path) > TOLERANCE


def test_external_data_is_folded_back(tmp_path):
    module = _Shuffler().eval()
    path = export.export_onnx(module, zoo.parse("shufflenet_v2_0.5x"), tmp_path / "model.onnx")
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    onnx.save_model(
        onnx.load(str(path)),
        str(split_dir / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert export.external_data_files(split_dir / "model.onnx") == ["model.onnx.data"]

    single = export.fold_external_data(split_dir / "model.onnx", tmp_path / "single.onnx")
    assert export.external_data_files(single) == []
    assert export.parity(module, single) <= TOLERANCE
