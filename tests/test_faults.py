"""Faults: broken models at start, a failing batch, clients that leave early or trickle their bodies,
and SIGTERM with the queue full. Each test counts what was answered, refused and lost (lost: an
accepted request that never got an answer), and lost is always 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time

import httpx

from contract.photos import encode, make_photo, photo_jpeg
from service.app import create_app
from tests.fake_repository import FakeRuntime, RecordingLoader, corrupt, make_repository
from tests.live_server import LiveServer, ServiceProcess, serving_settings, wait_ready
from tests.workloads import RawClient

JPEG = photo_jpeg(500, 375, seed=1)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def post_good(url: str, model: str = "mobilenet_v2") -> httpx.Response:
    return httpx.post(f"{url}/classify?model={model}", content=JPEG, headers={"Content-Type": "image/jpeg"})


# --- broken models at start -------------------------------------------------------------------------
def test_a_corrupt_and_a_missing_model_at_start_leave_the_others_serving(tmp_path):
    root = make_repository(tmp_path / "model_repository", ("mobilenet_v1", "mobilenet_v2", "shufflenet_v2"))
    corrupt(root / "mobilenet_v1")
    (root / "shufflenet_v2" / "model.onnx").unlink()
    service = ServiceProcess({"MODEL_REPOSITORY": str(root), "BACKEND": "onnxruntime-cpu"}, tmp_path / "log")
    try:
        readyz = wait_ready(service.url, timeout_s=60, allow_not_ready=True)
        assert readyz["ready"] is False and "mobilenet_v1" in readyz["error"]["message"]
        assert {name: m["status"] for name, m in readyz["models"].items()} == {
            "mobilenet_v1": "failed",
            "mobilenet_v2": "ready",
            "shufflenet_v2": "failed",
        }
        assert "sha256" in readyz["models"]["mobilenet_v1"]["reason"]
        models = {m["name"]: m for m in httpx.get(f"{service.url}/models").json()["models"]}
        assert models["shufflenet_v2"]["status"] == "failed" and models["shufflenet_v2"]["reason"]
        metrics = httpx.get(f"{service.url}/metrics").text
        assert metric(metrics, "classifier_model_ready", model="mobilenet_v1") == 0
        assert metric(metrics, "classifier_model_ready", model="shufflenet_v2") == 0
        assert metric(metrics, "classifier_model_ready", model="mobilenet_v2") == 1
        assert post_good(service.url).status_code == 200
        refused = post_good(service.url, "mobilenet_v1")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    finally:
        service.stop()


# --- one failing batch --------------------------------------------------------------------------------
def test_a_failing_batch_answers_500_names_the_request_in_the_log_and_the_next_batch_is_fine(
    fake_repo, caplog
):
    calls = {"n": 0}

    def fail_the_second_call(batch):
        calls["n"] += 1
        return calls["n"] == 2

    def loader(model_dir, manifest, **kwargs):
        return FakeRuntime(fail_when=fail_the_second_call, classes=1000)

    app = create_app(serving_settings(fake_repo, warmup=False), runtime_loader=loader)
    caplog.set_level(logging.ERROR, logger="service")
    with LiveServer(app) as server:
        wait_ready(server.url)
        codes = []
        for i in range(4):
            response = httpx.post(
                f"{server.url}/classify?model=mobilenet_v2",
                content=JPEG,
                headers={"Content-Type": "image/jpeg", "X-Request-ID": f"fault-{i}"},
            )
            codes.append(response.status_code)
            if response.status_code == 500:
                failed = response
    assert codes == [200, 500, 200, 200], codes
    error = failed.json()["error"]
    assert error["code"] == "internal_error" and "Traceback" not in error["message"]
    error_id = error["message"].split("error ")[1].rstrip(")")
    logged = [r for r in caplog.records if "batch of 1 failed" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert "fault-1" in logged[0].getMessage() and error_id in logged[0].getMessage()


# --- clients that leave ----------------------------------------------------------------------------
def raw_request(
    port: int, body: bytes, *, send: int | None = None, model: str = "mobilenet_v2"
) -> socket.socket:
    """A socket that sent a classify request with ``len(body)`` declared and ``send`` bytes of it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST /classify?model={model} HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) if send is None else send])
    return sock


def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_clients_that_disconnect_leave_no_work_behind(fake_repo):
    gate_delay_s = 0.6
    loader = RecordingLoader(delay_s={"mobilenet_v2": gate_delay_s})
    settings = serving_settings(fake_repo, max_batch_size=1, max_concurrent_batches=1, warmup=False)
    with LiveServer(create_app(settings, runtime_loader=loader)) as server:
        wait_ready(server.url)
        runtime = loader.runtimes["mobilenet_v2"]
        batcher = server.server.config.app.state.repository.models["mobilenet_v2"].batcher

        # Mid-upload: half the body, then gone.
        for _ in range(3):
            raw_request(server.port, JPEG, send=len(JPEG) // 2).close()
        until(lambda: batcher.in_progress == 0)
        assert runtime.batches == []

        # Before the answer: one request runs (0.6 s), six wait in the queue behind it; all leave.
        first = raw_request(server.port, JPEG)
        until(lambda: len(runtime.batches) == 1)
        waiting = [raw_request(server.port, JPEG) for _ in range(6)]
        until(lambda: batcher.depth == 6)
        for sock in [first, *waiting]:
            sock.close()
        until(lambda: batcher.in_progress == 0 and batcher.depth == 0)
        time.sleep(gate_delay_s + 0.2)  # the running batch ends; nothing queued may start after it
        assert len(runtime.batches) == 1, "work ran for clients that had gone"

        metrics = httpx.get(f"{server.url}/metrics").text
        gone = metric(metrics, "classifier_requests_total", code="499", model="mobilenet_v2")
        assert gone == 3 + 7, metrics
        assert metric(metrics, "classifier_queue_depth", model="mobilenet_v2") == 0
        assert post_good(server.url).status_code == 200


def test_slow_bodies_get_408_and_the_connection_closed_while_others_are_served(fake_repo):
    settings = serving_settings(fake_repo, body_read_timeout_s=1.0)
    with LiveServer(create_app(settings)) as server:
        wait_ready(server.url)
        stalled = raw_request(server.port, JPEG, send=100)  # then nothing
        trickle = raw_request(server.port, JPEG, send=0)
        started = time.monotonic()
        answers = {}
        while len(answers) < 2 and time.monotonic() - started < 10:
            if "trickle" not in answers:
                with contextlib.suppress(OSError):
                    trickle.sendall(b"\xff")  # about one byte every 100 ms: a slow-loris body
            assert post_good(server.url, "shufflenet_v2").status_code == 200  # others are served
            for name, sock in (("stalled", stalled), ("trickle", trickle)):
                sock.settimeout(0.1)
                if name not in answers:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        continue
                    answers[name] = (data, time.monotonic() - started)
        for name, (data, seconds) in answers.items():
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), (name, data[:300])
            assert b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "body_timeout"
            assert 0.9 <= seconds <= 3.0, (name, seconds)
            assert sock_closed(stalled if name == "stalled" else trickle), name
        assert set(answers) == {"stalled", "trickle"}


def sock_closed(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        return False
    return True


# --- SIGTERM with the queue full ---------------------------------------------------------------------
def test_sigterm_under_overload_answers_everything_accepted_and_exits_within_the_grace(fake_repo, tmp_path):
    heavy = encode(make_photo(1600, 1200, seed=5), "PNG")  # a slow decode: the server is busy at SIGTERM
    grace_s = 5
    service = ServiceProcess(
        {
            "MODEL_REPOSITORY": str(fake_repo),
            "BACKEND": "onnxruntime-cpu",
            "DECODE_THREADS": "2",
            "MAX_QUEUE_SIZE": "8",
            "SHUTDOWN_GRACE_S": str(grace_s),
        },
        tmp_path / "service.log",
    )
    try:
        wait_ready(service.url, timeout_s=60)

        async def load_then_sigterm() -> tuple[list, float, int]:
            clients = [RawClient("127.0.0.1", service.port) for _ in range(24)]
            headers = {"Content-Type": "image/png"}
            requests = [
                asyncio.ensure_future(c.request("POST", "/classify?model=mobilenet_v2", heavy, headers))
                for c in clients
            ]
            # SIGTERM once every request has reached the server: the refusals are back (only
            # requests it had admitted are left). A request still in a socket buffer when the server
            # stops is closed unread, as HTTP/1.1 allows; the k8s preStop drain keeps those away.
            capacity = 8 + 2  # MAX_QUEUE_SIZE + one running per core
            pending = set(requests)
            while len(pending) > capacity:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            still_running = len(pending)
            service.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*requests, return_exceptions=True)
            for client in clients:
                await client.close()
            return results, signalled, still_running

        results, signalled, still_running = asyncio.run(load_then_sigterm())
        code = service.wait(grace_s + 10)
        exited_after_s = time.monotonic() - signalled
    finally:
        service.stop()
    statuses = [r.status for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert lost == [], (lost, service.output()[-2000:])
    assert still_running >= 5, "SIGTERM came after the load: the test proved nothing"
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 5 and 429 in statuses, statuses
    assert code == 0 and exited_after_s <= grace_s + 2, (code, exited_after_s)


def test_idle_and_slow_header_connections_get_408_and_are_closed(fake_repo, tmp_path):
    service = ServiceProcess(
        {"MODEL_REPOSITORY": str(fake_repo), "BACKEND": "onnxruntime-cpu", "HEADER_TIMEOUT_S": "1"},
        tmp_path / "service.log",
    )
    try:
        wait_ready(service.url, timeout_s=60)
        idle = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        trickle = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        kept_alive = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        # A first request on kept_alive is answered; its second request then trickles its headers.
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += kept_alive.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        header = b"POST /classify?model=mobilenet_v2 HTTP/1.1\r\nHost: t\r\nX-Slow: "
        for i in range(30):  # one byte every 0.1 s, for up to 3 s
            for sock in (trickle, kept_alive):
                with contextlib.suppress(OSError):
                    sock.sendall(header[i : i + 1] if i < len(header) else b"a")
            time.sleep(0.1)
            if i == 10:
                assert post_good(service.url).status_code == 200  # everyone else is served meanwhile
        for name, sock in (("idle", idle), ("trickle", trickle), ("kept-alive", kept_alive)):
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408"), (name, answer[:200])
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_timeout"
            assert sock_closed(sock), name
            sock.close()
        assert time.monotonic() - started < 6
        assert post_good(service.url).status_code == 200
    finally:
        service.stop()
