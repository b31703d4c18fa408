"""The service behind a real uvicorn (uvloop + httptools) on a free port: streamed and lying bodies,
queue limits and deadlines under concurrency, dynamic batching, SIGTERM during load, and the
correctness of the four default models end to end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from contract.manifest import Manifest
from contract.photos import encode, make_corpus, make_photo, photo_jpeg
from service.app import create_app
from service.core.cpus import cpu_count
from tests.fake_repository import RecordingLoader
from tests.live_server import LiveServer, ServiceProcess, ready_service, serving_settings, wait_ready
from tests.reference_pipeline import assert_matches_reference

JPEG = photo_jpeg(500, 375, seed=1)


def status_and_headers(raw: bytes) -> tuple[int, bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return int(head.split(b" ", 2)[1]), head


def recv_response(sock: socket.socket, timeout_s: float = 10) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def small_body_server(fake_repo):
    app = create_app(serving_settings(fake_repo, max_body_bytes=1024 * 1024))
    with LiveServer(app) as server:
        wait_ready(server.url)
        yield server


def good_request_works(url: str, model: str = "mobilenet_v2") -> bool:
    response = httpx.post(
        f"{url}/classify?model={model}", content=JPEG, headers={"Content-Type": "image/jpeg"}
    )
    return response.status_code == 200


# --- bodies over the limit, however they are sent ---------------------------------------------------
def test_413_for_a_declared_length_over_the_limit_before_the_body_is_sent(small_body_server):
    with socket.create_connection(("127.0.0.1", small_body_server.port)) as sock:
        sock.sendall(
            b"POST /classify?model=mobilenet_v2 HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + JPEG[:1000]
        )
        status, _ = status_and_headers(recv_response(sock))
    assert status == 413
    assert good_request_works(small_body_server.url)


def test_413_for_an_endless_chunked_body_as_soon_as_the_limit_passes(small_body_server):
    limit = 1024 * 1024
    chunk = b"\xab" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", small_body_server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(
            b"POST /classify?model=mobilenet_v2 HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        response = b""
        while sent < 200 * limit:  # "gigabytes", as far as the server can tell
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                response = recv_response(sock)
                break
    status, headers = status_and_headers(response)
    assert status == 413, headers
    # Answered once the cap was passed, not after the client gave up: only socket buffers beyond it.
    assert sent < 40 * limit, sent
    assert good_request_works(small_body_server.url)


def test_a_body_longer_than_its_content_length_is_never_read_past_it(small_body_server):
    # The server reads the declared 2000 bytes (half a JPEG: 400), and the rest is not a request.
    body = JPEG + b"\0" * (3 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", small_body_server.port)) as sock:
        sock.sendall(
            b"POST /classify?model=mobilenet_v2 HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 2000\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # the server may close on the garbage that follows
            sock.sendall(body)
        status, _ = status_and_headers(recv_response(sock))
    assert status == 400
    assert good_request_works(small_body_server.url)


def test_413_for_a_multipart_body_over_the_limit(small_body_server):
    files = {"file": ("big.jpg", JPEG + b"\0" * (2 * 1024 * 1024), "image/jpeg")}
    response = httpx.post(f"{small_body_server.url}/classify?model=mobilenet_v2", files=files)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert good_request_works(small_body_server.url)


# --- queue limits and deadlines -------------------------------------------------------------------
async def _post_many(
    url: str, count: int, body: bytes = JPEG, model: str = "mobilenet_v2"
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{url}/classify?model={model}", content=body, headers={"Content-Type": "image/jpeg"}
                )
                for _ in range(count)
            )
        )


def test_429_when_the_queue_is_full_with_retry_after(fake_repo):
    loader = RecordingLoader(delay_s={"mobilenet_v2": 0.3})
    settings = serving_settings(fake_repo, max_queue_size=1, max_batch_size=1, warmup=False)
    with LiveServer(create_app(settings, runtime_loader=loader)) as server:
        wait_ready(server.url)
        responses = asyncio.run(_post_many(server.url, 6))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        assert good_request_works(server.url)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'classifier_requests_total{code="429",model="mobilenet_v2"}' in metrics


def test_504_when_the_deadline_passes_and_expired_requests_never_run(fake_repo):
    loader = RecordingLoader(delay_s={"mobilenet_v2": 0.4})
    settings = serving_settings(fake_repo, request_timeout_s=0.25, max_batch_size=1, warmup=False)
    with LiveServer(create_app(settings, runtime_loader=loader)) as server:
        wait_ready(server.url)
        responses = asyncio.run(_post_many(server.url, 5))
        assert [r.status_code for r in responses] == [504] * 5
        assert all(r.json()["error"]["code"] == "timeout" for r in responses)
        # One batch started in time and ran over; the four behind it expired in the queue and were dropped.
        assert len(loader.runtimes["mobilenet_v2"].batches) == 1
        assert good_request_works(server.url, "shufflenet_v2")


# --- dynamic batching -----------------------------------------------------------------------------
def _batch_histogram(metrics: str, model: str) -> tuple[float, float, float]:
    values = {}
    for line in metrics.splitlines():
        for key in ("_count", "_sum", '_bucket{le="1.0"'):
            if line.startswith(f"classifier_batch_size{key}") and f'model="{model}"' in line:
                values[key] = float(line.rsplit(" ", 1)[1])
    return values["_count"], values["_sum"], values['_bucket{le="1.0"']


def test_32_concurrent_requests_form_batches_of_at_most_8_with_the_same_answers(fake_repo):
    images = [photo_jpeg(320 + 16 * i, 240, seed=40 + i) for i in range(8)]
    loader = RecordingLoader(delay_s=0.01)  # a runtime slow enough for a queue to build up
    settings = serving_settings(fake_repo, max_batch_size=8, max_queue_delay_ms=20, max_concurrent_batches=1)
    with LiveServer(create_app(settings, runtime_loader=loader)) as server:
        wait_ready(server.url)
        url = f"{server.url}/classify?model=mobilenet_v2&top_k=10"
        alone = [httpx.post(url, content=image).json()["predictions"] for image in images]
        loader.warm_batches_cleared()
        before = _batch_histogram(httpx.get(f"{server.url}/metrics").text, "mobilenet_v2")

        async def burst():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
                return await asyncio.gather(*(client.post(url, content=images[i % 8]) for i in range(32)))

        responses = asyncio.run(burst())
        after = _batch_histogram(httpx.get(f"{server.url}/metrics").text, "mobilenet_v2")

    assert all(r.status_code == 200 for r in responses)
    sizes = [len(batch) for batch in loader.runtimes["mobilenet_v2"].batches]
    assert sum(sizes) == 32 and max(sizes) <= 8 and max(sizes) > 1, sizes
    batches, images_batched, batches_of_one = (a - b for a, b in zip(after, before, strict=True))
    assert images_batched == 32 and batches == len(sizes) and batches_of_one < batches
    for i, response in enumerate(responses):
        got, expected = response.json()["predictions"], alone[i % 8]
        assert [p["class_id"] for p in got] == [p["class_id"] for p in expected]
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in expected], rtol=1e-6)


# --- SIGTERM during load --------------------------------------------------------------------------
def test_sigterm_during_load_answers_every_accepted_request_and_exits_0(fake_repo, tmp_path):
    # A large PNG takes 70-200 ms to decode on this box: 24 of them keep two decode threads busy
    # for a second or more after the first answer.
    heavy = encode(make_photo(2000, 1500, seed=5), "PNG")
    count = 24
    service = ServiceProcess(
        {"MODEL_REPOSITORY": str(fake_repo), "BACKEND": "onnxruntime-cpu", "DECODE_THREADS": "2"},
        tmp_path / "service.log",
    )
    try:
        wait_ready(service.url, timeout_s=60)
        assert good_request_works(service.url)

        async def load_then_sigterm():
            limits = httpx.Limits(max_connections=count)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                url = f"{service.url}/classify?model=mobilenet_v2"
                requests = [
                    asyncio.create_task(
                        client.post(url, content=heavy, headers={"Content-Type": "image/png"})
                    )
                    for _ in range(count)
                ]
                # The first answer means every connection is open and the server is mid-load.
                await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
                service.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)  # uvicorn notices the signal within its 0.1 s tick
                refused = False
                try:
                    with socket.create_connection(("127.0.0.1", service.port), timeout=2):
                        pass
                except ConnectionRefusedError:
                    refused = True
                still_running = sum(not task.done() for task in requests)
                return await asyncio.gather(*requests, return_exceptions=True), refused, still_running

        responses, refused, still_running = asyncio.run(load_then_sigterm())
        code = service.wait(30)
    finally:
        service.stop()
    log = service.output()
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), (
        responses,
        log[-3000:],
    )
    assert still_running > 0, "the load ended before the refusal was checked: the test proved nothing"
    assert refused, "a new connection was accepted after SIGTERM"
    assert code == 0, log[-3000:]
    assert '"request_id"' in log and "shutdown complete" in log


def test_python_m_service_refuses_a_bad_setting(tmp_path):
    service = ServiceProcess({"MAX_BATCH_SIZE": "zero"}, tmp_path / "service.log")
    assert service.wait(30) == 2
    assert "MAX_BATCH_SIZE" in service.output()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_once_loaded_the_event_loop_waits_for_a_free_core_and_the_inference_threads_do_not(
    fake_repo, tmp_path
):
    def policies(pid: int) -> dict[int, int]:
        return {int(tid): os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}

    with ready_service(fake_repo, tmp_path / "default.log") as service:
        threads = policies(service.process.pid)
        # The main thread runs the event loop; it was marked once the models were loaded.
        assert threads[service.process.pid] == os.SCHED_BATCH
        # Two models, one inference thread per core plus one each (CPU default), all started by the
        # event loop's thread before that: none inherited its policy.
        inference_threads = 2 * (cpu_count() + 1)
        assert list(threads.values()).count(os.SCHED_OTHER) >= inference_threads, threads
    with ready_service(fake_repo, tmp_path / "preempts.log", EVENT_LOOP_PREEMPTS="true") as service:
        assert set(policies(service.process.pid).values()) == {os.SCHED_OTHER}


# --- correctness of the four default models end to end -------------------------------------------
@pytest.mark.slow
def test_every_default_model_matches_the_reference_pipeline_and_onnxruntime(built_repository):
    corpus = make_corpus()
    assert len(corpus) >= 20
    loader = RecordingLoader()
    settings = serving_settings(
        built_repository, max_concurrent_batches=1, intra_op_threads=os.cpu_count() or 1
    )
    with LiveServer(create_app(settings, runtime_loader=loader)) as server:
        ready = wait_ready(server.url, timeout_s=120)
        models = sorted(ready["models"])
        assert models == ["mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2"]
        loader.warm_batches_cleared()
        with httpx.Client(timeout=60) as client:
            for name in models:
                manifest = Manifest.load(built_repository / name)
                reference = ort.InferenceSession(
                    str(built_repository / name / "model.onnx"), providers=["CPUExecutionProvider"]
                )
                runtime = loader.runtimes[name]
                for count, (filename, data, content_type) in enumerate(corpus, start=1):
                    response = client.post(
                        f"{server.url}/classify",
                        params={"model": name, "top_k": 5},
                        content=data,
                        headers={"Content-Type": content_type},
                    )
                    assert response.status_code == 200, (name, filename, response.text)
                    assert len(runtime.batches) == count  # one request, one batch: this one's
                    batch = runtime.batches[-1]
                    assert batch.shape == (1, 3, 224, 224)
                    tensor = batch[0]
                    # Exact where the decode path is the reference's; within the stated bound for JPEG draft.
                    assert_matches_reference(tensor, data, manifest.preprocessing)
                    (logits,) = reference.run(None, {"input": batch})
                    logits = logits[0].astype(np.float64)
                    probabilities = np.exp(logits - logits.max())
                    probabilities /= probabilities.sum()
                    expected = np.argsort(-probabilities, kind="stable")[:5]
                    got = response.json()["predictions"]
                    assert [p["class_id"] for p in got] == expected.tolist(), (name, filename)
                    np.testing.assert_allclose(
                        [p["score"] for p in got],
                        probabilities[expected],
                        rtol=1e-6,
                        err_msg=f"{name} {filename}",
                    )
                    assert [p["label"] for p in got] == [manifest.labels[i] for i in expected]
