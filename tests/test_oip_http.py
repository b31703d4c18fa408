"""The Open Inference Protocol over HTTP, driven by Triton's own client (tritonclient.http, and its
asyncio flavour) against ``python -m service`` serving the four models built with random weights:
metadata, readiness, images as BYTES (binary and JSON), preprocessed FP32 tensors, the classification
extension, batches, concurrent calls, agreement with /classify, and the metrics they leave."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.manifest import Manifest
from contract.photos import photo_jpeg
from service.core.imaging import preprocess
from tests.live_server import ready_service

tritonhttp = pytest.importorskip("tritonclient.http")
tritonaio = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "mobilenet_v2"
JPEGS = [photo_jpeg(500, 375, seed=seed) for seed in range(8)]


@pytest.fixture(scope="module")
def service(built_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("oip-http") / "service.log"
    with ready_service(built_repository, log, MODELS=f"{MODEL},shufflenet_v2") as process:
        yield process


@pytest.fixture(scope="module")
def client(service):
    client = tritonhttp.InferenceServerClient(service.url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


def image_input(images: list[bytes], *, binary: bool = True, two_dims: bool = False):
    shape = [len(images), 1] if two_dims else [len(images)]
    tensor = tritonhttp.InferInput("image", shape, "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape), binary_data=True)
    else:
        # JSON strings carry text: an image element is its bytes in base64 there.
        encoded = [base64.b64encode(image) for image in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(shape), binary_data=False)
    return tensor


def classified(service, image: bytes, top_k: int = 5) -> list[dict]:
    response = httpx.post(
        f"{service.url}/classify", params={"model": MODEL, "top_k": top_k}, content=image, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def parse_classification(element: bytes | str) -> tuple[float, int, str]:
    text = element.decode() if isinstance(element, bytes) else element
    score, index, label = text.split(":", 2)
    return float(score), int(index), label


# --- metadata and health ------------------------------------------------------------------------------
def test_server_metadata_and_health(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])
    assert metadata["name"] and metadata["version"]
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")


def test_model_metadata_and_config(client, built_repository):
    crop = Manifest.load(built_repository / MODEL).preprocessing.crop
    metadata = client.get_model_metadata(MODEL)
    assert metadata == client.get_model_metadata(MODEL, "1")
    assert (
        metadata["name"] == MODEL and metadata["versions"] == ["1"] and metadata["platform"] == "onnx_onnxv1"
    )
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, crop, crop]},
    ]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] >= 8
    assert [entry["name"] for entry in config["input"]] == ["image", "input"]
    assert config["input"][1]["dims"] == [3, crop, crop] and config["output"][0]["dims"] == [1000]
    assert "dynamic_batching" in config
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("resnet50")


# --- inference ------------------------------------------------------------------------------------------
def test_classification_agrees_with_classify(client, service):
    output = tritonhttp.InferRequestedOutput("logits", binary_data=True, class_count=5)
    result = client.infer(MODEL, [image_input([JPEGS[0]])], outputs=[output])
    rows = result.as_numpy("logits")
    assert rows.shape == (1, 5)
    expected = classified(service, JPEGS[0])
    got = [parse_classification(element) for element in rows[0]]
    assert [index for _, index, _ in got] == [p["class_id"] for p in expected]
    assert [label for _, _, label in got] == [p["label"] for p in expected]
    np.testing.assert_allclose([score for score, _, _ in got], [p["score"] for p in expected], atol=1e-5)


def test_bytes_in_binary_and_in_json_and_an_fp32_tensor_give_the_same_logits(client, built_repository):
    binary = client.infer(MODEL, [image_input([JPEGS[1]])]).as_numpy("logits")
    assert binary.shape == (1, 1000) and binary.dtype == np.float32
    in_json = client.infer(
        MODEL,
        [image_input([JPEGS[1]], binary=False, two_dims=True)],
        outputs=[tritonhttp.InferRequestedOutput("logits", binary_data=False)],
    ).as_numpy("logits")
    np.testing.assert_allclose(in_json, binary, rtol=0, atol=1e-5)
    spec = Manifest.load(built_repository / MODEL).preprocessing
    tensor = preprocess(JPEGS[1], spec, 40_000_000)[np.newaxis]
    fp32 = tritonhttp.InferInput("input", list(tensor.shape), "FP32")
    fp32.set_data_from_numpy(tensor, binary_data=True)
    np.testing.assert_allclose(client.infer(MODEL, [fp32]).as_numpy("logits"), binary, rtol=0, atol=1e-5)


def test_json_classification_and_the_request_id(client, service):
    output = tritonhttp.InferRequestedOutput("logits", binary_data=False, class_count=3)
    result = client.infer(MODEL, [image_input([JPEGS[2]], binary=False)], outputs=[output], request_id="r-42")
    assert result.get_response()["id"] == "r-42" and result.get_response()["model_name"] == MODEL
    got = [parse_classification(element) for element in result.as_numpy("logits")[0]]
    assert [index for _, index, _ in got] == [p["class_id"] for p in classified(service, JPEGS[2], 3)]


def test_a_batch_of_eight_images_in_one_request(client, service):
    output = tritonhttp.InferRequestedOutput("logits", class_count=5)
    rows = client.infer(MODEL, [image_input(JPEGS)], outputs=[output]).as_numpy("logits")
    assert rows.shape == (8, 5)
    for image, row in zip(JPEGS, rows, strict=True):
        got = [parse_classification(element) for element in row]
        expected = classified(service, image)
        assert [index for _, index, _ in got] == [p["class_id"] for p in expected]
        np.testing.assert_allclose([s for s, _, _ in got], [p["score"] for p in expected], atol=1e-5)
    logits = client.infer(MODEL, [image_input(JPEGS)]).as_numpy("logits")
    assert logits.shape == (8, 1000)
    assert not np.allclose(logits[0], logits[1])  # each image its own row


def test_async_calls_at_concurrency_16(service):
    async def run() -> list[np.ndarray]:
        client = tritonaio.InferenceServerClient(service.url.removeprefix("http://"))
        try:
            calls = [client.infer(MODEL, [image_input([JPEGS[i % 8]])]) for i in range(48)]
            results = []
            for start in range(0, len(calls), 16):  # 16 in flight at a time
                results += await asyncio.gather(*calls[start : start + 16])
            return [result.as_numpy("logits") for result in results]
        finally:
            await client.close()

    logits = asyncio.run(run())
    assert len(logits) == 48
    for i, row in enumerate(logits):
        np.testing.assert_allclose(row, logits[i % 8], rtol=0, atol=1e-5)


def test_bad_requests_raise_the_servers_message(client):
    with pytest.raises(InferenceServerException, match="unknown model") as caught:
        client.infer("resnet50", [image_input([JPEGS[0]])])
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match="cannot decode") as caught:
        client.infer(MODEL, [image_input([b"\xff\xd8\xff" + b"\x00" * 100])])
    assert caught.value.status() == "400"


# --- metrics --------------------------------------------------------------------------------------------
def test_oip_requests_count_in_the_classifier_series_and_by_protocol(client, service):
    def samples() -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def delta(after, before, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    before = samples()
    client.infer(MODEL, [image_input(JPEGS[:3])])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [image_input([b"nope"])])
    classified(service, JPEGS[0])
    after = samples()
    ok = {"model": MODEL, "code": "200"}
    assert delta(after, before, "classifier_requests_total", **ok) == 2
    assert delta(after, before, "classifier_requests_total", model=MODEL, code="400") == 1
    assert delta(after, before, "classifier_images_total", model=MODEL) == 4
    assert delta(after, before, "classifier_protocol_requests_total", protocol="oip-http", **ok) == 1
    assert (
        delta(
            after, before, "classifier_protocol_requests_total", protocol="oip-http", model=MODEL, code="400"
        )
        == 1
    )
    assert delta(after, before, "classifier_protocol_requests_total", protocol="classify", **ok) == 1
    assert delta(after, before, "classifier_request_duration_seconds_count", model=MODEL) == 3
