"""The load generator: its statistics, its reading of the server's histograms, and real runs against
``python -m service`` (closed and open loop, errors by code, the CLI's files)."""

from __future__ import annotations

import asyncio
import csv
import json
import shlex

import numpy as np
import pytest
from prometheus_client import generate_latest

from benchmarks import load
from benchmarks.classify_requests import build_requests, generated_images
from benchmarks.http_client import Connection
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
