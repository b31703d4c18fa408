"""MAX_HEADER_BYTES: a request's line and headers together are capped on every HTTP route, /classify
and the Open Inference Protocol's included: at the cap it is served, one byte over or far over it
gets 431 with the JSON error body and the connection is closed."""

from __future__ import annotations

import base64
import json
import select
import socket

import pytest

from contract.photos import photo_jpeg
from service.errors import ERRORS
from service.http.protocol import DEFAULT_MAX_HEADER_BYTES, headers_too_large_response
from tests.live_server import ServiceProcess, free_socket, wait_ready

CAP = DEFAULT_MAX_HEADER_BYTES  # the default, so that the default is what is tested
JPEG = photo_jpeg(320, 240, seed=4)
ROUTES = [
    ("GET", "/healthz", b""),
    ("POST", "/classify?model=mobilenet_v2", JPEG),
    ("GET", "/v2/health/live", b""),
    ("GET", "/v2/models/mobilenet_v2", b""),
    (
        "POST",
        "/v2/models/mobilenet_v2/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(JPEG).decode()],
                    }
                ]
            }
        ).encode(),
    ),
]


def head_of_size(size: int, method: str, target: str, body: bytes, *, close: bool = True) -> bytes:
    """A request whose line and headers take exactly ``size`` bytes (padded by an X-Pad header)."""
    lines = f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
    if close:
        lines += "Connection: close\r\n"
    pad = size - len(lines) - len("X-Pad: \r\n") - len("\r\n")
    assert pad >= 1
    head = (lines + f"X-Pad: {'a' * pad}\r\n\r\n").encode()
    assert len(head) == size
    return head + body


def exchange(port: int, data: bytes, piece: int = 16384) -> bytes:
    """Send ``data`` a piece at a time until the server answers, then read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for start in range(0, len(data), piece):
            if select.select([sock], [], [], 0)[0]:
                break  # answered (refused) before it had it all
            try:
                sock.sendall(data[start : start + piece])
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return answer


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def assert_431(answer: bytes) -> None:
    status, body = status_and_body(answer)
    assert status == 431, answer[:300]
    assert b"connection: close" in answer.partition(b"\r\n\r\n")[0].lower()
    error = json.loads(body)["error"]
    assert error["code"] == "headers_too_large" and str(CAP) in error["message"]


def test_the_431_answer_is_a_whole_json_error_response():
    canned = headers_too_large_response(CAP)
    head, _, body = canned.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line == "HTTP/1.1 431 Request Header Fields Too Large"
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert ERRORS["headers_too_large"].status_code == 431


@pytest.fixture(scope="module")
def service(fake_repo, tmp_path_factory):
    process = ServiceProcess(
        {"MODEL_REPOSITORY": str(fake_repo), "BACKEND": "onnxruntime-cpu", "LOG_LEVEL": "WARNING"},
        tmp_path_factory.mktemp("header-limit") / "service.log",
    )
    try:
        wait_ready(process.url, timeout_s=60)
        yield process
    finally:
        process.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "target", "body"), ROUTES, ids=[f"{m} {t}" for m, t, _ in ROUTES])
def test_at_the_cap_served_one_byte_over_and_far_over_refused(service, method, target, body):
    status, _ = status_and_body(exchange(service.port, head_of_size(CAP, method, target, body)))
    assert status == 200, (method, target)
    assert_431(exchange(service.port, head_of_size(CAP + 1, method, target, body)))
    # Far over: a megabyte of one header, then a megabyte of small ones. The server answers without
    # waiting for the end of them.
    assert_431(exchange(service.port, head_of_size(1 << 20, method, target, body)))
    many = f"{method} {target} HTTP/1.1\r\nHost: t\r\n".encode() + b"X-A: b\r\n" * 150_000 + b"\r\n"
    assert_431(exchange(service.port, many))


@pytest.mark.slow
def test_a_kept_alive_connection_is_held_to_the_cap_on_every_request(service):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(head_of_size(CAP, "GET", "/healthz", b"", close=False))
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(head_of_size(CAP + 1, "GET", "/healthz", b"", close=False))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert_431(answer)
    assert "Traceback" not in service.output()


@pytest.mark.slow
def test_the_metrics_port_is_held_to_the_same_cap(fake_repo, tmp_path):
    sock = free_socket()
    metrics_port = sock.getsockname()[1]
    sock.close()
    process = ServiceProcess(
        {
            "MODEL_REPOSITORY": str(fake_repo),
            "BACKEND": "onnxruntime-cpu",
            "LOG_LEVEL": "WARNING",
            "METRICS_PORT": str(metrics_port),
        },
        tmp_path / "service.log",
    )
    try:
        wait_ready(process.url, timeout_s=60)
        status, body = status_and_body(exchange(metrics_port, head_of_size(CAP, "GET", "/metrics", b"")))
        assert status == 200 and b"classifier_requests_total" in body
        assert_431(exchange(metrics_port, head_of_size(CAP + 1, "GET", "/metrics", b"")))
        assert_431(exchange(metrics_port, head_of_size(1 << 20, "GET", "/metrics", b"")))
        many = b"GET /metrics HTTP/1.1\r\nHost: t\r\n" + b"X-A: b\r\n" * 150_000 + b"\r\n"
        assert_431(exchange(metrics_port, many))
        # A request line alone over the cap.
        assert_431(exchange(metrics_port, b"GET /metrics?" + b"a" * CAP + b" HTTP/1.1\r\n\r\n"))
        status, _ = status_and_body(exchange(metrics_port, head_of_size(200, "GET", "/metrics", b"")))
        assert status == 200  # and it serves on after refusing
    finally:
        process.stop()
