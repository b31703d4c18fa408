"""When a model's outputs are up to date: same inputs (variant, weights, opset, tools, model code) and an
intact ONNX file. An up-to-date model is skipped, so a second build rewrites nothing."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from contract.manifest import Manifest, WeightsProvenance, file_matches


def tool_versions() -> dict[str, str]:
    """Everything whose version can change the exported file, including this project's model code."""
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "models_code": models_code_digest(),
    }


def models_code_digest() -> str:
    """A digest of the code that decides what is exported, beyond the variant and the weights."""
    # Random-weight builds are reproducible (fixed seed), so an edit of the model table, the architectures,
    # the key mapping, the random initialisation, the exporter or the cost model is what changes the
    # outputs without changing the variant or the weights: fold that code into the up-to-date check. The
    # summary CLI changes nothing built.
    import models
    from builder import export, weights
    from contract import zoo

    sources = [p for p in Path(models.__file__).parent.glob("*.py") if p.name != "__main__.py"]
    digest = hashlib.sha256()
    for source in sorted([*sources, Path(export.__file__), Path(weights.__file__), Path(zoo.__file__)]):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def same_weights(a: WeightsProvenance, b: WeightsProvenance) -> bool:
    # The note is explanation (e.g. why auto fell back), not an input of the exported file.
    keys = ("source", "url", "path", "sha256")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def up_to_date(model_dir: Path, variant: str, weights: WeightsProvenance, opset: int, tools: dict) -> bool:
    """Whether ``model_dir`` already holds this exact build: same inputs, intact ONNX file."""
    try:
        manifest = Manifest.load(model_dir)
    except (OSError, ValueError):
        return False
    return (
        manifest.variant == variant
        and same_weights(manifest.weights, weights)
        and manifest.onnx.opset == opset
        and manifest.tools == tools
        and file_matches(model_dir / manifest.onnx.file, manifest.onnx.sha256, manifest.onnx.bytes)
    )
