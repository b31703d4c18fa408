"""In-process speed of each precision build beside fp32: the hook ``make bench`` calls for variants.

    python -m benchmarks.precision_speed [--repository DIR] [--models NAME ...] [--backend B]
                                         [--batch N] [--threads N] [--repeats N] [--rounds N]

For every model in the repository with a ``model.fp16.onnx`` / ``model.int8.onnx`` recorded in its
manifest, each precision is loaded the way the server loads it (``service.core.runtimes.load_runtime``,
same backend, same thread settings) and timed on the same preprocessed photo: the median latency of
``repeats`` runs, taken ``rounds`` times in interleaved order (fp32, fp16, int8, fp32, ...) so that a
noisy neighbour slows all precisions alike, and the median over rounds is reported with the spread.

``variant_names(repository)`` lists what the server would serve (``mobilenet_v2``,
``mobilenet_v2:fp16``, ``mobilenet_v2:int8``, ...): a benchmark that takes model names can include
the variants by iterating over it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.text_table import text_table
from contract.zoo import split_precision


@dataclass
class PrecisionTiming:
    model: str
    precision: str
    backend: str
    batch: int
    median_ms: float  # median over rounds of the per-round median
    spread_ms: tuple[float, float]  # lowest and highest per-round median
    speedup: float | None = None  # fp32 median / this median
    agreement: dict[str, float | None] = field(default_factory=dict)  # as recorded by the build


def variant_names(repository: Path) -> list[str]:
    """Every servable name in ``repository``, precision builds included (the server's discovery)."""
    from service.core.repository import discover

    return discover(Path(repository))


def time_precisions(
    repository: Path,
    model: str,
    *,
    backend: str = "onnxruntime-cpu",
    batch: int = 1,
    threads: int = 1,
    repeats: int = 50,
    rounds: int = 5,
    warmup: int = 10,
) -> list[PrecisionTiming]:
    """fp32 and every recorded variant of ``model``, timed as described in the module doc."""
    from contract.manifest import Manifest
    from contract.photos import photo_jpeg
    from service.core.imaging import preprocess
    from service.core.runtimes import RuntimeOptions, load_runtime

    model_dir = Path(repository) / model
    manifest = Manifest.load(model_dir)
    precisions = ["fp32", *(v.precision for v in manifest.precisions)]
    options = RuntimeOptions(intra_op_threads=threads, inter_op_threads=1, max_batch_size=batch)
    runtimes = {
        p: load_runtime(model_dir, manifest, backend=backend, precision=p, options=options)
        for p in precisions
    }
    image = preprocess(photo_jpeg(500, 375, seed=7), manifest.preprocessing, max_image_pixels=100_000_000)
    inputs = np.ascontiguousarray(np.repeat(image[None], batch, axis=0), dtype=np.float32)
    try:
        for runtime in runtimes.values():
            for _ in range(warmup):
                runtime.run(inputs)
        per_round: dict[str, list[float]] = {p: [] for p in precisions}
        for _ in range(rounds):
            for precision, runtime in runtimes.items():
                samples = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    runtime.run(inputs)
                    samples.append(time.perf_counter() - started)
                per_round[precision].append(statistics.median(samples) * 1e3)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    recorded = {v.precision: v for v in manifest.precisions}
    timings = []
    for precision in precisions:
        medians = per_round[precision]
        variant = recorded.get(precision)
        timings.append(
            PrecisionTiming(
                model=model,
                precision=precision,
                backend=runtimes[precision].name,
                batch=batch,
                median_ms=statistics.median(medians),
                spread_ms=(min(medians), max(medians)),
                agreement={
                    "top1_agreement": variant.top1_agreement,
                    "max_abs_logit_diff": variant.max_abs_logit_diff,
                    "mean_abs_logit_diff": variant.mean_abs_logit_diff,
                }
                if variant
                else {},
            )
        )
    base = timings[0].median_ms
    for timing in timings:
        timing.speedup = base / timing.median_ms
    return timings


def format_table(timings: list[PrecisionTiming]) -> str:
    header = (
        "model",
        "precision",
        "backend",
        "batch",
        "median ms",
        "round medians",
        "vs fp32",
        "top-1 agree",
    )
    lines = [header]
    for t in timings:
        agree = t.agreement.get("top1_agreement")
        lines.append(
            (
                t.model,
                t.precision,
                t.backend,
                str(t.batch),
                f"{t.median_ms:.2f}",
                f"{t.spread_ms[0]:.2f}-{t.spread_ms[1]:.2f}",
                f"x{t.speedup:.2f}" if t.speedup else "-",
                f"{agree:.1%}" if agree is not None else "-",
            )
        )
    return text_table(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="precision_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", metavar="NAME", help="default: every model with a variant")
    parser.add_argument("--backend", default="onnxruntime-cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args(argv)
    models = args.models or sorted(
        {split_precision(name)[0] for name in variant_names(args.repository) if ":" in name}
    )
    if not models:
        print(
            f"no precision builds in {args.repository}: build_engines.py --precision fp16 int8",
            file=sys.stderr,
        )
        return 1
    timings = []
    for model in models:
        timings += time_precisions(
            args.repository,
            model,
            backend=args.backend,
            batch=args.batch,
            threads=args.threads,
            repeats=args.repeats,
            rounds=args.rounds,
        )
    print(format_table(timings))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(t) for t in timings], indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
