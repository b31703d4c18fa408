"""Unit tests of the protocol-neutral Open Inference Protocol layer: service/oip/tensors.py (datatypes,
shapes, the binary tensor data and classification extensions), service/oip/model.py (metadata and
config), service/oip/infer.py (a request checked against a model, the one error table) and the core's
entry for it (Pipeline.infer: encoded or preprocessed images, logits or top-k)."""

from __future__ import annotations

import base64
import functools
import struct
from pathlib import Path

import numpy as np
import pytest

from contract.manifest import Manifest
from contract.photos import photo_jpeg
from service.app import create_app
from service.core.imaging import preprocess
from service.core.pipeline import LOGITS
from service.core.repository import ModelStatus, ServedModel
from service.errors import (
    ImageTooLarge,
    InternalError,
    InvalidImage,
    ModelUnavailable,
    Overloaded,
    RequestTimeout,
    UnknownModel,
    UnsupportedMediaType,
)
from service.oip import model as oip_model
from service.oip.infer import (
    STATUS,
    InputTensor,
    Kind,
    OipError,
    RequestedOutput,
    decode_inputs,
    from_service_error,
    requested_output,
)
from service.oip.tensors import (
    BinarySections,
    TensorFormatError,
    byte_size,
    check_datatype,
    check_shape,
    classification_strings,
    deserialize_bytes,
    serialize_bytes,
    split_body,
)
from tests.live_server import serving, serving_settings

JPEG = photo_jpeg(320, 240, seed=3)
QUEUE = 4


class _Batcher:
    max_queue_size = QUEUE


@pytest.fixture(scope="module")
def served(fake_repo: Path) -> ServedModel:
    """mobilenet_v2 of the fake repository (32x32 input, 1000 classes), as the OIP layer sees it."""
    manifest = Manifest.load(fake_repo / "mobilenet_v2")
    model = ServedModel("mobilenet_v2", fake_repo / "mobilenet_v2", "fp32", ModelStatus.READY)
    model.manifest = manifest
    model.batcher = _Batcher()  # type: ignore[assignment]
    return model


# --- tensors.py ---------------------------------------------------------------------------------------
def test_bytes_elements_round_trip_in_the_binary_layout():
    elements = [b"", b"a", JPEG, bytes(range(256))]
    raw = serialize_bytes(elements)
    assert raw[:4] == struct.pack("<I", 0) and raw[4:8] == struct.pack("<I", 1)
    assert deserialize_bytes(raw, 4, name="x") == elements
    assert deserialize_bytes(memoryview(raw), 4, name="x") == elements


@pytest.mark.parametrize(
    ("raw", "count", "match"),
    [
        (struct.pack("<I", 10) + b"short", 1, "says 10 bytes but only 5 remain"),
        (struct.pack("<I", 2**32 - 1) + b"x", 1, "only 1 remain"),
        (b"\x01\x00", 1, "length prefix is cut off"),
        (serialize_bytes([b"a", b"b"]), 1, "has more"),
        (serialize_bytes([b"a"]), 2, "has 1"),
        (b"", 1, "has 0"),
    ],
)
def test_bytes_elements_that_overrun_or_miscount_are_refused(raw, count, match):
    with pytest.raises(TensorFormatError, match=match):
        deserialize_bytes(raw, count, name="image")


def test_a_body_splits_at_the_inference_header_length():
    body = b'{"a":1}' + b"\x00\x01\x02"
    header, binary = split_body(body, "7")
    assert bytes(header) == b'{"a":1}' and bytes(binary) == b"\x00\x01\x02"
    header, binary = split_body(body, None)
    assert bytes(header) == body and len(binary) == 0
    assert len(split_body(body, str(len(body)))[1]) == 0


@pytest.mark.parametrize("length", ["11", "-1", "abc", "", "1e3", "99999999999999999999999", " 3 x"])
def test_a_bad_or_too_large_inference_header_length_is_refused(length):
    with pytest.raises(TensorFormatError, match="Inference-Header-Content-Length"):
        split_body(b'{"a":1}\x00\x01\x02', length)


def test_binary_sections_are_taken_in_order_and_must_all_be_claimed():
    sections = BinarySections(memoryview(b"abcdef"))
    assert bytes(sections.take("x", 2)) == b"ab"
    assert bytes(sections.take("y", 0)) == b""
    with pytest.raises(TensorFormatError, match="1 bytes of binary data"):
        assert bytes(sections.take("z", 3)) == b"cde"
        sections.check_consumed()
    with pytest.raises(TensorFormatError, match="runs past the end"):
        sections.take("w", 2)


@pytest.mark.parametrize("size", [-1, True, 1.5, "4", None])
def test_a_binary_data_size_must_be_a_non_negative_integer(size):
    with pytest.raises(TensorFormatError, match="binary_data_size must be an integer"):
        BinarySections(memoryview(b"abcd")).take("x", size)


def test_shapes_and_datatypes():
    assert check_shape([2, 3, 0]) == (2, 3, 0)
    assert check_shape((1,)) == (1,)
    for bad in ([-1], [True], [1.0], "12", None, [[1]], {"a": 1}):
        with pytest.raises(TensorFormatError):
            check_shape(bad)
    assert check_datatype("FP32") == "FP32"
    for bad in ("fp32", "FLOAT", None, 1):
        with pytest.raises(TensorFormatError, match="unknown datatype"):
            check_datatype(bad)
    assert byte_size("FP32", (2, 3)) == 24 and byte_size("BYTES", (2,)) is None


def test_classification_strings_are_score_index_label():
    predictions = [{"class_id": 281, "label": "tabby, tabby cat", "score": 0.75}]
    assert classification_strings(predictions) == [b"0.75:281:tabby, tabby cat"]


# --- model.py -----------------------------------------------------------------------------------------
def test_model_metadata_is_truthful(served):
    metadata = oip_model.model_metadata(served, [1, 3])
    assert metadata == {
        "name": "mobilenet_v2",
        "versions": ["1", "3"],
        "platform": "onnx_onnxv1",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
    }
    server = oip_model.server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"]) and server["version"]


# --- infer.py -----------------------------------------------------------------------------------------
def test_every_kind_has_an_http_status_and_a_grpc_code():
    import grpc

    assert set(STATUS) == set(Kind)
    for kind, status in STATUS.items():
        assert 400 <= status.http < 600 and grpc.StatusCode[status.grpc], kind
    assert STATUS[Kind.INVALID].http == 400 and STATUS[Kind.INVALID].grpc == "INVALID_ARGUMENT"
    assert STATUS[Kind.OVERLOADED].http == 429 and STATUS[Kind.OVERLOADED].grpc == "RESOURCE_EXHAUSTED"
    assert STATUS[Kind.TIMEOUT].grpc == "DEADLINE_EXCEEDED" and STATUS[Kind.UNAVAILABLE].http == 503


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (UnknownModel("x"), Kind.NOT_FOUND),
        (ModelUnavailable("x"), Kind.UNAVAILABLE),
        (Overloaded("x", headers={"Retry-After": "2"}), Kind.OVERLOADED),
        (RequestTimeout("x"), Kind.TIMEOUT),
        (InvalidImage("x"), Kind.INVALID),
        (ImageTooLarge("x"), Kind.INVALID),
        (UnsupportedMediaType("x"), Kind.INVALID),
        (InternalError("x"), Kind.INTERNAL),
    ],
)
def test_the_cores_errors_have_a_kind(error, kind):
    converted = from_service_error(error)
    assert converted.kind is kind and converted.message == "x"
    if kind is Kind.OVERLOADED:
        assert converted.headers == {"Retry-After": "2"}
    # A client's error stays the client's, a server's the server's.
    assert (converted.http_status < 500) == (error.status_code < 500)


def test_images_come_from_bytes_in_the_binary_layout_or_base64_in_json(served):
    raw = serialize_bytes([JPEG, JPEG])
    assert decode_inputs(served, [InputTensor("image", "BYTES", (2,), raw=raw)]) == [JPEG, JPEG]
    assert decode_inputs(served, [InputTensor("image", "BYTES", (1, 1), raw=serialize_bytes([JPEG]))]) == [
        JPEG
    ]
    text = base64.b64encode(JPEG).decode()
    assert decode_inputs(served, [InputTensor("image", "BYTES", (1,), values=[text])]) == [JPEG]
    assert decode_inputs(served, [InputTensor("image", "BYTES", (1, 1), values=[[text]])]) == [JPEG]
    assert decode_inputs(served, [InputTensor("image", "BYTES", (1,), values=[JPEG])]) == [JPEG]


def test_a_preprocessed_tensor_comes_from_bytes_or_numbers(served):
    batch = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    array = decode_inputs(served, [InputTensor("input", "FP32", batch.shape, raw=batch.tobytes())])
    np.testing.assert_array_equal(array, batch)
    nested = decode_inputs(served, [InputTensor("input", "FP32", batch.shape, values=batch.tolist())])
    np.testing.assert_array_equal(nested, batch)
    flat = decode_inputs(served, [InputTensor("input", "FP32", batch.shape, values=batch.ravel().tolist())])
    np.testing.assert_array_equal(flat, batch)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ([], "expected 1 input"),
        ([InputTensor("image", "BYTES", (1,), values=["x"])] * 2, "expected 1 input"),
        ([InputTensor("pixels", "BYTES", (1,), values=["x"])], "unexpected input 'pixels'"),
        ([InputTensor("image", "FP32", (1,), values=[1.0])], "is BYTES"),
        ([InputTensor("image", "BYTES", (1, 2), values=["a", "b"])], r"shape \[-1\] or \[-1, 1\]"),
        ([InputTensor("image", "BYTES", (0,), values=[])], "holds no image"),
        ([InputTensor("image", "BYTES", (QUEUE + 1,), values=["x"] * 5)], "the limit is 4"),
        ([InputTensor("image", "BYTES", (2,), values=["eA=="])], "holds 2 elements, data has 1"),
        ([InputTensor("image", "BYTES", (1,), values=["not base64!"])], "not base64"),
        ([InputTensor("image", "BYTES", (1,), values=[12])], "must be a string"),
        ([InputTensor("image", "BYTES", (1,), values=None)], "has no data"),
        ([InputTensor("input", "INT8", (1, 3, 32, 32), raw=b"")], "is FP32"),
        ([InputTensor("input", "FP32", (1, 3, 16, 16), raw=b"")], r"shape \[-1, 3, 32, 32\]"),
        ([InputTensor("input", "FP32", (1, 3, 32, 32), raw=b"\x00" * 12)], "takes 12288 bytes, got 12"),
        ([InputTensor("input", "FP32", (1, 3, 32, 32), values=[1.0] * 5)], "holds 3072 elements, data has 5"),
        ([InputTensor("input", "FP32", (1, 3, 32, 32), values=["a"] * 3072)], "must be numbers"),
        ([InputTensor("input", "FP32", (1, 3, 32, 32), values=[[1.0], [1.0, 2.0]])], "list of numbers"),
        ([InputTensor("input", "FP32", (1, 3, 32, 32), values=[float("nan")] * 3072)], "finite"),
    ],
)
def test_inputs_that_do_not_fit_the_model_are_invalid(served, inputs, match):
    with pytest.raises(OipError, match=match) as caught:
        decode_inputs(served, inputs)
    assert caught.value.kind is Kind.INVALID and caught.value.http_status == 400


def test_the_one_output_and_its_classification(served):
    assert requested_output(served, []) == RequestedOutput("logits")
    assert requested_output(served, [RequestedOutput("logits", 5)]).classification == 5
    for outputs, match in [
        ([RequestedOutput("probabilities")], "unexpected output"),
        ([RequestedOutput("logits"), RequestedOutput("logits")], "one output"),
        ([RequestedOutput("logits", 1001)], "from 1 to 1000"),
        ([RequestedOutput("logits", -1)], "from 1 to 1000"),
        ([RequestedOutput("logits", True)], "from 1 to 1000"),
        ([RequestedOutput("logits", "5")], "from 1 to 1000"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(OipError, match=match):
            requested_output(served, outputs)


# --- the core's entry -----------------------------------------------------------------------------------
def test_pipeline_infer_gives_logits_or_the_top_k_that_classify_gives(fake_repo):
    app = create_app(serving_settings(fake_repo))
    with serving(app) as client:
        served = app.state.repository.get("mobilenet_v2")
        pipeline = app.state.pipeline

        def infer(images, top_k):
            work = functools.partial(pipeline.infer, served, images, top_k=top_k, deadline=float("inf"))
            return client.portal.call(work)

        classified = client.post(
            "/classify", params={"model": "mobilenet_v2", "top_k": 5}, content=JPEG
        ).json()["predictions"]
        (ranked,) = infer([JPEG], 5)
        assert ranked.output == classified
        logits = infer([JPEG, JPEG], LOGITS)
        assert [r.output.shape for r in logits] == [(1000,), (1000,)]
        assert logits[0].output.dtype == np.float32
        np.testing.assert_array_equal(logits[0].output, logits[1].output)
        top = np.argsort(-logits[0].output, kind="stable")[:5]
        assert [p["class_id"] for p in classified] == top.tolist()
        # The same image preprocessed by the client: no decode, the same logits.
        tensor = preprocess(JPEG, served.manifest.preprocessing, 40_000_000)[np.newaxis]
        registry = app.state.metrics.registry
        decodes = {"model": "mobilenet_v2"}
        decoded_before = registry.get_sample_value("classifier_decode_duration_seconds_count", decodes)
        (from_tensor,) = infer(tensor, LOGITS)
        np.testing.assert_allclose(from_tensor.output, logits[0].output, rtol=0, atol=1e-6)
        decoded_after = registry.get_sample_value("classifier_decode_duration_seconds_count", decodes)
        assert decoded_before >= 4 and decoded_after == decoded_before  # nothing was decoded for it
        with pytest.raises(InvalidImage) as caught:
            infer([JPEG, b"\xff\xd8\xffnot a jpeg"], 5)
        assert caught.value.message.startswith("image 1: ")  # which image of the batch
