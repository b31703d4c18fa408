"""Servers for the HTTP tests: the app in a real uvicorn (uvloop + httptools) on a free port.

``LiveServer`` runs it in a thread of the test process, so a test can hand the app a wrapped or
slowed-down runtime; ``ServiceProcess`` runs ``python -m service`` as its own process, as users do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from fastapi.testclient import TestClient

from service.config import Settings

REPO = Path(__file__).resolve().parents[1]


def serving_settings(repository: Path, **overrides: object) -> Settings:
    """Settings for a test server: independent of the developer's environment."""
    values: dict[str, object] = {
        "model_repository": repository,
        "models": None,
        "backend": "onnxruntime-cpu",
        "max_batch_size": 4,
        "max_queue_delay_ms": 0,
        "max_queue_size": 64,
        "max_concurrent_batches": 1,
        "request_timeout_s": 10,
        "max_body_bytes": 20 * 1024 * 1024,
        "max_image_pixels": 40_000_000,
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        "decode_threads": 2,
        # The test process's own threads keep the default policy (tests/test_server.py checks the
        # service's default in a process of its own).
        "event_loop_preempts": True,
        "warmup": True,
        "log_level": "INFO",
        "log_format": "json",
        "shutdown_grace_s": 10,
    }
    return Settings(**(values | overrides))


@contextlib.contextmanager
def serving(app) -> Iterator[TestClient]:
    """A client whose app has started and whose models have all settled (ready or not)."""
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while any(m["status"] == "loading" for m in client.get("/readyz").json()["models"].values()):
            assert time.monotonic() < deadline, "models did not settle"
            time.sleep(0.02)
        yield client


def wait_ready(base_url: str, timeout_s: float = 60.0, *, allow_not_ready: bool = False) -> dict:
    """Poll /readyz until 200 (or until every model has settled, with ``allow_not_ready``)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=2)
        except httpx.TransportError as exc:
            last = exc
        else:
            body = response.json()
            if response.status_code == 200:
                return body
            settled = all(m["status"] != "loading" for m in body["models"].values())
            if allow_not_ready and settled:
                return body
            last = body
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout_s} s: {last}")


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """``with LiveServer(app) as server:`` -> ``server.url`` answers until the block ends."""

    def __init__(self, app: object) -> None:
        self._sock = free_socket()
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            loop="uvloop",
            http="httptools",
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._sock.close()


class ServiceProcess:
    """``python -m service`` on a free port with the given environment; output kept for asserts."""

    def __init__(self, env: dict[str, str], log_path: Path, *, wrapper: list[str] | None = None) -> None:
        sock, grpc_sock = free_socket(), free_socket()
        self.port = sock.getsockname()[1]
        self.grpc_port = grpc_sock.getsockname()[1]  # gRPC too: never the default, which may be taken
        sock.close()  # the child binds it again: a small race, harmless on a test box
        grpc_sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        child_env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
        child_env |= {"PYTHONUNBUFFERED": "1", "GRPC_PORT": str(self.grpc_port), **env}
        self.process = subprocess.Popen(
            # ``wrapper`` (e.g. a mount namespace) must exec the command, so that the pid is the server's.
            [
                *(wrapper or []),
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=child_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def ready_service(repository: Path, log_path: Path, **env: str) -> Iterator[ServiceProcess]:
    """``python -m service`` on CPU over ``repository``, ready to answer; killed on exit."""
    process = ServiceProcess(
        {"MODEL_REPOSITORY": str(repository), "BACKEND": "onnxruntime-cpu", "LOG_LEVEL": "WARNING", **env},
        log_path,
    )
    try:
        wait_ready(process.url, timeout_s=60)
        yield process
    finally:
        process.stop()


# Every variable the service reads: a developer's own settings never leak into a test's server.
_SERVICE_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)
