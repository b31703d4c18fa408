"""The Open Inference Protocol over gRPC, with Triton's own client (tritonclient.grpc) against
``python -m service`` serving a model built by build_engines.py: health, metadata and configuration,
BYTES images and FP32 tensors, the classification extension, batches, concurrent async calls, agreement
with ``/classify`` on the same bytes, and the metrics that count the calls."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from prometheus_client.parser import text_string_to_metric_families

from contract.manifest import Manifest
from contract.photos import photo_jpeg
from service.core import imaging
from service.core.ranking import softmax
from tests.live_server import ready_service

pytestmark = pytest.mark.slow

MODEL = "shufflenet_v2"
JPEGS = [photo_jpeg(320 + 16 * i, 240 + 8 * i, seed=60 + i) for i in range(8)]


@pytest.fixture(scope="module")
def service(built_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("oip-grpc") / "service.log"
    with ready_service(built_repository, log, MODELS=MODEL) as process:
        yield process


@pytest.fixture(scope="module")
def client(service):
    with grpcclient.InferenceServerClient(service.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def manifest(built_repository) -> Manifest:
    return Manifest.load(built_repository / MODEL)


def image_input(images: list[bytes], shape: list[int] | None = None) -> grpcclient.InferInput:
    shape = shape or [len(images)]
    tensor = grpcclient.InferInput("image", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape))
    return tensor


def logits_of(client, inputs: list[grpcclient.InferInput]) -> np.ndarray:
    result = client.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32
    return logits


def classify(service, image: bytes, top_k: int = 5) -> list[dict]:
    response = httpx.post(f"{service.url}/classify?model={MODEL}&top_k={top_k}", content=image, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def parse_classification(element: bytes) -> tuple[float, int, str]:
    score, index, label = element.decode().split(":", 2)
    return float(score), int(index), label


def assert_agrees(classes: list[tuple[float, int, str]], predictions: list[dict]) -> None:
    assert [c[1] for c in classes] == [p["class_id"] for p in predictions]
    assert [c[2] for c in classes] == [p["label"] for p in predictions]
    np.testing.assert_allclose([c[0] for c in classes], [p["score"] for p in predictions], rtol=0, atol=1e-5)


# --- health, metadata, configuration ---------------------------------------------------------------
def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name and metadata.version
    assert {"binary_tensor_data", "classification"} <= set(metadata.extensions)


def test_model_metadata_readiness_and_config_are_truthful(client, manifest):
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    metadata = client.get_model_metadata(MODEL)
    size = manifest.preprocessing.crop
    assert (metadata.name, list(metadata.versions), metadata.platform) == (MODEL, ["1"], "onnx_onnxv1")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {"image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, size, size])}
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("logits", "FP32", [-1, 1000])]
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.max_batch_size >= 8
    assert {t.name for t in config.input} == {"image", "input"}
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [1000])]
    assert config.HasField("dynamic_batching")


# --- inference ---------------------------------------------------------------------------------------
def test_a_jpeg_as_bytes_gives_the_logits_that_classify_ranks(client, service):
    result = client.infer(MODEL, [image_input([JPEGS[0]])], request_id="request-42")
    assert (result.get_response().id, result.get_response().model_version) == ("request-42", "1")
    logits = result.as_numpy("logits")
    assert logits.shape == (1, 1000)
    scores = softmax(logits[0])
    top = np.argsort(-scores, kind="stable")[:5]
    predictions = classify(service, JPEGS[0])
    assert [int(i) for i in top] == [p["class_id"] for p in predictions]
    np.testing.assert_allclose(scores[top], [p["score"] for p in predictions], rtol=0, atol=1e-5)


def test_classification_k5_agrees_with_classify(client, service):
    result = client.infer(
        MODEL, [image_input([JPEGS[1]])], outputs=[grpcclient.InferRequestedOutput("logits", class_count=5)]
    )
    classes = result.as_numpy("logits")
    assert classes.shape == (1, 5)
    assert_agrees([parse_classification(e) for e in classes[0]], classify(service, JPEGS[1]))


def test_a_preprocessed_fp32_tensor_gives_the_same_logits_as_its_jpeg(client, manifest):
    tensor = imaging.preprocess(JPEGS[2], manifest.preprocessing, 40_000_000)[np.newaxis]
    fp32 = grpcclient.InferInput("input", list(tensor.shape), "FP32")
    fp32.set_data_from_numpy(tensor)
    np.testing.assert_allclose(
        logits_of(client, [fp32]), logits_of(client, [image_input([JPEGS[2]])]), rtol=1e-5, atol=1e-5
    )


def test_a_batch_of_8_images_in_one_request_answers_each_as_alone(client):
    alone = np.concatenate([logits_of(client, [image_input([jpeg])]) for jpeg in JPEGS])
    batch = logits_of(client, [image_input(JPEGS)])
    assert batch.shape == (8, 1000)
    np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-5)
    # [-1, 1] is the other shape the metadata admits.
    np.testing.assert_allclose(logits_of(client, [image_input(JPEGS, [8, 1])]), alone, rtol=1e-5, atol=1e-5)


def test_async_calls_at_concurrency_16_each_agree_with_classify(service):
    expected = [classify(service, jpeg) for jpeg in JPEGS]

    async def calls():
        async with aio_grpcclient.InferenceServerClient(service.grpc_url) as client:
            top5 = [aio_grpcclient.InferRequestedOutput("logits", class_count=5)]
            return await asyncio.gather(
                *(client.infer(MODEL, [image_input([JPEGS[i % 8]])], outputs=top5) for i in range(16))
            )

    results = asyncio.run(calls())
    for i, result in enumerate(results):
        assert_agrees([parse_classification(e) for e in result.as_numpy("logits")[0]], expected[i % 8])


# --- metrics --------------------------------------------------------------------------------------------
def _samples(service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{service.url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_calls_are_counted_in_the_classifier_series_and_by_protocol(client, service):
    requests = ("classifier_requests_total", (("code", "200"), ("model", MODEL)))
    by_protocol = (
        "classifier_protocol_requests_total",
        (("code", "200"), ("model", MODEL), ("protocol", "oip-grpc")),
    )
    images = ("classifier_images_total", (("model", MODEL),))
    not_found = (
        "classifier_protocol_requests_total",
        (("code", "404"), ("model", "_unknown"), ("protocol", "oip-grpc")),
    )
    before = _samples(service)
    logits_of(client, [image_input(JPEGS[:3])])
    with pytest.raises(grpcclient.InferenceServerException):
        client.infer("no_such_model", [image_input(JPEGS[:1])])
    after = _samples(service)
    assert after[requests] - before.get(requests, 0) == 1
    assert after[by_protocol] - before.get(by_protocol, 0) == 1
    assert after[images] - before[images] == 3
    assert after[not_found] - before.get(not_found, 0) == 1
