"""What the models cost without the server: the runtime alone, and the server's work done in-process.

    python -m benchmarks.inprocess --repository model_repository --models mobilenet_v2 shufflenet_v2

Everything goes through the service's own code: the runtime is the one the server loads
(``service.core.runtimes.load_runtime``, same session options), decoding is
``service.core.imaging.preprocess`` and the answer is ``service.core.ranking.top_k``. Three measurements:

- ``runtime_cost``: the runtime alone on a ready tensor, per batch size and intra-op thread count
  (ms per batch and images/s);
- ``pipeline_latency``: one request at a time on one thread: decode + preprocess + inference +
  top-5 of a JPEG (the in-process counterpart of the served latency at concurrency 1);
- ``pipeline_throughput``: the same work with every core busy: one worker thread per core, each
  decoding and inferring with one intra-op thread, either sharing one session (as the server does)
  or with a session each (the in-process counterpart of the served throughput at concurrency 16).

Each figure is measured ``repeats`` times; results carry the median and the spread (min, max) of
the repeats.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from contract.manifest import Manifest
from service.config import Settings
from service.core import imaging
from service.core.cpus import cpu_count
from service.core.ranking import top_k
from service.core.runtimes import Runtime, RuntimeOptions, load_runtime

MAX_IMAGE_PIXELS = Settings.model_fields["max_image_pixels"].default
ARRANGEMENTS = ("shared-session", "session-per-worker")


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over repeated measurements."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), tuple(values))

    def to_dict(self) -> dict:
        return asdict(self)


def load(model_dir: Path, *, intra_op_threads: int = 1, backend: str = "onnxruntime-cpu") -> Runtime:
    """The model's runtime exactly as the server builds it (one inter-op thread, sequential)."""
    manifest = Manifest.load(model_dir)
    options = RuntimeOptions(
        intra_op_threads=intra_op_threads, inter_op_threads=1, execution_mode="sequential"
    )
    return load_runtime(Path(model_dir), manifest, backend=backend, options=options)


def _timed_runs(call: Callable[[], object], duration_s: float, min_runs: int = 3) -> list[float]:
    """Seconds per call, calling for ``duration_s`` (and at least ``min_runs`` times)."""
    times = []
    stop_at = time.perf_counter() + duration_s
    while len(times) < min_runs or time.perf_counter() < stop_at:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


# ---------------------------------------------------------------------------------------------
# The runtime alone


@dataclass(frozen=True)
class RuntimeCost:
    model: str
    backend: str
    intra_op_threads: int
    batch_size: int
    batch_ms: Spread  # median ms per batch, per repeat
    images_per_s: Spread
    runs: int

    @property
    def ms_per_image(self) -> float:
        return self.batch_ms.median / self.batch_size

    def to_dict(self) -> dict:
        return {**asdict(self), "ms_per_image": self.ms_per_image}


def runtime_cost(
    model_dir: Path,
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    thread_settings: Sequence[int] = (1, 2),
    duration_s: float = 1.0,
    repeats: int = 3,
    backend: str = "onnxruntime-cpu",
) -> list[RuntimeCost]:
    """ms per batch for each (intra-op threads, batch size), on a fixed random input."""
    manifest = Manifest.load(model_dir)
    crop = manifest.preprocessing.crop
    rng = np.random.default_rng(0)
    results = []
    for threads in thread_settings:
        runtime = load(model_dir, intra_op_threads=threads, backend=backend)
        try:
            for batch in batch_sizes:
                inputs = rng.standard_normal((batch, 3, crop, crop), dtype=np.float32)
                _timed_runs(functools.partial(runtime.run, inputs), 0.0, min_runs=3)  # warm-up
                medians, total = [], 0
                for _ in range(repeats):
                    times = _timed_runs(functools.partial(runtime.run, inputs), duration_s)
                    medians.append(statistics.median(times) * 1000)
                    total += len(times)
                results.append(
                    RuntimeCost(
                        model=manifest.name,
                        backend=runtime.name,
                        intra_op_threads=threads,
                        batch_size=batch,
                        batch_ms=Spread.of(medians),
                        images_per_s=Spread.of([1000 * batch / ms for ms in medians]),
                        runs=total,
                    )
                )
        finally:
            runtime.close()
    return results


# ---------------------------------------------------------------------------------------------
# Decode + preprocess + inference, as the server does it


def classify_once(runtime: Runtime, manifest: Manifest, data: bytes) -> list[dict]:
    """One request's work without HTTP: sniff, decode, preprocess, infer (batch 1), top-5."""
    imaging.sniff_media_type(data, "image/jpeg")
    tensor = imaging.preprocess(data, manifest.preprocessing, MAX_IMAGE_PIXELS)
    logits = runtime.run(tensor[None])
    return top_k(logits[0], 5, manifest.labels)


@dataclass(frozen=True)
class PipelineLatency:
    model: str
    p50_ms: Spread
    p90_ms: Spread
    requests: int

    def to_dict(self) -> dict:
        return asdict(self)


def pipeline_latency(
    model_dir: Path, images: Sequence[bytes], *, duration_s: float = 2.0, repeats: int = 3
) -> PipelineLatency:
    """Latency of one request at a time on one thread (one intra-op thread, as served)."""
    manifest = Manifest.load(model_dir)
    runtime = load(model_dir)
    try:
        for data in images:  # warm-up: every image once
            classify_once(runtime, manifest, data)
        p50s, p90s, total = [], [], 0
        cycle = itertools.count()

        def one() -> None:
            classify_once(runtime, manifest, images[next(cycle) % len(images)])

        for _ in range(repeats):
            times = _timed_runs(one, duration_s)
            ordered = sorted(times)
            p50s.append(statistics.median(ordered) * 1000)
            p90s.append(ordered[int(0.9 * (len(ordered) - 1))] * 1000)
            total += len(times)
    finally:
        runtime.close()
    return PipelineLatency(manifest.name, Spread.of(p50s), Spread.of(p90s), total)


@dataclass(frozen=True)
class PipelineThroughput:
    model: str
    arrangement: str  # "shared-session" or "session-per-worker"
    workers: int
    requests_per_s: Spread
    requests: int
    # The process's CPU time per request while the workers ran (every request they ran, the ones that
    # finished after the window included): the served path's CPU per request compares with this.
    cpu_ms_per_request: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def pipeline_throughput(
    model_dir: Path,
    images: Sequence[bytes],
    *,
    workers: int | None = None,
    arrangement: str = "shared-session",
    duration_s: float = 3.0,
    repeats: int = 3,
) -> PipelineThroughput:
    """Requests/s with ``workers`` threads (default: one per core) each doing whole requests."""
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {ARRANGEMENTS}, got {arrangement!r}")
    workers = workers or cpu_count()
    manifest = Manifest.load(model_dir)
    if arrangement == "shared-session":
        shared = load(model_dir)
        runtimes = [shared] * workers
    else:
        runtimes = [load(model_dir) for _ in range(workers)]
    try:
        for runtime in set(runtimes):
            classify_once(runtime, manifest, images[0])
        rates, total, cpu_s, ran = [], 0, 0.0, 0
        for _ in range(repeats):
            cpu0 = time.process_time()
            done, finished = _run_workers(runtimes, manifest, images, duration_s)
            cpu_s += time.process_time() - cpu0
            ran += finished
            rates.append(sum(done) / duration_s)
            total += sum(done)
    finally:
        for runtime in set(runtimes):
            runtime.close()
    cpu_ms = 1000 * cpu_s / ran if ran else None
    return PipelineThroughput(manifest.name, arrangement, workers, Spread.of(rates), total, cpu_ms)


def _run_workers(
    runtimes: Sequence[Runtime], manifest: Manifest, images: Sequence[bytes], duration_s: float
) -> tuple[list[int], int]:
    """Requests each worker finished inside a window of ``duration_s`` that they all start together,
    and how many they ran in all (each worker's last one ends after the window)."""
    start = threading.Barrier(len(runtimes) + 1)
    window: dict[str, float] = {}
    done = [0] * len(runtimes)

    def work(index: int, runtime: Runtime) -> None:
        start.wait()
        stop_at = window["stop_at"]
        i = index
        while True:
            classify_once(runtime, manifest, images[i % len(images)])
            if time.perf_counter() > stop_at:
                return  # the request that ran past the window's end is not counted
            done[index] += 1
            i += len(runtimes)

    threads = [threading.Thread(target=work, args=(i, rt), daemon=True) for i, rt in enumerate(runtimes)]
    for thread in threads:
        thread.start()
    window["stop_at"] = time.perf_counter() + duration_s
    start.wait()
    for thread in threads:
        thread.join()
    return done, sum(done) + len(threads)


def best_throughput(results: Sequence[PipelineThroughput]) -> PipelineThroughput:
    return max(results, key=lambda r: r.requests_per_s.median)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    from contract.photos import photo_jpeg

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--models", nargs="+", default=["mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2"]
    )
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=lambda t: [int(x) for x in t.split(",")], default=[1, cpu_count()])
    args = parser.parse_args(argv)
    images = [photo_jpeg(500, 375, seed) for seed in range(8)]
    print(f"{'model':<14} {'threads':>7} {'batch':>5} {'ms/batch':>9} {'spread':>15} {'img/s':>8}")
    for model in args.models:
        for row in runtime_cost(
            args.repository / model,
            batch_sizes=args.batch_sizes,
            thread_settings=args.threads,
            duration_s=args.duration,
            repeats=args.repeats,
        ):
            spread = f"{row.batch_ms.low:.2f}-{row.batch_ms.high:.2f}"
            print(
                f"{model:<14} {row.intra_op_threads:>7} {row.batch_size:>5} {row.batch_ms.median:>9.2f}"
                f" {spread:>15} {row.images_per_s.median:>8.1f}"
            )
    print(f"\n{'model':<14} {'p50 ms (1 thread)':>18} {'req/s':>8} arrangement")
    for model in args.models:
        latency = pipeline_latency(
            args.repository / model, images, duration_s=args.duration, repeats=args.repeats
        )
        rates = [
            pipeline_throughput(
                args.repository / model, images, arrangement=a, duration_s=args.duration, repeats=args.repeats
            )
            for a in ARRANGEMENTS
        ]
        best = best_throughput(rates)
        rate = best.requests_per_s.median
        print(f"{model:<14} {latency.p50_ms.median:>18.2f} {rate:>8.1f} {best.arrangement}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
