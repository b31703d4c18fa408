"""Reduced-precision models beside ``model.onnx``: fp16 conversion, int8 Q/DQ quantization, agreement.

* ``model.fp16.onnx``: every float32 tensor converted to float16 by onnxconverter-common, with the
  graph's input and output kept float32 (Cast nodes at the edges), so callers feed and read what they
  feed and read for fp32. TensorRT builds an fp16 engine from it; ONNX Runtime runs it on any device.
* ``model.int8.onnx``: static Q/DQ quantization by ONNX Runtime, calibrated (MinMax) on preprocessed
  images, weights per output channel. Two recipes, because the two consumers want different graphs:

  - ``cpu`` (``--target cpu``): uint8 activations with zero points, int8 symmetric weights, biases
    quantized. ONNX Runtime's CPU kernels fuse this into QLinearConv and friends (its fast U8S8 path).
  - ``tensorrt`` (``--target gpu|jetson``): int8 *symmetric* activations and weights (TensorRT takes
    only zero point 0), a Q/DQ pair on each float weight and one dedicated pair per consumer, float
    biases (TensorRT's DequantizeLinear takes no int32 input). TensorRT 10 reads the scales from the
    Q/DQ nodes (explicit quantization); TensorRT 11 has no other way to build int8.

* Agreement: each variant is run beside ``model.onnx`` on held-out images (never the calibration
  ones) in ONNX Runtime CPU, and the top-1 agreement and the max/mean absolute logit difference are
  recorded in the manifest. They are measured, never assumed.

Torch-free: the build step runs it after the export, and so may a machine without PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.export import quiet
from contract.layout import model_directory
from contract.manifest import (
    ONNX_FILES,
    Manifest,
    OnnxFile,
    PrecisionVariant,
    PreprocessingSpec,
    file_matches,
    sha256_of,
)

log = logging.getLogger(__name__)

# The precisions made from the fp32 model, each into its own file (ONNX_FILES).
VARIANT_PRECISIONS = tuple(p for p in ONNX_FILES if p != "fp32")
INT8_RECIPES = ("cpu", "tensorrt")
# The default calibration and held-out sets: the project's generated photos, disjoint seeds.
DEFAULT_CALIBRATION_COUNT = 32
DEFAULT_HELD_OUT_COUNT = 32
CALIBRATION_SEED = 10_000
HELD_OUT_SEED = 20_000
CALIBRATION_BATCH = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A user directory keeps every HELD_OUT_EVERY-th image out of calibration, to measure agreement on.
HELD_OUT_EVERY = 5


class PrecisionError(RuntimeError):
    """A reduced-precision model could not be made, or does not check out."""


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images (N, 3, H, W) float32, and where they came from (for the manifest)."""

    tensors: np.ndarray
    description: str

    def __len__(self) -> int:
        return len(self.tensors)


def _preprocess_all(blobs: Sequence[bytes], spec: PreprocessingSpec) -> np.ndarray:
    from service.core.imaging import preprocess

    return np.stack([preprocess(blob, spec, max_image_pixels=100_000_000) for blob in blobs])


def generated_images(spec: PreprocessingSpec, count: int, seed: int) -> np.ndarray:
    """``count`` of the project's generated photos (seeds ``seed ..``), preprocessed for ``spec``."""
    try:
        from contract.photos import photo_jpeg
    except ImportError as exc:  # an image that ships models/ and service/ only
        raise PrecisionError(
            f"the default calibration photos come from contract/photos.py, which is not importable here "
            f"({exc}): pass --calibration-images DIR"
        ) from exc

    return _preprocess_all([photo_jpeg(500, 375, seed=seed + i) for i in range(count)], spec)


def image_files(directory: Path) -> list[Path]:
    """The image files directly in ``directory``, sorted by name (so splits are reproducible)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PrecisionError(f"calibration image directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrecisionError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


@dataclass(frozen=True)
class ImageSplit:
    """Which images calibrate and which measure agreement; nothing is decoded yet."""

    calibration_files: list[Path] | None  # None: generated photos
    held_out_files: list[Path] | None
    calibration_count: int
    held_out_count: int
    directory: Path | None

    @property
    def calibration_description(self) -> str:
        if self.calibration_files is None:
            return f"{self.calibration_count} generated photos (contract.photos, seeds {CALIBRATION_SEED}+)"
        return f"{len(self.calibration_files)} images from {self.directory}"

    @property
    def held_out_description(self) -> str:
        if self.held_out_files is None:
            return f"{self.held_out_count} generated photos (contract.photos, seeds {HELD_OUT_SEED}+)"
        count = len(self.held_out_files)
        return f"{count} held-out images from {self.directory} (every {HELD_OUT_EVERY}th file)"


def split_images(
    directory: Path | None = None,
    *,
    calibration_count: int = DEFAULT_CALIBRATION_COUNT,
    held_out_count: int = DEFAULT_HELD_OUT_COUNT,
) -> ImageSplit:
    """Calibration images and disjoint held-out images for agreement.

    From ``directory``: every HELD_OUT_EVERY-th file (by name) is held out, the rest calibrate (at most
    ``calibration_count`` of them); a directory too small to spare any is measured on generated photos.
    Without one: the project's generated photos, two disjoint seed ranges. Generated photos are not
    ImageNet pictures, so real images calibrate better: pass ``--calibration-images``.
    """
    if calibration_count < 1 or held_out_count < 1:
        raise ValueError("calibration and held-out counts must be at least 1")
    if directory is None:
        return ImageSplit(None, None, calibration_count, held_out_count, None)
    files = image_files(directory)
    held = files[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY][:held_out_count]
    calibration = [f for f in files if f not in held][:calibration_count]
    return ImageSplit(
        calibration, held or None, len(calibration), len(held) or held_out_count, Path(directory)
    )


def load_split(split: ImageSplit, spec: PreprocessingSpec) -> tuple[ImageSet, ImageSet]:
    """Decode and preprocess both halves of ``split`` for ``spec``."""

    def from_files(files: list[Path]) -> np.ndarray:
        try:
            return _preprocess_all([f.read_bytes() for f in files], spec)
        except Exception as exc:  # the imaging errors name the problem
            raise PrecisionError(f"an image in {split.directory} cannot be used: {exc}") from exc

    if split.calibration_files is None:
        calibration = generated_images(spec, split.calibration_count, CALIBRATION_SEED)
    else:
        calibration = from_files(split.calibration_files)
    if split.held_out_files is None:
        held_out = generated_images(spec, split.held_out_count, HELD_OUT_SEED)
    else:
        held_out = from_files(split.held_out_files)
    return (
        ImageSet(calibration, split.calibration_description),
        ImageSet(held_out, split.held_out_description),
    )


# ---------------------------------------------------------------------------------------------
# Conversion


def _quiet() -> contextlib.AbstractContextManager[None]:
    # The converters warn per node about things that do not concern these models (e.g. values clamped
    # to the float16 range, ops left in float32 on purpose); the checks below are what counts.
    return quiet(("onnxconverter_common", "onnxruntime", "root"))


def convert_fp16(source: Path, dest: Path) -> Path:
    """``source`` with float16 weights and activations, float32 input and output, checked, at ``dest``."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    with _quiet():
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    converted.producer_name = model.producer_name
    _save_checked(converted, dest)
    return dest


def calibration_reader(input_name: str, tensors: np.ndarray, batch: int = CALIBRATION_BATCH):
    """An ONNX Runtime CalibrationDataReader over preprocessed images, ``batch`` at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = [tensors[i : i + batch] for i in range(0, len(tensors), batch)]
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= len(self._batches):
                return None
            chunk = self._batches[self._next]
            self._next += 1
            return {input_name: np.ascontiguousarray(chunk, dtype=np.float32)}

        def rewind(self) -> None:
            self._next = 0

    return Reader()


def int8_options(recipe: str) -> dict:
    """``onnxruntime.quantization.quantize_static`` keyword arguments for ``recipe`` (see the module doc)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    if recipe not in INT8_RECIPES:
        raise ValueError(f"int8 recipe {recipe!r} is not one of {', '.join(INT8_RECIPES)}")
    common = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
    }
    if recipe == "cpu":
        return common | {
            "activation_type": QuantType.QUInt8,
            "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True},
        }
    return common | {
        "activation_type": QuantType.QInt8,
        "extra_options": {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "AddQDQPairToWeight": True,
            "DedicatedQDQPair": True,
            "QuantizeBias": False,
        },
    }


def quantize_int8(source: Path, dest: Path, calibration: np.ndarray, recipe: str = "cpu") -> Path:
    """``source`` as a static Q/DQ int8 model calibrated on ``calibration`` (N, 3, H, W), at ``dest``."""
    import onnx
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise PrecisionError("int8 calibration needs at least one image")
    options = int8_options(recipe)
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(dir=Path(dest).parent, prefix=".quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "quantized.onnx"
        with _quiet():
            # Shape inference and ONNX Runtime's basic graph optimisations (BatchNorm folded into
            # Conv), so that every Conv is quantized as one unit: what ONNX Runtime recommends.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
            quantize_static(
                str(prepared), str(quantized), calibration_reader(input_name, calibration), **options
            )
        model = onnx.load(str(quantized))
        model.producer_name = onnx.load(str(source), load_external_data=False).producer_name
        _save_checked(model, dest)
    return dest


def _save_checked(model, dest: Path) -> None:
    import onnx

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.building")
    try:
        onnx.save_model(model, str(staging), save_as_external_data=False)
        try:
            onnx.checker.check_model(str(staging), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise PrecisionError(f"{dest.name} does not pass onnx.checker: {exc}") from exc
        os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Agreement


@dataclass(frozen=True)
class Agreement:
    """How a variant's logits compare with fp32's on the same images."""

    images: int
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float


def _cpu_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_cpu(path: Path, tensors: np.ndarray, batch: int = 8) -> np.ndarray:
    """Logits of ``path`` on ``tensors`` in ONNX Runtime CPU, as float32."""
    session = _cpu_session(path)
    name = session.get_inputs()[0].name
    wants_half = session.get_inputs()[0].type == "tensor(float16)"
    outputs = []
    for start in range(0, len(tensors), batch):
        chunk = tensors[start : start + batch]
        (logits,) = session.run(None, {name: chunk.astype(np.float16 if wants_half else np.float32)})
        outputs.append(logits.astype(np.float32))
    return np.concatenate(outputs)


def compare(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Top-1 agreement and absolute logit differences of ``candidate`` against ``reference``."""
    if reference.shape != candidate.shape:
        raise PrecisionError(f"logits of shape {candidate.shape}, fp32 gives {reference.shape}")
    if not np.all(np.isfinite(candidate)):
        raise PrecisionError("the reduced-precision model produced non-finite logits")
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    return Agreement(
        images=len(reference),
        top1_agreement=float(np.mean(candidate.argmax(axis=1) == reference.argmax(axis=1))),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
    )


def agreement(fp32_path: Path, variant_path: Path, images: np.ndarray) -> Agreement:
    return compare(run_cpu(fp32_path, images), run_cpu(variant_path, images))


# ---------------------------------------------------------------------------------------------
# One variant of one model directory


def variant_up_to_date(
    model_dir: Path, manifest: Manifest, precision: str, recipe: str | None, split: ImageSplit
) -> bool:
    """Whether ``manifest`` already records this variant, made the same way from the current fp32 file."""
    for variant in manifest.precisions:
        if variant.precision != precision:
            continue
        path = Path(model_dir) / variant.onnx.file
        same_recipe = precision != "int8" or (
            variant.recipe == recipe and variant.calibration == f"MinMax on {split.calibration_description}"
        )
        return (
            variant.source_sha256 == manifest.onnx.sha256
            and same_recipe
            and variant.held_out == split.held_out_description
            and variant.tools == variant_tools()
            and file_matches(path, variant.onnx.sha256, variant.onnx.bytes)
        )
    return False


def build_variant(
    model_dir: Path,
    manifest: Manifest,
    precision: str,
    *,
    recipe: str = "cpu",
    split: ImageSplit | None = None,
) -> PrecisionVariant:
    """Make ``model.<precision>.onnx`` from ``model_dir``'s fp32 model, measure it, describe it.

    The caller records the returned variant in the manifest (:func:`with_variant`).
    """
    if precision not in VARIANT_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} has no reduced-precision file (one of {list(VARIANT_PRECISIONS)})"
        )
    model_dir = Path(model_dir)
    split = split or split_images()
    source = model_dir / manifest.onnx.file
    dest = model_dir / ONNX_FILES[precision]
    calibration, held_out = load_split(split, manifest.preprocessing)
    if precision == "fp16":
        convert_fp16(source, dest)
        calibration_note = None
        recipe_used = None
    else:
        quantize_int8(source, dest, calibration.tensors, recipe)
        calibration_note = f"MinMax on {calibration.description}"
        recipe_used = recipe
    measured = agreement(source, dest, held_out.tensors)
    return PrecisionVariant(
        precision=precision,  # type: ignore[arg-type]
        onnx=OnnxFile(
            file=dest.name, sha256=sha256_of(dest), bytes=dest.stat().st_size, opset=_opset_of(dest)
        ),
        top1_agreement=measured.top1_agreement,
        max_abs_logit_diff=measured.max_abs_logit_diff,
        mean_abs_logit_diff=measured.mean_abs_logit_diff,
        calibration=calibration_note,
        recipe=recipe_used,  # type: ignore[arg-type]
        held_out=held_out.description,
        source_sha256=manifest.onnx.sha256,
        tools=variant_tools(),
    )


def with_variant(manifest: Manifest, variant: PrecisionVariant) -> Manifest:
    """``manifest`` with ``variant`` replacing any earlier build of the same precision."""
    kept = [v for v in manifest.precisions if v.precision != variant.precision]
    order = {"fp16": 0, "int8": 1}
    precisions = sorted([*kept, variant], key=lambda v: order[v.precision])
    return manifest.model_copy(update={"precisions": precisions})


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def variant_tools() -> dict[str, str]:
    import onnx
    import onnxruntime

    tools = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxconverter_common

        tools["onnxconverter_common"] = onnxconverter_common.__version__
    except ImportError:  # only the fp16 conversion needs it
        pass
    return tools


def build_model_variants(name: str, args: argparse.Namespace) -> list[str]:
    """The reduced-precision variants in ``args.precision`` of the built model ``name``, each measured and
    recorded in its manifest as soon as it is made; a line per variant for the build's report."""
    from builder.report import variant_line

    model_dir = model_directory(args.out, name, args.version)
    # TensorRT takes only symmetric int8 (and no int32 biases): a GPU build quantizes for it.
    recipe = "tensorrt" if args.target in ("gpu", "jetson") else "cpu"
    split = split_images(
        args.calibration_images,
        calibration_count=args.calibration_count,
        held_out_count=args.held_out_count,
    )
    if args.calibration_images is None and "int8" in args.precision:
        log.warning(
            "%s: int8 calibration on the project's generated photos; real images (--calibration-images DIR) "
            "calibrate better",
            name,
        )
    lines = []
    for precision in args.precision:
        if precision == "fp32":
            continue
        manifest = Manifest.load(model_dir)
        if not args.force and variant_up_to_date(model_dir, manifest, precision, recipe, split):
            variant = next(v for v in manifest.precisions if v.precision == precision)
            lines.append(variant_line(name, variant, "up to date"))
            continue
        variant = build_variant(model_dir, manifest, precision, recipe=recipe, split=split)
        with_variant(Manifest.load(model_dir), variant).save(model_dir)
        lines.append(variant_line(name, variant, "built"))
    return lines
