"""Load generator: closed-loop concurrency sweeps and open-loop request rates against a running server.

    python -m benchmarks.load --url http://127.0.0.1:8000 --models all --concurrency 1,4,16 --duration 10
    python -m benchmarks.load --models mobilenet_v2 --rate 25,50 --duration 10 --images DIR

For each model and load level it reports what perf_analyzer reports: requests/s, images/s,
p50/p90/p95/p99 latency, errors by status code, and the server's own split of the time (decode,
queue, inference, from each response's ``timings_ms``). It reads the server's request-duration
histogram from ``/metrics`` before and after each level, so the client's and the server's view of
the same requests sit side by side (they should agree to within one bucket).

Closed loop (``--concurrency N``): N connections, each sending its next request as soon as the
previous answer arrives. Open loop (``--rate R``): requests start on a fixed schedule (constant or
Poisson intervals) whether or not earlier ones have been answered, and latency is counted from the
scheduled start, so a server that falls behind cannot hide its queue (no coordinated omission).

Each level runs a warm-up first (not counted) and is bounded by ``--duration`` seconds and by
``--requests`` requests, whichever comes first. Images: the project's deterministic 500x375 test
photos (``contract/photos.py``), or every image in ``--images DIR``.

The generator is one thread running one event loop over plain HTTP/1.1 keep-alive connections, with
every request's bytes built in advance, so it costs the machine little; it measures the CPU time of
that thread and reports it per level. Results: a table on the terminal (a progress line while it
runs) and ``load.json`` + ``load.csv`` under ``--out`` (default ``benchmarks/results/load-<time>/``).

The parts, by concern: ``classify_requests`` (the images and the prepared requests),
``http_client`` (the keep-alive client), ``server_metrics`` (the server's histograms),
``load_results`` (levels, one level's result and its statistics), ``load_output`` (progress bar,
table, JSON and CSV). This module runs the levels (closed and open loop) and is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks import cpu_time
from benchmarks.classify_requests import Image, build_requests, folder_images, generated_images
from benchmarks.http_client import Connection, HttpError, address, http_get
from benchmarks.load_output import Progress, format_table, progress_bar, write_results
from benchmarks.load_results import (
    Level,
    LevelResult,
    latency_summary,
    levels_from,
    percentile,
    server_histogram_summary,
)
from benchmarks.server_metrics import scrape

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRANSPORT_ERROR = "connection"
TIMEOUT_ERROR = "timeout"


# ---------------------------------------------------------------------------------------------
# Running one level


@dataclass
class _Window:
    """Samples of the measured part of one level."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    answered: list[float] = field(default_factory=list)  # seconds, every HTTP answer (the server's view)
    errors: Counter = field(default_factory=Counter)  # status code or transport error -> count
    bodies: list[bytes] = field(default_factory=list)  # successful answers, read after the level
    images: int = 0
    sent: int = 0
    late: int = 0  # open loop: requests that started more than 1 ms after their scheduled time

    def record(self, seconds: float, status: int | str, body: bytes, images: int) -> None:
        if isinstance(status, int):
            self.answered.append(seconds)
        if status == 200:
            self.latencies.append(seconds)
            self.images += images
            # Parsed once the level is over: the generator shares the machine with the server, and
            # decoding every answer while it runs would take CPU from what is being measured.
            self.bodies.append(body)
        else:
            self.errors[str(status)] += 1

    def server_timings(self) -> dict[str, list[float]]:
        """The server's own ``timings_ms`` of every successful answer, by stage."""
        stages: dict[str, list[float]] = {}
        for body in self.bodies:
            try:
                timings = json.loads(body)["timings_ms"]
            except (ValueError, KeyError, TypeError):
                continue
            for stage, value in timings.items():
                stages.setdefault(stage, []).append(value)
        return stages


class _Budget:
    """At most ``limit`` requests (None: unbounded) and nothing after ``stop_at``."""

    def __init__(self, limit: int | None, stop_at: float) -> None:
        self.left = math.inf if limit is None else limit
        self.stop_at = stop_at

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.stop_at:
            return False
        self.left -= 1
        return True


async def _send(connection: Connection, raw: bytes, timeout_s: float) -> tuple[int | str, bytes]:
    try:
        # asyncio.timeout, not wait_for: no task per request (Python 3.11's wait_for makes one).
        async with asyncio.timeout(timeout_s):
            return await connection.exchange(raw)
    except TimeoutError:
        connection.close()
        return TIMEOUT_ERROR, b""
    except HttpError:
        return TRANSPORT_ERROR, b""


async def _closed_loop(
    connections: list[Connection],
    requests: Sequence[bytes],
    images_per_request: int,
    budget: _Budget,
    window: _Window,
    timeout_s: float,
) -> None:
    async def worker(offset: int) -> None:
        i = offset
        connection = connections[offset]
        while budget.take():
            raw = requests[i % len(requests)]
            i += len(connections)
            started = time.perf_counter()
            status, body = await _send(connection, raw, timeout_s)
            window.sent += 1
            window.record(time.perf_counter() - started, status, body, images_per_request)

    await asyncio.gather(*(worker(offset) for offset in range(len(connections))))


class _Pool:
    """Idle connections for the open loop; a new one opens whenever none is idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.opened = 0

    def get(self) -> Connection:
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        return Connection(self.host, self.port)

    def put(self, connection: Connection) -> None:
        self.idle.append(connection)

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


async def _open_loop(
    pool: _Pool,
    rate: float,
    requests: Sequence[bytes],
    images_per_request: int,
    budget: _Budget,
    window: _Window,
    timeout_s: float,
    poisson: bool,
    rng: random.Random,
) -> None:
    tasks: set[asyncio.Task] = set()

    async def one(raw: bytes, scheduled: float) -> None:
        connection = pool.get()
        status, body = await _send(connection, raw, timeout_s)
        window.sent += 1
        # From the scheduled start: time spent waiting behind a slow server is the user's time too.
        window.record(time.perf_counter() - scheduled, status, body, images_per_request)
        pool.put(connection)

    scheduled = time.perf_counter()
    i = 0
    while True:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            window.late += 1
        if not budget.take():
            break
        task = asyncio.create_task(one(requests[i % len(requests)], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        scheduled += rng.expovariate(rate) if poisson else 1.0 / rate
    if tasks:
        await asyncio.gather(*tasks)


@dataclass
class LoadConfig:
    url: str
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int | None = None
    timeout_s: float = 30.0
    top_k: int = 5
    files_per_request: int = 1
    poisson: bool = False
    seed: int = 0
    read_metrics: bool = True
    server_pid: int | None = None  # a server on this machine: its CPU is read around each level


async def run_level(
    config: LoadConfig,
    model: str,
    level: Level,
    images: Sequence[Image],
    progress: Progress | None = None,
) -> LevelResult:
    """Warm up, then measure one model at one level; the server's histograms are read around it."""
    host, port = address(config.url)
    requests = build_requests(
        f"{host}:{port}", model, images, top_k=config.top_k, files_per_request=config.files_per_request
    )
    rng = random.Random(config.seed)
    connections = (
        [Connection(host, port) for _ in range(int(level.value))] if level.mode == "concurrency" else []
    )
    pool = _Pool(host, port)

    async def phase(duration_s: float, limit: int | None, window: _Window) -> None:
        budget = _Budget(limit, time.perf_counter() + duration_s)
        if level.mode == "concurrency":
            await _closed_loop(
                connections, requests, config.files_per_request, budget, window, config.timeout_s
            )
        else:
            await _open_loop(
                pool,
                level.value,
                requests,
                config.files_per_request,
                budget,
                window,
                config.timeout_s,
                config.poisson,
                rng,
            )

    try:
        if config.warmup_s > 0:
            await phase(config.warmup_s, None, _Window())
        before = await scrape(config.url) if config.read_metrics else None
        window = _Window()
        ticker = asyncio.create_task(_tick(progress, f"{model} {level}", window, config.duration_s))
        server_cpu0 = cpu_time.read(config.server_pid) if config.server_pid is not None else None
        cpu0, started = time.thread_time(), time.perf_counter()
        try:
            await phase(config.duration_s, config.max_requests, window)
        finally:
            elapsed = time.perf_counter() - started
            cpu_s = time.thread_time() - cpu0
            server_cpu1 = cpu_time.read(config.server_pid) if server_cpu0 is not None else None
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if progress is not None:  # the bar's last state: complete, which also clears the line
                progress(f"{model} {level}", config.duration_s, window.sent, config.duration_s)
        # Every measured request has been answered, so the server has recorded all of them, and only them.
        after = await scrape(config.url) if config.read_metrics else None
    finally:
        for connection in connections:
            connection.close()
        pool.close()

    latencies = window.latencies
    server_timings = {
        stage: {"mean": sum(values) / len(values), "p50": percentile(values, 0.5) or 0.0}
        for stage, values in window.server_timings().items()
        if values
    }
    return LevelResult(
        model=model,
        mode=level.mode,
        level=level.value,
        duration_s=elapsed,
        requests=window.sent,
        ok=len(latencies),
        images=window.images,
        requests_per_s=len(latencies) / elapsed if elapsed > 0 else 0.0,
        images_per_s=window.images / elapsed if elapsed > 0 else 0.0,
        latency_ms=latency_summary(latencies),
        errors=dict(sorted(window.errors.items())),
        server_timings_ms=server_timings,
        # The server's histogram holds every answer, errors included: compare it with the same set.
        server_histogram=server_histogram_summary(model, before, after, window.answered),
        client_cpu_s=cpu_s,
        client_cpu_percent=100.0 * cpu_s / elapsed if elapsed > 0 else 0.0,
        client_cpu_us_per_request=1e6 * cpu_s / window.sent if window.sent else 0.0,
        target_rate=level.value if level.mode == "rate" else None,
        late_starts=window.late,
        connections=len(connections) if level.mode == "concurrency" else pool.opened,
        server_cpu=(server_cpu1 - server_cpu0).per_request(window.sent)
        if server_cpu0 is not None and server_cpu1 is not None
        else None,
    )


async def _tick(progress: Progress | None, label: str, window: _Window, duration_s: float) -> None:
    if progress is None:
        return
    started = time.perf_counter()
    while True:
        progress(label, time.perf_counter() - started, window.sent, duration_s)
        await asyncio.sleep(0.25)


async def sweep(
    config: LoadConfig,
    models: Sequence[str],
    levels: Sequence[Level],
    images: Sequence[Image],
    progress: Progress | None = None,
) -> list[LevelResult]:
    """Every model at every level, one after the other."""
    results = []
    for model in models:
        for level in levels:
            results.append(await run_level(config, model, level, images, progress))
    return results


def run(coroutine):
    """Run ``coroutine`` on uvloop where it is installed (it is a dependency of the service)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


# ---------------------------------------------------------------------------------------------
# Command line


def _numbers(text: str, kind: type) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--models", default="all", help="comma-separated names, or 'all' (every ready model)")
    parser.add_argument(
        "--concurrency",
        type=lambda t: _numbers(t, int),
        default=None,
        help="closed-loop levels, e.g. 1,4,16 (default 1,4,16 unless --rate is given)",
    )
    parser.add_argument(
        "--rate", type=lambda t: _numbers(t, float), default=[], help="open-loop requests/s, e.g. 20,50"
    )
    parser.add_argument(
        "--poisson", action="store_true", help="open loop: exponential gaps instead of constant"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument(
        "--requests", type=int, default=None, help="at most this many measured requests per level"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before a request counts as failed"
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="folder of images to send (default: generated)"
    )
    parser.add_argument("--image-count", type=int, default=8, help="generated 500x375 JPEGs when no --images")
    parser.add_argument("--files-per-request", type=int, default=1, help="> 1: multipart requests of N files")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the server's process id, when it runs on this machine: its CPU per request is reported",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default benchmarks/results/load-TIME)"
    )
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [] if args.rate else [1, 4, 16]
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    if args.files_per_request < 1:
        parser.error("--files-per-request must be >= 1")
    return args


async def ready_models(url: str) -> list[str]:
    """The models the server at ``url`` answers for now (status ``ready`` in ``/models``)."""
    status, body = await http_get(url, "/models")
    if status != 200:
        raise SystemExit(f"GET {url}/models answered {status}: {body[:200]!r}")
    return [m["name"] for m in json.loads(body)["models"] if m.get("status") == "ready"]


async def _main(args: argparse.Namespace) -> int:
    available = await ready_models(args.url)
    if args.models == "all":
        models = available
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        missing = [m for m in models if m not in available]
        if missing:
            print(
                f"not served (or not ready): {', '.join(missing)}; ready: {', '.join(available)}",
                file=sys.stderr,
            )
            return 2
    if not models:
        print(f"{args.url} serves no ready model", file=sys.stderr)
        return 2
    images = folder_images(args.images) if args.images else generated_images(args.image_count)
    config = LoadConfig(
        url=args.url,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.requests,
        timeout_s=args.timeout,
        top_k=args.top_k,
        files_per_request=args.files_per_request,
        poisson=args.poisson,
        server_pid=args.server_pid,
    )
    levels = levels_from(args.concurrency, args.rate)
    started = datetime.now().astimezone()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    results = await sweep(config, models, levels, images, progress_bar())
    cpu_s, wall_s = time.thread_time() - cpu0, time.perf_counter() - wall0
    print(format_table(results))
    print(f"load generator CPU: {cpu_s:.2f} s over {wall_s:.1f} s ({100 * cpu_s / wall_s:.1f}% of one core)")
    out = args.out or RESULTS_DIR / f"load-{started:%Y%m%d-%H%M%S}"
    meta = {
        "url": args.url,
        "started": started.isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(config).items() if k != "url"},
        "images": [image.name for image in images],
        "client_cpu_s": cpu_s,
        "wall_s": wall_s,
    }
    json_path, csv_path = write_results(out, results, meta)
    print(f"wrote {json_path} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
