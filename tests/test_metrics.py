"""Unit tests of service/core/metrics.py: the pinned names, closed label sets, what each call records."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.core.metrics import (
    BATCH_SIZE_BUCKETS,
    CLASSIFY,
    LATENCY_BUCKETS_S,
    OIP_GRPC,
    OIP_HTTP,
    PROTOCOLS,
    UNKNOWN_MODEL,
    Metrics,
)

MODELS = ("mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2")
BACKEND = "onnxruntime-cpu"

# The metrics' contract: name -> (type, labels). Dashboards and alerts are written against it.
CONTRACT = {
    "classifier_requests": ("counter", {"model", "code"}),
    "classifier_protocol_requests": ("counter", {"protocol", "model", "code"}),
    "classifier_images": ("counter", {"model"}),
    "classifier_request_duration_seconds": ("histogram", {"model"}),
    "classifier_decode_duration_seconds": ("histogram", {"model"}),
    "classifier_queue_duration_seconds": ("histogram", {"model"}),
    "classifier_inference_duration_seconds": ("histogram", {"model", "backend"}),
    "classifier_batch_size": ("histogram", {"model"}),
    "classifier_queue_depth": ("gauge", {"model"}),
    "classifier_model_flops": ("gauge", {"model"}),
    "classifier_model_parameters": ("gauge", {"model"}),
    "classifier_model_memory_access_cost": ("gauge", {"model"}),
    "classifier_model_ready": ("gauge", {"model"}),
    "classifier_model_load_duration_seconds": ("gauge", {"model"}),
    "classifier_model_loads": ("counter", {"model"}),
    "classifier_model_load_failures": ("counter", {"model"}),
    "classifier_model_version": ("gauge", {"model"}),
    "classifier_model_info": ("gauge", {"model", "family", "backend", "precision", "weights", "input_size"}),
}
LATENCY_HISTOGRAMS = (
    "classifier_request_duration_seconds",
    "classifier_decode_duration_seconds",
    "classifier_queue_duration_seconds",
    "classifier_inference_duration_seconds",
)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run monitoring/install-prometheus.sh (make test installs it)")
    return path


def _load(metrics: Metrics, model: str, backend: str = BACKEND, **overrides: object) -> None:
    facts: dict = {
        "family": model,
        "backend": backend,
        "precision": "fp32",
        "weights": "random",
        "input_size": 224,
        "flops": 569_000_000,
        "params": 4_231_976,
        "memory_access_cost": 1_000_000,
        "version": 1,
    }
    facts.update(overrides)
    metrics.model_loaded(model, **facts)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(MODELS)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_configured_model_is_visible_before_any_traffic(metrics):
    for model in MODELS:
        assert value(metrics, "classifier_images_total", model=model) == 0
        assert value(metrics, "classifier_model_ready", model=model) == 0
        for histogram in (*LATENCY_HISTOGRAMS[:3], "classifier_batch_size"):
            assert value(metrics, f"{histogram}_count", model=model) == 0
    # Nobody has misspelled a model yet, so there is no _unknown series to clutter the dashboards.
    assert b"_unknown" not in generate_latest(metrics.registry)


def test_unknown_model_names_are_counted_as_unknown(metrics):
    metrics.observe_request("resnet50", 404, 0.001)
    metrics.observe_request("../../etc/passwd?x=1", 404, 0.001)
    metrics.observe_request(None, 404, 0.002)
    assert value(metrics, "classifier_requests_total", model=UNKNOWN_MODEL, code="404") == 3
    assert value(metrics, "classifier_request_duration_seconds_count", model=UNKNOWN_MODEL) == 3
    exposition = generate_latest(metrics.registry).decode()
    assert "resnet50" not in exposition
    assert "passwd" not in exposition
    assert metrics.label("mobilenet_v2") == "mobilenet_v2"
    assert metrics.label("MobileNet_V2") == UNKNOWN_MODEL


def test_every_front_door_counts_in_the_classifier_series_and_by_protocol(metrics):
    metrics.observe_request("mobilenet_v2", 200, 0.01)  # /classify: the default
    metrics.observe_request("mobilenet_v2", 200, 0.01, OIP_HTTP)
    metrics.observe_request("mobilenet_v2", 200, 0.01, OIP_GRPC)
    metrics.observe_request("mobilenet_v2", 400, 0.01, OIP_HTTP)
    metrics.observe_request("resnet50", 404, 0.01, OIP_GRPC)
    assert value(metrics, "classifier_requests_total", model="mobilenet_v2", code="200") == 3
    assert value(metrics, "classifier_request_duration_seconds_count", model="mobilenet_v2") == 4
    for protocol, code, expected in ((CLASSIFY, "200", 1), (OIP_HTTP, "200", 1), (OIP_HTTP, "400", 1)):
        labels = {"protocol": protocol, "model": "mobilenet_v2", "code": code}
        assert value(metrics, "classifier_protocol_requests_total", **labels) == expected
    assert (
        value(
            metrics, "classifier_protocol_requests_total", protocol=OIP_GRPC, model=UNKNOWN_MODEL, code="404"
        )
        == 1
    )
    assert PROTOCOLS == ("classify", "oip-http", "oip-grpc")
    with pytest.raises(ValueError, match="unknown protocol"):
        metrics.observe_request("mobilenet_v2", 200, 0.01, "soap")


def test_requests_are_counted_by_model_and_code(metrics):
    for _ in range(7):
        metrics.observe_request("mobilenet_v2", 200, 0.01)
    for code in (400, 400, 429, 503, 504):
        metrics.observe_request("mobilenet_v2", code, 0.01)
    assert value(metrics, "classifier_requests_total", model="mobilenet_v2", code="200") == 7
    assert value(metrics, "classifier_requests_total", model="mobilenet_v2", code="400") == 2
    for code in ("429", "503", "504"):
        assert value(metrics, "classifier_requests_total", model="mobilenet_v2", code=code) == 1
    assert value(metrics, "classifier_request_duration_seconds_count", model="mobilenet_v2") == 12
    assert value(metrics, "classifier_requests_total", model="mobilenet_v1", code="200") is None


@pytest.mark.parametrize("histogram", LATENCY_HISTOGRAMS)
def test_latency_buckets_span_half_a_millisecond_to_two_and_a_half_seconds(metrics, histogram):
    metrics.observe_request("shufflenet_v2", 200, 0.0004)
    metrics.observe_decode("shufflenet_v2", 0.0004)
    metrics.observe_queue("shufflenet_v2", 0.0004)
    metrics.observe_batch("shufflenet_v2", BACKEND, 1, 0.0004)
    labels = {"model": "shufflenet_v2"}
    if histogram == "classifier_inference_duration_seconds":
        labels["backend"] = BACKEND
    family = next(f for f in metrics.registry.collect() if f.name == histogram)
    bounds = sorted(
        float(s.labels["le"])
        for s in family.samples
        if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())
    )
    assert bounds[0] == 0.0005
    assert bounds[-2] == 2.5
    assert bounds[-1] == math.inf
    assert len(bounds) == len(LATENCY_BUCKETS_S) + 1
    # A sub-millisecond observation is resolved, not lumped with everything under 5 ms.
    assert metrics.registry.get_sample_value(f"{histogram}_bucket", {**labels, "le": "0.0005"}) == 1


def test_observe_batch_records_inference_batch_size_and_images(metrics):
    metrics.observe_batch("mobilenet_v1", BACKEND, 8, 0.02)
    metrics.observe_batch("mobilenet_v1", BACKEND, 3, 0.01)
    inference = {"model": "mobilenet_v1", "backend": BACKEND}
    assert value(metrics, "classifier_inference_duration_seconds_count", **inference) == 2
    assert value(metrics, "classifier_inference_duration_seconds_sum", **inference) == pytest.approx(0.03)
    assert value(metrics, "classifier_batch_size_count", model="mobilenet_v1") == 2
    assert value(metrics, "classifier_batch_size_sum", model="mobilenet_v1") == 11
    assert value(metrics, "classifier_batch_size_bucket", model="mobilenet_v1", le="3.0") == 1
    assert value(metrics, "classifier_batch_size_bucket", model="mobilenet_v1", le="8.0") == 2
    # Images, not batches and not requests: a multi-file post counts each file.
    assert value(metrics, "classifier_images_total", model="mobilenet_v1") == 11
    assert value(metrics, "classifier_images_total", model="mobilenet_v2") == 0


def test_batch_size_buckets_cover_every_size_up_to_the_largest(metrics):
    assert BATCH_SIZE_BUCKETS[0] == 1
    assert list(BATCH_SIZE_BUCKETS) == sorted(set(BATCH_SIZE_BUCKETS))


def test_decode_and_queue_are_recorded_per_model(metrics):
    for _ in range(3):
        metrics.observe_decode("shufflenet_v1", 0.002)
    metrics.observe_queue("shufflenet_v1", 0.004)
    assert value(metrics, "classifier_decode_duration_seconds_count", model="shufflenet_v1") == 3
    assert value(metrics, "classifier_decode_duration_seconds_sum", model="shufflenet_v1") == pytest.approx(
        0.006
    )
    assert value(metrics, "classifier_queue_duration_seconds_count", model="shufflenet_v1") == 1
    assert value(metrics, "classifier_queue_duration_seconds_count", model="shufflenet_v2") == 0


def test_queue_depth_is_read_at_scrape_time(metrics):
    depth = {"mobilenet_v2": 0}
    metrics.track_queue_depth("mobilenet_v2", lambda: depth["mobilenet_v2"])
    assert value(metrics, "classifier_queue_depth", model="mobilenet_v2") == 0
    depth["mobilenet_v2"] = 5
    assert value(metrics, "classifier_queue_depth", model="mobilenet_v2") == 5
    depth["mobilenet_v2"] = 2
    assert value(metrics, "classifier_queue_depth", model="mobilenet_v2") == 2


def test_model_loaded_sets_the_static_facts(metrics):
    _load(
        metrics, "mobilenet_v2", flops=300_774_272, params=3_504_872, memory_access_cost=7_000_000, version=3
    )
    metrics.record_load("mobilenet_v2", seconds=1.5, failed=False)
    assert value(metrics, "classifier_model_flops", model="mobilenet_v2") == 300_774_272
    assert value(metrics, "classifier_model_parameters", model="mobilenet_v2") == 3_504_872
    assert value(metrics, "classifier_model_memory_access_cost", model="mobilenet_v2") == 7_000_000
    assert value(metrics, "classifier_model_load_duration_seconds", model="mobilenet_v2") == 1.5
    assert value(metrics, "classifier_model_version", model="mobilenet_v2") == 3
    info = {
        "model": "mobilenet_v2",
        "family": "mobilenet_v2",
        "backend": BACKEND,
        "precision": "fp32",
        "weights": "random",
        "input_size": "224",
    }
    assert value(metrics, "classifier_model_info", **info) == 1
    # The inference histogram shows the model under its real backend before the first batch.
    assert (
        value(metrics, "classifier_inference_duration_seconds_count", model="mobilenet_v2", backend=BACKEND)
        == 0
    )


def test_reloading_onto_another_backend_replaces_the_info_series(metrics):
    _load(metrics, "shufflenet_v2", backend="onnxruntime-cuda")
    _load(metrics, "shufflenet_v2", backend=BACKEND)
    families = {f.name: f for f in metrics.registry.collect()}
    info = [s for s in families["classifier_model_info"].samples if s.labels["model"] == "shufflenet_v2"]
    assert [s.labels["backend"] for s in info] == [BACKEND]


def test_loads_and_failures_are_counted_per_model(metrics):
    assert value(metrics, "classifier_model_loads_total", model="shufflenet_v2") == 0
    metrics.record_load("shufflenet_v2", seconds=0.4, failed=False)
    metrics.record_load("shufflenet_v2", seconds=0.2, failed=True)
    assert value(metrics, "classifier_model_loads_total", model="shufflenet_v2") == 2
    assert value(metrics, "classifier_model_load_failures_total", model="shufflenet_v2") == 1
    # The last load's duration, failed or not.
    assert value(metrics, "classifier_model_load_duration_seconds", model="shufflenet_v2") == 0.2


def test_a_model_added_after_the_start_gets_its_own_series(metrics):
    assert metrics.label("mobilenet_v2_x0.5") == "_unknown"
    metrics.add_model("mobilenet_v2_x0.5")
    assert metrics.label("mobilenet_v2_x0.5") == "mobilenet_v2_x0.5"
    assert value(metrics, "classifier_model_ready", model="mobilenet_v2_x0.5") == 0


def test_set_ready(metrics):
    metrics.set_ready("mobilenet_v1", True)
    assert value(metrics, "classifier_model_ready", model="mobilenet_v1") == 1
    metrics.set_ready("mobilenet_v1", False)
    assert value(metrics, "classifier_model_ready", model="mobilenet_v1") == 0


def test_two_instances_do_not_share_or_collide(metrics):
    other = Metrics(MODELS)
    other.observe_request("mobilenet_v1", 200, 0.01)
    assert value(other, "classifier_requests_total", model="mobilenet_v1", code="200") == 1
    assert value(metrics, "classifier_requests_total", model="mobilenet_v1", code="200") is None


def _fully_populated() -> Metrics:
    metrics = Metrics(MODELS)
    for i, model in enumerate(MODELS):
        _load(metrics, model)
        metrics.record_load(model, seconds=0.5, failed=False)
        metrics.set_ready(model, True)
        metrics.track_queue_depth(model, lambda i=i: i)
        metrics.observe_decode(model, 0.003)
        metrics.observe_queue(model, 0.001)
        metrics.observe_batch(model, BACKEND, 4, 0.012)
        metrics.observe_request(model, 200, 0.02)
        metrics.observe_request(model, 400, 0.001)
    metrics.observe_request("nope", 404, 0.0001)
    return metrics


def test_exposition_matches_the_design_contract():
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(_fully_populated().registry).decode())
    }
    assert set(families) == set(CONTRACT)
    for name, (kind, labels) in CONTRACT.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
        served = {s.labels["model"] for s in family.samples}
        assert set(MODELS) <= served, name
    assert "classifier_requests_total" in {s.name for s in families["classifier_requests"].samples}


def test_exposition_passes_promtool_check_metrics():
    result = subprocess.run(
        [_promtool(), "check", "metrics"],
        input=generate_latest(_fully_populated().registry),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", (
        result.stdout + result.stderr
    ).decode()
