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

How to read it: a table per model, then the verdict, one line per backend and precision: how many
models loaded, how many agree (top-1 agreement at least ``MIN_TOP1``, and max |logit difference| at
most ``LOGIT_RTOL`` times the largest reference logit; the worst model's figures and its tolerance are
shown), and images/s and p50 latency per batch at each batch size (the median over the models).
fp32 runs with TF32 off (unless ALLOW_TF32=true), so it should agree on every image, with logits close
to the CPU's; fp16 may flip near-ties; int8 differs more (compare with the agreement the build
recorded for the CPU in the manifest). Throughput should grow with the batch on a GPU; latency at
batch 1 is what one request pays. With random weights (no published checkpoint reachable) logits are
nearly flat, so top-1 flips under reduced precision are common: judge fp16/int8 on imagenet weights.

Exit status: 0 when every requested GPU backend loaded and every fp32 result agreed; 1 otherwise (the
verdict says which and why; fp16 and int8 agreement is reported, not enforced). The verdict, the
per-model results and the environment are also written as JSON (``--out``), to paste into an issue.
``--backends onnxruntime-cpu`` runs the whole procedure on a machine without a GPU (that is how its
tests run); it proves the procedure, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.text_table import text_table
from contract.zoo import DEFAULT_MODELS, split_precision

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")
DEFAULT_BATCH_SIZES = (1, 8, 32, 64)
IMAGE_COUNT = 32
# The bars a precision must clear to agree with ONNX Runtime CPU fp32: top-1 agreement, and max |logit
# difference| relative to the largest reference logit. fp32 without TF32 differs only by the order of
# its sums (far below 1e-3 of the largest logit); TF32 rounds inputs to a 10-bit mantissa and can come
# near it. fp16 keeps ~3 significant digits, int8 ~2.
MIN_TOP1 = {"fp32": 0.99, "fp16": 0.95, "int8": 0.90}
LOGIT_RTOL = {"fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}

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
    logit_tolerance: float | None = None  # the bar max_abs_logit_diff was held to
    agrees: bool | None = None
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
    from builder.tensorrt import tf32_allowed
    from contract.manifest import Manifest
    from service.core.runtimes import BackendUnavailable, RuntimeLoadError, RuntimeOptions, load_runtime

    base, _ = split_precision(name)
    model_dir = args.repository / base
    manifest = Manifest.load(model_dir)
    tensors = preprocess_all(test_images(args.images), manifest)
    reference = run_cpu(model_dir / manifest.onnx.file, tensors)
    # TF32 as the engines were built: both follow ALLOW_TF32 in the environment.
    options = RuntimeOptions(max_batch_size=max(args.batch_sizes), allow_tf32=tf32_allowed())
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
                judge(result, measured.top1_agreement, measured.max_abs_logit_diff, reference)
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
    text = text_table(lines).split("\n")
    reasons = [f"  {r.name} on {r.backend}: {r.reason}" for r in results if r.status != "ok"]
    if reasons:
        text += ["", "not run:", *reasons]
    return "\n".join(text)


def judge(result: Result, top1: float, max_diff: float, reference: np.ndarray) -> None:
    """Record the agreement with the reference and whether it clears the bars of its precision."""
    result.top1_agreement, result.max_abs_logit_diff = top1, max_diff
    result.logit_tolerance = LOGIT_RTOL[result.precision] * float(np.max(np.abs(reference)))
    result.agrees = top1 >= MIN_TOP1[result.precision] and max_diff <= result.logit_tolerance


def verdict_rows(results: list[Result], batch_sizes: list[int]) -> list[dict]:
    """One summary per backend and precision, in the order they were run."""
    rows = []
    for backend, precision in dict.fromkeys((r.backend, r.precision) for r in results):
        mine = [r for r in results if r.backend == backend and r.precision == precision]
        ran = [r for r in mine if r.status == "ok"]
        worst = min(ran, key=lambda r: (r.agrees, r.top1_agreement, -r.max_abs_logit_diff), default=None)
        if not ran:
            status = "unavailable" if all(r.status == "unavailable" for r in mine) else "failed"
        elif len(ran) < len(mine):
            status = "failed"
        elif all(r.agrees for r in ran):
            status = "agrees"
        else:
            status = "DISAGREES" if precision == "fp32" else "differs"
        speed = {}
        for size in batch_sizes:
            measured = [r.speed[size] for r in ran if size in r.speed]
            if measured:
                speed[size] = {
                    key: float(np.median([m[key] for m in measured])) for key in ("images_per_s", "p50_ms")
                }
        rows.append(
            {
                "backend": backend,
                "precision": precision,
                "status": status,
                "models": len(mine),
                "loaded": len(ran),
                "agreed": sum(bool(r.agrees) for r in ran),
                "min_top1_required": MIN_TOP1[precision],
                "logit_rtol": LOGIT_RTOL[precision],
                "worst_model": worst.model if worst else None,
                "worst_top1_agreement": worst.top1_agreement if worst else None,
                "worst_max_abs_logit_diff": worst.max_abs_logit_diff if worst else None,
                "worst_logit_tolerance": worst.logit_tolerance if worst else None,
                "median_speed": speed,
                "reason": next((f"{r.model}: {r.reason}" for r in mine if r.status != "ok"), ""),
            }
        )
    return rows


def format_verdict(rows: list[dict], batch_sizes: list[int]) -> str:
    """The verdict as one screen: a line per backend and precision, then why the others did not run."""
    sizes = "/".join(f"b{s}" for s in batch_sizes)
    header = ["backend", "prec", "loads", "agrees", "top-1", "max|diff| <= tol", f"img/s {sizes}"]
    header += [f"p50 ms {sizes}", "verdict"]
    lines = [header]
    for row in rows:
        line = [row["backend"], row["precision"], f"{row['loaded']}/{row['models']}"]
        if row["loaded"]:
            line += [
                f"{row['agreed']}/{row['loaded']}",
                f"{row['worst_top1_agreement']:.1%}",
                f"{row['worst_max_abs_logit_diff']:.1e} <= {row['worst_logit_tolerance']:.1e}",
            ]
            speed = row["median_speed"]
            line.append(
                "/".join(f"{speed[s]['images_per_s']:.0f}" if s in speed else "-" for s in batch_sizes)
            )
            line.append("/".join(f"{speed[s]['p50_ms']:.2f}" if s in speed else "-" for s in batch_sizes))
        else:
            line += ["-", "-", "-", "-", "-"]
        line.append(row["status"])
        lines.append(line)
    text = text_table(lines).split("\n")
    bars = ", ".join(
        f"{p} top-1 >= {MIN_TOP1[p]:.0%} and max|diff| <= {LOGIT_RTOL[p]:g} x max|logit|"
        for p in dict.fromkeys(row["precision"] for row in rows)
    )
    text.append(f"agreement with ONNX Runtime CPU fp32 (worst model shown): {bars}")
    text += [f"  {row['backend']} {row['precision']}: {row['reason']}" for row in rows if row["reason"]]
    return "\n".join(text)


def verdict(results: list[Result], backends: list[str]) -> list[str]:
    """What failed the self-test (empty: passed)."""
    problems = []
    for backend in backends:
        mine = [r for r in results if r.backend == backend]
        if not any(r.status == "ok" for r in mine):
            problems.append(f"{backend} did not run any model")
        for r in mine:
            if r.precision == "fp32" and r.status == "ok" and not r.agrees:
                problems.append(
                    f"{r.name} on {backend} disagrees with ONNX Runtime CPU: top-1 {r.top1_agreement:.1%} "
                    f"(needs {MIN_TOP1['fp32']:.0%}), max |logit diff| {r.max_abs_logit_diff:.1e} "
                    f"(tolerance {r.logit_tolerance:.1e})"
                )
            if r.status == "failed":
                problems.append(f"{r.name} on {backend} failed: {r.reason}")
    return problems


def environment() -> dict[str, str]:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    info["ALLOW_TF32"] = os.environ.get("ALLOW_TF32", "unset (false)")
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
    rows = verdict_rows(results, args.batch_sizes)
    print("\n" + format_verdict(rows, args.batch_sizes))
    problems = verdict(results, args.backends)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "environment": env,
        "verdict": rows,
        "results": [asdict(r) for r in results],
        "problems": problems,
        "passed": not problems,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.out}")
    if problems:
        print("SELF-TEST FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("SELF-TEST PASSED")
    # The defaults are a starting point; the batching that suits this GPU is measured, not guessed.
    print(
        "next: the serving configuration for this GPU, measured by the real server under load:\n"
        f"  python -m benchmarks.tune --repository {args.repository} --models {' '.join(args.models)}\n"
        "  then serve with MODEL_CONFIG=<the model_config.toml it writes>"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
