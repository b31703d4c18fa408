"""The load generator: its statistics, its reading of the server's histograms, and real runs against
``python -m service`` (closed and open loop, errors by code, the CLI's files)."""

from __future__ import annotations

import asyncio
import csv
import json
import shlex
import struct
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import generate_latest

from benchmarks import load, oip_requests
from benchmarks.classify_requests import build_requests, generated_images
from benchmarks.http_client import Connection
from benchmarks.load_protocols import PROTOCOLS
from benchmarks.load_results import Level, percentile
from benchmarks.server_metrics import Histogram, Scrape, parse_metrics, within_one_bucket
from benchmarks.text_table import text_table
from service.core.metrics import LATENCY_BUCKETS_S, Metrics
from tests.live_server import ServiceProcess, wait_ready

MODEL = "shufflenet_v2"


# --- statistics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_percentile_matches_numpy(q):
    values = list(np.random.default_rng(0).exponential(0.01, 501))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))
    assert percentile([], q) is None


def _histogram(observations: list[float]) -> Histogram:
    bounds = (*LATENCY_BUCKETS_S, float("inf"))
    counts = tuple(float(sum(1 for v in observations if v <= b)) for b in bounds)
    return Histogram(bounds, counts, sum(observations))


def test_histogram_bucket_and_quantile_follow_prometheus():
    # 10 observations: 6 in (5 ms, 7.5 ms], 3 in (10, 15], 1 in (100, 150].
    histogram = _histogram([0.006] * 6 + [0.012] * 3 + [0.12])
    assert histogram.count == 10
    assert histogram.bucket(0.5) == (0.005, 0.0075)
    assert histogram.bucket(0.9) == (0.01, 0.015)
    assert histogram.bucket(0.99) == (0.1, 0.15)
    # histogram_quantile: rank 5 of the 6 in (5, 7.5] -> 5 + 2.5 * 5/6 ms.
    assert histogram.quantile(0.5) == pytest.approx(0.005 + 0.0025 * 5 / 6)
    empty = histogram - histogram
    assert empty.count == 0 and empty.bucket(0.5) is None and empty.quantile(0.5) is None


def test_within_one_bucket_accepts_the_neighbours_and_nothing_further():
    histogram = _histogram([0.012] * 10)  # every quantile in (10, 15] ms
    assert within_one_bucket(histogram, 0.5, 0.013)  # same bucket
    assert within_one_bucket(histogram, 0.5, 0.009)  # (7.5, 10]: one below
    assert within_one_bucket(histogram, 0.5, 0.019)  # (15, 20]: one above
    assert not within_one_bucket(histogram, 0.5, 0.007)  # two below
    assert not within_one_bucket(histogram, 0.5, 0.025)  # two above


def test_parse_metrics_reads_the_services_own_exposition():
    metrics = Metrics(["a", "b"])
    for seconds in (0.004, 0.004, 0.011, 0.2):
        metrics.observe_request("a", 200, seconds)
    metrics.observe_decode("a", 0.002)
    metrics.observe_decode("a", 0.004)
    metrics.observe_batch("a", "onnxruntime-cpu", 1, 0.006)
    scrape = parse_metrics(generate_latest(metrics.registry).decode())
    histogram = scrape.requests["a"]
    assert histogram.count == 4
    assert histogram.total_sum == pytest.approx(0.219)
    assert histogram.bucket(0.5) == (0.003, 0.005)
    assert scrape.requests["b"].count == 0
    nothing = Scrape({}, {})
    assert scrape.stage_mean_delta("a", "decode", nothing) == pytest.approx(0.003)
    assert scrape.stage_mean_delta("a", "inference", nothing) == pytest.approx(0.006)
    assert scrape.stage_mean_delta("b", "decode", nothing) is None


def test_requests_are_built_complete_with_their_length():
    images = generated_images(2, 64, 48)
    raw = build_requests("h:1", "mobilenet_v2", images)
    head, body = raw[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /classify?model=mobilenet_v2&top_k=5 HTTP/1.1\r\n")
    assert f"Content-Length: {len(images[0].data)}".encode() in head and body == images[0].data
    multipart = build_requests("h:1", "m", images, files_per_request=2)[0]
    assert multipart.count(b'name="file"') == 2


def test_the_client_reads_chunked_bodies_and_honours_connection_close():
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
    ]
    connections = []

    async def answer(reader, writer):
        connections.append(writer)
        for raw in answers[len(connections) - 1 :]:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(raw)
            await writer.drain()
        writer.close()

    async def exchange_twice():
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = Connection("127.0.0.1", port)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            return await connection.exchange(request), await connection.exchange(request), connection
        finally:
            server.close()

    first, second, connection = asyncio.run(exchange_twice())
    assert first == (200, b"abcde") and second == (404, b"no")
    # Both answers came over one kept-alive connection, which the second one then closed.
    assert len(connections) == 1 and connection._writer is None


def test_text_table_aligns_text_left_and_numbers_right():
    table = text_table([("model", "req/s"), ("a", "1.5"), ("longer", "100.0")], left_aligned=1)
    assert table.splitlines() == [
        "model   req/s",
        "------  -----",
        "a         1.5",
        "longer  100.0",
    ]
    assert text_table([("a", "b"), ("ccc", "d")]).splitlines()[0] == "a    b"


# --- the Open Inference Protocol: requests built, answers read, against small fakes ------------------


def _split_http(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    request_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return request_line, headers, body


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_oip_http_requests_carry_binary_bytes_input_and_ask_for_the_classification():
    images = generated_images(3, 64, 48)
    raw = oip_requests.build_http_requests("h:1", "mobilenet_v2", images, top_k=5)[1]
    request_line, headers, body = _split_http(raw)
    assert request_line == "POST /v2/models/mobilenet_v2/infer HTTP/1.1"
    assert int(headers["content-length"]) == len(body)
    assert headers["content-type"] == "application/octet-stream"
    json_size = int(headers["inference-header-content-length"])
    header = json.loads(body[:json_size])
    (tensor,) = header["inputs"]
    assert tensor == {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(body) - json_size},
    }
    # The binary layout of BYTES: a 4-byte little-endian length, then the element's bytes.
    assert body[json_size:] == struct.pack("<I", len(images[1].data)) + images[1].data
    assert header["outputs"] == [{"name": "logits", "parameters": {"classification": 5, "binary_data": True}}]
    # Several images in one request: one BYTES element each.
    batch = oip_requests.build_http_requests("h:1", "m", images, images_per_request=3)[0]
    _, headers, body = _split_http(batch)
    json_size = int(headers["inference-header-content-length"])
    assert json.loads(body[:json_size])["inputs"][0]["shape"] == [3]
    assert oip_requests.bytes_elements(body[json_size:], 3) == [image.data for image in images]


def _classification(rows: int, k: int) -> list[bytes]:
    return [f"{0.5 - i / 100:.6f}:{i}:label {i}: with colon".encode() for _ in range(rows) for i in range(k)]


def _http_answer(rows: int, k: int, *, binary: bool = True, extra_output: bool = False) -> bytes:
    outputs = []
    data = b""
    if extra_output:
        raw = struct.pack("<4f", 1, 2, 3, 4)
        outputs.append(
            {
                "name": "other",
                "datatype": "FP32",
                "shape": [1, 4],
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        data += raw
    elements = _classification(rows, k)
    output = {"name": "logits", "datatype": "BYTES", "shape": [rows, k]}
    if binary:
        tensor = _bytes_tensor(elements)
        output["parameters"] = {"binary_data_size": len(tensor)}
        data += tensor
    else:
        output["data"] = [e.decode() for e in elements]
    outputs.append(output)
    return json.dumps({"model_name": "m", "model_version": "1", "outputs": outputs}).encode() + data


def test_oip_http_answers_are_read_binary_or_json():
    for answer in (
        _http_answer(2, 5),
        _http_answer(2, 5, binary=False),
        _http_answer(2, 5, extra_output=True),
    ):
        rows = oip_requests.read_http_answer(answer)
        assert len(rows) == 2 and all(len(row) == 5 for row in rows)
        assert oip_requests.parse_classification(rows[1][2]) == (0.48, 2, "label 2: with colon")
    truncated = _http_answer(1, 5)[:-3]
    with pytest.raises(oip_requests.AnswerError):
        oip_requests.read_http_answer(truncated)
    with pytest.raises(oip_requests.AnswerError):
        oip_requests.read_http_answer(b'{"error": "unknown model"}')
    with pytest.raises(oip_requests.AnswerError):
        oip_requests.bytes_elements(struct.pack("<I", 1000) + b"short")


def test_oip_grpc_requests_carry_raw_bytes_input_and_ask_for_the_classification():
    from tritonclient.grpc import service_pb2

    images = generated_images(2, 64, 48)
    (message, _) = oip_requests.build_grpc_requests("shufflenet_v2", images, top_k=3)
    request = service_pb2.ModelInferRequest.FromString(message)
    assert request.model_name == "shufflenet_v2"
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("image", "BYTES", [1])
    assert list(request.raw_input_contents) == [_bytes_tensor([images[0].data])]
    (output,) = request.outputs
    assert output.name == "logits" and output.parameters["classification"].int64_param == 3

    response = service_pb2.ModelInferResponse(model_name="shufflenet_v2", model_version="1")
    response.outputs.add(name="logits", datatype="BYTES", shape=[1, 3])
    response.raw_output_contents.append(_bytes_tensor(_classification(1, 3)))
    rows = oip_requests.read_grpc_answer(response.SerializeToString())
    assert [oip_requests.parse_classification(e)[1] for e in rows[0]] == [0, 1, 2]
    with pytest.raises(oip_requests.AnswerError):
        oip_requests.read_grpc_answer(b"\xff\xff not protobuf")


async def _fake_oip_http_server(malformed: bool = False):
    """Answers every infer request with a binary classification of as many rows as it sent images."""

    async def answer(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                _, headers, _ = _split_http(head)
                body = await reader.readexactly(int(headers["content-length"]))
                header = json.loads(body[: int(headers["inference-header-content-length"])])
                k = header["outputs"][0]["parameters"]["classification"]
                out = _http_answer(header["inputs"][0]["shape"][0], k)
                out = out[:-2] if malformed else out
                writer.write(
                    f"HTTP/1.1 200 OK\r\nContent-Length: {len(out)}\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n".encode()
                    + out
                )
        except asyncio.IncompleteReadError:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.parametrize("malformed", [False, True])
def test_oip_http_level_against_a_fake_server(malformed):
    images = generated_images(2, 64, 48)

    async def level():
        server = await _fake_oip_http_server(malformed)
        port = server.sockets[0].getsockname()[1]
        config = load.LoadConfig(
            url=f"http://127.0.0.1:{port}",
            duration_s=0.3,
            warmup_s=0.05,
            read_metrics=False,
            protocol="oip-http",
            files_per_request=2,
        )
        try:
            return await load.run_level(config, "m", Level("concurrency", 3), images)
        finally:
            server.close()

    result = load.run(level())
    assert result.protocol == "oip-http" and result.requests > 10 and result.connections == 3
    assert result.images == 2 * (result.ok + result.errors.get("malformed", 0))
    if malformed:
        assert result.ok == 0 and result.errors == {"malformed": result.requests}
    else:
        assert result.ok == result.requests and result.errors == {}
    assert result.server_timings_ms == {}  # OIP answers carry no timings_ms


def test_oip_grpc_level_against_a_fake_server():
    import grpc
    from tritonclient.grpc import service_pb2

    images = generated_images(2, 64, 48)
    seen = []

    async def model_infer(message: bytes, context) -> bytes:
        request = service_pb2.ModelInferRequest.FromString(message)
        seen.append(request.model_name)
        if request.model_name != "m":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name}")
        k = request.outputs[0].parameters["classification"].int64_param
        response = service_pb2.ModelInferResponse(model_name="m", model_version="1")
        response.outputs.add(name="logits", datatype="BYTES", shape=[1, k])
        response.raw_output_contents.append(_bytes_tensor(_classification(1, k)))
        return response.SerializeToString()

    async def level(model: str, concurrency: int):
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        config = load.LoadConfig(
            url="http://127.0.0.1:9",  # the HTTP side is not used: no metrics read
            grpc_url=f"127.0.0.1:{port}",
            duration_s=0.3,
            warmup_s=0.05,
            read_metrics=False,
            protocol="oip-grpc",
        )
        try:
            return await load.run_level(config, model, Level("concurrency", concurrency), images)
        finally:
            await server.stop(None)

    result = load.run(level("m", 4))
    assert result.protocol == "oip-grpc" and result.requests > 10
    assert result.ok == result.requests and result.errors == {}
    assert result.connections == 1  # one channel carries every concurrent call
    assert result.client_cpu_s > 0
    refused = load.run(level("nope", 2))
    assert refused.ok == 0 and refused.errors == {"NOT_FOUND": refused.requests}
    assert refused.latency_ms["p50"] is None and "nope" in seen


def test_the_cli_takes_protocols_by_name():
    assert load.parse_args(["--protocol", "oip-http,oip-grpc"]).protocol == ["oip-http", "oip-grpc"]
    assert load.parse_args(["--protocol", "all"]).protocol == list(PROTOCOLS)
    assert load.parse_args([]).protocol == ["classify"]
    with pytest.raises(SystemExit):
        load.parse_args(["--protocol", "oip-websocket"])


# --- against a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(built_repository, tmp_path_factory):
    env = {
        "MODEL_REPOSITORY": str(built_repository),
        "MODELS": MODEL,
        "BACKEND": "onnxruntime-cpu",
        "LOG_LEVEL": "WARNING",
    }
    process = ServiceProcess(env, tmp_path_factory.mktemp("load") / "server.log")
    try:
        wait_ready(process.url, 120)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def images():
    return generated_images(4)


def test_closed_loop_agrees_with_the_servers_histogram_within_one_bucket(server, images):
    config = load.LoadConfig(url=server.url, duration_s=2.0, warmup_s=0.5)
    result = load.run(load.run_level(config, MODEL, Level("concurrency", 4), images))
    assert result.errors == {} and result.ok == result.requests > 20
    histogram = result.server_histogram
    assert histogram is not None
    # The server counted exactly the measured requests: the warm-up is outside the window.
    assert histogram["count"] == result.ok
    for name in ("p50", "p99"):
        entry = histogram[name]
        low, high = entry["bucket_ms"]
        assert entry["client_within_one_bucket"], (name, result.latency_ms[name], (low, high))
    # The server's own split, from every response's timings_ms.
    assert set(result.server_timings_ms) >= {"decode", "queue", "inference", "total"}
    assert 0 < result.server_timings_ms["inference"]["mean"] < result.latency_ms["mean"]
    # Its own cost: reported, and small next to the server's.
    assert result.client_cpu_s > 0 and result.client_cpu_percent < 30
    assert result.connections == 4


def test_open_loop_keeps_its_schedule_and_counts_from_it(server, images):
    config = load.LoadConfig(url=server.url, duration_s=1.5, warmup_s=0.3)
    result = load.run(load.run_level(config, MODEL, Level("rate", 40), images))
    assert result.target_rate == 40
    assert abs(result.requests - 60) <= 2, result.requests
    assert result.ok == result.requests and result.errors == {}
    assert result.requests_per_s == pytest.approx(40, rel=0.25)
    assert result.server_histogram["count"] == result.ok


def test_errors_are_counted_by_status_code(server, images):
    config = load.LoadConfig(url=server.url, duration_s=0.5, warmup_s=0, max_requests=7)
    result = load.run(load.run_level(config, "no_such_model", Level("concurrency", 2), images))
    assert result.ok == 0 and result.errors == {"404": 7} and result.requests == 7
    assert result.latency_ms["p50"] is None


def test_the_cli_sweeps_every_ready_model_and_writes_json_and_csv(server, tmp_path, capsys):
    out = tmp_path / "results"
    flags = shlex.split("--models all --concurrency 1,2 --duration 0.5 --warmup 0.2 --image-count 2")
    code = load.main(["--url", server.url, *flags, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "load generator CPU" in printed and "p99" in printed
    # Standard JSON (no Infinity or NaN), so any tool reads it.
    data = json.loads((out / "load.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert [(r["model"], r["level"]) for r in data["results"]] == [(MODEL, 1), (MODEL, 2)]
    assert data["client_cpu_s"] > 0
    histogram = data["results"][0]["server_histogram"]
    assert histogram["le"][-1] == "+Inf" and len(histogram["le"]) == len(histogram["cumulative_counts"])
    rows = list(csv.DictReader((out / "load.csv").open()))
    assert [row["level"] for row in rows] == ["1", "2"]
    assert all(float(row["requests_per_s"]) > 0 and row["errors"] == "0" for row in rows)
    assert all(row["server_p50_bucket_ms"].startswith("(") for row in rows)


def test_the_cli_refuses_a_model_the_server_does_not_serve(server, capsys):
    assert load.main(["--url", server.url, "--models", "nope", "--duration", "0.1"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["oip-http", "oip-grpc"])
def test_the_open_inference_protocol_levels_against_the_real_server(server, images, protocol):
    config = load.LoadConfig(
        url=server.url, grpc_url=server.grpc_url, duration_s=1.5, warmup_s=0.3, protocol=protocol
    )
    result = load.run(load.run_level(config, MODEL, Level("concurrency", 4), images))
    # Every answer a well-formed top-5 classification of its image.
    assert result.errors == {} and result.ok == result.requests > 10
    assert result.protocol == protocol and result.images == result.ok
    # The server counts OIP requests in the same request histogram, under the same model.
    assert result.server_histogram is not None and result.server_histogram["count"] == result.ok
    assert result.client_cpu_s > 0
    refused = load.run(
        load.run_level(replace(config, max_requests=3), "no_such_model", Level("concurrency", 1), images)
    )
    assert refused.ok == 0 and refused.requests == 3
    assert refused.errors == ({"404": 3} if protocol == "oip-http" else {"NOT_FOUND": 3})


def test_the_cli_sweeps_each_protocol_in_turn(server, tmp_path, capsys):
    out = tmp_path / "results"
    flags = shlex.split("--protocol all --concurrency 1 --duration 0.4 --warmup 0.1 --image-count 2")
    code = load.main(["--url", server.url, "--grpc-url", server.grpc_url, *flags, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "load.json").read_text())
    assert [r["protocol"] for r in data["results"]] == list(PROTOCOLS)
    assert all(r["ok"] > 0 and r["errors"] == {} for r in data["results"])
    rows = list(csv.DictReader((out / "load.csv").open()))
    assert [row["protocol"] for row in rows] == list(PROTOCOLS)
