"""TensorRT engines from the model repository's ONNX files (``build_engines.py --target gpu|jetson``).

What is decided here, and why:

* **TensorRT 10 vs 11.** TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``,
  ``BuilderFlag.INT8``) and the int8 calibrators: every network is strongly typed, so the precision
  comes from the ONNX file. On 11.x an fp16 engine is built from ``model.fp16.onnx`` and an int8
  engine from the Q/DQ ``model.int8.onnx``, with no precision flags. On 10.x the classic route is
  kept: fp16 = ``model.onnx`` + ``BuilderFlag.FP16`` (TensorRT keeps the layers that need it in
  fp32), int8 = the Q/DQ model + ``BuilderFlag.INT8`` (explicit quantization: the scales come from the
  Q/DQ nodes; TensorRT 10 refuses a Q/DQ network without the flag) + ``BuilderFlag.FP16`` for the
  layers outside Q/DQ pairs. :func:`plan_build` makes that choice; it is pure, so it is tested here.
* **Profiles.** The ONNX batch axis is dynamic. Each engine gets ``contexts`` identical profiles
  (min 1, opt ``min(max_batch, GPU_OPT_BATCH)``, the batch the server runs on a GPU by default, max
  ``--max-batch``): an execution context that runs while another does needs a profile of its own, and
  the server runs ``contexts`` batches at a time.
  DLA has no dynamic shapes, so a DLA engine is static: min = opt = max = ``--max-batch``.
* **Timing cache.** One per TensorRT version and GPU, beside the engines, loaded before each build and
  saved after it, so the second model (and every rebuild) skips most kernel timing.
* **Workspace.** ``MemoryPoolType.WORKSPACE`` is capped (``--workspace-mib``) so that a build on a
  small Jetson does not take the memory the server needs.
* **Names.** An engine is valid only for the TensorRT version, the GPU (compute capability) and the
  DLA core it was built for, at its precision and batch profile; the file name says all of it, e.g.
  ``engines/fp16_b1-16-32x2_trt10.8.0.43_nvidia-l4_sm89.plan``.
* **DLA (Jetson).** ``--dla-core N`` sets the default device to DLA core N with GPU fallback on; the
  layers DLA cannot run are listed (``IBuilderConfig.can_run_on_DLA``) in the manifest and the log.
  DLA runs fp16 and int8 only. TensorRT 11.0 to 11.4.0 have no DLA on Jetson (11.4.1 brings it back
  on AGX Orin with JetPack 7.2.2); JetPack 6 ships TensorRT 10, which has it. :func:`dla_problem`
  says so from the version before anything is built; a device without DLA cores (Thor, x86 GPUs) is
  refused when the build starts.
* **TF32.** TensorRT's builder allows TF32 by default (``BuilderFlag.TF32`` is set in a new builder
  config, per TensorRT's developer guide): fp32 convolutions then round their inputs to a 10-bit
  mantissa, and logits drift from the CPU's by far more than fp32 rounding. An fp32 engine is built
  with the flag cleared unless ``ALLOW_TF32`` is true in the environment (the server's variable of
  the same name, so one config map sets both); reduced-precision engines keep TensorRT's default.
  An engine built before ``ALLOW_TF32`` changed is not rebuilt by itself: build with ``--force``.

Nothing here has run on a GPU yet: the calls follow TensorRT's Python API reference and migration
guides, and ``make gpu-selftest`` is the check to run on real hardware.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from contract.gpu import GPU_OPT_BATCH, GpuDevice
from contract.layout import model_directory
from contract.manifest import ENGINES_DIR, ONNX_FILES, Engine, Manifest, file_matches, sha256_of

log = logging.getLogger(__name__)

SUPPORTED_MAJORS = (10, 11)
# Under the model repository: one timing cache per TensorRT version and GPU, shared by every model.
TIMING_CACHE_DIR = ".timing-cache"
DEFAULT_CONTEXTS = 2
DEFAULT_WORKSPACE_MIB = 1024
# First TensorRT 11 release with DLA on Jetson (AGX Orin, JetPack 7.2.2 or later).
TRT11_FIRST_JETSON_DLA = (11, 4, 1)
ALLOW_TF32_VARIABLE = "ALLOW_TF32"
_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"", "0", "false", "no", "off", "f", "n"})


class TensorRTBuildError(RuntimeError):
    """An engine cannot be built as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Pure decisions


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> ``(10, 8, 0, 43)``; trailing non-numeric parts (``"11.4.1.post1"``) dropped."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    if not parts:
        raise TensorRTBuildError(f"cannot read TensorRT version {version!r}")
    return tuple(parts)


def trt_major(version: str) -> int:
    return version_tuple(version)[0]


def check_version(version: str) -> int:
    """The major version, if this code supports it; TensorRTBuildError otherwise."""
    major = trt_major(version)
    if major not in SUPPORTED_MAJORS:
        raise TensorRTBuildError(
            f"TensorRT {version} is not supported: this build step targets TensorRT 10.x and 11.x "
            "(name-based tensor I/O, execute_async_v3); install one of those"
        )
    return major


def dla_problem(trt_version: str) -> str | None:
    """Why TensorRT ``trt_version`` cannot build for DLA on a Jetson, or None."""
    major = trt_major(trt_version)
    if major == 11 and version_tuple(trt_version)[:3] < TRT11_FIRST_JETSON_DLA:
        return (
            f"TensorRT {trt_version} has no DLA support on Jetson (TensorRT 11.0 to 11.4.0 dropped it; "
            "11.4.1 with JetPack 7.2.2 brings it back on AGX Orin, and JetPack 6's TensorRT 10 has it): "
            "build without --dla-core, or use one of those versions"
        )
    return None


def tf32_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """``ALLOW_TF32`` from the environment, read as the server reads it (unset: false)."""
    value = environ.get(ALLOW_TF32_VARIABLE, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise TensorRTBuildError(f"{ALLOW_TF32_VARIABLE}={environ[ALLOW_TF32_VARIABLE]!r}: use true or false")


@dataclass(frozen=True)
class Profile:
    """Batch sizes of an optimization profile, and how many identical profiles the engine carries."""

    min: int
    opt: int
    max: int
    count: int = 1

    @property
    def label(self) -> str:
        return f"b{self.min}-{self.opt}-{self.max}x{self.count}"

    def shapes(self, chw: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``IOptimizationProfile.set_shape``."""
        return (self.min, *chw), (self.opt, *chw), (self.max, *chw)


def batch_profile(max_batch: int, *, dla: bool = False, contexts: int = DEFAULT_CONTEXTS) -> Profile:
    """The profile for ``--max-batch``: 1..max (opt at the server's default batch), or static for DLA."""
    if max_batch < 1:
        raise ValueError("max batch must be at least 1")
    if contexts < 1:
        raise ValueError("an engine needs at least one execution context")
    if dla:
        return Profile(max_batch, max_batch, max_batch, contexts)
    return Profile(1, min(max_batch, GPU_OPT_BATCH), max_batch, contexts)


def engine_file_name(
    precision: str, profile: Profile, trt_version: str, device: GpuDevice, dla_core: int | None = None
) -> str:
    """Everything that makes an engine valid, in its name (see the module doc)."""
    dla = f"_dla{dla_core}" if dla_core is not None else ""
    return f"{precision}_{profile.label}_trt{trt_version}_{device.slug}_{device.sm}{dla}.plan"


def timing_cache_name(trt_version: str, device: GpuDevice) -> str:
    return f"timing_trt{trt_version}_{device.slug}_{device.sm}.cache"


@dataclass(frozen=True)
class BuildPlan:
    """What to parse and which switches to set for one engine; made by :func:`plan_build`."""

    precision: str
    trt_version: str
    onnx_file: str
    builder_flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members
    profile: Profile
    workspace_bytes: int
    dla_core: int | None = None
    strongly_typed: bool = False  # informational: 11.x networks always are
    notes: tuple[str, ...] = field(default=())
    # Names of tensorrt.BuilderFlag members to clear from the builder config's defaults.
    cleared_flags: tuple[str, ...] = ()


def plan_build(
    trt_version: str,
    precision: str,
    *,
    max_batch: int,
    dla_core: int | None = None,
    contexts: int = DEFAULT_CONTEXTS,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    int8_recipe: str | None = None,
    allow_tf32: bool = False,
) -> BuildPlan:
    """How to build a ``precision`` engine with TensorRT ``trt_version`` (10.x or 11.x)."""
    major = check_version(trt_version)
    if precision not in ONNX_FILES:
        raise TensorRTBuildError(f"unknown precision {precision!r}")
    if precision == "int8" and int8_recipe not in (None, "tensorrt"):
        raise TensorRTBuildError(
            f"{ONNX_FILES['int8']} was quantized with the {int8_recipe!r} recipe (asymmetric uint8 "
            "activations, for ONNX Runtime's CPU kernels), which TensorRT cannot build: rebuild it for "
            "TensorRT with build_engines.py --target gpu --precision int8"
        )
    dla = dla_core is not None
    if dla:
        if dla_core < 0:
            raise TensorRTBuildError(f"--dla-core must be 0 or more, got {dla_core}")
        if precision == "fp32":
            raise TensorRTBuildError(
                "DLA runs fp16 and int8 only: use --precision fp16 or int8 with --dla-core"
            )
        problem = dla_problem(trt_version)
        if problem:
            raise TensorRTBuildError(problem)
    flags: list[str] = []
    notes: list[str] = []
    if major >= 11:
        onnx_file = ONNX_FILES[precision]
        notes.append("TensorRT 11: strongly typed network, precision taken from the ONNX file")
    else:
        # 10.x: weak typing. fp16 lets TensorRT choose fp16 kernels per layer from the fp32 graph;
        # int8 builds the Q/DQ graph (explicit quantization) and needs the INT8 flag to accept it.
        onnx_file = ONNX_FILES["int8" if precision == "int8" else "fp32"]
        if precision == "fp16":
            flags.append("FP16")
        elif precision == "int8":
            flags += ["INT8", "FP16"]
    if dla:
        flags.append("GPU_FALLBACK")
    cleared = ("TF32",) if precision == "fp32" and not allow_tf32 else ()
    return BuildPlan(
        precision=precision,
        trt_version=trt_version,
        onnx_file=onnx_file,
        builder_flags=tuple(flags),
        profile=batch_profile(max_batch, dla=dla, contexts=contexts),
        workspace_bytes=workspace_mib * 1024 * 1024,
        dla_core=dla_core,
        strongly_typed=major >= 11,
        notes=tuple(notes),
        cleared_flags=cleared,
    )


def engine_up_to_date(model_dir: Path, record: Engine, source_sha256: str) -> bool:
    # An engine recorded without its size is rebuilt rather than trusted on its digest alone.
    return (
        record.source_sha256 == source_sha256
        and record.bytes is not None
        and file_matches(Path(model_dir) / record.file, record.sha256, record.bytes)
    )


def with_engine(manifest: Manifest, engine: Engine) -> Manifest:
    """``manifest`` listing ``engine``, replacing any earlier engine of the same file name."""
    kept = [e for e in manifest.engines if e.file != engine.file]
    return manifest.model_copy(update={"engines": [*kept, engine]})


def jetson_command(
    names: list[str],
    precisions: list[str],
    max_batch: int,
    dla_core: int | None = None,
    calibration_images: Path | None = None,
) -> str:
    """The command to run on the Jetson itself for what was asked here."""
    parts = ["python build_engines.py --target jetson --models", *names, "--precision", *precisions]
    parts += ["--max-batch", str(max_batch)]
    if dla_core is not None:
        parts += ["--dla-core", str(dla_core)]
    if calibration_images is not None:
        parts += ["--calibration-images", shlex.quote(str(calibration_images))]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Building (needs TensorRT and a GPU)


@dataclass
class BuiltEngine:
    record: Engine
    seconds: float
    skipped: bool = False


def build_engine(
    model_dir: Path,
    manifest: Manifest,
    plan: BuildPlan,
    device: GpuDevice,
    *,
    timing_cache_dir: Path,
    force: bool = False,
) -> BuiltEngine:
    """Build (or keep, when up to date) one engine of ``model_dir``; the caller records it."""
    import time

    import tensorrt as trt

    model_dir = Path(model_dir)
    source = model_dir / plan.onnx_file
    if not source.is_file():
        raise TensorRTBuildError(f"{source} is missing (build --precision {plan.precision} first)")
    source_sha = sha256_of(source)
    name = engine_file_name(plan.precision, plan.profile, plan.trt_version, device, plan.dla_core)
    relative = f"{ENGINES_DIR}/{name}"
    existing = next((e for e in manifest.engines if e.file == relative), None)
    if existing is not None and not force and engine_up_to_date(model_dir, existing, source_sha):
        return BuiltEngine(existing, 0.0, skipped=True)

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in 10.x; 11.x is strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT cannot parse {source.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    fallback: list[str] | None = None
    if plan.dla_core is not None:
        cores = builder.num_DLA_cores
        if plan.dla_core >= cores:
            raise TensorRTBuildError(
                f"--dla-core {plan.dla_core}: this device has {cores} DLA core(s) (Jetson Orin Nano, "
                "Thor and discrete GPUs have none): build without --dla-core"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        fallback = [
            network.get_layer(i).name
            for i in range(network.num_layers)
            if not config.can_run_on_DLA(network.get_layer(i))
        ]

    input_tensor = network.get_input(0)
    chw = tuple(int(d) for d in input_tensor.shape[1:])
    for _ in range(plan.profile.count):
        profile = builder.create_optimization_profile()
        profile.set_shape(input_tensor.name, *plan.profile.shapes(chw))
        config.add_optimization_profile(profile)

    cache_path = Path(timing_cache_dir) / timing_cache_name(plan.trt_version, device)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("%s does not fit this GPU/TensorRT; building without it", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT could not build the {plan.precision} engine for {manifest.name}")
    data = bytes(serialized)
    # A plan that this TensorRT cannot load back is not worth writing.
    if trt.Runtime(logger).deserialize_cuda_engine(data) is None:
        raise TensorRTBuildError(f"the {plan.precision} engine for {manifest.name} does not deserialize")

    _write_atomically(model_dir / relative, data)
    _write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))
    record = Engine(
        file=relative,
        precision=plan.precision,  # type: ignore[arg-type]
        tensorrt_version=plan.trt_version,
        device_name=device.name,
        compute_capability=device.compute_capability,
        min_batch=plan.profile.min,
        opt_batch=plan.profile.opt,
        max_batch=plan.profile.max,
        dla_core=plan.dla_core,
        sha256=sha256_of(model_dir / relative),
        bytes=len(data),
        profiles=plan.profile.count,
        source_onnx=plan.onnx_file,
        source_sha256=source_sha,
        gpu_fallback_layers=fallback,
    )
    return BuiltEngine(record, time.perf_counter() - started)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def build_model_engines(
    name: str, args: argparse.Namespace, device: GpuDevice, trt_version: str
) -> list[str]:
    """One engine per precision in ``args.precision`` for the built model ``name``, each recorded in its
    manifest as soon as it is built; a line per engine for the build's report."""
    from builder.report import engine_line

    model_dir = model_directory(args.out, name, args.version)
    lines = []
    allow_tf32 = tf32_allowed()
    for precision in args.precision:
        manifest = Manifest.load(model_dir)
        variant = next((v for v in manifest.precisions if v.precision == precision), None)
        plan = plan_build(
            trt_version,
            precision,
            max_batch=args.max_batch,
            dla_core=args.dla_core,
            contexts=args.contexts,
            workspace_mib=args.workspace_mib,
            int8_recipe=variant.recipe if variant is not None else None,
            allow_tf32=allow_tf32,
        )
        built = build_engine(
            model_dir,
            manifest,
            plan,
            device,
            timing_cache_dir=args.out / TIMING_CACHE_DIR,
            force=args.force,
        )
        with_engine(Manifest.load(model_dir), built.record).save(model_dir)
        lines.append(engine_line(name, built, plan))
    return lines
