"""The model manifest (``model.json``): the contract between the build step and the server.

``build_engines.py`` writes one beside each ONNX file through :class:`Manifest` (so a manifest that
does not validate is never written) and the server reads it back the same way. The server trusts
the manifest and never guesses: preprocessing, labels, cost and provenance all come from here.

The names of the files a model directory holds are defined here, once, and so is the one check that
a file is the one its manifest describes (:func:`verify_file`): the build's up-to-date checks and both
runtimes use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.preprocessing import PreprocessingSpec
from contract.zoo import FAMILIES

__all__ = [
    "ENGINES_DIR",
    "MANIFEST_FILE",
    "ONNX_FILES",
    "Engine",
    "FileMismatch",
    "Manifest",
    "OnnxFile",
    "PrecisionVariant",
    "PreprocessingSpec",
    "TensorSpec",
    "WeightsProvenance",
    "file_matches",
    "sha256_of",
    "verify_file",
]

MANIFEST_FILE = "model.json"
SCHEMA_VERSION = 1
# The ONNX file of each precision, beside model.json: fp32 is exported, the others are made from it.
ONNX_FILES: dict[str, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# Native TensorRT engines, under the model directory.
ENGINES_DIR = "engines"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    shape: list[int | str]  # a string names a dynamic axis ("batch")
    dtype: Literal["float32", "float16"] = "float32"


class WeightsProvenance(_Strict):
    source: Literal["imagenet", "file", "random"]
    url: str | None = None
    path: str | None = None
    sha256: str | None = None
    note: str = ""


class OnnxFile(_Strict):
    file: str = ONNX_FILES["fp32"]
    sha256: str
    bytes: int
    opset: int


class PrecisionVariant(_Strict):
    """A reduced-precision ONNX beside the fp32 one, and how closely it agrees with fp32."""

    precision: Literal["fp16", "int8"]
    onnx: OnnxFile
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    calibration: str | None = None
    # int8 only: "cpu" (uint8 activations, for ONNX Runtime's CPU kernels) or "tensorrt" (symmetric
    # int8 activations and weights, float biases: what TensorRT can build).
    recipe: Literal["cpu", "tensorrt"] | None = None
    held_out: str | None = Field(None, description="the images the agreement figures were measured on")
    source_sha256: str | None = Field(None, description="sha256 of the fp32 ONNX file it was made from")
    tools: dict[str, str] = {}


class Engine(_Strict):
    """A TensorRT engine built from this model on one kind of GPU."""

    file: str
    precision: Literal["fp32", "fp16", "int8"]
    tensorrt_version: str
    device_name: str
    compute_capability: str
    min_batch: int
    opt_batch: int
    max_batch: int
    dla_core: int | None = None
    sha256: str
    bytes: int | None = None
    # Identical profiles, one per execution context that may run at the same time.
    profiles: int = 1
    source_onnx: str | None = Field(None, description="the ONNX file the engine was built from")
    source_sha256: str | None = None
    # DLA engines: layers that DLA cannot run and TensorRT placed on the GPU instead.
    gpu_fallback_layers: list[str] | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(description="name the model is served under, e.g. mobilenet_v1")
    variant: str = Field(description="full variant name, e.g. mobilenet_v1_1.0_224")
    family: Literal[tuple(FAMILIES)]  # type: ignore[valid-type]  # the zoo's families, nothing else
    knobs: dict[str, float | int]
    input_size: int
    input: TensorSpec
    output: TensorSpec
    preprocessing: PreprocessingSpec
    flops: int = Field(description="multiply-adds per image, conv and FC layers")
    params: int
    memory_access_cost: int = Field(description="elements read + written per image, conv and FC layers")
    fp32_bytes: int
    weights: WeightsProvenance
    labels: list[str]
    onnx: OnnxFile
    parity_max_abs_diff: float = Field(description="max |ONNX Runtime - PyTorch| on random input")
    tools: dict[str, str]
    created_at: str
    precisions: list[PrecisionVariant] = []
    engines: list[Engine] = []

    @classmethod
    def load(cls, model_dir: Path) -> Manifest:
        return cls.model_validate_json((Path(model_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class FileMismatch(ValueError):
    """A file is missing, or its size or SHA-256 is not what its manifest records."""


def verify_file(path: Path, sha256: str, size: int | None) -> None:
    """Raise :class:`FileMismatch`, saying how, unless ``path`` has this size (if known) and SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileMismatch(f"{path} is missing")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise FileMismatch(f"{path.name} is {actual_size} bytes, the manifest says {size}")
    digest = sha256_of(path)
    if digest != sha256:
        raise FileMismatch(
            f"{path.name} sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}..."
        )


def file_matches(path: Path, sha256: str, size: int | None) -> bool:
    """Whether :func:`verify_file` accepts ``path``: what the build's up-to-date checks ask."""
    try:
        verify_file(path, sha256, size)
    except FileMismatch:
        return False
    return True
