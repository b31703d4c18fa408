"""Build the model repository: ONNX models, reduced-precision variants, TensorRT engines, manifests.

    python build_engines.py [--models all|NAME ...] [--weights auto|imagenet|random|PATH]
                            [--out model_repository] [--target cpu|gpu|jetson]
                            [--precision fp32|fp16|int8 ...] [--max-batch N] [--calibration-images DIR]
                            [--dla-core N] [--version N] [--force]

For each model: resolve its weights, export ONNX with a dynamic batch axis, check it with onnx.checker
and against PyTorch through ONNX Runtime, and write ``<out>/<name>/{model.onnx, model.json}`` (with
``--version N``: ``<out>/<name>/N/``, a version the server serves beside the others). A model
whose outputs are up to date (same ONNX file, built from the same variant, weights, opset, tools and
model code) is skipped unless ``--force``.

``--precision fp16`` / ``int8`` (one or more) also write ``model.fp16.onnx`` / ``model.int8.onnx`` beside
it (builder/precision.py), with their agreement with fp32 on held-out images in the manifest; the
server serves them as ``<name>:fp16`` / ``<name>:int8``. ``--target gpu|jetson`` then builds a TensorRT
engine per precision into ``<name>/engines/`` on this machine's GPU (builder/tensorrt.py).

This file is the command line only: what the machine can build (builder/host.py), one model
(builder/onnx_model.py, builder/staleness.py, builder/weights.py) and the report (builder/report.py)
live in the builder package.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

from builder.host import check_target
from builder.precision import PrecisionError, build_model_variants
from builder.report import Row, format_table
from builder.tensorrt import TensorRTBuildError, build_model_engines
from contract import zoo
from contract.layout import model_directory
from contract.manifest import ONNX_FILES

log = logging.getLogger("build_engines")

EXIT_FAILED = 1
EXIT_USAGE = 2


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
        "--version",
        type=int,
        default=None,
        metavar="N",
        help="write version N of each model (<out>/<name>/N/, an integer >= 1); default: <out>/<name>/, "
        "which the server serves as version 1",
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
    if args.version is not None and args.version < 1:
        parser.error("--version must be an integer >= 1")
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

    from builder import export, weights
    from builder.onnx_model import build_model, existing_model
    from builder.staleness import tool_versions

    device, trt_version = None, ""
    if args.target in ("gpu", "jetson"):
        import tensorrt

        from builder.host import detect_device

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
                row.details += build_model_variants(name, args)
                if device is not None:
                    row.details += build_model_engines(name, args, device, trt_version)
        except failures as exc:
            row = Row(name=name, status="FAILED", error=f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - started
        if row.status in ("up to date", "kept"):
            log.info("%s: %s (%s)", prefix, row.status, model_directory(args.out, name, args.version))
        elif row.ok:
            onnx_path = model_directory(args.out, name, args.version) / ONNX_FILES["fp32"]
            built = f"{onnx_path} ({row.onnx_bytes / 1e6:.2f} MB, parity {row.parity:.1e}"
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
