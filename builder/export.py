"""PyTorch -> ONNX: one self-contained file with a dynamic batch axis, checked and compared with PyTorch.

The dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) is used: it is the maintained path in
torch 2.13, names the symbolic batch dimension after our ``Dim`` ("batch") and keeps it symbolic through
ShuffleNet's channel-shuffle reshapes, because those take the batch from ``x.size(0)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from contract.zoo import ModelSpec

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
# Upper bound of the symbolic batch dimension; TensorRT profiles choose their own range later.
MAX_EXPORT_BATCH = 4096

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported model is malformed or does not behave like the PyTorch module."""


@contextlib.contextmanager
def quiet(logger_names: tuple[str, ...], *warning_categories: type[Warning]) -> Iterator[None]:
    """Only errors from these loggers, and none of these warnings, while the block runs."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in warning_categories or (Warning,):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _quiet_exporter() -> contextlib.AbstractContextManager[None]:
    # The exporter logs a warning per torchvision op it cannot register (torchvision is not a dependency)
    # and emits deprecation chatter from its dependencies; none of it concerns these models.
    return quiet(
        ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir"),
        FutureWarning,
        DeprecationWarning,
        UserWarning,
    )


def export_onnx(
    module: nn.Module,
    spec: ModelSpec,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` (in eval mode) to ``path`` as one ONNX file and check it with onnx.checker.

    Input ``input`` float32 [batch, 3, R, R], output ``logits`` [batch, classes], batch symbolic. The
    file is written to a temporary directory first and moved into place only once it checks out, so a
    failed export never leaves a half-written model behind.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    # Batch 2, not 1: torch.export specialises dimensions whose example size is 0 or 1.
    example = torch.randn(2, *spec.input_shape)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=MAX_EXPORT_BATCH)

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(raw),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        single = fold_external_data(raw, Path(tmp) / "model.onnx")
        model = onnx.load(str(single), load_external_data=False)
        _check_io(model, spec)
        onnx.checker.check_model(str(single), full_check=True)
        shutil.move(str(single), path)
    return path


def fold_external_data(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Rewrite ``source`` as one self-contained ONNX file at ``dest``, pulling in any ``.data`` side files.

    The exporter may move initializers to a side file whatever it is asked; a model that is one file can
    be copied, hashed and mounted without losing half of itself.
    """
    import onnx

    model = onnx.load(str(source), load_external_data=True)
    model.producer_name = "efficient-cnn build_engines"
    onnx.save_model(model, str(dest), save_as_external_data=False)
    return Path(dest)


def _dims(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_io(model, spec: ModelSpec) -> None:
    from onnx import TensorProto

    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(
            f"expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got "
            f"{[i.name for i in inputs]} and {[o.name for o in model.graph.output]}"
        )
    if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError("the exported input is not float32")
    in_dims, out_dims = _dims(inputs[0]), _dims(model.graph.output[0])
    if in_dims != [BATCH_DIM, *spec.input_shape]:
        raise ExportError(f"input shape {in_dims}, expected {[BATCH_DIM, *spec.input_shape]}")
    if len(out_dims) != 2 or out_dims[0] != BATCH_DIM:
        raise ExportError(f"output shape {out_dims}: the batch axis is not dynamic")


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Locations of external-data tensors an ONNX file refers to (empty for a self-contained file)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


def input_output_shapes(path: str | os.PathLike) -> tuple[list[int | str], list[int | str]]:
    """The declared shapes of the model's (single) input and output; a string is a symbolic axis."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return _dims(model.graph.input[0]), _dims(model.graph.output[0])


def parity(
    module: nn.Module,
    onnx_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 4),
    seed: int = 0,
) -> float:
    """Max |ONNX Runtime (CPU) - PyTorch| over the logits of random inputs at each batch size."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_shape = tuple(session.get_inputs()[0].shape[1:])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    module = module.eval()
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = module(x).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if actual.shape != expected.shape:
            raise ExportError(f"batch {batch}: ONNX output shape {actual.shape}, PyTorch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(actual - expected))))
    return worst
