"""Reloads under load, against ``python -m service``: a model reloaded 20 times while 16 clients
classify with it loses no request, and 50 reloads leave its memory where it was.

The model is a real network (ShuffleNet v2, exported by build_engines.py). Its version 2 is version 1
with the classifier's rows rotated by one, so that every answer says which version gave it: version
2's top class is version 1's plus one.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import numpy_helper

from contract.manifest import Manifest, sha256_of
from contract.photos import photo_jpeg
from tests.fake_repository import corrupt
from tests.live_server import ready_service

MODEL = "shufflenet_v2"
CONCURRENCY = 16
RELOADS = 20
MIB = 1024 * 1024
JPEG = photo_jpeg(500, 375, seed=11)


def _rotated_copy(source: Path, target: Path) -> Path:
    """``source`` copied to ``target`` with the final classifier's classes rotated by one, and its
    manifest's digest updated: a valid build whose class i is the source's class i - 1."""
    shutil.copytree(source, target)
    path = target / "model.onnx"
    model = onnx.load(str(path))
    classifier = model.graph.node[-1]
    assert classifier.op_type == "Gemm", classifier.op_type
    for initializer in model.graph.initializer:
        if initializer.name in classifier.input[1:]:
            rotated = np.roll(numpy_helper.to_array(initializer), 1, axis=0)
            initializer.CopyFrom(numpy_helper.from_array(rotated, initializer.name))
    onnx.save(model, str(path))
    manifest = Manifest.load(target)
    onnx_file = manifest.onnx.model_copy(update={"sha256": sha256_of(path), "bytes": path.stat().st_size})
    manifest.model_copy(update={"onnx": onnx_file}).save(target)
    return target


def _repository(built_repository: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "repository"
    shutil.copytree(built_repository / MODEL, root / MODEL)  # version 1, the flat layout
    return root, _rotated_copy(built_repository / MODEL, tmp_path / "rotated")


def _classify(client: httpx.Client, url: str, **params: object) -> httpx.Response:
    return client.post(
        f"{url}/classify",
        params={"model": MODEL, **params},
        content=JPEG,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )


def _load(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v2/repository/models/{MODEL}/load", timeout=120)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{MODEL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


def test_twenty_reloads_under_load_lose_no_request(built_repository, tmp_path):
    root, rotated = _repository(built_repository, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(rotated, broken)
    corrupt(broken)  # a failing build: its ONNX file no longer matches its manifest
    version_2, version_3 = root / MODEL / "2", root / MODEL / "3"
    env = {"REPOSITORY_API": "true", "MODELS": MODEL, "REQUEST_TIMEOUT_S": "30"}
    with ready_service(root, tmp_path / "server.log", **env) as server:
        with httpx.Client() as client:
            first = _classify(client, server.url).json()
        top_class = {1: first["predictions"][0]["class_id"]}
        top_class[2] = (top_class[1] + 1) % 1000

        answers: list[tuple[int, int | None, int | None]] = []  # (status, version, top class)
        stop = threading.Event()

        def client_loop() -> None:
            with httpx.Client() as client:
                while not stop.is_set():
                    response = _classify(client, server.url)
                    if response.status_code == 200:
                        body = response.json()
                        answers.append((200, body["version"], body["predictions"][0]["class_id"]))
                    else:
                        answers.append((response.status_code, None, None))

        outcomes = []
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            clients = [pool.submit(client_loop) for _ in range(CONCURRENCY)]
            try:
                time.sleep(1.0)
                for reload in range(RELOADS):
                    if reload % 5 == 4:
                        shutil.copytree(broken, version_3)
                        outcomes.append(("broken 3", _load(server.url).status_code))
                        shutil.rmtree(version_3)  # the next load lets it go
                    elif version_2.exists():
                        shutil.rmtree(version_2)
                        outcomes.append(("back to 1", _load(server.url).status_code))
                    else:
                        shutil.copytree(rotated, version_2)
                        outcomes.append(("up to 2", _load(server.url).status_code))
                    time.sleep(0.5)
            finally:
                stop.set()
                for future in clients:
                    future.result()
        log = server.output()

    assert [status for _, status in outcomes] == [400 if i % 5 == 4 else 200 for i in range(RELOADS)], (
        outcomes
    )
    statuses = {status for status, _, _ in answers}
    assert statuses == {200}, f"non-200 answers: {[a for a in answers if a[0] != 200][:5]}\n{log[-3000:]}"
    wrong = [a for a in answers if a[2] != top_class[a[1]]]
    assert not wrong, f"answers that match neither version: {wrong[:5]}"
    served = {version for _, version, _ in answers}
    assert served == {1, 2}, served
    assert len(answers) > 100
    assert "Traceback" not in log


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_fifty_reloads_release_the_replaced_runtimes(built_repository, tmp_path):
    root, rotated = _repository(built_repository, tmp_path)
    version_2 = root / MODEL / "2"
    shutil.copytree(rotated, version_2)
    manifest = version_2 / "model.json"
    env = {"REPOSITORY_API": "true", "MODELS": MODEL}
    with ready_service(root, tmp_path / "server.log", **env) as server:
        pid = server.process.pid
        rss = []
        loads_before = _metric(server.url, "classifier_model_loads_total")
        with httpx.Client() as client:
            for reload in range(50):
                # Version 2 rewritten (its manifest touched): loaded anew, the old one released.
                stamp = time.time_ns() + reload * 1_000_000
                os.utime(manifest, ns=(stamp, stamp))
                assert _load(server.url).status_code == 200
                assert _classify(client, server.url).json()["version"] == 2
                time.sleep(0.05)  # the replaced version drains and is released
                rss.append(_rss_bytes(pid))
        assert _metric(server.url, "classifier_model_loads_total") == loads_before + 50
        log = server.output()
    growth = rss[-1] - rss[0]
    print(
        f"RSS after the first reload {rss[0] / MIB:.1f} MiB, after the 50th {rss[-1] / MIB:.1f} MiB "
        f"({growth / MIB:+.1f} MiB; peak {max(rss) / MIB:.1f} MiB)"
    )
    assert growth <= 32 * MIB, " ".join(f"{value / MIB:.0f}" for value in rss)
    assert "Traceback" not in log
