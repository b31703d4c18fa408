"""Bad calls to the Open Inference Protocol over gRPC, as a corpus: each gets its proper status code
and a short message, never UNKNOWN or INTERNAL, and the server stays up. Also: the message and
metadata limits (MAX_BODY_BYTES, MAX_HEADER_BYTES), the admission rule (RESOURCE_EXHAUSTED where
HTTP says 429), the client's deadline (DEADLINE_EXCEEDED, and the expired call never runs), and the
bearer token in the ``authorization`` metadata.

Calls go through the generated stub that Triton's client ships, with messages built by hand where the
call is one the client would refuse to send; calls that protobuf cannot express (strings that are not
UTF-8, bytes that are no message) go as raw bytes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from contract.manifest import Manifest
from contract.photos import photo_jpeg
from service.app import create_app
from tests.fake_repository import RecordingLoader
from tests.live_server import LiveServer, ready_service, serving_settings, wait_ready

pytestmark = pytest.mark.slow

MODEL = "mobilenet_v2"
JPEG = photo_jpeg(64, 48, seed=3)
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 8 * 1024
MAX_QUEUE_SIZE = 8
SERVICE = "/inference.GRPCInferenceService/"
TOKEN = "grpc-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def service(fake_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("oip-grpc-corpus") / "service.log"
    env = {
        "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "MAX_QUEUE_SIZE": str(MAX_QUEUE_SIZE),
    }
    with ready_service(fake_repo, log, **env) as process:
        yield process
        assert process.process.poll() is None, "the server died"
        output = process.output()
        assert "Traceback" not in output and "unhandled error" not in output, output[-3000:]


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.grpc_url) as channel:
        yield channel


@pytest.fixture(scope="module")
def size(fake_repo) -> int:
    return Manifest.load(fake_repo / MODEL).preprocessing.crop


# --- building calls ----------------------------------------------------------------------------------
def lengths(*elements: bytes) -> bytes:
    """BYTES elements in the binary layout: a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor(name: str, datatype: str, shape: list[int], **contents: object):
    message = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if contents:
        message.contents.CopyFrom(service_pb2.InferTensorContents(**contents))
    return message


def request(inputs=(), raw=(), outputs=(), model=MODEL, version=""):
    return service_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=list(inputs),
        raw_input_contents=list(raw),
        outputs=list(outputs),
    )


def image(*elements: bytes, shape: list[int] | None = None):
    """A request of encoded images in raw contents (what tritonclient sends)."""
    shape = [len(elements)] if shape is None else shape
    return request([tensor("image", "BYTES", shape)], [lengths(*elements)])


def one_image(**kwargs: object):
    """One good JPEG, with what ``kwargs`` change about the request (outputs, model, version)."""
    return request([tensor("image", "BYTES", [1])], [lengths(JPEG)], **kwargs)


def pixels(size: int, shape: list[int] | None = None, data: bytes | None = None, datatype: str = "FP32"):
    shape = [1, 3, size, size] if shape is None else shape
    if data is None:
        data = np.zeros(int(np.prod(shape)), dtype="<f4").tobytes()
    return request([tensor("input", datatype, shape)], [data])


def output(name: str = "logits", **parameters: object):
    message = service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[
            type(value)
        ]
        setattr(message.parameters[key], field, value)
    return message


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (for payloads protobuf would refuse)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


NOT_UTF8 = b"\xff\xfe\xc3\x28"


def not_utf8_model_name() -> bytes:
    return field(1, NOT_UTF8) + image(JPEG).SerializeToString().split(field(1, MODEL.encode()), 1)[1]


def not_utf8_input_name() -> bytes:
    bare = tensor("", "BYTES", [1]).SerializeToString()
    return field(1, MODEL.encode()) + field(5, field(1, NOT_UTF8) + bare) + field(7, lengths(JPEG))


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    call: Callable[[int], object]  # the crop size -> a message, or raw bytes
    code: grpc.StatusCode


INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
TRUNCATED_JPEG = JPEG[: len(JPEG) // 2]

CORPUS = [
    # wrong datatype
    Case("image as FP32", "ModelInfer", lambda s: request([tensor("image", "FP32", [1])], [JPEG]), INVALID),
    Case(
        "image as INT32",
        "ModelInfer",
        lambda s: request([tensor("image", "INT32", [1])], [b"\0" * 4]),
        INVALID,
    ),
    Case(
        "image with no datatype",
        "ModelInfer",
        lambda s: request([tensor("image", "", [1])], [lengths(JPEG)]),
        INVALID,
    ),
    Case(
        "image of a made-up datatype",
        "ModelInfer",
        lambda s: request([tensor("image", "JPEG", [1])], [JPEG]),
        INVALID,
    ),
    Case("tensor as BYTES", "ModelInfer", lambda s: pixels(s, datatype="BYTES"), INVALID),
    Case("tensor as FP64", "ModelInfer", lambda s: pixels(s, datatype="FP64"), INVALID),
    Case("tensor as FP16", "ModelInfer", lambda s: pixels(s, datatype="FP16"), INVALID),
    # shape and element count
    Case("2 images declared, 1 sent", "ModelInfer", lambda s: image(JPEG, shape=[2]), INVALID),
    Case(
        "1 image declared, 2 sent",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])], [lengths(JPEG, JPEG)]),
        INVALID,
    ),
    Case("image shape []", "ModelInfer", lambda s: image(JPEG, shape=[]), INVALID),
    Case("image shape [0]", "ModelInfer", lambda s: request([tensor("image", "BYTES", [0])], [b""]), INVALID),
    Case("image shape [1, 2]", "ModelInfer", lambda s: image(JPEG, JPEG, shape=[1, 2]), INVALID),
    Case("image shape [1, 1, 1]", "ModelInfer", lambda s: image(JPEG, shape=[1, 1, 1]), INVALID),
    Case("negative dimension", "ModelInfer", lambda s: image(JPEG, shape=[-1]), INVALID),
    Case("huge dimension", "ModelInfer", lambda s: image(JPEG, shape=[2**62]), INVALID),
    Case(
        "more images than the queue holds",
        "ModelInfer",
        lambda s: image(*[JPEG] * (MAX_QUEUE_SIZE + 1)),
        INVALID,
    ),
    Case("tensor of the wrong side", "ModelInfer", lambda s: pixels(s, shape=[1, 3, s - 1, s]), INVALID),
    Case("tensor of 1 channel", "ModelInfer", lambda s: pixels(s, shape=[1, 1, s, s]), INVALID),
    Case("tensor of 3 dimensions", "ModelInfer", lambda s: pixels(s, shape=[3, s, s]), INVALID),
    Case(
        "tensor of a huge batch", "ModelInfer", lambda s: pixels(s, shape=[2**40, 3, s, s], data=b""), INVALID
    ),
    # raw contents of the wrong size
    Case(
        "tensor one float short", "ModelInfer", lambda s: pixels(s, data=b"\0" * (4 * 3 * s * s - 4)), INVALID
    ),
    Case(
        "tensor one byte over", "ModelInfer", lambda s: pixels(s, data=b"\0" * (4 * 3 * s * s + 1)), INVALID
    ),
    Case("tensor with no bytes", "ModelInfer", lambda s: pixels(s, data=b""), INVALID),
    Case(
        "tensor not finite",
        "ModelInfer",
        lambda s: pixels(s, data=np.full(3 * s * s, np.nan, "<f4").tobytes()),
        INVALID,
    ),
    Case(
        "two raw contents for one input",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])], [lengths(JPEG)] * 2),
        INVALID,
    ),
    Case(
        "raw contents and typed contents",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1], bytes_contents=[JPEG])], [lengths(JPEG)]),
        INVALID,
    ),
    # BYTES length prefixes
    Case(
        "length prefix overruns",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])], [struct.pack("<I", 1000) + JPEG[:10]]),
        INVALID,
    ),
    Case(
        "length prefix of 4 GiB",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])], [b"\xff\xff\xff\xff" + JPEG]),
        INVALID,
    ),
    Case(
        "length prefix cut off",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])], [b"\x05\x00"]),
        INVALID,
    ),
    Case(
        "bytes past the last element",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])], [lengths(JPEG) + b"\x01"]),
        INVALID,
    ),
    # the images themselves
    Case("not an image", "ModelInfer", lambda s: image(b"this is not an image"), INVALID),
    Case("an empty image", "ModelInfer", lambda s: image(b""), INVALID),
    Case("a truncated JPEG", "ModelInfer", lambda s: image(TRUNCATED_JPEG), INVALID),
    Case("a bad image among good ones", "ModelInfer", lambda s: image(JPEG, b"GIF89a", JPEG), INVALID),
    # typed contents
    Case(
        "typed contents: fewer images than the shape",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [2], bytes_contents=[JPEG])]),
        INVALID,
    ),
    Case(
        "typed contents: too few floats",
        "ModelInfer",
        lambda s: request([tensor("input", "FP32", [1, 3, s, s], fp32_contents=[0.0] * 7)]),
        INVALID,
    ),
    Case(
        "typed contents in the wrong field",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1], fp32_contents=[1.0])]),
        INVALID,
    ),
    Case("no data at all", "ModelInfer", lambda s: request([tensor("image", "BYTES", [1])]), INVALID),
    # inputs and outputs
    Case(
        "too many inputs",
        "ModelInfer",
        lambda s: request(
            [tensor("image", "BYTES", [1]), tensor("input", "FP32", [1, 3, s, s])],
            [lengths(JPEG), b"\0" * (12 * s * s)],
        ),
        INVALID,
    ),
    Case(
        "the same input twice",
        "ModelInfer",
        lambda s: request([tensor("image", "BYTES", [1])] * 2, [lengths(JPEG)] * 2),
        INVALID,
    ),
    Case("no inputs", "ModelInfer", lambda s: request(), INVALID),
    Case(
        "unknown input",
        "ModelInfer",
        lambda s: request([tensor("pixels", "BYTES", [1])], [lengths(JPEG)]),
        INVALID,
    ),
    Case("unknown output", "ModelInfer", lambda s: one_image(outputs=[output("probabilities")]), INVALID),
    Case("two outputs", "ModelInfer", lambda s: one_image(outputs=[output(), output()]), INVALID),
    Case(
        "classification -1", "ModelInfer", lambda s: one_image(outputs=[output(classification=-1)]), INVALID
    ),
    Case(
        "classification past the classes",
        "ModelInfer",
        lambda s: one_image(outputs=[output(classification=1001)]),
        INVALID,
    ),
    Case(
        "classification as a string",
        "ModelInfer",
        lambda s: one_image(outputs=[output(classification="5")]),
        INVALID,
    ),
    Case(
        "classification as a bool",
        "ModelInfer",
        lambda s: one_image(outputs=[output(classification=True)]),
        INVALID,
    ),
    Case(
        "classification as a fraction",
        "ModelInfer",
        lambda s: one_image(outputs=[output(classification=2.5)]),
        INVALID,
    ),
    # not UTF-8, not protobuf
    Case("model name not UTF-8", "ModelInfer", lambda s: not_utf8_model_name(), INVALID),
    Case("input name not UTF-8", "ModelInfer", lambda s: not_utf8_input_name(), INVALID),
    Case("not a protobuf message", "ModelInfer", lambda s: b"\xff" * 64, INVALID),
    Case("metadata: model name not UTF-8", "ModelMetadata", lambda s: field(1, NOT_UTF8), INVALID),
    Case("ready: model name not UTF-8", "ModelReady", lambda s: field(1, NOT_UTF8), INVALID),
    # unknown model or version
    Case("unknown model", "ModelInfer", lambda s: one_image(model="resnet50"), NOT_FOUND),
    Case("no model name", "ModelInfer", lambda s: one_image(model=""), NOT_FOUND),
    Case("a 60 KB model name", "ModelInfer", lambda s: one_image(model="m" * 60_000), NOT_FOUND),
    Case("unknown version", "ModelInfer", lambda s: one_image(version="2"), NOT_FOUND),
    Case(
        "metadata: unknown model",
        "ModelMetadata",
        lambda s: service_pb2.ModelMetadataRequest(name="resnet50"),
        NOT_FOUND,
    ),
    Case(
        "metadata: unknown version",
        "ModelMetadata",
        lambda s: service_pb2.ModelMetadataRequest(name=MODEL, version="0"),
        NOT_FOUND,
    ),
    Case(
        "ready: unknown model",
        "ModelReady",
        lambda s: service_pb2.ModelReadyRequest(name="resnet50"),
        NOT_FOUND,
    ),
    Case(
        "ready: unknown version",
        "ModelReady",
        lambda s: service_pb2.ModelReadyRequest(name=MODEL, version="latest"),
        NOT_FOUND,
    ),
    Case(
        "config: unknown model",
        "ModelConfig",
        lambda s: service_pb2.ModelConfigRequest(name="resnet50"),
        NOT_FOUND,
    ),
    # over the message limit (MAX_BODY_BYTES)
    Case(
        "a message one image over the limit", "ModelInfer", lambda s: image(b"\0" * MAX_BODY_BYTES), EXHAUSTED
    ),
    Case(
        "a message far over the limit", "ModelInfer", lambda s: image(b"\0" * (8 * MAX_BODY_BYTES)), EXHAUSTED
    ),
]


def raw_call(channel: grpc.Channel, method: str, payload: object) -> grpc.RpcError:
    """Call ``method`` with ``payload`` (a message or raw bytes) and return the error it must raise."""
    call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as raised:
        call(data, timeout=30)
    return raised.value


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 40
    assert len({case.name for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_a_bad_call_gets_its_status_code_and_a_short_message(channel, size, case):
    error = raw_call(channel, case.method, case.call(size))
    assert error.code() == case.code, (error.code(), error.details())
    assert error.details() and len(error.details()) < 1000


def test_after_the_corpus_the_server_still_answers(channel):
    response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(image(JPEG), timeout=30)
    assert list(response.outputs[0].shape) == [1, 1000]
    assert len(response.raw_output_contents[0]) == 4000


def test_typed_contents_answer_as_raw_contents_do(channel, size):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    raw = stub.ModelInfer(image(JPEG), timeout=30).raw_output_contents[0]
    typed = request([tensor("image", "BYTES", [1], bytes_contents=[JPEG])])
    assert stub.ModelInfer(typed, timeout=30).raw_output_contents[0] == raw
    pixels_raw = stub.ModelInfer(pixels(size, data=np.ones(3 * size * size, "<f4").tobytes()), timeout=30)
    pixels_typed = request(
        [tensor("input", "FP32", [1, 3, size, size], fp32_contents=[1.0] * (3 * size * size))]
    )
    response = stub.ModelInfer(pixels_typed, timeout=30)
    assert response.raw_output_contents[0] == pixels_raw.raw_output_contents[0]


def test_a_method_the_service_does_not_serve_is_unimplemented(channel):
    error = raw_call(channel, "ModelStatistics", service_pb2.ModelStatisticsRequest(name=MODEL))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- metadata limit (MAX_HEADER_BYTES) ---------------------------------------------------------------
def _live_with_metadata(channel: grpc.Channel, pad: int) -> grpc.StatusCode:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        # No deadline: a call with one carries grpc-timeout, whose length varies from call to call
        # (the time left, in as few digits as fit), which would move the cap by a byte or two.
        stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=[("x-pad", "a" * pad)])
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_metadata_up_to_the_cap_passes_one_byte_over_and_far_over_are_refused(channel):
    # gRPC counts each entry as name + value + 32 bytes, the call's own entries (path, authority,
    # content type, user agent, ...) included: find the largest entry of ours that passes.
    low, high = 0, MAX_HEADER_BYTES
    assert _live_with_metadata(channel, low) == grpc.StatusCode.OK
    assert _live_with_metadata(channel, high) != grpc.StatusCode.OK
    while high - low > 1:
        middle = (low + high) // 2
        if _live_with_metadata(channel, middle) == grpc.StatusCode.OK:
            low = middle
        else:
            high = middle
    at_cap = low + len("x-pad") + 32
    # What the call's own entries take is all that separates our largest entry from the cap.
    assert MAX_HEADER_BYTES - 1024 < at_cap <= MAX_HEADER_BYTES, at_cap
    assert _live_with_metadata(channel, low) == grpc.StatusCode.OK
    one_over = _live_with_metadata(channel, low + 1)
    far_over = _live_with_metadata(channel, 64 * MAX_HEADER_BYTES)
    assert one_over == far_over == grpc.StatusCode.RESOURCE_EXHAUSTED, (one_over, far_over)
    assert _live_with_metadata(channel, 0) == grpc.StatusCode.OK


# --- admission and deadlines, with a slow runtime ----------------------------------------------------
@pytest.fixture
def slow_server(fake_repo):
    loader = RecordingLoader(delay_s={MODEL: 0.3})
    settings = serving_settings(
        fake_repo, grpc_port=0, max_queue_size=1, max_batch_size=1, max_concurrent_batches=1, warmup=False
    )
    app = create_app(settings, runtime_loader=loader, serve_grpc=True)
    with LiveServer(app) as server:
        wait_ready(server.url)
        yield f"127.0.0.1:{app.state.grpc_server.port}", loader


def test_a_full_line_is_resource_exhausted_as_http_is_429(slow_server):
    url, _ = slow_server

    async def burst():
        async with grpc.aio.insecure_channel(url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(image(JPEG), timeout=30) for _ in range(6)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    answered = [o for o in outcomes if isinstance(o, service_pb2.ModelInferResponse)]
    assert len(answered) >= 2 and refused and len(answered) + len(refused) == 6, outcomes
    assert {o.code() for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(int(dict(o.trailing_metadata())["retry-after"]) >= 1 for o in refused)


def test_the_clients_deadline_is_honoured_and_an_expired_call_never_runs(slow_server):
    url, loader = slow_server
    loader.warm_batches_cleared()

    async def busy_then_short_deadline():
        async with grpc.aio.insecure_channel(url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            busy = asyncio.ensure_future(stub.ModelInfer(image(JPEG), timeout=30))
            await asyncio.sleep(0.1)  # the runtime is busy with it for 0.3 s
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(image(JPEG), timeout=0.1)
            await busy
            return raised.value.code()

    assert asyncio.run(busy_then_short_deadline()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(loader.runtimes[MODEL].batches) == 1, "the call whose deadline passed was run"


def test_a_model_that_failed_to_load_is_unavailable_and_not_ready(fake_repo):
    settings = serving_settings(fake_repo, grpc_port=0, models=(MODEL, "mobilenet_v1"), warmup=False)
    app = create_app(settings, serve_grpc=True)
    with LiveServer(app) as server:
        wait_ready(server.url, allow_not_ready=True)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.state.grpc_server.port}") as client:
            assert client.is_server_live() and not client.is_server_ready()
            assert client.is_model_ready(MODEL) and not client.is_model_ready("mobilenet_v1")
            inputs = [
                grpcclient.InferInput("image", [1], "BYTES").set_data_from_numpy(
                    np.array([JPEG], dtype=object)
                )
            ]
            for call in (
                lambda: client.infer("mobilenet_v1", inputs),
                lambda: client.get_model_metadata("mobilenet_v1"),
                lambda: client.get_model_config("mobilenet_v1"),
            ):
                with pytest.raises(grpcclient.InferenceServerException) as raised:
                    call()
                assert raised.value.status() == "StatusCode.UNAVAILABLE", raised.value.message()
            assert client.infer(MODEL, inputs).as_numpy("logits").shape == (1, 1000)


# --- bearer token --------------------------------------------------------------------------------------
def test_with_auth_token_calls_need_the_authorization_metadata(fake_repo, tmp_path):
    with (
        ready_service(fake_repo, tmp_path / "service.log", AUTH_TOKEN=TOKEN) as service,
        grpcclient.InferenceServerClient(service.grpc_url) as client,
    ):
        good = {"authorization": f"Bearer {TOKEN}"}
        with pytest.raises(grpcclient.InferenceServerException) as raised:
            client.is_server_live()
        assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_server_live(headers=good) and client.is_server_ready(headers=good)
        inputs = [
            grpcclient.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([JPEG], dtype=object))
        ]
        for headers in (None, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": TOKEN}):
            with pytest.raises(grpcclient.InferenceServerException) as raised:
                client.infer(MODEL, inputs, headers=headers)
            assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(grpcclient.InferenceServerException):
                client.get_model_metadata(MODEL, headers=headers)
        assert client.infer(MODEL, inputs, headers=good).as_numpy("logits").shape == (1, 1000)
        assert client.get_model_metadata(MODEL, headers=good).name == MODEL
