"""Prometheus metrics: every series the dashboards and alerts are written against, declared in one place.

Each app owns a :class:`Metrics` with its own ``CollectorRegistry`` so that a second
``create_app()`` (tests do this) never collides with the first. Label values come from a closed
set: the models the server was configured with, plus ``_unknown`` for anything else a client typed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

UNKNOWN_MODEL = "_unknown"

# The front doors that classify, as classifier_protocol_requests_total labels them.
CLASSIFY, OIP_HTTP, OIP_GRPC = "classify", "oip-http", "oip-grpc"
PROTOCOLS = (CLASSIFY, OIP_HTTP, OIP_GRPC)

# One ``*_created`` series per labelled child would nearly double every scrape, and nothing reads
# them: rate() detects counter resets from the values themselves.
disable_created_metrics()

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
        self.protocol_requests = Counter(
            "classifier_protocol_requests",
            "Classification requests answered, by the protocol that carried them (classify, oip-http, "
            "oip-grpc) and HTTP status code (a gRPC call's is the status its outcome has over HTTP).",
            ["protocol", "model", "code"],
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
        self.model_loads = Counter(
            "classifier_model_loads",
            "Loads of a model version (each read, verified and warmed up), failed ones included.",
            ["model"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "classifier_model_load_failures",
            "Loads of a model version that failed (the version served before stays served).",
            ["model"],
            registry=r,
        )
        self.model_version = Gauge(
            "classifier_model_version",
            "The version a model serves to requests that name none.",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "classifier_model_info",
            "Static facts about a served model (value is always 1).",
            ["model", "family", "backend", "precision", "weights", "input_size"],
            registry=r,
        )
        # Children resolved once per label set: ``.labels()`` takes a lock and builds a tuple on every
        # call, which the request path need not pay.
        self._per_model: dict[str, _ModelChildren] = {}
        # (model, code, protocol) -> its classifier_requests_total and classifier_protocol_requests_total.
        self._requests_by_code: dict[tuple[str, int, str], tuple[Counter, Counter]] = {}
        self._inference_by_backend: dict[tuple[str, str], Histogram] = {}
        self._info_labels: dict[str, tuple[str, ...]] = {}
        for model in self.known_models:
            self._touch(model)

    def _touch(self, model: str) -> None:
        # Labelled series exist only once touched: create them so dashboards see every model at 0.
        # ``_unknown`` is left to appear when a client first misspells a name.
        self._children(model)
        self.model_ready.labels(model).set(0)
        self.model_loads.labels(model)
        self.model_load_failures.labels(model)

    def add_model(self, model: str) -> None:
        """A model loaded after the start (through the repository API): its own series from now on."""
        if model not in self.known_models:
            self.known_models = self.known_models | {model}
            self._touch(model)

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
        version: int,
    ) -> None:
        """The facts of the version now served under ``model``."""
        self.model_flops.labels(model).set(flops)
        self.model_parameters.labels(model).set(params)
        self.model_memory_access_cost.labels(model).set(memory_access_cost)
        self.model_version.labels(model).set(version)
        info = (model, family, backend, precision, weights, str(input_size))
        previous = self._info_labels.get(model)
        if previous is not None and previous != info:
            # A reload onto another backend must not leave the old facts standing beside the new.
            self.model_info.remove(*previous)
        self._info_labels[model] = info
        self.model_info.labels(*info).set(1)
        if model in self.known_models:
            # So the inference histogram shows the model before its first batch, under the real backend.
            self._inference(model, backend)

    def record_load(self, model: str, *, seconds: float, failed: bool) -> None:
        """One load of one version of ``model``, whether or not it is served now."""
        self.model_loads.labels(model).inc()
        if failed:
            self.model_load_failures.labels(model).inc()
        self.model_load_duration.labels(model).set(seconds)

    def set_ready(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model).set(1 if ready else 0)

    def track_queue_depth(self, model: str, depth: Callable[[], int]) -> None:
        """Queue depth is read at scrape time: no updater runs on the hot path."""
        self.queue_depth.labels(model).set_function(depth)

    # --- per request / image / batch ---------------------------------------------------------
    def observe_request(
        self, model: str | None, status_code: int, seconds: float, protocol: str = CLASSIFY
    ) -> None:
        """One answered request of any front door (``protocol``, one of :data:`PROTOCOLS`): counted in
        the classifier_* series under its model, and by protocol. ``status_code`` is HTTP's."""
        model = self.label(model)
        key = (model, status_code, protocol)
        counters = self._requests_by_code.get(key)
        if counters is None:
            if protocol not in PROTOCOLS:
                raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
            # Codes come from the app's own responses, a handful per model: a bounded set.
            code = str(status_code)
            counters = self._requests_by_code[key] = (
                self.requests.labels(model, code),
                self.protocol_requests.labels(protocol, model, code),
            )
        counters[0].inc()
        counters[1].inc()
        self._children(model).request_duration.observe(seconds)

    def observe_decode(self, model: str, seconds: float) -> None:
        self._children(self.label(model)).decode_duration.observe(seconds)

    def observe_queue(self, model: str, seconds: float) -> None:
        self._children(self.label(model)).queue_duration.observe(seconds)

    def observe_batch(self, model: str, backend: str, batch_size: int, seconds: float) -> None:
        model = self.label(model)
        self._inference(model, backend).observe(seconds)
        children = self._children(model)
        children.batch_size.observe(batch_size)
        children.images.inc(batch_size)

    def _children(self, model: str) -> _ModelChildren:
        children = self._per_model.get(model)
        if children is None:
            children = self._per_model[model] = _ModelChildren(
                images=self.images.labels(model),
                request_duration=self.request_duration.labels(model),
                decode_duration=self.decode_duration.labels(model),
                queue_duration=self.queue_duration.labels(model),
                batch_size=self.batch_size.labels(model),
            )
        return children

    def _inference(self, model: str, backend: str) -> Histogram:
        key = (model, backend)
        child = self._inference_by_backend.get(key)
        if child is None:
            child = self._inference_by_backend[key] = self.inference_duration.labels(model, backend)
        return child


@dataclass(frozen=True, slots=True)
class _ModelChildren:
    images: Counter
    request_duration: Histogram
    decode_duration: Histogram
    queue_duration: Histogram
    batch_size: Histogram
