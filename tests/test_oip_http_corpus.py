"""Bad Open Inference Protocol requests over HTTP, as a corpus: each gets its status and the protocol's
error body ``{"error": "<message>"}``, never a 5xx, and the server goes on serving. Then the bearer
token: with AUTH_TOKEN set, the /v2 routes need it."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from contract.photos import photo_jpeg
from service.app import create_app
from tests.live_server import serving, serving_settings
from tests.workloads import jpeg_declaring

JPEG = photo_jpeg(320, 240, seed=5)
B64 = base64.b64encode(JPEG).decode()
MODEL = "mobilenet_v2"
INFER = f"/v2/models/{MODEL}/infer"
MAX_BODY = 1024 * 1024
QUEUE = 64


@pytest.fixture(scope="module")
def client(fake_repo):
    app = create_app(serving_settings(fake_repo, max_body_bytes=MAX_BODY, max_queue_size=QUEUE))
    with serving(app) as client:
        yield client


def image(data=None, *, shape=None, datatype="BYTES", name="image", **extra) -> dict:
    entry = {"name": name, "datatype": datatype, "shape": shape or [1]}
    entry["data"] = [B64] if data is None else data
    return entry | extra


def request(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs)} | extra).encode()


def binary(document: dict, *sections: bytes) -> tuple[bytes, dict[str, str]]:
    """A body with binary tensor data, and its Inference-Header-Content-Length header."""
    header = json.dumps(document).encode()
    return header + b"".join(sections), {"Inference-Header-Content-Length": str(len(header))}


def framed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_image(size: int, *sections: bytes, shape=(1,)) -> tuple[bytes, dict[str, str]]:
    entry = {
        "name": "image",
        "datatype": "BYTES",
        "shape": list(shape),
        "parameters": {"binary_data_size": size},
    }
    return binary({"inputs": [entry]}, *sections)


FP32_ONE = b"\x00\x00\x80\x3f"
SVG = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode()
HUGE = base64.b64encode(jpeg_declaring(60000, 60000)).decode()

# (id, method, path, body or (body, headers), status, a piece of the message)
CORPUS: list[tuple[str, str, str, object, int, str]] = [
    ("unknown-model", "POST", "/v2/models/resnet50/infer", request(image()), 404, "unknown model"),
    ("unknown-version", "POST", f"/v2/models/{MODEL}/versions/2/infer", request(image()), 404, "no version"),
    ("empty-version", "POST", f"/v2/models/{MODEL}/versions//infer", request(image()), 404, "no version"),
    ("non-utf8-model-name", "POST", "/v2/models/%FF%FE/infer", request(image()), 404, "unknown model"),
    ("get-infer", "GET", INFER, None, 405, "answers POST"),
    ("post-metadata", "POST", f"/v2/models/{MODEL}", b"{}", 405, "answers GET"),
    ("unknown-route", "GET", "/v2/foo", None, 404, "no route"),
    ("models-without-name", "GET", "/v2/models", None, 404, "no route"),
    ("unknown-model-metadata", "GET", "/v2/models/resnet50", None, 404, "unknown model"),
    ("unknown-model-config", "GET", "/v2/models/resnet50/config", None, 404, "unknown model"),
    ("not-json", "POST", INFER, b"inputs: image", 400, "not JSON"),
    ("not-utf8", "POST", INFER, b'{"inputs": "\xff\xfe"}', 400, "not JSON"),
    ("empty-body", "POST", INFER, b"", 400, "not JSON"),
    ("json-array", "POST", INFER, b"[1, 2]", 400, "JSON object"),
    ("no-inputs", "POST", INFER, b"{}", 400, "'inputs' must be a non-empty list"),
    ("empty-inputs", "POST", INFER, request(), 400, "'inputs' must be a non-empty list"),
    ("inputs-not-list", "POST", INFER, b'{"inputs": {"name": "image"}}', 400, "non-empty list"),
    ("input-not-object", "POST", INFER, request("image"), 400, "JSON object"),
    (
        "input-without-name",
        "POST",
        INFER,
        request({"datatype": "BYTES", "shape": [1], "data": [B64]}),
        400,
        "name",
    ),
    ("input-name-number", "POST", INFER, request(image(name=7)), 400, "name must be a string"),
    ("unknown-input", "POST", INFER, request(image(name="pixels")), 400, "unexpected input 'pixels'"),
    ("non-utf8-input-name", "POST", INFER, request(image(name="\udcff\ud800")), 400, "unexpected input"),
    ("two-inputs", "POST", INFER, request(image(), image()), 400, "expected 1 input"),
    ("hundred-inputs", "POST", INFER, request(*[image(["eA=="])] * 100), 400, "got 100"),
    ("image-as-fp32", "POST", INFER, request(image([1.0], datatype="FP32")), 400, "is BYTES"),
    ("unknown-datatype", "POST", INFER, request(image(datatype="STRING")), 400, "unknown datatype"),
    ("no-datatype", "POST", INFER, request({"name": "image", "shape": [1], "data": [B64]}), 400, "datatype"),
    ("no-shape", "POST", INFER, request({"name": "image", "datatype": "BYTES", "data": [B64]}), 400, "shape"),
    ("negative-shape", "POST", INFER, request(image(shape=[-1])), 400, "integer >= 0"),
    ("bool-shape", "POST", INFER, request(image(shape=[True])), 400, "integer >= 0"),
    ("image-shape-1x2", "POST", INFER, request(image([B64, B64], shape=[1, 2])), 400, "[-1] or [-1, 1]"),
    ("zero-images", "POST", INFER, request(image([], shape=[0])), 400, "holds no image"),
    ("too-many-images", "POST", INFER, request(image(["eA=="] * 65, shape=[65])), 400, "the limit is 64"),
    ("count-mismatch", "POST", INFER, request(image([B64], shape=[2])), 400, "holds 2 elements, data has 1"),
    ("not-base64", "POST", INFER, request(image(["%%%"])), 400, "not base64"),
    ("not-an-image", "POST", INFER, request(image([base64.b64encode(b"hello").decode()])), 400, "image 0"),
    ("svg", "POST", INFER, request(image([SVG])), 400, "SVG"),
    ("decompression-bomb", "POST", INFER, request(image([HUGE])), 400, "pixels"),
    ("null-data", "POST", INFER, request(image(None) | {"data": None}), 400, "has no data"),
    ("no-data", "POST", INFER, request({"name": "image", "datatype": "BYTES", "shape": [1]}), 400, "neither"),
    (
        "data-and-binary",
        "POST",
        INFER,
        binary({"inputs": [image(parameters={"binary_data_size": 4})]}, framed(b"")),
        400,
        "both",
    ),
    (
        "binary-size-past-body",
        "POST",
        INFER,
        binary_image(4 + len(JPEG) + 1, framed(JPEG)),
        400,
        "past the end",
    ),
    ("binary-size-negative", "POST", INFER, binary_image(-4, framed(JPEG)), 400, "integer >= 0"),
    ("binary-size-huge", "POST", INFER, binary_image(2**62, framed(JPEG)), 400, "past the end"),
    ("binary-size-string", "POST", INFER, binary_image("4", framed(JPEG)), 400, "integer >= 0"),  # type: ignore[arg-type]
    (
        "header-length-past-body",
        "POST",
        INFER,
        (request(image()), {"Inference-Header-Content-Length": "100000"}),
        400,
        "the body has only",
    ),
    (
        "header-length-not-a-number",
        "POST",
        INFER,
        (request(image()), {"Inference-Header-Content-Length": "ten"}),
        400,
        "number of bytes",
    ),
    (
        "header-length-negative",
        "POST",
        INFER,
        (request(image()), {"Inference-Header-Content-Length": "-5"}),
        400,
        "number of bytes",
    ),
    (
        "header-length-cuts-the-json",
        "POST",
        INFER,
        (request(image()), {"Inference-Header-Content-Length": "10"}),
        400,
        "not JSON",
    ),
    (
        "bytes-prefix-overruns",
        "POST",
        INFER,
        binary_image(8, struct.pack("<I", 1000) + b"abcd"),
        400,
        "says 1000 bytes",
    ),
    ("bytes-prefix-cut", "POST", INFER, binary_image(2, b"\x05\x00"), 400, "cut off"),
    ("bytes-count-short", "POST", INFER, binary_image(4 + len(JPEG), framed(JPEG), shape=(2,)), 400, "has 1"),
    (
        "binary-left-over",
        "POST",
        INFER,
        binary_image(4 + len(JPEG), framed(JPEG), b"xyz"),
        400,
        "belong to no input",
    ),
    (
        "fp32-size-mismatch",
        "POST",
        INFER,
        binary(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 3, 32, 32],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            FP32_ONE * 2,
        ),
        400,
        "takes 12288 bytes",
    ),
    (
        "fp32-wrong-size",
        "POST",
        INFER,
        request({"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.0]}),
        400,
        "[-1, 3, 32, 32]",
    ),
    (
        "fp32-strings",
        "POST",
        INFER,
        request({"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["1"] * 3072}),
        400,
        "must be numbers",
    ),
    (
        "fp32-nan",
        "POST",
        INFER,
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ['
        + b"NaN," * 3071
        + b"NaN]}]}",
        400,
        "finite",
    ),
    (
        "fp32-as-int64",
        "POST",
        INFER,
        request({"name": "input", "datatype": "INT64", "shape": [1, 3, 32, 32], "data": [0] * 3072}),
        400,
        "is FP32",
    ),
    (
        "unknown-output",
        "POST",
        INFER,
        request(image(), outputs=[{"name": "probs"}]),
        400,
        "unexpected output",
    ),
    (
        "classification-too-large",
        "POST",
        INFER,
        request(image(), outputs=[{"name": "logits", "parameters": {"classification": 1001}}]),
        400,
        "from 1 to 1000",
    ),
    (
        "classification-string",
        "POST",
        INFER,
        request(image(), outputs=[{"name": "logits", "parameters": {"classification": "5"}}]),
        400,
        "from 1 to 1000",
    ),
    (
        "classification-negative",
        "POST",
        INFER,
        request(image(), outputs=[{"name": "logits", "parameters": {"classification": -3}}]),
        400,
        "from 1 to 1000",
    ),
    (
        "outputs-not-list",
        "POST",
        INFER,
        request(image(), outputs={"name": "logits"}),
        400,
        "'outputs' must be a list",
    ),
    (
        "duplicate-output",
        "POST",
        INFER,
        request(image(), outputs=[{"name": "logits"}, {"name": "logits"}]),
        400,
        "more than once",
    ),
    (
        "binary-data-not-bool",
        "POST",
        INFER,
        request(image(), outputs=[{"name": "logits", "parameters": {"binary_data": "yes"}}]),
        400,
        "true or false",
    ),
    (
        "binary-output-not-bool",
        "POST",
        INFER,
        request(image(), parameters={"binary_data_output": 1}),
        400,
        "true or false",
    ),
    ("parameters-not-object", "POST", INFER, request(image(), parameters=[1]), 400, "'parameters' must be"),
    ("id-not-string", "POST", INFER, request(image(), id=42), 400, "'id' must be a string"),
    (
        "timeout-not-a-number",
        "POST",
        INFER,
        request(image(), parameters={"timeout": "1s"}),
        400,
        "microseconds",
    ),
    ("timeout-negative", "POST", INFER, request(image(), parameters={"timeout": -5}), 400, "microseconds"),
    (
        "declared-too-large",
        "POST",
        INFER,
        (b"{}", {"Content-Length": str(MAX_BODY + 1)}),
        413,
        "MAX_BODY_BYTES",
    ),
    ("body-too-large", "POST", INFER, request(image(["A" * (MAX_BODY + 8)])), 413, "MAX_BODY_BYTES"),
]


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 40
    assert len({case[0] for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
def test_bad_request_gets_its_status_and_the_protocols_error_body(
    client, method, path, body, status, message
):
    content, headers = body if isinstance(body, tuple) else (body, {})
    response = client.request(method, path, content=content, headers=headers)
    assert response.status_code == status < 500, response.text
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str), payload
    assert message in payload["error"], payload
    assert len(payload["error"]) < 400  # the client's input is echoed, never amplified
    if status == 405:
        assert response.headers["allow"] in {"GET", "POST"}
    # And the model still serves.
    ok = client.post(INFER, content=request(image()))
    assert ok.status_code == 200, ok.text


def test_a_good_request_in_json_for_reference(client):
    response = client.post(
        INFER, content=request(image(), outputs=[{"name": "logits", "parameters": {"classification": 2}}])
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1"
    (output,) = body["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "BYTES" and output["shape"] == [1, 2]
    score, index, label = output["data"][0].split(":", 2)
    assert 0 < float(score) <= 1 and 0 <= int(index) < 1000 and label
    response = client.post(INFER, content=request(image()))
    output = response.json()["outputs"][0]
    assert output["datatype"] == "FP32" and output["shape"] == [1, 1000] and len(output["data"]) == 1000


def test_the_clients_timeout_parameter_is_honoured(client):
    """Triton's clients send their timeout in microseconds; one that has passed before the batch runs is
    the 504 of the request deadline, and a generous one changes nothing."""
    late = client.post(INFER, content=request(image(), parameters={"timeout": 1}))
    assert late.status_code == 504 and "deadline passed" in late.json()["error"], late.text
    ok = client.post(INFER, content=request(image(), parameters={"timeout": 60_000_000}))
    assert ok.status_code == 200, ok.text


def test_health_and_readiness_bodies_are_empty(client):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        response = client.get(path)
        assert response.status_code == 200 and response.content == b"", path
    assert client.get("/v2/models/resnet50/ready").status_code == 404


TOKEN = "oip-test-token-0123456789"


def test_with_a_token_the_v2_routes_need_it(fake_repo):
    app = create_app(serving_settings(fake_repo, auth_token=TOKEN))
    with serving(app) as client:
        for method, path, body in (
            ("POST", INFER, request(image())),
            ("GET", f"/v2/models/{MODEL}", None),
            ("GET", "/v2", None),
        ):
            refused = client.request(method, path, content=body)
            assert refused.status_code == 401, (path, refused.text)
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = client.request(
                method, path, content=body, headers={"Authorization": "Bearer nope-nope-nope-nope"}
            )
            assert wrong.status_code == 401, path
            allowed = client.request(method, path, content=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert allowed.status_code == 200, (path, allowed.text)
