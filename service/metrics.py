"""Prometheus metrics: every series DESIGN.md pins, declared in one place.

Each app owns a :class:`Metrics` with its own ``CollectorRegistry`` so that a second
``create_app()`` (tests do this) never collides with the first. Label values come from a closed
set: the models the server was configured with, plus ``_unknown`` for anything else a client typed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_MODEL = "_unknown"

# Sub-millisecond to seconds: a batch-1 ShuffleNet runs in ~1 ms on a desktop core, a loaded queue
# can hold a request for a second or two.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    """The service's metrics. Call sites pass raw model names; :meth:`label` closes the set."""

    def __init__(self, model_names: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.known_models = frozenset(model_names)
        r = self.registry
        self.requests = Counter(
            "classifier_requests",
            "Classification requests answered, by HTTP status code.",
            ["model", "code"],
            registry=r,
        )
        self.images = Counter("classifier_images", "Images classified.", ["model"], registry=r)
        self.request_duration = Histogram(
            "classifier_request_duration_seconds",
            "End-to-end time of a /classify request.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.decode_duration = Histogram(
            "classifier_decode_duration_seconds",
            "Decode and preprocessing time per image.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_duration = Histogram(
            "classifier_queue_duration_seconds",
            "Time a request waited in its model's queue.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_duration = Histogram(
            "classifier_inference_duration_seconds",
            "Runtime time per batch.",
            ["model", "backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "classifier_batch_size",
            "Images per batch handed to the runtime.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "classifier_queue_depth",
            "Requests waiting in the model's queue.",
            ["model"],
            registry=r,
        )
        self.model_flops = Gauge(
            "classifier_model_flops",
            "Multiply-adds per image (conv and FC layers).",
            ["model"],
            registry=r,
        )
        self.model_parameters = Gauge(
            "classifier_model_parameters",
            "Learnable parameters.",
            ["model"],
            registry=r,
        )
        self.model_memory_access_cost = Gauge(
            "classifier_model_memory_access_cost",
            "Elements read and written per image by conv and FC layers.",
            ["model"],
            registry=r,
        )
        self.model_ready = Gauge(
            "classifier_model_ready",
            "1 when the model is loaded and warmed up.",
            ["model"],
            registry=r,
        )
        self.model_load_duration = Gauge(
            "classifier_model_load_duration_seconds",
            "Time to load and warm up the model.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "classifier_model_info",
            "Static facts about a served model (value is always 1).",
            ["model", "family", "backend", "precision", "weights", "input_size"],
            registry=r,
        )
        for model in self.known_models:
            # Labelled series exist only once touched: create them so dashboards see every model at 0.
            self.model_ready.labels(model).set(0)
            self.images.labels(model)
            for histogram in (
                self.request_duration,
                self.decode_duration,
                self.queue_duration,
                self.batch_size,
            ):
                histogram.labels(model)

    def label(self, model: str | None) -> str:
        return model if model in self.known_models else UNKNOWN_MODEL

    # --- static facts, from the manifest and the loader --------------------------------------
    def model_loaded(
        self,
        model: str,
        *,
        family: str,
        backend: str,
        precision: str,
        weights: str,
        input_size: int,
        flops: int,
        params: int,
        memory_access_cost: int,
        load_seconds: float,
    ) -> None:
        self.model_flops.labels(model).set(flops)
        self.model_parameters.labels(model).set(params)
        self.model_memory_access_cost.labels(model).set(memory_access_cost)
        self.model_load_duration.labels(model).set(load_seconds)
        self.model_info.labels(model, family, backend, precision, weights, str(input_size)).set(1)

    def set_ready(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model).set(1 if ready else 0)

    def track_queue_depth(self, model: str, depth: Callable[[], int]) -> None:
        """Queue depth is read at scrape time: no updater runs on the hot path."""
        self.queue_depth.labels(model).set_function(depth)

    # --- per request / image / batch ---------------------------------------------------------
    def observe_request(self, model: str | None, status_code: int, seconds: float) -> None:
        model = self.label(model)
        self.requests.labels(model, str(status_code)).inc()
        self.request_duration.labels(model).observe(seconds)

    def observe_decode(self, model: str, seconds: float) -> None:
        self.decode_duration.labels(self.label(model)).observe(seconds)

    def observe_queue(self, model: str, seconds: float) -> None:
        self.queue_duration.labels(self.label(model)).observe(seconds)

    def observe_batch(self, model: str, backend: str, batch_size: int, seconds: float) -> None:
        model = self.label(model)
        self.inference_duration.labels(model, backend).observe(seconds)
        self.batch_size.labels(model).observe(batch_size)
        self.images.labels(model).inc(batch_size)
