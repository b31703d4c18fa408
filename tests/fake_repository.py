"""A model repository of tiny ONNX classifiers, and fake runtimes, for the serving tests.

The tiny model is a real ONNX graph with the served models' signature (input ``input``
[batch, 3, R, R] float32, output ``logits`` [batch, 1000]): global average pooling, then a
random fully-connected layer. It loads in milliseconds, so tests exercise the real ONNX Runtime
backend, manifest checks and batching without building the real networks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.layout import model_directory
from contract.manifest import (
    Manifest,
    OnnxFile,
    PreprocessingSpec,
    TensorSpec,
    WeightsProvenance,
    sha256_of,
)
from contract.zoo import FAMILIES, imagenet_labels
from service.core.runtimes import Runtime, load_runtime

NUM_CLASSES = 1000
OPSET = 17
TINY_RESOLUTION = 32
FAKE_MODELS = ("mobilenet_v2", "shufflenet_v2")


def make_onnx(
    path: Path, resolution: int = TINY_RESOLUTION, *, seed: int = 0, fixed_batch: bool = False
) -> Path:
    """A tiny classifier: per-channel mean of a 4x4 grid of cells -> Gemm to 1000 logits."""
    rng = np.random.default_rng(seed)
    cells = 4
    features = 3 * cells * cells
    weight = numpy_helper.from_array(rng.normal(0, 1, (features, NUM_CLASSES)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, NUM_CLASSES).astype(np.float32), "bias")
    pool = resolution // cells
    batch: int | str = 1 if fixed_batch else "batch"
    graph = helper.make_graph(
        [
            # Average pooling to a 4x4 grid keeps some spatial layout, so different images (and a
            # wrongly cropped or transposed tensor) give clearly different logits.
            helper.make_node(
                "AveragePool", ["input"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]
            ),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, NUM_CLASSES])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_model(
    root: Path,
    name: str,
    *,
    resolution: int = TINY_RESOLUTION,
    seed: int = 0,
    family: str | None = None,
    fixed_batch: bool = False,
    version: int | None = None,
) -> Path:
    """``root/name/{model.onnx, model.json}`` (``root/name/version/...`` with a version) for a tiny
    classifier; returns the model directory."""
    directory = model_directory(Path(root), name, version)
    onnx_path = make_onnx(directory / "model.onnx", resolution, seed=seed, fixed_batch=fixed_batch)
    manifest = Manifest(
        name=name,
        variant=name,
        family=family or _family_of(name),
        knobs={},
        input_size=resolution,
        input=TensorSpec(name="input", shape=["batch", 3, resolution, resolution]),
        output=TensorSpec(name="logits", shape=["batch", NUM_CLASSES]),
        preprocessing=PreprocessingSpec(
            resize=resolution * 8 // 7,
            crop=resolution,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        flops=3 * resolution * resolution + 48 * NUM_CLASSES,
        params=49 * NUM_CLASSES,
        memory_access_cost=3 * resolution * resolution + 50 * NUM_CLASSES,
        fp32_bytes=4 * 49 * NUM_CLASSES,
        weights=WeightsProvenance(source="random", note="tiny test classifier"),
        labels=list(imagenet_labels()),
        onnx=OnnxFile(sha256=sha256_of(onnx_path), bytes=onnx_path.stat().st_size, opset=OPSET),
        parity_max_abs_diff=0.0,
        tools={"onnx": onnx.__version__},
        created_at=datetime.now(UTC).isoformat(),
    )
    manifest.save(directory)
    return directory


def _family_of(name: str) -> str:
    return next((family for family in FAMILIES if name.startswith(family)), "mobilenet_v2")


def make_repository(root: Path, names: tuple[str, ...] = FAKE_MODELS) -> Path:
    root = Path(root)
    for seed, name in enumerate(names):
        write_model(root, name, seed=seed)
    return root


def corrupt(model_dir: Path) -> None:
    """Flip bytes in the middle of the ONNX file, keeping its size (only the digest can tell)."""
    path = Path(model_dir) / "model.onnx"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


# --- runtimes -----------------------------------------------------------------------------------
class FakeRuntime:
    """Output row i = [sum of input i, batch size, ...]: each caller can check it got its own row.

    ``delay_s`` makes each call slow; ``fail_when(batch)`` returning True makes that call raise;
    ``gate`` (a threading.Event), when given, holds every call until it is set.
    """

    name = "fake"
    precision = "fp32"
    input_name = "input"

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        fail_when: Callable[[np.ndarray], bool] | None = None,
        gate: threading.Event | None = None,
        classes: int = 4,
    ) -> None:
        self.delay_s = delay_s
        self.fail_when = fail_when
        self.gate = gate
        self.classes = classes
        self.batches: list[np.ndarray] = []
        self.closed = False
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(batch.copy())
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when(batch):
            raise RuntimeError("fake runtime failure")
        out = np.zeros((len(batch), self.classes), dtype=np.float32)
        out[:, 0] = batch.reshape(len(batch), -1).sum(axis=1)
        out[:, 1] = len(batch)
        return out

    def close(self) -> None:
        self.closed = True

    @property
    def batch_sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


class RecordingRuntime:
    """Wraps a real runtime: records every batch it is handed, optionally slows every call down."""

    def __init__(self, inner: Runtime, *, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.name = inner.name
        self.precision = inner.precision
        self.input_name = inner.input_name
        self.delay_s = delay_s
        self.batches: list[np.ndarray] = []
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(batch.copy())
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.run(batch)

    def close(self) -> None:
        self.inner.close()


class RecordingLoader:
    """A runtime loader for ``create_app``: loads as the server does, then wraps in RecordingRuntime."""

    def __init__(self, *, delay_s: float | dict[str, float] = 0.0) -> None:
        self.delay_s = delay_s
        self.runtimes: dict[str, RecordingRuntime] = {}

    def __call__(self, model_dir: Path, manifest: Manifest, **kwargs: object) -> RecordingRuntime:
        inner = load_runtime(model_dir, manifest, **kwargs)  # type: ignore[arg-type]
        delay = self.delay_s.get(manifest.name, 0.0) if isinstance(self.delay_s, dict) else self.delay_s
        runtime = RecordingRuntime(inner, delay_s=delay)
        self.runtimes[manifest.name] = runtime
        return runtime

    def warm_batches_cleared(self) -> None:
        """Forget the warm-up batches, so a test sees only what its requests caused."""
        for runtime in self.runtimes.values():
            runtime.batches.clear()
