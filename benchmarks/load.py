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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import cpu_time

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.9, 0.95, 0.99)
IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
REQUEST_HISTOGRAM = "classifier_request_duration_seconds"
STAGE_HISTOGRAMS = {
    "decode": "classifier_decode_duration_seconds",
    "queue": "classifier_queue_duration_seconds",
    "inference": "classifier_inference_duration_seconds",
}
TRANSPORT_ERROR = "connection"
TIMEOUT_ERROR = "timeout"


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Image:
    name: str
    data: bytes
    content_type: str


def generated_images(count: int = 8, width: int = 500, height: int = 375) -> list[Image]:
    """``count`` distinct deterministic JPEG photos (seeds 0..count-1)."""
    from contract.photos import photo_jpeg

    return [
        Image(f"photo_{seed}.jpg", photo_jpeg(width, height, seed), "image/jpeg") for seed in range(count)
    ]


def folder_images(folder: Path) -> list[Image]:
    """Every JPEG, PNG and WebP file directly in ``folder``, by name."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no .jpg/.jpeg/.png/.webp images in {folder}")
    return [Image(p.name, p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()]) for p in paths]


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` connections in a closed loop, or ``rate`` requests/s open loop."""

    mode: str  # "concurrency" or "rate"
    value: float

    def __str__(self) -> str:
        return f"c={self.value:g}" if self.mode == "concurrency" else f"{self.value:g}/s"


def levels_from(concurrency: Iterable[int] = (), rates: Iterable[float] = ()) -> list[Level]:
    return [Level("concurrency", c) for c in concurrency] + [Level("rate", r) for r in rates]


def build_requests(
    host: str, model: str, images: Sequence[Image], *, top_k: int = 5, files_per_request: int = 1
) -> list[bytes]:
    """The complete bytes of one request per image (or per group of images, as multipart)."""
    target = f"/classify?model={quote(model, safe='')}&top_k={top_k}"
    requests = []
    for i in range(len(images)):
        if files_per_request == 1:
            image = images[i]
            body, content_type = image.data, image.content_type
        else:
            group = [images[(i + j) % len(images)] for j in range(files_per_request)]
            body, content_type = _multipart(group)
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nUser-Agent: benchmarks.load\r\n\r\n"
        )
        requests.append(head.encode("latin-1") + body)
    return requests


def _multipart(images: Sequence[Image]) -> tuple[bytes, str]:
    boundary = "benchmarks-load-7d1f0c"
    parts = []
    for image in images:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n'
            f"Content-Type: {image.content_type}\r\n\r\n".encode("latin-1")
            + image.data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode("latin-1")
    return body, f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client: a general-purpose client costs several times the CPU per
# request, and this one only ever talks to our own server.


class HttpError(Exception):
    """The connection failed or the response could not be read."""


class Connection:
    """One keep-alive connection; ``exchange`` sends a prepared request and reads the response."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def exchange(self, raw: bytes) -> tuple[int, bytes]:
        """(status, body) for the request bytes ``raw``. Raises HttpError; the connection is then closed."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            self._writer.write(raw)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status, length, chunked, close = _parse_head(head)
            if chunked:
                body = await _read_chunked(self._reader)
            elif length is not None:
                body = await self._reader.readexactly(length)
            else:  # no length: the body runs to the end of the connection
                body = await self._reader.read()
                close = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()  # cancelled mid-exchange: the stream is in an unknown state
            raise
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = None, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def http_get(url: str, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    host, port = _address(url)
    connection = Connection(host, port)
    try:
        raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1")
        return await asyncio.wait_for(connection.exchange(raw), timeout_s)
    finally:
        connection.close()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--url must be http://HOST[:PORT], got {url!r}")
    return parts.hostname, parts.port or 80


# ---------------------------------------------------------------------------------------------
# The server's histograms


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts of one Prometheus histogram series (``bounds`` end with +inf)."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    total_sum: float

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def __sub__(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets")
        counts = tuple(a - b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(self.bounds, counts, self.total_sum - other.total_sum)

    def bucket_index(self, q: float) -> int | None:
        """Index of the bucket holding quantile ``q`` (the first whose cumulative count reaches it)."""
        if self.count <= 0:
            return None
        rank = q * self.count
        for i, cumulative in enumerate(self.counts):
            if cumulative >= rank:
                return i
        return len(self.counts) - 1

    def bucket(self, q: float) -> tuple[float, float] | None:
        """(lower, upper] bounds in seconds of the bucket holding quantile ``q``."""
        i = self.bucket_index(q)
        if i is None:
            return None
        return (self.bounds[i - 1] if i else 0.0), self.bounds[i]

    def quantile(self, q: float) -> float | None:
        """Prometheus ``histogram_quantile``: linear interpolation inside the bucket."""
        i = self.bucket_index(q)
        if i is None:
            return None
        lower = self.bounds[i - 1] if i else 0.0
        upper = self.bounds[i]
        if math.isinf(upper):
            return lower
        below = self.counts[i - 1] if i else 0.0
        inside = self.counts[i] - below
        return lower + (upper - lower) * ((q * self.count - below) / inside if inside else 1.0)


def bucket_index_of(bounds: Sequence[float], seconds: float) -> int:
    """Index of the bucket (lower, upper] that holds ``seconds``."""
    for i, upper in enumerate(bounds):
        if seconds <= upper:
            return i
    return len(bounds) - 1


def within_one_bucket(histogram: Histogram, q: float, client_seconds: float) -> bool:
    """Whether the client's quantile falls in the server's bucket for ``q`` or one next to it."""
    server = histogram.bucket_index(q)
    if server is None:
        return False
    return abs(bucket_index_of(histogram.bounds, client_seconds) - server) <= 1


@dataclass(frozen=True)
class Scrape:
    """What one /metrics scrape says per model: request histogram, stage sums/counts, codes."""

    requests: dict[str, Histogram]
    stage_sums: dict[tuple[str, str], tuple[float, float]]  # (model, stage) -> (sum, count)

    def request_delta(self, model: str, before: Scrape) -> Histogram | None:
        after_h, before_h = self.requests.get(model), before.requests.get(model)
        if after_h is None:
            return None
        return after_h - before_h if before_h is not None else after_h

    def stage_mean_delta(self, model: str, stage: str, before: Scrape) -> float | None:
        total, count = self.stage_sums.get((model, stage), (0.0, 0.0))
        total0, count0 = before.stage_sums.get((model, stage), (0.0, 0.0))
        return (total - total0) / (count - count0) if count > count0 else None


def parse_metrics(text: str) -> Scrape:
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    stage_sums: dict[tuple[str, str], list[float]] = {}
    stage_of = {name: stage for stage, name in STAGE_HISTOGRAMS.items()}
    for family in text_string_to_metric_families(text):
        if family.name == REQUEST_HISTOGRAM:
            for sample in family.samples:
                model = sample.labels.get("model", "")
                if sample.name.endswith("_bucket"):
                    buckets.setdefault(model, []).append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_sum"):
                    sums[model] = sample.value
        elif family.name in stage_of:
            stage = stage_of[family.name]
            for sample in family.samples:
                model = sample.labels.get("model", "")
                entry = stage_sums.setdefault((model, stage), [0.0, 0.0])
                # The inference histogram has a backend label too: add its series up per model.
                if sample.name.endswith("_sum"):
                    entry[0] += sample.value
                elif sample.name.endswith("_count"):
                    entry[1] += sample.value
    requests = {}
    for model, pairs in buckets.items():
        pairs.sort()
        requests[model] = Histogram(
            tuple(b for b, _ in pairs), tuple(c for _, c in pairs), sums.get(model, 0.0)
        )
    return Scrape(requests, {key: (v[0], v[1]) for key, v in stage_sums.items()})


async def scrape(url: str) -> Scrape | None:
    """The server's histograms, or None when /metrics cannot be read (the report then says so)."""
    try:
        status, body = await http_get(url, "/metrics")
    except (HttpError, TimeoutError):
        return None
    return parse_metrics(body.decode("utf-8", "replace")) if status == 200 else None


async def ready_models(url: str) -> list[str]:
    status, body = await http_get(url, "/models")
    if status != 200:
        raise SystemExit(f"GET {url}/models answered {status}: {body[:200]!r}")
    return [m["name"] for m in json.loads(body)["models"] if m.get("status") == "ready"]


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
class LevelResult:
    """One model at one load level: the client's measurements and the server's, side by side."""

    model: str
    mode: str
    level: float
    duration_s: float
    requests: int
    ok: int
    images: int
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float | None]  # p50, p90, p95, p99, mean, min, max (successful requests)
    errors: dict[str, int]
    server_timings_ms: dict[str, dict[str, float]]  # stage -> {"mean", "p50"} from timings_ms
    server_histogram: dict[str, object] | None  # request histogram of the same window, from /metrics
    client_cpu_s: float
    client_cpu_percent: float  # of one core
    client_cpu_us_per_request: float
    target_rate: float | None = None
    late_starts: int = 0
    connections: int = 0
    # With LoadConfig.server_pid: the server's CPU per request (event loop, other threads) and the
    # machine's idle share over the same window (benchmarks/cpu_time.py).
    server_cpu: dict[str, float] | None = None

    @property
    def label(self) -> str:
        return str(Level(self.mode, self.level))

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (NumPy's default method); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    summary: dict[str, float | None] = {}
    for q in QUANTILES:
        value = percentile(seconds, q)
        summary[f"p{round(q * 100)}"] = None if value is None else value * 1000
    summary["mean"] = sum(seconds) / len(seconds) * 1000 if seconds else None
    summary["min"] = min(seconds) * 1000 if seconds else None
    summary["max"] = max(seconds) * 1000 if seconds else None
    return summary


def _server_histogram_summary(
    model: str, before: Scrape | None, after: Scrape | None, client_s: Sequence[float]
) -> dict[str, object] | None:
    if before is None or after is None:
        return None
    histogram = after.request_delta(model, before)
    if histogram is None or histogram.count <= 0:
        return None
    # Bucket bounds as Prometheus writes them ("+Inf", not a float): the JSON stays standard.
    bounds = ["+Inf" if math.isinf(b) else f"{b:g}" for b in histogram.bounds]
    summary: dict[str, object] = {
        "count": histogram.count,
        "le": bounds,
        "cumulative_counts": list(histogram.counts),
    }
    for q in (0.5, 0.99):
        name = f"p{round(q * 100)}"
        bucket = histogram.bucket(q)
        estimate = histogram.quantile(q)
        client = percentile(client_s, q)
        summary[name] = {
            "bucket_ms": [bucket[0] * 1000, bucket[1] * 1000] if bucket else None,
            "estimate_ms": None if estimate is None else estimate * 1000,
            "client_within_one_bucket": None if client is None else within_one_bucket(histogram, q, client),
        }
    summary["stage_means_ms"] = {
        stage: (None if (mean := after.stage_mean_delta(model, stage, before)) is None else mean * 1000)
        for stage in STAGE_HISTOGRAMS
    }
    return summary


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


Progress = Callable[[str, float, int, float], None]  # label, elapsed_s, requests, duration_s


async def run_level(
    config: LoadConfig,
    model: str,
    level: Level,
    images: Sequence[Image],
    progress: Progress | None = None,
) -> LevelResult:
    """Warm up, then measure one model at one level; the server's histograms are read around it."""
    host, port = _address(config.url)
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
        latency_ms=_latency_summary(latencies),
        errors=dict(sorted(window.errors.items())),
        server_timings_ms=server_timings,
        # The server's histogram holds every answer, errors included: compare it with the same set.
        server_histogram=_server_histogram_summary(model, before, after, window.answered),
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
# Output


def progress_bar(stream=sys.stderr) -> Progress | None:
    """A one-line progress bar on ``stream`` when it is a terminal, else None (no progress output)."""
    if not stream.isatty():
        return None

    def show(label: str, elapsed_s: float, sent: int, duration_s: float) -> None:
        done = min(1.0, elapsed_s / duration_s) if duration_s > 0 else 1.0
        bar = "#" * round(done * 24)
        rate = sent / elapsed_s if elapsed_s > 0 else 0.0
        stream.write(
            f"\r{label:<28} [{bar:<24}] {elapsed_s:5.1f}/{duration_s:.0f} s {sent:6d} req {rate:7.1f}/s"
        )
        stream.flush()
        if done >= 1.0:
            stream.write("\r" + " " * 90 + "\r")

    return show


CSV_COLUMNS = (
    "model",
    "mode",
    "level",
    "duration_s",
    "requests",
    "ok",
    "images",
    "requests_per_s",
    "images_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "errors",
    "server_decode_ms",
    "server_queue_ms",
    "server_inference_ms",
    "server_total_ms",
    "server_p50_bucket_ms",
    "server_p99_bucket_ms",
    "client_cpu_percent",
    "client_cpu_us_per_request",
    "server_event_loop_ms_per_request",
    "server_other_threads_ms_per_request",
    "machine_idle_percent",
)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bucket_text(result: LevelResult, name: str) -> str:
    histogram = result.server_histogram or {}
    entry = histogram.get(name)
    if not isinstance(entry, dict) or not entry.get("bucket_ms"):
        return "-"
    low, high = entry["bucket_ms"]
    return f"({low:g},{high:g}]"


def _errors_text(errors: dict[str, int]) -> str:
    return " ".join(f"{code}:{n}" for code, n in errors.items()) or "0"


def csv_row(result: LevelResult) -> dict[str, object]:
    stages = result.server_timings_ms
    cpu = result.server_cpu or {}
    return {
        "model": result.model,
        "mode": result.mode,
        "level": result.level,
        "duration_s": round(result.duration_s, 3),
        "requests": result.requests,
        "ok": result.ok,
        "images": result.images,
        "requests_per_s": round(result.requests_per_s, 2),
        "images_per_s": round(result.images_per_s, 2),
        **{f"{k}_ms": _round(result.latency_ms.get(k)) for k in ("p50", "p90", "p95", "p99", "mean")},
        "errors": _errors_text(result.errors),
        **{
            f"server_{s}_ms": _round(stages.get(s, {}).get("mean"))
            for s in ("decode", "queue", "inference", "total")
        },
        "server_p50_bucket_ms": _bucket_text(result, "p50"),
        "server_p99_bucket_ms": _bucket_text(result, "p99"),
        "client_cpu_percent": round(result.client_cpu_percent, 2),
        "client_cpu_us_per_request": round(result.client_cpu_us_per_request, 1),
        "server_event_loop_ms_per_request": _round(cpu.get("event_loop_ms_per_request")),
        "server_other_threads_ms_per_request": _round(cpu.get("other_threads_ms_per_request")),
        "machine_idle_percent": _round(cpu.get("machine_idle_percent")),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def format_table(results: Sequence[LevelResult]) -> str:
    """perf_analyzer-style summary: one row per model and level."""
    header = (
        "model",
        "load",
        "req/s",
        "img/s",
        "p50 ms",
        "p90",
        "p95",
        "p99",
        "errors",
        "decode",
        "queue",
        "infer",
        "server p50 bucket",
        "server p99 bucket",
        "client CPU",
    )
    with_server_cpu = any(r.server_cpu for r in results)
    if with_server_cpu:
        header += ("loop ms/req", "threads ms/req", "idle")
    rows = [header]
    for r in results:
        stages = r.server_timings_ms
        cpu = r.server_cpu or {}
        server_cells = (
            (
                _fmt(cpu.get("event_loop_ms_per_request"), 3),
                _fmt(cpu.get("other_threads_ms_per_request"), 3),
                _fmt(cpu.get("machine_idle_percent")) + ("%" if cpu else ""),
            )
            if with_server_cpu
            else ()
        )
        rows.append(
            (
                r.model,
                r.label,
                _fmt(r.requests_per_s),
                _fmt(r.images_per_s),
                *(_fmt(r.latency_ms.get(k), 2) for k in ("p50", "p90", "p95", "p99")),
                _errors_text(r.errors),
                *(_fmt(stages.get(s, {}).get("mean"), 2) for s in ("decode", "queue", "inference")),
                _bucket_text(r, "p50"),
                _bucket_text(r, "p99"),
                f"{r.client_cpu_percent:.1f}%",
                *server_cells,
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "latencies in ms; decode/queue/infer: server means from timings_ms; client CPU: % of one core"
        + (
            "; loop/threads: the server's event-loop thread and its other threads, CPU ms per request;"
            " idle: the machine's idle share"
            if with_server_cpu
            else ""
        )
    )
    return "\n".join(lines)


def write_results(out_dir: Path, results: Sequence[LevelResult], meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "load.json"
    json_path.write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    csv_path = out_dir / "load.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(csv_row(result))
    return json_path, csv_path


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
