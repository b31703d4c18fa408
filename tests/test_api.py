"""The HTTP API in-process (TestClient) on tiny ONNX models: responses, every error shape, /models,
/readyz and /metrics. Transport-level behaviour (streamed bodies, concurrency, signals) is in
test_server.py against a real uvicorn."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from contract.photos import encode, make_photo, photo_jpeg
from contract.zoo import imagenet_labels
from service.app import create_app
from service.core.runtimes import load_runtime
from tests.fake_repository import FAKE_MODELS, FakeRuntime, corrupt, make_repository
from tests.live_server import serving, serving_settings
from tests.workloads import png_declaring

JPEG = photo_jpeg(500, 375, seed=1)
PNG = encode(make_photo(320, 240, seed=2), "PNG")


@pytest.fixture(scope="module")
def client(fake_repo):
    app = create_app(serving_settings(fake_repo, max_body_bytes=2 * 1024 * 1024))
    with serving(app) as client:
        yield client


def classify(client, body=JPEG, content_type="image/jpeg", **params):
    params = {"model": "mobilenet_v2"} | params
    return client.post("/classify", params=params, content=body, headers={"Content-Type": content_type})


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def assert_still_serving(client) -> None:
    assert classify(client).status_code == 200


# --- the happy path -------------------------------------------------------------------------------
def test_classify_a_jpeg(client):
    response = classify(client, top_k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "version", "backend", "predictions", "timings_ms"}
    assert body["version"] == 1  # the flat layout is version 1
    assert (body["model"], body["backend"]) == ("mobilenet_v2", "onnxruntime-cpu")
    predictions = body["predictions"]
    assert len(predictions) == 5
    labels = imagenet_labels()
    for p in predictions:
        assert set(p) == {"class_id", "label", "score"}
        assert p["label"] == labels[p["class_id"]]
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1
    timings = body["timings_ms"]
    assert set(timings) == {"decode", "queue", "inference", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["total"] >= timings["decode"] + timings["inference"]
    assert response.headers["x-request-id"]


def test_scores_are_the_softmax_of_the_runtime_logits(client, fake_repo):
    from contract.manifest import Manifest
    from service.core.imaging import preprocess

    manifest = Manifest.load(fake_repo / "mobilenet_v2")
    runtime = load_runtime(fake_repo / "mobilenet_v2", manifest, backend="onnxruntime-cpu")
    logits = runtime.run(preprocess(JPEG, manifest.preprocessing, 40_000_000)[None])[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    expected = np.argsort(-probabilities, kind="stable")[:1000]
    body = classify(client, top_k=1000).json()
    assert [p["class_id"] for p in body["predictions"]] == expected.tolist()
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], probabilities[expected], rtol=1e-6)


@pytest.mark.parametrize(("top_k", "count"), [(1, 1), (7, 7), (1000, 1000)])
def test_top_k(client, top_k, count):
    assert len(classify(client, top_k=top_k).json()["predictions"]) == count


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", ""])
def test_raw_bodies_are_sniffed(client, content_type):
    response = classify(client, PNG, content_type)
    assert response.status_code == 200, response.text


def test_several_files_in_one_multipart_request(client):
    files = [("file", ("a.jpg", JPEG, "image/jpeg")), ("file", ("b.png", PNG, "image/png"))]
    response = client.post("/classify", params={"model": "shufflenet_v2", "top_k": 3}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["filename"] for r in body["results"]] == ["a.jpg", "b.png"]
    for (_, (_, data, content_type)), result in zip(files, body["results"], strict=True):
        alone = classify(client, data, content_type, model="shufflenet_v2", top_k=3).json()["predictions"]
        assert result["predictions"] == alone


def test_multipart_ignores_other_fields(client):
    response = client.post(
        "/classify", params={"model": "mobilenet_v2"}, files={"file": ("x.jpg", JPEG)}, data={"note": "hello"}
    )
    assert response.status_code == 200 and len(response.json()["results"]) == 1


def test_request_id_is_echoed(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


# --- every error, each followed by a good request -------------------------------------------------
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (np.random.default_rng(0).bytes(5000), "application/octet-stream"),
        (np.random.default_rng(1).bytes(5000), "image/jpeg"),
        (JPEG[: len(JPEG) // 2], "image/jpeg"),
        (b"", "image/jpeg"),
        (b"", ""),
    ],
    ids=["random-bytes", "random-bytes-as-jpeg", "truncated-jpeg", "empty", "empty-untyped"],
)
def test_400_invalid_image(client, body, content_type):
    assert_error(classify(client, body, content_type), 400, "invalid_image")
    assert_still_serving(client)


def test_400_malformed_multipart(client):
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'  # never closed
    response = classify(client, body, "multipart/form-data; boundary=xyz")
    assert_error(response, 400, "invalid_image")
    assert_still_serving(client)


def test_404_unknown_model_lists_the_available_ones(client):
    error = assert_error(classify(client, model="resnet50"), 404, "unknown_model")
    assert all(name in error["message"] for name in FAKE_MODELS)
    assert_error(client.get("/models/resnet50"), 404, "unknown_model")
    assert_still_serving(client)


def test_404_and_405_for_routes_keep_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/classify"), 405, "method_not_allowed")
    assert_still_serving(client)


def test_413_payload_too_large(client):
    big = JPEG + b"\0" * (2 * 1024 * 1024)
    assert_error(classify(client, big), 413, "payload_too_large")
    assert_still_serving(client)


def test_413_image_too_large_from_the_header_alone(client):
    error = assert_error(classify(client, png_declaring(50_000, 50_000), "image/png"), 413, "image_too_large")
    assert "pixels" in error["message"] or "large" in error["message"]
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (JPEG, "text/plain"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "image/svg+xml"),
        (b'<?xml version="1.0"?><svg></svg>', "application/octet-stream"),
        (JPEG, "multipart/form-data"),  # no boundary: the body cannot be parsed at all
    ],
    ids=["text-plain", "svg", "sniffed-svg", "multipart-without-boundary"],
)
def test_415_unsupported_media_type(client, body, content_type):
    assert_error(classify(client, body, content_type), 415, "unsupported_media_type")
    assert_still_serving(client)


@pytest.mark.parametrize("top_k", ["0", "1001", "abc", "-1", "2.5"])
def test_422_bad_top_k(client, top_k):
    error = assert_error(classify(client, top_k=top_k), 422, "invalid_parameter")
    assert "top_k" in error["message"]
    assert_still_serving(client)


def test_422_missing_model_and_missing_file_part(client):
    response = client.post("/classify", content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert "model" in assert_error(response, 422, "invalid_parameter")["message"]
    response = client.post("/classify", params={"model": "mobilenet_v2"}, files={"image": ("x.jpg", JPEG)})
    assert "file" in assert_error(response, 422, "invalid_parameter")["message"]
    assert_still_serving(client)


def test_500_when_inference_fails_and_the_next_request_is_fine(fake_repo):
    calls = {"n": 0}

    def flaky_loader(model_dir, manifest, **kwargs):
        def fail_first_real_call(batch):
            calls["n"] += 1
            return calls["n"] == 1

        # Warm-up is off, so the first call is the first request's.
        return FakeRuntime(fail_when=fail_first_real_call, classes=1000)

    app = create_app(serving_settings(fake_repo, warmup=False), runtime_loader=flaky_loader)
    with serving(app) as client:
        error = assert_error(classify(client), 500, "internal_error")
        assert "error" in error["message"]
        assert classify(client).status_code == 200


def test_500_for_an_unhandled_exception_keeps_the_error_shape(fake_repo):
    app = create_app(serving_settings(fake_repo))

    @app.get("/boom")
    async def boom():
        raise ZeroDivisionError("boom")

    with serving(app) as client:
        error = assert_error(client.get("/boom"), 500, "internal_error")
        assert "boom" not in error["message"]  # internals stay in the log
        assert client.get("/healthz").status_code == 200


# --- broken models: 503, and the others still serve -----------------------------------------------
@pytest.fixture
def broken_repo(tmp_path):
    root = make_repository(tmp_path / "model_repository", ("mobilenet_v1", "mobilenet_v2", "shufflenet_v2"))
    corrupt(root / "mobilenet_v1")
    (root / "shufflenet_v2" / "model.onnx").unlink()
    return root


def test_503_for_corrupt_and_missing_models_while_the_others_serve(broken_repo):
    app = create_app(serving_settings(broken_repo))
    with serving(app) as client:
        readyz = client.get("/readyz")
        assert readyz.status_code == 503
        body = readyz.json()
        assert body["error"]["code"] == "not_ready"
        assert body["models"]["mobilenet_v2"]["status"] == "ready"
        assert body["models"]["mobilenet_v1"]["status"] == "failed"
        assert "sha256" in body["models"]["mobilenet_v1"]["reason"]
        assert body["models"]["shufflenet_v2"]["status"] == "failed"
        assert "missing" in body["models"]["shufflenet_v2"]["reason"]
        assert "mobilenet_v1" in body["error"]["message"] and "shufflenet_v2" in body["error"]["message"]

        for name in ("mobilenet_v1", "shufflenet_v2"):
            error = assert_error(classify(client, model=name), 503, "model_unavailable")
            assert name in error["message"]
        assert classify(client, model="mobilenet_v2").status_code == 200

        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["mobilenet_v1"]["status"] == "failed" and "sha256" in listed["mobilenet_v1"]["reason"]
        metrics = client.get("/metrics").text
        assert 'classifier_model_ready{model="mobilenet_v1"} 0.0' in metrics
        assert 'classifier_model_ready{model="mobilenet_v2"} 1.0' in metrics


def test_a_gpu_backend_requested_here_is_unavailable_not_served_on_cpu(fake_repo):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    app = create_app(serving_settings(fake_repo, backend="onnxruntime-cuda"))
    with serving(app) as client:
        body = client.get("/readyz").json()
        assert {m["status"] for m in body["models"].values()} == {"unavailable"}
        assert "CUDAExecutionProvider" in body["models"]["mobilenet_v2"]["reason"]
        assert_error(classify(client), 503, "model_unavailable")


def test_a_missing_repository_reports_the_default_models_failed(tmp_path):
    app = create_app(serving_settings(tmp_path / "nothing-here"))
    with serving(app) as client:
        models = client.get("/readyz").json()["models"]
        assert set(models) == {"mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2"}
        assert all(m["status"] == "failed" and "model.json" in m["reason"] for m in models.values())


# --- /models, probes, metrics ---------------------------------------------------------------------
def test_models_list_and_detail(client):
    models = client.get("/models").json()["models"]
    assert [m["name"] for m in models] == list(FAKE_MODELS)
    for entry in models:
        assert entry["status"] == "ready" and entry["backend"] == "onnxruntime-cpu"
        assert entry["precision"] == "fp32"
        assert entry["weights"]["source"] == "random"
        assert {"flops", "params", "memory_access_cost", "input_size", "preprocessing"} <= set(entry)
        assert "labels" not in entry
    detail = client.get("/models/mobilenet_v2").json()
    assert len(detail["labels"]) == 1000 and detail["providers"] == ["CPUExecutionProvider"]
    assert detail["onnx"]["sha256"] and detail["preprocessing"]["crop"] == 32


def test_probes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    readyz = client.get("/readyz")
    assert readyz.status_code == 200 and readyz.json()["ready"] is True


def test_index_page(client):
    response = client.get("/")
    assert response.status_code == 200 and "classify" in response.text


def test_metrics_count_every_classify_response(fake_repo):
    app = create_app(serving_settings(fake_repo))
    with serving(app) as client:
        classify(client)
        classify(client, top_k=0)
        classify(client, model="nope")
        classify(client, b"junk")
        text = client.get("/metrics").text
    assert 'classifier_requests_total{code="200",model="mobilenet_v2"} 1.0' in text
    assert 'classifier_requests_total{code="422",model="mobilenet_v2"} 1.0' in text
    assert 'classifier_requests_total{code="404",model="_unknown"} 1.0' in text
    assert 'classifier_requests_total{code="400",model="mobilenet_v2"} 1.0' in text
    assert 'classifier_images_total{model="mobilenet_v2"} 1.0' in text
    assert 'classifier_model_info{backend="onnxruntime-cpu"' in text
    assert 'classifier_queue_depth{model="mobilenet_v2"} 0.0' in text
    assert 'classifier_decode_duration_seconds_count{model="mobilenet_v2"}' in text


def test_counters_match_exactly_the_requests_sent_and_images_count_files(fake_repo):
    from prometheus_client.parser import text_string_to_metric_families

    successes, failures, files_per_post = 3, 2, 4
    app = create_app(serving_settings(fake_repo))
    with serving(app) as client:
        for _ in range(successes):
            assert classify(client).status_code == 200
        for _ in range(failures):
            assert classify(client, b"junk").status_code == 400
        files = [("file", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(files_per_post)]
        multi = client.post("/classify", params={"model": "mobilenet_v2"}, files=files)
        assert multi.status_code == 200 and len(multi.json()["results"]) == files_per_post
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for sample in family.samples
        }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("classifier_requests_total", model="mobilenet_v2", code="200") == successes + 1
    assert value("classifier_requests_total", model="mobilenet_v2", code="400") == failures
    assert value("classifier_images_total", model="mobilenet_v2") == successes + files_per_post
    requests = successes + failures + 1
    assert value("classifier_request_duration_seconds_count", model="mobilenet_v2") == requests


def test_models_are_discovered_unless_named(tmp_path):
    root = make_repository(tmp_path / "repo", ("mobilenet_v2", "shufflenet_v2"))
    shutil.copytree(root / "mobilenet_v2", root / "mobilenet_v1")  # a manifest naming another model
    app = create_app(serving_settings(root, models=("shufflenet_v2",)))
    with serving(app) as client:
        assert list(client.get("/readyz").json()["models"]) == ["shufflenet_v2"]
    app = create_app(serving_settings(root))
    with serving(app) as client:
        models = client.get("/readyz").json()["models"]
        assert list(models) == ["mobilenet_v1", "mobilenet_v2", "shufflenet_v2"]
        assert models["mobilenet_v1"]["status"] == "failed"
        assert "describes 'mobilenet_v2'" in models["mobilenet_v1"]["reason"]
