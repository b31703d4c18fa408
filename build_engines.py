"""Build the model repository: ONNX models, reduced-precision variants, TensorRT engines, manifests.

    python build_engines.py [--models all|NAME ...] [--weights auto|imagenet|random|PATH]
                            [--out model_repository] [--target cpu|gpu|jetson]
                            [--precision fp32|fp16|int8 ...] [--max-batch N] [--calibration-images DIR]
                            [--dla-core N] [--force]

For each model: resolve its weights, export ONNX with a dynamic batch axis, check it with onnx.checker
and against PyTorch through ONNX Runtime, and write ``<out>/<name>/{model.onnx, model.json}``. A model
whose outputs are up to date (same ONNX file, built from the same variant, weights, opset, tools and
model code) is skipped unless ``--force``.

``--precision fp16`` / ``int8`` (one or more) also write ``model.fp16.onnx`` / ``model.int8.onnx`` beside
it (builder/precision.py), with their agreement with fp32 on held-out images in the manifest; the
server serves them as ``<name>:fp16`` / ``<name>:int8``. ``--target gpu|jetson`` then builds a TensorRT
engine per precision into ``<name>/engines/`` on this machine's GPU (builder/tensorrt.py).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from builder.precision import PrecisionError
from builder.tensorrt import TensorRTBuildError
from contract import zoo
from contract.manifest import (
    Manifest,
    OnnxFile,
    PreprocessingSpec,
    TensorSpec,
    WeightsProvenance,
    sha256_of,
)

log = logging.getLogger("build_engines")

PARITY_TOLERANCE = 1e-4
ONNX_FILE = "model.onnx"
RANDOM_SEED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass
class Row:
    """One line of the closing table."""

    name: str
    status: str  # "built", "up to date", "kept" (exported elsewhere, no PyTorch here) or "FAILED"
    flops: int = 0
    params: int = 0
    mac: int = 0
    onnx_bytes: int = 0
    parity: float | None = None
    weights: str = ""
    error: str = ""
    # one line per reduced-precision variant and per engine, printed under the table
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "FAILED"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="build_engines.py",
        description="Export the zoo's models to ONNX (and TensorRT engines) with their manifests.",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(zoo.DEFAULT_MODELS),
        metavar="NAME",
        help=f"model names, or 'all' for every variant (default: {' '.join(zoo.DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--weights",
        default="auto",
        metavar="auto|imagenet|random|PATH",
        help="auto: published ImageNet weights if available, else random with a warning (default); "
        "imagenet: published weights or fail; random: random initialisation; PATH: a local state dict",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("model_repository"), help="model repository directory"
    )
    parser.add_argument(
        "--target",
        choices=("cpu", "gpu", "jetson"),
        default="cpu",
        help="cpu: ONNX models only; gpu / jetson: also TensorRT engines, built on this machine's GPU",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=zoo.PRECISIONS,
        default=["fp32"],
        metavar="fp32|fp16|int8",
        help="precisions to build (fp32 is always built: the others are made from it)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=32, metavar="N", help="largest batch of engine profiles"
    )
    parser.add_argument(
        "--calibration-images",
        type=Path,
        metavar="DIR",
        help="images for int8 calibration (default: the project's generated photos; real ones are better)",
    )
    parser.add_argument(
        "--calibration-count", type=int, default=32, metavar="N", help="images used for int8 calibration"
    )
    parser.add_argument(
        "--held-out-count", type=int, default=32, metavar="N", help="images the agreement is measured on"
    )
    parser.add_argument(
        "--dla-core", type=int, metavar="N", help="Jetson: build for DLA core N (GPU fallback on)"
    )
    parser.add_argument(
        "--contexts",
        type=int,
        default=2,
        metavar="N",
        help="engine profiles, one per batch the server runs at the same time",
    )
    parser.add_argument(
        "--workspace-mib", type=int, default=1024, metavar="MIB", help="TensorRT workspace cap"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when outputs are up to date")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    if args.calibration_count < 1 or args.held_out_count < 1:
        parser.error("--calibration-count and --held-out-count must be at least 1")
    if args.contexts < 1 or args.workspace_mib < 1:
        parser.error("--contexts and --workspace-mib must be at least 1")
    if args.dla_core is not None and args.target != "jetson":
        parser.error("--dla-core needs --target jetson (DLA cores are on Jetson modules)")
    args.precision = list(dict.fromkeys(args.precision))
    return args


def select_models(requested: list[str]) -> list[str]:
    """The model names to build, in order, without repeats; ``all`` expands to every variant."""
    names: list[str] = []
    for item in requested:
        expanded = zoo.all_variants() if item == "all" else [item]
        for name in expanded:
            zoo.parse(name)  # raises UnknownModelError with the zoo's explanation
            if zoo.split_precision(name)[1] != "fp32":
                raise zoo.UnknownModelError(f"{name!r}: choose the precision with --precision, not a suffix")
            if name not in names:
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Targets other than CPU/fp32: say exactly what is missing, never pretend


def _tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used here, or None."""
    try:
        import tensorrt
    except ImportError as exc:
        return (
            f"the TensorRT Python package 'tensorrt' is not importable ({exc}); install TensorRT 10 or 11 "
            "(pip install '.[gpu]' on x86-64, JetPack's python3-libnvinfer on a Jetson)"
        )
    from builder.tensorrt import check_version

    try:
        check_version(tensorrt.__version__)
    except TensorRTBuildError as exc:
        return str(exc)
    return None


def _nvidia_gpu_present() -> bool:
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    return shutil.which("nvidia-smi") is not None and any(Path("/dev").glob("nvidia[0-9]*"))


def _on_jetson() -> bool:
    if Path("/etc/nv_tegra_release").exists():
        return True
    model = Path("/proc/device-tree/model")
    try:
        return "jetson" in model.read_text(errors="ignore").lower()
    except OSError:
        return False


def check_target(args: argparse.Namespace, names: list[str]) -> list[str]:
    """Problems that prevent building for ``args.target`` here (empty: none), each saying what to do."""
    from builder.tensorrt import jetson_command

    problems: list[str] = []
    if args.target == "jetson" and not _on_jetson():
        command = jetson_command(
            names, args.precision, args.max_batch, args.dla_core, args.calibration_images
        )
        # What else this machine lacks does not matter: the build has to happen over there.
        return [
            "this machine is not a Jetson. Jetson engines must be built on the Jetson itself "
            "(TensorRT engines are specific to the GPU and TensorRT version that build them and "
            f"cannot be cross-built). Copy the repository there and run: {command}"
        ]
    if args.target in ("gpu", "jetson"):
        trt = _tensorrt_problem()
        if trt:
            problems.append(trt)
        if args.target == "gpu" and not _nvidia_gpu_present():
            problems.append(
                "no NVIDIA GPU found (no /proc/driver/nvidia/gpus entry or /dev/nvidia* device): run this "
                "on the machine whose GPU will serve the engines, with the NVIDIA driver installed"
            )
    if args.calibration_images is not None and "int8" in args.precision:
        from builder.precision import image_files

        try:
            image_files(args.calibration_images)
        except PrecisionError as exc:
            problems.append(str(exc))
    return problems


# ---------------------------------------------------------------------------------------------
# One model


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
        "models_code": _models_code_digest(),
    }


def _models_code_digest() -> str:
    # Random-weight builds are reproducible (fixed seed), so an edit of the architectures, the key mapping,
    # the exporter or the cost model is what changes the outputs without changing the variant or the
    # weights: fold that code into the up-to-date check. The summary CLI changes nothing built.
    import models
    from builder import export

    sources = [p for p in Path(models.__file__).parent.glob("*.py") if p.name != "__main__.py"]
    digest = hashlib.sha256()
    for source in sorted([*sources, Path(export.__file__)]):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _same_weights(a: WeightsProvenance, b: WeightsProvenance) -> bool:
    # The note is explanation (e.g. why auto fell back), not an input of the exported file.
    keys = ("source", "url", "path", "sha256")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def up_to_date(model_dir: Path, variant: str, weights: WeightsProvenance, opset: int, tools: dict) -> bool:
    """Whether ``model_dir`` already holds this exact build: same inputs, intact ONNX file."""
    try:
        manifest = Manifest.load(model_dir)
    except (OSError, ValueError):
        return False
    onnx_path = model_dir / manifest.onnx.file
    return (
        manifest.variant == variant
        and _same_weights(manifest.weights, weights)
        and manifest.onnx.opset == opset
        and manifest.tools == tools
        and onnx_path.is_file()
        and onnx_path.stat().st_size == manifest.onnx.bytes
        and sha256_of(onnx_path) == manifest.onnx.sha256
    )


def _weights_label(weights: WeightsProvenance) -> str:
    if weights.source == "imagenet":
        return f"imagenet ({weights.sha256[:8]})" if weights.sha256 else "imagenet"
    if weights.source == "file":
        return f"file {Path(weights.path or '').name}"
    return "RANDOM"


def build_model(name: str, args: argparse.Namespace, opset: int, tools: dict) -> Row:
    """Export, check and describe one model; skipped when its outputs are up to date."""
    import torch

    import models
    from builder import export
    from models import complexity, weights

    spec = zoo.parse(name)
    model_dir = args.out / name
    state_dict, provenance = weights.resolve(name, args.weights)
    if provenance["source"] == "random":
        extra = f"torch seed {RANDOM_SEED}, BatchNorm statistics calibrated on random input"
        provenance["note"] = "; ".join(filter(None, [provenance["note"], extra]))
    provenance_model = WeightsProvenance(**provenance)
    cost = complexity.count(spec.variant)
    row = Row(
        name=name,
        status="built",
        flops=cost.flops,
        params=cost.params,
        mac=cost.memory_access_cost,
        weights=_weights_label(provenance_model),
    )

    if not args.force and up_to_date(model_dir, spec.variant, provenance_model, opset, tools):
        manifest = Manifest.load(model_dir)
        row.status, row.onnx_bytes, row.parity = (
            "up to date",
            manifest.onnx.bytes,
            manifest.parity_max_abs_diff,
        )
        return row

    torch.manual_seed(RANDOM_SEED)
    module = models.create(spec.variant)
    if state_dict is not None:
        module.load_state_dict(state_dict, strict=True)
    else:
        weights.calibrate_batchnorm(module, spec.input_shape, seed=RANDOM_SEED)
    module.eval()

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".{ONNX_FILE}.building"
    try:
        export.export_onnx(module, spec, staging, opset=opset)
        row.parity = export.parity(module, staging, batch_sizes=(1, 4))
        if row.parity > PARITY_TOLERANCE:
            row.status = "FAILED"
            row.error = f"ONNX Runtime and PyTorch differ by {row.parity:.2e} > {PARITY_TOLERANCE:.0e}"
            return row
        final = model_dir / ONNX_FILE
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)

    row.onnx_bytes = final.stat().st_size
    manifest = Manifest(
        name=name,
        variant=spec.variant,
        family=spec.family,
        knobs=spec.knobs,
        input_size=spec.resolution,
        input=TensorSpec(name=export.INPUT_NAME, shape=[export.BATCH_DIM, *spec.input_shape]),
        output=TensorSpec(name=export.OUTPUT_NAME, shape=[export.BATCH_DIM, len(zoo.imagenet_labels())]),
        preprocessing=PreprocessingSpec(**spec.preprocessing.to_dict()),
        flops=cost.flops,
        params=cost.params,
        memory_access_cost=cost.memory_access_cost,
        fp32_bytes=cost.fp32_bytes,
        weights=provenance_model,
        labels=list(zoo.imagenet_labels()),
        onnx=OnnxFile(file=ONNX_FILE, sha256=sha256_of(final), bytes=row.onnx_bytes, opset=opset),
        parity_max_abs_diff=row.parity,
        tools=tools,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest = _carry_over(model_dir, manifest)
    manifest.save(model_dir)
    return row


def existing_model(name: str, args: argparse.Namespace) -> Row:
    """A model exported elsewhere (no PyTorch here): its manifest and intact ONNX file, or FAILED."""
    model_dir = args.out / name
    row = Row(name=name, status="FAILED")
    try:
        manifest = Manifest.load(model_dir)
    except (OSError, ValueError) as exc:
        row.error = (
            f"no usable {model_dir}/model.json ({type(exc).__name__}) and PyTorch is not installed to export "
            "it: build it where PyTorch is (pip install '.[build]') and copy the model directory here"
        )
        return row
    onnx_path = model_dir / manifest.onnx.file
    if not onnx_path.is_file() or sha256_of(onnx_path) != manifest.onnx.sha256:
        row.error = (
            f"{onnx_path} is missing or does not match its manifest, and PyTorch is not installed to "
            "re-export it"
        )
        return row
    row.status, row.flops, row.params, row.mac = (
        "kept",
        manifest.flops,
        manifest.params,
        manifest.memory_access_cost,
    )
    row.onnx_bytes, row.parity = manifest.onnx.bytes, manifest.parity_max_abs_diff
    row.weights = _weights_label(manifest.weights)
    return row


def _carry_over(model_dir: Path, manifest: Manifest) -> Manifest:
    """Keep the earlier manifest's variants and engines that were made from this very ONNX file
    (a forced rebuild of a seeded export reproduces it); drop the rest, which are stale."""
    try:
        previous = Manifest.load(model_dir)
    except (OSError, ValueError):
        return manifest
    variants = [v for v in previous.precisions if v.source_sha256 == manifest.onnx.sha256]
    sources = {manifest.onnx.sha256, *(v.onnx.sha256 for v in variants)}
    engines = [e for e in previous.engines if e.source_sha256 in sources]
    return manifest.model_copy(update={"precisions": variants, "engines": engines})


def build_precisions(name: str, args: argparse.Namespace, row: Row) -> None:
    """The reduced-precision variants of one built model, measured and recorded in its manifest."""
    from builder import precision as reduced

    model_dir = args.out / name
    # TensorRT takes only symmetric int8 (and no int32 biases): a GPU build quantizes for it.
    recipe = "tensorrt" if args.target in ("gpu", "jetson") else "cpu"
    split = reduced.split_images(
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
    for precision in args.precision:
        if precision == "fp32":
            continue
        manifest = Manifest.load(model_dir)
        if not args.force and reduced.variant_up_to_date(model_dir, manifest, precision, recipe, split):
            variant = next(v for v in manifest.precisions if v.precision == precision)
            row.details.append(_variant_line(name, variant, "up to date"))
            continue
        variant = reduced.build_variant(model_dir, manifest, precision, recipe=recipe, split=split)
        reduced.with_variant(Manifest.load(model_dir), variant).save(model_dir)
        row.details.append(_variant_line(name, variant, "built"))


def _variant_line(name: str, variant, status: str) -> str:
    recipe = f", {variant.recipe} recipe" if variant.recipe else ""
    return (
        f"{name}:{variant.precision} {status}: {variant.onnx.file} "
        f"({variant.onnx.bytes / 1e6:.2f} MB{recipe}); "
        f"vs fp32 on {variant.held_out}: top-1 agreement {variant.top1_agreement:.1%}, "
        f"max |logit diff| {variant.max_abs_logit_diff:.3g}, mean {variant.mean_abs_logit_diff:.3g}"
    )


def build_tensorrt(name: str, args: argparse.Namespace, row: Row, device, trt_version: str) -> None:
    """One TensorRT engine per requested precision for one built model, recorded in its manifest."""
    from builder import tensorrt as trtb

    model_dir = args.out / name
    for precision in args.precision:
        manifest = Manifest.load(model_dir)
        variant = next((v for v in manifest.precisions if v.precision == precision), None)
        plan = trtb.plan_build(
            trt_version,
            precision,
            max_batch=args.max_batch,
            dla_core=args.dla_core,
            contexts=args.contexts,
            workspace_mib=args.workspace_mib,
            int8_recipe=variant.recipe if variant is not None else None,
        )
        built = trtb.build_engine(
            model_dir,
            manifest,
            plan,
            device,
            timing_cache_dir=args.out / trtb.TIMING_CACHE_DIR,
            force=args.force,
        )
        trtb.with_engine(Manifest.load(model_dir), built.record).save(model_dir)
        status = "up to date" if built.skipped else f"built in {built.seconds:.0f} s"
        line = f"{name} {precision} engine {status}: {built.record.file} (from {plan.onnx_file})"
        if built.record.gpu_fallback_layers is not None:
            fallback = built.record.gpu_fallback_layers
            line += f"; DLA core {plan.dla_core}, {len(fallback)} layer(s) fall back to the GPU"
            if fallback:
                line += ": " + ", ".join(fallback[:20]) + (" ..." if len(fallback) > 20 else "")
        row.details.append(line)


# ---------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[Row]) -> str:
    header = ("model", "status", "MFLOPs", "params (M)", "MAC (M)", "ONNX (MB)", "max |diff|", "weights")
    lines = [header]
    for r in rows:
        counted = r.flops > 0
        lines.append(
            (
                r.name,
                r.status,
                f"{r.flops / 1e6:.1f}" if counted else "-",
                f"{r.params / 1e6:.3f}" if counted else "-",
                f"{r.mac / 1e6:.1f}" if counted else "-",
                f"{r.onnx_bytes / 1e6:.2f}" if r.onnx_bytes else "-",
                f"{r.parity:.1e}" if r.parity is not None else "-",
                r.weights,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        names = select_models(args.models)
    except zoo.UnknownModelError as exc:
        log.error("error: %s", exc)
        return EXIT_USAGE

    problems = check_target(args, names)
    if problems:
        for problem in problems:
            log.error(
                "error: cannot build --target %s --precision %s: %s",
                args.target,
                " ".join(args.precision),
                problem,
            )
        return EXIT_USAGE if args.target == "cpu" else EXIT_FAILED

    from builder import export
    from models import weights

    device, trt_version = None, ""
    if args.target in ("gpu", "jetson"):
        import tensorrt

        from builder.tensorrt import detect_device

        try:
            device = detect_device()
        except TensorRTBuildError as exc:
            log.error("error: cannot build --target %s: %s", args.target, exc)
            return EXIT_FAILED
        trt_version = tensorrt.__version__
        log.info(
            "TensorRT %s on %s (compute capability %s)", trt_version, device.name, device.compute_capability
        )

    opset = export.DEFAULT_OPSET
    # The GPU and Jetson images carry the exported ONNX models but no PyTorch: there, the models found
    # in --out are used as they are (checked against their manifests) and only what comes after the
    # export (precision variants, engines) is built.
    exporting = importlib.util.find_spec("torch") is not None
    if not exporting:
        log.warning("PyTorch is not installed: using the exported models found in %s as they are", args.out)
    tools = tool_versions() if exporting else {}
    rows: list[Row] = []
    failures = (
        weights.WeightsError,
        export.ExportError,
        PrecisionError,
        TensorRTBuildError,
        ImportError,  # a build-only package missing here (onnxconverter-common, onnx): named in the message
        OSError,
        RuntimeError,
        ValueError,
    )
    for index, name in enumerate(names, start=1):
        started = time.perf_counter()
        prefix = f"[{index}/{len(names)}] {name}"
        try:
            row = build_model(name, args, opset, tools) if exporting else existing_model(name, args)
            if row.ok:
                build_precisions(name, args, row)
                if device is not None:
                    build_tensorrt(name, args, row, device, trt_version)
        except failures as exc:
            row = Row(name=name, status="FAILED", error=f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
        if row.status in ("up to date", "kept"):
            log.info("%s: %s (%s)", prefix, row.status, args.out / name)
        elif row.ok:
            built = f"{args.out / name / ONNX_FILE} ({row.onnx_bytes / 1e6:.2f} MB, parity {row.parity:.1e}"
            log.info("%s: built %s, weights %s) in %.1f s", prefix, built, row.weights, seconds)
        else:
            log.error("%s: FAILED: %s", prefix, row.error)
        rows.append(row)

    print(format_table(rows))
    for row in rows:
        for line in row.details:
            print(line)
    failed = [r.name for r in rows if not r.ok]
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
