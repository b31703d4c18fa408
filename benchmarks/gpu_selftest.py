"""GPU / Jetson self-test: build the engines, check every GPU backend against ONNX Runtime CPU, benchmark.

    python -m benchmarks.gpu_selftest [--repository DIR] [--models NAME ...] [--target auto|gpu|jetson]
                                      [--precisions fp32 fp16 int8] [--backends B ...]
                                      [--batch-sizes 1 8 32 64] [--seconds S] [--no-build]

``make gpu-selftest`` runs it with the defaults. Steps:

1. ``build_engines.py --target gpu|jetson --precision fp32 fp16 int8 --max-batch <largest batch>``
   into the repository (skipped with ``--no-build``; what is up to date is not rebuilt).
2. The project's test images (contract.photos: the corpus plus generated photos), preprocessed as
   the server does, give the reference logits from ONNX Runtime CPU on ``model.onnx`` (fp32).
3. For each backend (native ``tensorrt``, ``onnxruntime-tensorrt``, ``onnxruntime-cuda``) and each
   precision: load it as the server would (``service.core.runtimes.load_runtime``), run the same images,
   and compare with the reference: top-1 agreement and max |logit difference|. A backend that does not
   load is reported with the reason, never replaced.
4. Throughput (images/s) and latency (ms per batch, p50 and p99) at each batch size.

How to read the table: ``fp32`` on a GPU backend should agree on top-1 for every image (TensorRT may
use TF32, so logits differ by ~1e-3, not 1e-6); ``fp16`` differs by ~1e-2 and may flip near-ties;
``int8`` differs more (compare with the agreement the build recorded for the CPU in the manifest).
Throughput should grow with the batch on a GPU; latency at batch 1 is what one request pays.
With random weights (no published checkpoint reachable) logits are nearly flat, so near-ties, and
top-1 flips under reduced precision, are common: judge int8/fp16 agreement on imagenet weights.

Exit status: 0 when every requested GPU backend loaded and agreed on fp32 for at least
``FP32_MIN_AGREEMENT`` of the images; 1 otherwise (the table says which and why). Results are also
written as JSON (``--out``). ``--backends onnxruntime-cpu`` runs the whole procedure on a machine
without a GPU (that is how its tests run); it proves the procedure, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from contract.zoo import DEFAULT_MODELS, split_precision

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")
DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
FP32_MIN_AGREEMENT = 0.99
IMAGE_COUNT = 32

log = logging.getLogger("gpu_selftest")


@dataclass
class Result:
    model: str
    backend: str
    precision: str
    status: str  # "ok", "unavailable", "failed"
    reason: str = ""
    runs_on: str = ""
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    # batch size -> {"images_per_s", "p50_ms", "p99_ms"}
    speed: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model if self.precision == "fp32" else f"{self.model}:{self.precision}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    parser.add_argument("--weights", default="auto", help="passed to build_engines.py")
    parser.add_argument("--target", choices=("auto", "gpu", "jetson"), default="auto")
    parser.add_argument(
        "--precisions", nargs="+", choices=("fp32", "fp16", "int8"), default=["fp32", "fp16", "int8"]
    )
    parser.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS), metavar="BACKEND")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(DEFAULT_BATCH_SIZES), metavar="N")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed run per batch size")
    parser.add_argument("--images", type=int, default=IMAGE_COUNT, help="test images for agreement")
    parser.add_argument("--no-build", action="store_true", help="use the repository as it is")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu_selftest.json"
    )
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.seconds <= 0 or args.images < 1:
        parser.error("batch sizes, --seconds and --images must be positive")
    return args


def resolve_target(target: str) -> str:
    if target != "auto":
        return target
    from builder.host import on_jetson

    return "jetson" if on_jetson() else "gpu"


def build(args: argparse.Namespace, target: str) -> int:
    import build_engines

    argv = ["--models", *args.models, "--weights", args.weights, "--out", str(args.repository)]
    argv += ["--target", target, "--precision", *args.precisions, "--max-batch", str(max(args.batch_sizes))]
    log.info("building: build_engines.py %s", " ".join(argv))
    return build_engines.main(argv)


def test_images(count: int) -> list[bytes]:
    """The project's test pictures: the decodable corpus entries first, then generated photos."""
    from contract.photos import make_corpus, photo_jpeg

    blobs = [data for name, data, _ in make_corpus() if not name.startswith(("pixel_", "tall_", "wide_"))]
    seed = 30_000
    while len(blobs) < count:
        blobs.append(photo_jpeg(500, 375, seed=seed))
        seed += 1
    return blobs[:count]


def preprocess_all(blobs: list[bytes], manifest) -> np.ndarray:
    from service.core.imaging import preprocess

    return np.stack(
        [preprocess(blob, manifest.preprocessing, max_image_pixels=100_000_000) for blob in blobs]
    )


def run_batched(runtime, tensors: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([runtime.run(tensors[i : i + batch]) for i in range(0, len(tensors), batch)])


def measure(runtime, sample: np.ndarray, batch_size: int, seconds: float) -> dict[str, float]:
    """Images/s and per-batch latency percentiles of ``runtime`` at ``batch_size``."""
    batch = np.ascontiguousarray(np.resize(sample, (batch_size, *sample.shape[1:])), dtype=np.float32)
    for _ in range(3):
        runtime.run(batch)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 5:
        started = time.perf_counter()
        runtime.run(batch)
        latencies.append(time.perf_counter() - started)
    latencies_ms = np.array(latencies) * 1e3
    return {
        "images_per_s": batch_size * len(latencies) / float(np.sum(latencies)),
        "p50_ms": float(np.percentile(latencies_ms, 50)),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
    }


def check_model(args: argparse.Namespace, name: str) -> list[Result]:
    from builder.precision import compare, run_cpu
    from contract.manifest import Manifest
    from service.core.runtimes import BackendUnavailable, RuntimeLoadError, RuntimeOptions, load_runtime

    base, _ = split_precision(name)
    model_dir = args.repository / base
    manifest = Manifest.load(model_dir)
    tensors = preprocess_all(test_images(args.images), manifest)
    reference = run_cpu(model_dir / manifest.onnx.file, tensors)
    options = RuntimeOptions(max_batch_size=max(args.batch_sizes))
    results = []
    for backend in args.backends:
        for precision in args.precisions:
            result = Result(base, backend, precision, "ok")
            results.append(result)
            try:
                runtime = load_runtime(
                    model_dir, manifest, backend=backend, precision=precision, options=options
                )
            except BackendUnavailable as exc:
                result.status, result.reason = "unavailable", str(exc)
                continue
            except RuntimeLoadError as exc:
                result.status, result.reason = "failed", str(exc)
                continue
            try:
                result.runs_on = " ".join(getattr(runtime, "providers", ()) or (runtime.name,))
                measured = compare(reference, run_batched(runtime, tensors))
                result.top1_agreement = measured.top1_agreement
                result.max_abs_logit_diff = measured.max_abs_logit_diff
                for size in args.batch_sizes:
                    result.speed[size] = measure(runtime, tensors, size, args.seconds)
            except Exception as exc:  # report and go on with the next backend
                result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                runtime.close()
    return results


def format_table(results: list[Result], batch_sizes: list[int]) -> str:
    header = ["model", "backend", "status", "top-1 agree", "max |diff|"]
    header += [f"b{size} img/s (p50 ms)" for size in batch_sizes]
    lines = [header]
    for r in results:
        row = [r.name, r.backend, r.status]
        if r.status == "ok":
            row += [f"{r.top1_agreement:.1%}", f"{r.max_abs_logit_diff:.2e}"]
            row += [
                f"{r.speed[s]['images_per_s']:.0f} ({r.speed[s]['p50_ms']:.2f})" if s in r.speed else "-"
                for s in batch_sizes
            ]
        else:
            row += ["-", "-"] + ["-"] * len(batch_sizes)
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    reasons = [f"  {r.name} on {r.backend}: {r.reason}" for r in results if r.status != "ok"]
    if reasons:
        text += ["", "not run:", *reasons]
    return "\n".join(text)


def verdict(results: list[Result], backends: list[str]) -> list[str]:
    """What failed the self-test (empty: passed)."""
    problems = []
    for backend in backends:
        mine = [r for r in results if r.backend == backend]
        if not any(r.status == "ok" for r in mine):
            problems.append(f"{backend} did not run any model")
        for r in mine:
            if r.precision == "fp32" and r.status == "ok" and r.top1_agreement < FP32_MIN_AGREEMENT:
                share = f"{r.top1_agreement:.1%}"
                problems.append(
                    f"{r.name} on {backend} agrees with ONNX Runtime CPU on {share} of the images"
                )
            if r.status == "failed":
                problems.append(f"{r.name} on {backend} failed: {r.reason}")
    return problems


def environment() -> dict[str, str]:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:
        pass
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = "not installed"
    try:
        from builder.host import detect_device
        from builder.tensorrt import TensorRTBuildError

        try:
            device = detect_device()
            info["gpu"] = f"{device.name} (sm {device.compute_capability})"
        except TensorRTBuildError as exc:
            info["gpu"] = str(exc)
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    gpu_requested = [b for b in args.backends if b in GPU_BACKENDS]
    if not args.no_build:
        target = resolve_target(args.target)
        code = build(args, target if gpu_requested else "cpu")
        if code != 0:
            log.error("gpu_selftest: the build failed (above: what is missing); nothing was checked")
            return code
    env = environment()
    log.info("environment: %s", ", ".join(f"{k}={v}" for k, v in env.items()))
    results: list[Result] = []
    for name in args.models:
        results.extend(check_model(args, name))
    print(format_table(results, args.batch_sizes))
    problems = verdict(results, args.backends)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "results": [asdict(r) for r in results], "problems": problems}
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.out}")
    if problems:
        print("SELF-TEST FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("SELF-TEST PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
