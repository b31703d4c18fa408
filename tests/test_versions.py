"""Model versions and reloads: the repository's layout, which version serves, the repository API,
and loads that replace a model while it serves."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from contract import layout
from contract.photos import photo_jpeg
from service.app import create_app
from service.config import ConfigError, load_settings
from service.core.metrics import Metrics
from service.core.repository import ModelRepository
from service.core.runtimes import load_runtime
from tests.fake_repository import corrupt, write_model
from tests.live_server import LiveServer, ready_service, serving, serving_settings, wait_ready

MODEL = "shufflenet_v2"
JPEG = photo_jpeg(500, 375, seed=3)


def _repository(root: Path, *versions: int, flat: bool = True) -> Path:
    """A tiny ``shufflenet_v2`` as the flat layout (version 1) and/or numbered versions, each version
    with weights of its own (seed = version) so that their answers differ."""
    if flat:
        write_model(root, MODEL, seed=1)
    for version in versions:
        write_model(root, MODEL, seed=version, version=version)
    return root


def _classify(client, **params) -> httpx.Response:
    return client.post(
        "/classify", params={"model": MODEL, **params}, content=JPEG, headers={"Content-Type": "image/jpeg"}
    )


def _top1(client, **params) -> tuple[int, int]:
    response = _classify(client, **params)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["version"], body["predictions"][0]["class_id"]


def _models_entry(client) -> dict:
    return client.get(f"/models/{MODEL}").json()


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{MODEL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {MODEL} not exposed")


# --- the layout -------------------------------------------------------------------------------------
def test_the_flat_layout_is_version_1_and_numbered_directories_are_versions(tmp_path):
    write_model(tmp_path, MODEL, seed=1)
    model_root = tmp_path / MODEL
    assert layout.versions(model_root) == {1: model_root}
    write_model(tmp_path, MODEL, seed=2, version=2)
    write_model(tmp_path, MODEL, seed=3, version=10)
    (model_root / "02").mkdir()  # another spelling of 2: not a version
    (model_root / "02" / "model.json").write_text("{}")
    (model_root / "7").mkdir()  # no manifest: not a version
    assert layout.versions(model_root) == {1: model_root, 2: model_root / "2", 10: model_root / "10"}
    # A 1/ directory wins over the files beside it.
    write_model(tmp_path, MODEL, seed=4, version=1)
    assert layout.versions(model_root)[1] == model_root / "1"
    assert layout.model_names(tmp_path) == [MODEL]
    assert layout.model_directory(tmp_path, MODEL, 3) == model_root / "3"
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="version"):
            layout.model_directory(tmp_path, MODEL, bad)


def test_a_fingerprint_changes_when_a_file_is_rewritten_and_ignores_other_versions(tmp_path):
    flat = write_model(tmp_path, MODEL, seed=1)
    before = layout.fingerprint(flat)
    assert {entry[0] for entry in before} == {"model.json", "model.onnx"}
    write_model(tmp_path, MODEL, seed=2, version=2)
    assert layout.fingerprint(flat) == before  # version 2 lives below, and is not version 1's
    time.sleep(0.01)
    write_model(tmp_path, MODEL, seed=1)
    assert layout.fingerprint(flat) != before


# --- which version serves -------------------------------------------------------------------------
def test_the_highest_ready_version_serves_and_every_loaded_version_is_reachable(tmp_path):
    repository = _repository(tmp_path, 2, 3)
    corrupt(tmp_path / MODEL / "3")
    with serving(create_app(serving_settings(repository))) as client:
        entry = _models_entry(client)
        assert entry["status"] == "ready" and entry["version"] == 2
        assert [(v["version"], v["status"]) for v in entry["versions"]] == [
            (1, "ready"),
            (2, "ready"),
            (3, "failed"),
        ]
        assert "sha256" in entry["versions"][2]["reason"]
        assert entry["loads"]["loads"] == 3 and entry["loads"]["failures"] == 1
        assert "version 3" in entry["loads"]["last_error"]
        default, two, one = _top1(client), _top1(client, version=2), _top1(client, version=1)
        assert default == two and default[0] == 2 and one[0] == 1
        assert one[1] != two[1]  # the versions' own weights answer
        failed = _classify(client, version=3)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "model_unavailable"
        assert "version 3" in failed.json()["error"]["message"]
        missing = _classify(client, version=9)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"
        assert "its versions: 1, 2, 3" in missing.json()["error"]["message"]
        bad = _classify(client, version="two")
        assert bad.status_code == 422 and "version" in bad.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200  # the model serves: version 3 is reported
        assert _metric(client, "classifier_model_version") == 2
        assert _metric(client, "classifier_model_load_failures_total") == 1


def test_a_pinned_version_is_the_only_one_loaded(tmp_path):
    repository = _repository(tmp_path, 2)
    with serving(create_app(serving_settings(repository, model_versions={MODEL: 1}))) as client:
        entry = _models_entry(client)
        assert entry["version"] == 1 and [v["version"] for v in entry["versions"]] == [1]
        assert _top1(client)[0] == 1
    with serving(create_app(serving_settings(repository, model_versions={MODEL: 5}))) as client:
        entry = _models_entry(client)
        assert entry["status"] == "failed" and "pins version 5" in entry["reason"]
        assert "it holds: 1, 2" in entry["reason"]
        assert client.get("/readyz").status_code == 503


def test_model_versions_is_parsed_with_errors_that_name_it(monkeypatch):
    monkeypatch.setenv("MODEL_VERSIONS", "mobilenet_v2=2, shufflenet_v2:int8=1")
    assert load_settings().model_versions == {"mobilenet_v2": 2, "shufflenet_v2:int8": 1}
    for bad in ("mobilenet_v2", "mobilenet_v2=0", "mobilenet_v2=x", "=2"):
        monkeypatch.setenv("MODEL_VERSIONS", bad)
        with pytest.raises(ConfigError, match="MODEL_VERSIONS"):
            load_settings()


def test_the_open_inference_protocol_lists_and_reaches_versions(tmp_path):
    repository = _repository(tmp_path, 2)
    with serving(create_app(serving_settings(repository))) as client:
        metadata = client.get(f"/v2/models/{MODEL}").json()
        assert metadata["versions"] == ["1", "2"]
        assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
        assert client.get(f"/v2/models/{MODEL}/versions/4/ready").status_code == 404
        assert client.get(f"/v2/models/{MODEL}/versions/01/ready").status_code == 404
        config = client.get(f"/v2/models/{MODEL}/config").json()
        assert config["version_policy"] == {"specific": {"versions": [1, 2]}}
        size = metadata["inputs"][1]["shape"][-1]
        pixels = np.ones(3 * size * size).tolist()
        request = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, size, size], "data": pixels}]
        }
        answers = {}
        for version in ("1", "2"):
            response = client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=request)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == version
            answers[version] = response.json()["outputs"][0]["data"]
        assert answers["1"] != answers["2"]
        default = client.post(f"/v2/models/{MODEL}/infer", json=request).json()
        assert default["model_version"] == "2" and default["outputs"][0]["data"] == answers["2"]


# --- the repository API ---------------------------------------------------------------------------
def test_the_repository_api_is_off_unless_asked_for(tmp_path):
    with serving(create_app(serving_settings(_repository(tmp_path)))) as client:
        for path in ("/v2/repository/index", f"/v2/repository/models/{MODEL}/load"):
            response = client.post(path)
            assert response.status_code == 403 and "REPOSITORY_API=true" in response.json()["error"]
        assert _top1(client)[0] == 1


def test_the_repository_api_needs_the_bearer_token(tmp_path):
    token = "s3cret-token-of-some-length"
    settings = serving_settings(_repository(tmp_path), repository_api=True, auth_token=token)
    with serving(create_app(settings)) as client:
        assert client.post("/v2/repository/index").status_code == 401
        answer = client.post("/v2/repository/index", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()[0]["name"] == MODEL


def test_a_load_swaps_in_a_new_version_and_a_failed_load_keeps_the_old_one(tmp_path):
    repository = _repository(tmp_path)
    with serving(create_app(serving_settings(repository, repository_api=True))) as client:
        assert _top1(client)[0] == 1
        write_model(repository, MODEL, seed=2, version=2)
        assert client.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        assert _top1(client)[0] == 2
        assert _metric(client, "classifier_model_version") == 2
        assert _metric(client, "classifier_model_loads_total") == 2

        # A broken build of version 3 (its ONNX file does not match its manifest): 400, and 2 serves on.
        write_model(repository, MODEL, seed=3, version=3)
        corrupt(repository / MODEL / "3")
        failed = client.post(f"/v2/repository/models/{MODEL}/load")
        assert failed.status_code == 400 and "version 3" in failed.json()["error"]
        assert _top1(client)[0] == 2
        entry = _models_entry(client)
        assert entry["status"] == "ready" and "version 3" in entry["loads"]["last_error"]
        assert _metric(client, "classifier_model_load_failures_total") == 1
        # A manifest that does not parse fails as well, with the reason.
        (repository / MODEL / "3" / "model.json").write_text('{"name": ')
        failed = client.post(f"/v2/repository/models/{MODEL}/load")
        assert failed.status_code == 400 and "model.json is unreadable" in failed.json()["error"]

        # Version 2 rewritten in place with other weights: loaded anew, beside the one serving.
        before = _top1(client, version=2)
        time.sleep(0.01)
        write_model(repository, MODEL, seed=7, version=2)
        shutil.rmtree(repository / MODEL / "3")
        assert client.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        after = _top1(client, version=2)
        assert after[0] == 2 and after[1] != before[1]
        assert "last_error" not in _models_entry(client)["loads"]

        # Nothing changed: nothing is loaded.
        loads = _metric(client, "classifier_model_loads_total")
        assert client.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        assert _metric(client, "classifier_model_loads_total") == loads

        # Rolled back: version 2 removed, version 1 serves again.
        shutil.rmtree(repository / MODEL / "2")
        assert client.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        assert _top1(client)[0] == 1
        assert [v["version"] for v in _models_entry(client)["versions"]] == [1]

        index = client.post("/v2/repository/index").json()
        assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]


def test_unload_stops_serving_a_model_without_failing_readiness_and_load_brings_it_back(tmp_path):
    repository = _repository(tmp_path)
    write_model(repository, "mobilenet_v2", seed=5)
    with serving(create_app(serving_settings(repository, repository_api=True))) as client:
        assert client.post(f"/v2/repository/models/{MODEL}/unload", json={}).status_code == 200
        response = _classify(client)
        assert response.status_code == 503 and "unloaded" in response.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200
        assert _models_entry(client)["status"] == "unloaded"
        index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
        assert index[MODEL]["state"] == "UNAVAILABLE"
        ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
        assert [entry["name"] for entry in ready_only] == ["mobilenet_v2"]
        assert client.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        assert _top1(client)[0] == 1


def test_load_refuses_what_it_cannot_do(tmp_path):
    repository = _repository(tmp_path)
    with serving(create_app(serving_settings(repository, repository_api=True))) as client:
        unknown = client.post("/v2/repository/models/nosuch/load")
        assert unknown.status_code == 400 and "no such model" in unknown.json()["error"]
        upload = client.post(
            f"/v2/repository/models/{MODEL}/load",
            json={"parameters": {"config": "{}", "file:1/model.onnx": ""}},
        )
        assert upload.status_code == 400 and "not supported" in upload.json()["error"]
        assert client.post(f"/v2/repository/models/{MODEL}/load", content=b"[").status_code == 400
        assert client.get("/v2/repository/index").status_code == 405
        assert client.post("/v2/repository/nothing").status_code == 404
        assert client.post("/v2/repository/index", json={"ready": "yes"}).status_code == 400
        assert client.post("/v2/repository/models/nosuch/unload").status_code == 400
        assert _top1(client)[0] == 1


def test_a_model_of_the_repository_that_was_not_configured_can_be_loaded(tmp_path):
    repository = _repository(tmp_path)
    write_model(repository, "mobilenet_v2", seed=5)
    settings = serving_settings(repository, repository_api=True, models=(MODEL,))
    with serving(create_app(settings)) as client:
        index = client.post("/v2/repository/index").json()
        assert {"name": "mobilenet_v2"} in index  # held, never loaded
        assert client.post("/v2/repository/models/mobilenet_v2/load").status_code == 200
        response = client.post(
            "/classify",
            params={"model": "mobilenet_v2"},
            content=JPEG,
            headers={"Content-Type": "image/jpeg"},
        )
        assert response.status_code == 200
        assert 'classifier_requests_total{code="200",model="mobilenet_v2"}' in client.get("/metrics").text


# --- loads while requests run ----------------------------------------------------------------------
class _Recorder:
    """Wraps the real loader: counts loads, slows inference down, and records closed runtimes."""

    def __init__(self, run_delay_s: float = 0.0, load_delay_s: float = 0.0) -> None:
        self.loads: list[Path] = []
        self.closed: list[Path] = []
        self.run_delay_s = run_delay_s
        self.load_delay_s = load_delay_s
        self.lock = threading.Lock()

    def __call__(self, directory: Path, *args, **kwargs):
        runtime = load_runtime(directory, *args, **kwargs)
        time.sleep(self.load_delay_s)
        with self.lock:
            self.loads.append(directory)
        recorder, run, close = self, runtime.run, runtime.close

        def slow_run(batch):
            time.sleep(recorder.run_delay_s)
            return run(batch)

        def recorded_close():
            with recorder.lock:
                recorder.closed.append(directory)
            close()

        runtime.run, runtime.close = slow_run, recorded_close
        return runtime


def test_two_loads_at_once_load_the_model_once(tmp_path):
    repository = _repository(tmp_path)
    recorder = _Recorder(load_delay_s=0.5)
    app = create_app(serving_settings(repository, repository_api=True), runtime_loader=recorder)
    with LiveServer(app) as server:
        wait_ready(server.url)
        write_model(repository, MODEL, seed=2, version=2)
        url = f"{server.url}/v2/repository/models/{MODEL}/load"
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: httpx.post(url, timeout=30), range(2)))
        assert [answer.status_code for answer in answers] == [200, 200]
        assert [path.name for path in recorder.loads] == [MODEL, "2"]  # the start's, then version 2 once


def _send_headers_and_half_a_body(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /classify?model={MODEL} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(JPEG)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + JPEG[: len(JPEG) // 2])
    return sock


def _finish(sock: socket.socket) -> tuple[int, dict]:
    sock.sendall(JPEG[len(JPEG) // 2 :])
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_requests_admitted_to_the_replaced_version_finish_on_it(tmp_path):
    repository = _repository(tmp_path)
    # One image at a time, 0.15 s each: requests queue up behind each other.
    recorder = _Recorder(run_delay_s=0.15)
    settings = serving_settings(
        repository, repository_api=True, max_batch_size=1, max_concurrent_batches=1, request_timeout_s=30
    )
    app = create_app(settings, runtime_loader=recorder)
    with LiveServer(app) as server:
        wait_ready(server.url)

        def classify(_: int) -> httpx.Response:
            return httpx.post(
                f"{server.url}/classify",
                params={"model": MODEL},
                content=JPEG,
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )

        old_answer = classify(0).json()["predictions"]
        with ThreadPoolExecutor(8) as pool:
            # Admitted to the version serving now: one still sending its body, eight queued or running.
            reading = _send_headers_and_half_a_body(server.url)
            queued = [pool.submit(classify, i) for i in range(8)]
            time.sleep(0.3)
            write_model(repository, MODEL, seed=9)  # version 1 rebuilt in place, with other weights
            load = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", timeout=30)
            assert load.status_code == 200, load.text
            after = [pool.submit(classify, i) for i in range(4)]
            status, late_body = _finish(reading)
            answers = [future.result() for future in queued]
            answers_after = [future.result() for future in after]
        assert status == 200, late_body
        assert late_body["predictions"] == old_answer
        assert [a.status_code for a in answers + answers_after] == [200] * 12
        assert all(a.json()["predictions"] == old_answer for a in answers)
        new_answers = [a.json()["predictions"] for a in answers_after]
        assert all(answer == new_answers[0] != old_answer for answer in new_answers)
        # The replaced runtime is released once its last request has its answer, and only that one.
        deadline = time.monotonic() + 10
        while not recorder.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert recorder.closed == [repository / MODEL]


# --- python -m service: SIGHUP, and the repository API over gRPC ----------------------------------
def _wait_for_version(url: str, version: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = httpx.get(f"{url}/models/{MODEL}").json()
        if entry["version"] == version and entry["status"] == "ready":
            return entry
        time.sleep(0.05)
    raise AssertionError(f"version {version} never served: {entry}")


def test_sighup_rescans_the_repository(tmp_path):
    repository = _repository(tmp_path)
    with ready_service(repository, tmp_path / "server.log", MODELS=MODEL) as server:
        write_model(repository, MODEL, seed=2, version=2)
        server.process.send_signal(signal.SIGHUP)
        entry = _wait_for_version(server.url, 2)
        assert [v["version"] for v in entry["versions"]] == [1, 2]
        shutil.rmtree(repository / MODEL / "2")
        server.process.send_signal(signal.SIGHUP)
        _wait_for_version(server.url, 1)
        with httpx.Client(base_url=server.url) as client:
            assert _top1(client)[0] == 1
        assert server.process.poll() is None  # SIGHUP's default would have ended the process


def test_the_repository_api_over_grpc(tmp_path):
    repository = _repository(tmp_path)
    with ready_service(repository, tmp_path / "server.log", REPOSITORY_API="true") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        index = client.get_model_repository_index(as_json=True)["models"]
        assert index == [{"name": MODEL, "version": "1", "state": "READY"}]  # empty reason: left out
        write_model(repository, MODEL, seed=2, version=2)
        client.load_model(MODEL)
        assert client.get_model_metadata(MODEL).versions == ["1", "2"]
        assert client.is_model_ready(MODEL, "2")
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("nosuch")
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
        client.close()


def test_shutdown_does_not_wait_past_its_grace_for_a_replaced_version(tmp_path):
    repository_dir = _repository(tmp_path)
    settings = serving_settings(repository_dir, body_read_timeout_s=60, request_timeout_s=60)

    async def scenario() -> float:
        repository = ModelRepository([MODEL], settings, Metrics([MODEL]))
        await repository.load_all()
        old = repository.get(MODEL)
        assert old.batcher is not None
        with old.batcher.admit():  # a request still reading its body when its version is replaced
            await asyncio.sleep(0.01)
            write_model(repository_dir, MODEL, seed=9)
            await repository.load(MODEL)
            assert repository.get(MODEL) is not old
            started = time.monotonic()
            await repository.stop(grace_s=0.5)
            return time.monotonic() - started

    elapsed = asyncio.run(scenario())
    # Its own drain would wait up to 120 s (body read + deadline) for that request.
    assert elapsed < 10, elapsed
