"""What one model at one load level measured: the level, its result, and the statistics behind both.

``LevelResult`` is what ``load.json`` holds per level (and what ``make bench`` keeps in
``results.json``): the client's latency quantiles and throughput, errors by status code, the
server's own split of the time, and the server's request histogram for the same window beside the
client's quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from benchmarks.server_metrics import STAGE_HISTOGRAMS, Scrape, within_one_bucket

QUANTILES = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Level:
    """One load level: ``concurrency`` connections in a closed loop, or ``rate`` requests/s open loop."""

    mode: str  # "concurrency" or "rate"
    value: float

    def __str__(self) -> str:
        return f"c={self.value:g}" if self.mode == "concurrency" else f"{self.value:g}/s"


def levels_from(concurrency: Iterable[int] = (), rates: Iterable[float] = ()) -> list[Level]:
    """The closed-loop levels, then the open-loop ones, in the order given."""
    return [Level("concurrency", c) for c in concurrency] + [Level("rate", r) for r in rates]


@dataclass
class LevelResult:
    """One model at one load level in one protocol: the client's and the server's measurements."""

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
    # How the requests were sent: classify, oip-http or oip-grpc (benchmarks/load_protocols.py).
    protocol: str = "classify"

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


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p95, p99, mean, min and max in ms of ``seconds`` (None each when it is empty)."""
    summary: dict[str, float | None] = {}
    for q in QUANTILES:
        value = percentile(seconds, q)
        summary[f"p{round(q * 100)}"] = None if value is None else value * 1000
    summary["mean"] = sum(seconds) / len(seconds) * 1000 if seconds else None
    summary["min"] = min(seconds) * 1000 if seconds else None
    summary["max"] = max(seconds) * 1000 if seconds else None
    return summary


def server_histogram_summary(
    model: str, before: Scrape | None, after: Scrape | None, client_s: Sequence[float]
) -> dict[str, object] | None:
    """The server's request histogram of ``model`` between two scrapes, with its p50 and p99 buckets
    beside the client's quantiles of the same answers ``client_s``; None without both scrapes."""
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
