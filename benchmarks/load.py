"""Load generator: closed-loop concurrency sweeps and open-loop request rates against a running server.

    python -m benchmarks.load --url http://127.0.0.1:8000 --models all --concurrency 1,4,16 --duration 10
    python -m benchmarks.load --models mobilenet_v2 --rate 25,50 --duration 10 --images DIR
    python -m benchmarks.load --protocol classify,oip-http,oip-grpc --models mobilenet_v2 --concurrency 1,16

For each model and load level it reports what perf_analyzer reports: requests/s, images/s,
p50/p90/p95/p99 latency, errors by status code, and the server's own split of the time (decode,
queue, inference, from each response's ``timings_ms``). It reads the server's request-duration
histogram from ``/metrics`` before and after each level, so the client's and the server's view of
the same requests sit side by side (they should agree to within one bucket).

Closed loop (``--concurrency N``): N connections, each sending its next request as soon as the
previous answer arrives. Open loop (``--rate R``): requests start on a fixed schedule (constant or
Poisson intervals) whether or not earlier ones have been answered, and latency is counted from the
scheduled start, so a server that falls behind cannot hide its queue (no coordinated omission).

Protocols (``--protocol``): ``classify`` (``POST /classify``), ``oip-http`` and ``oip-grpc`` (the Open
Inference Protocol over HTTP, binary tensor data, and over gRPC; BYTES JPEG input, the classification
extension's top-k output); ``benchmarks/load_protocols.py`` says how each is spoken.

Each level runs a warm-up first (not counted) and is bounded by ``--duration`` seconds and by
``--requests`` requests, whichever comes first. Images: the project's deterministic 500x375 test
photos (``contract/photos.py``), or every image in ``--images DIR``.

The generator is one thread running one event loop over plain HTTP/1.1 keep-alive connections (or
one gRPC channel), with every request's bytes built in advance, so it costs the machine little; it
measures its own CPU time and reports it per level. Results: a table on the terminal (a progress
line while it runs) and ``load.json`` + ``load.csv`` under ``--out`` (default
``benchmarks/results/load-<time>/``).

The parts, by concern: ``classify_requests`` (the images and the prepared requests),
``oip_requests`` (the same as Open Inference Protocol requests), ``http_client`` (the keep-alive
client), ``grpc_client`` (the gRPC channel), ``load_protocols`` (each protocol's requests, clients
and answers), ``server_metrics`` (the server's histograms), ``load_results`` (levels, one level's
result and its statistics), ``load_output`` (progress bar, table, JSON and CSV). This module runs
the levels (closed and open loop) and is the command line.
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
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from benchmarks import cpu_time
from benchmarks.classify_requests import Image, folder_images, generated_images
from benchmarks.http_client import http_get
from benchmarks.load_output import Progress, format_table, progress_bar, write_results
from benchmarks.load_protocols import (
    MALFORMED,
    PROTOCOLS,
    SUCCESS,
    UNANSWERED,
    ProtocolClient,
    Send,
    Status,
    protocol_client,
)
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


# ---------------------------------------------------------------------------------------------
# Running one level


@dataclass
class _Window:
    """Samples of the measured part of one level."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    answered: list[float] = field(default_factory=list)  # seconds, every answer (the server's view)
    # HTTP status code, gRPC status code name, or the client's own failure -> count
    errors: Counter = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)  # successful answers, read after the level
    images: int = 0
    sent: int = 0
    late: int = 0  # open loop: requests that started more than 1 ms after their scheduled time

    def record(self, seconds: float, status: Status, body: bytes, images: int) -> None:
        if status not in UNANSWERED:
            self.answered.append(seconds)
        if status in SUCCESS:
            self.latencies.append(seconds)
            self.images += images
            # Parsed once the level is over: the generator shares the machine with the server, and
            # decoding every answer while it runs would take CPU from what is being measured.
            self.bodies.append(body)
        else:
            self.errors[str(status)] += 1


class Budget:
    """At most ``limit`` requests (None: unbounded) and nothing after ``stop_at``."""

    def __init__(self, limit: int | None, stop_at: float) -> None:
        self.left = math.inf if limit is None else limit
        self.stop_at = stop_at

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.stop_at:
            return False
        self.left -= 1
        return True


async def closed_loop(
    send: Send,
    connections: list,
    requests: Sequence[bytes],
    images_per_request: int,
    budget: Budget,
    window: _Window,
    timeout_s: float,
) -> None:
    """Each connection sends its next request as soon as its answer arrives, until ``budget`` runs out;
    every answer goes to ``window.record`` (``benchmarks/reload.py`` passes a recorder of its own)."""

    async def worker(offset: int) -> None:
        i = offset
        connection = connections[offset]
        while budget.take():
            raw = requests[i % len(requests)]
            i += len(connections)
            started = time.perf_counter()
            status, body = await send(connection, raw, timeout_s)
            window.sent += 1
            window.record(time.perf_counter() - started, status, body, images_per_request)

    await asyncio.gather(*(worker(offset) for offset in range(len(connections))))


async def _open_loop(
    send: Send,
    pool,
    rate: float,
    requests: Sequence[bytes],
    images_per_request: int,
    budget: Budget,
    window: _Window,
    timeout_s: float,
    poisson: bool,
    rng: random.Random,
) -> None:
    tasks: set[asyncio.Task] = set()

    async def one(raw: bytes, scheduled: float) -> None:
        connection = pool.get()
        status, body = await send(connection, raw, timeout_s)
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
    protocol: str = "classify"  # one of PROTOCOLS
    grpc_url: str | None = None  # oip-grpc: HOST:PORT (default: the --url's host, port 8001)


async def run_level(
    config: LoadConfig,
    model: str,
    level: Level,
    images: Sequence[Image],
    progress: Progress | None = None,
) -> LevelResult:
    """Warm up, then measure one model at one level; the server's histograms are read around it."""
    client: ProtocolClient = protocol_client(
        config.protocol,
        config.url,
        config.grpc_url,
        model,
        images,
        top_k=config.top_k,
        images_per_request=config.files_per_request,
    )
    requests, send, cpu_clock = client.requests, client.send, client.cpu_clock
    rng = random.Random(config.seed)
    connections = client.clients(int(level.value)) if level.mode == "concurrency" else []
    pool = client.pool()

    async def phase(duration_s: float, limit: int | None, window: _Window) -> None:
        budget = Budget(limit, time.perf_counter() + duration_s)
        if level.mode == "concurrency":
            await closed_loop(
                send, connections, requests, config.files_per_request, budget, window, config.timeout_s
            )
        else:
            await _open_loop(
                send,
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

    label = f"{model} {level}" if config.protocol == "classify" else f"{model} {config.protocol} {level}"
    try:
        if config.warmup_s > 0:
            await phase(config.warmup_s, None, _Window())
        before = await scrape(config.url) if config.read_metrics else None
        window = _Window()
        ticker = asyncio.create_task(_tick(progress, label, window, config.duration_s))
        server_cpu0 = cpu_time.read(config.server_pid) if config.server_pid is not None else None
        cpu0, started = cpu_clock(), time.perf_counter()
        try:
            await phase(config.duration_s, config.max_requests, window)
        finally:
            elapsed = time.perf_counter() - started
            cpu_s = cpu_clock() - cpu0
            server_cpu1 = cpu_time.read(config.server_pid) if server_cpu0 is not None else None
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if progress is not None:  # the bar's last state: complete, which also clears the line
                progress(label, config.duration_s, window.sent, config.duration_s)
        # Every measured request has been answered, so the server has recorded all of them, and only them.
        after = await scrape(config.url) if config.read_metrics else None
    finally:
        pool.close()
        await client.close()

    latencies = window.latencies
    timings, malformed = client.read_answers(window.bodies)
    server_timings = {
        stage: {"mean": sum(values) / len(values), "p50": percentile(values, 0.5) or 0.0}
        for stage, values in timings.items()
        if values
    }
    if malformed:
        window.errors[MALFORMED] += malformed
    ok = len(latencies) - malformed
    return LevelResult(
        model=model,
        mode=level.mode,
        level=level.value,
        duration_s=elapsed,
        requests=window.sent,
        ok=ok,
        images=window.images,
        requests_per_s=ok / elapsed if elapsed > 0 else 0.0,
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
        connections=client.opened if level.mode == "concurrency" else pool.opened,
        server_cpu=(server_cpu1 - server_cpu0).per_request(window.sent)
        if server_cpu0 is not None and server_cpu1 is not None
        else None,
        protocol=config.protocol,
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
    """Every model at every level, one after the other, in ``config.protocol``."""
    results = []
    for model in models:
        for level in levels:
            results.append(await run_level(config, model, level, images, progress))
    return results


def _protocols(text: str) -> list[str]:
    names = list(PROTOCOLS) if text == "all" else [p.strip() for p in text.split(",") if p.strip()]
    unknown = [name for name in names if name not in PROTOCOLS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected 'all' or some of {', '.join(PROTOCOLS)}; got {text!r}")
    return names


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
        "--protocol",
        type=_protocols,
        default=["classify"],
        help=f"comma-separated, each swept in turn, or 'all': {', '.join(PROTOCOLS)} (oip-http: the Open "
        "Inference Protocol over HTTP with binary tensor data; oip-grpc: over gRPC)",
    )
    parser.add_argument(
        "--grpc-url",
        default=None,
        help="oip-grpc: the server's gRPC HOST:PORT (default: the --url's host, port 8001)",
    )
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
    parser.add_argument(
        "--files-per-request",
        type=int,
        default=1,
        help="> 1: N images per request (classify: multipart files; OIP: a BYTES input of N elements)",
    )
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
        grpc_url=args.grpc_url,
    )
    levels = levels_from(args.concurrency, args.rate)
    started = datetime.now().astimezone()
    # The process's CPU: with oip-grpc, grpc's own threads do part of the generator's work.
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = []
    for protocol in args.protocol:
        config = replace(config, protocol=protocol)
        results += await sweep(config, models, levels, images, progress_bar())
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    print(format_table(results))
    print(f"load generator CPU: {cpu_s:.2f} s over {wall_s:.1f} s ({100 * cpu_s / wall_s:.1f}% of one core)")
    out = args.out or RESULTS_DIR / f"load-{started:%Y%m%d-%H%M%S}"
    meta = {
        "url": args.url,
        "started": started.isoformat(timespec="seconds"),
        "config": {k: v for k, v in asdict(config).items() if k not in ("url", "protocol")},
        "protocols": args.protocol,
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
