"""The server's own view of a load level: its ``/metrics`` scraped before and after, read as histograms.

The request-duration histogram of the same requests the client timed lets the two views sit side by
side: the client's p50 and p99 should fall in the server's bucket for that quantile or one next to it
(``within_one_bucket``). The decode, queue and inference histograms give the server's mean per stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.http_client import HttpError, http_get

REQUEST_HISTOGRAM = "classifier_request_duration_seconds"
STAGE_HISTOGRAMS = {
    "decode": "classifier_decode_duration_seconds",
    "queue": "classifier_queue_duration_seconds",
    "inference": "classifier_inference_duration_seconds",
}


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
