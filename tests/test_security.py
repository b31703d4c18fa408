"""Security: bearer-token authentication, no debug endpoints or stack traces, request ids in the logs,
/metrics on its own port, and a server that runs on a read-only root filesystem."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from contract.photos import photo_jpeg
from service import __main__ as service_main
from service.app import create_app
from service.config import ConfigError, load_settings
from service.http import auth
from service.logs import JsonFormatter
from tests.live_server import REPO, ServiceProcess, free_socket, serving, serving_settings, wait_ready
from tests.test_api import assert_error

JPEG = photo_jpeg(160, 120, seed=7)
TOKEN = "s3cr3t-token-0123456789abcdef"
HEADERS = {"Content-Type": "image/jpeg"}


def classify(client, token: str | None = None, model: str = "mobilenet_v2"):
    headers = HEADERS | ({"Authorization": f"Bearer {token}"} if token is not None else {})
    return client.post("/classify", params={"model": model}, content=JPEG, headers=headers)


# --- no debug endpoints ----------------------------------------------------------------------------
def test_docs_are_off_by_default_and_the_schema_stays(fake_repo):
    with serving(create_app(serving_settings(fake_repo))) as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert_error(client.get(path), 404, "not_found")
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and "/classify" in schema.json()["paths"]
    with serving(create_app(serving_settings(fake_repo, docs_enabled=True))) as client:
        assert client.get("/docs").status_code == 200
        assert client.get("/redoc").status_code == 200


def test_the_server_never_reloads_and_never_runs_in_debug(monkeypatch, fake_repo):
    seen = {}

    class FakeServer:
        def __init__(self, config):
            seen["config"] = config
            self.started = True

        def run(self):
            pass

    monkeypatch.setattr(service_main.uvicorn, "Server", FakeServer)
    monkeypatch.setattr(service_main, "configure_logging", lambda *args: None)
    monkeypatch.setattr(service_main, "use_scratch_dir", lambda path: None)
    monkeypatch.setenv("MODEL_REPOSITORY", str(fake_repo))
    assert service_main.main(["--port", "8123"]) == 0
    config = seen["config"]
    assert config.reload is False and config.workers == 1
    assert config.app.debug is False


# --- no stack traces, request ids in the logs ------------------------------------------------------
class Lines(logging.Handler):
    """Formats each record as it is emitted (inside the request, where its id is known)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines():
    handler = Lines()
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_an_unhandled_error_is_a_json_500_without_a_traceback_and_logged_with_its_request_id(
    fake_repo, log_lines
):
    app = create_app(serving_settings(fake_repo))

    async def broken() -> None:
        raise RuntimeError("internal detail /srv/secret.py line 42")

    app.add_api_route("/broken", broken)
    with serving(app) as client:
        response = client.get("/broken", headers={"X-Request-ID": "boom-1"})
        error = assert_error(response, 500, "internal_error")
        assert response.headers["x-request-id"] == "boom-1"
        assert "boom-1" in error["message"]
        for leak in ("Traceback", "RuntimeError", "secret", 'File "'):
            assert leak not in response.text
        assert classify(client).status_code == 200
    logged = [line for line in log_lines if line["message"].startswith("unhandled error")]
    assert len(logged) == 1 and logged[0]["request_id"] == "boom-1"
    assert "RuntimeError: internal detail" in logged[0]["exc_info"]  # the traceback is in the log only
    access = [line for line in log_lines if line["logger"] == "service.access" and line["path"] == "/broken"]
    assert access and access[0]["request_id"] == "boom-1" and access[0]["status"] == 500


def test_every_access_log_line_carries_the_request_id(fake_repo, log_lines):
    with serving(create_app(serving_settings(fake_repo))) as client:
        response = classify(client)
        assert response.status_code == 200
    access = [
        line for line in log_lines if line["logger"] == "service.access" and line["path"] == "/classify"
    ]
    assert len(access) == 1
    assert access[0]["request_id"] == response.headers["x-request-id"]


# --- bearer-token authentication -------------------------------------------------------------------
def test_auth_is_off_by_default(fake_repo):
    assert serving_settings(fake_repo).expected_token() is None
    with serving(create_app(serving_settings(fake_repo))) as client:
        assert classify(client).status_code == 200
        assert client.get("/models").status_code == 200


def test_with_a_token_every_route_but_the_probes_and_the_page_needs_it(fake_repo, monkeypatch, log_lines):
    calls = []
    real = auth.hmac.compare_digest

    def recording(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    with serving(create_app(serving_settings(fake_repo, auth_token=TOKEN))) as client:
        # No token, another scheme, an empty one: 401 with a bare challenge.
        for headers in ({}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "}):
            response = client.post(
                "/classify", params={"model": "mobilenet_v2"}, content=JPEG, headers=HEADERS | headers
            )
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == 'Bearer realm="classifier"'
            assert response.headers["x-request-id"]
        assert not calls  # nothing to compare without a bearer token
        # A wrong token (shorter, longer, one character off): 401 invalid_token.
        for wrong in (TOKEN[:-1], TOKEN + "x", TOKEN[:-1] + "g"):
            response = classify(client, wrong)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == 'Bearer realm="classifier", error="invalid_token"'
            assert wrong not in response.text
        assert calls and set(calls) == {(bytes, bytes)}  # constant-time, on bytes
        # The right token, with the scheme in any case.
        assert classify(client, TOKEN).status_code == 200
        lower = client.get("/models", headers={"Authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/models", "/models/mobilenet_v2", "/metrics", "/openapi.json"):
            assert_error(client.get(path), 401, "unauthorized")
            assert client.get(path, headers=bearer).status_code == 200, path
        # Routes that do not exist say no more than 401 without the token.
        assert_error(client.get("/admin"), 401, "unauthorized")
        assert_error(client.get("/admin", headers=bearer), 404, "not_found")
        # Probes and the page stay open.
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/").status_code == 200
    text = json.dumps(log_lines)
    assert TOKEN not in text and TOKEN[:-1] not in text


def test_the_token_can_come_from_a_file(fake_repo, tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # a mounted secret often ends with a newline
    settings = serving_settings(fake_repo, auth_token_file=secret)
    assert settings.expected_token() == TOKEN.encode()
    with serving(create_app(settings)) as client:
        assert_error(classify(client), 401, "unauthorized")
        assert classify(client, TOKEN).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"auth_token": "short"}, "AUTH_TOKEN"),
        ({"auth_token": "with spaces in the token"}, "AUTH_TOKEN"),
        ({"auth_token_file": "/nonexistent/token"}, "AUTH_TOKEN_FILE"),
        ({"auth_token": TOKEN, "auth_token_file": __file__}, "AUTH_TOKEN_FILE"),
        ({"metrics_port": 8000, "port": 8000}, "METRICS_PORT"),
        ({"metrics_port": 0}, "METRICS_PORT"),
    ],
)
def test_bad_security_settings_are_named_and_the_token_never_shown(overrides, named):
    with pytest.raises(ConfigError, match=named) as caught:
        load_settings(**overrides)
    assert "short" not in str(caught.value) and "with spaces" not in str(caught.value)


# --- a real python -m service: the token stays out of the log; /metrics on its own port --------------
def test_python_m_service_with_a_token_and_a_metrics_port(fake_repo, tmp_path):
    sock = free_socket()
    metrics_port = sock.getsockname()[1]
    sock.close()
    service = ServiceProcess(
        {
            "MODEL_REPOSITORY": str(fake_repo),
            "BACKEND": "onnxruntime-cpu",
            "AUTH_TOKEN": TOKEN,
            "METRICS_PORT": str(metrics_port),
            "LOG_LEVEL": "DEBUG",
        },
        tmp_path / "service.log",
    )
    try:
        wait_ready(service.url)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (
            httpx.post(
                f"{service.url}/classify?model=mobilenet_v2", content=JPEG, headers=HEADERS
            ).status_code
            == 401
        )
        ok = httpx.post(f"{service.url}/classify?model=mobilenet_v2", content=JPEG, headers=HEADERS | bearer)
        assert ok.status_code == 200, ok.text
        assert (
            httpx.get(f"{service.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        # The main port no longer serves /metrics, token or not.
        assert_error(httpx.get(f"{service.url}/metrics", headers=bearer), 404, "not_found")
        # The metrics port does, without a token (it is for the internal network), from the app's registry.
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200
        assert 'classifier_requests_total{code="200",model="mobilenet_v2"} 1.0' in scraped.text
        assert 'classifier_requests_total{code="401",model="mobilenet_v2"} 1.0' in scraped.text
        assert 'classifier_model_ready{model="shufflenet_v2"} 1.0' in scraped.text
    finally:
        service.stop()
    log = service.output()
    starting = next(json.loads(line) for line in log.splitlines() if '"message":"starting"' in line)
    assert TOKEN not in log and starting["settings"]["auth_token"] == "**********"
    assert f"/metrics on 127.0.0.1:{metrics_port}" in log


# --- a read-only root filesystem ----------------------------------------------------------------------
# Every mount but the kernel's own (/proc, /sys) and /dev is remounted read-only in a private mount
# namespace, and the scratch directory is a fresh tmpfs: the server can write there and nowhere else.
READ_ONLY_ROOT = r"""
set -eu
scratch="$1"; shift
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mnt; do
    case "$mnt" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/pts|*'\0'*) continue ;; esac
    mount -o remount,bind,ro "$mnt" 2>/dev/null || true
done
mount -t tmpfs -o size=64m,mode=1777 scratch "$scratch"
if touch "$scratch/../write-probe" 2>/dev/null || touch /write-probe 2>/dev/null; then
    echo "the root filesystem is still writable" >&2; exit 90
fi
for dir in "$REPO_DIR" "$MODEL_REPOSITORY"; do
    if touch "$dir/write-probe" 2>/dev/null; then echo "$dir is still writable" >&2; exit 91; fi
done
exec "$@"
"""


def _can_make_mount_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=10
    )
    return result.returncode == 0


@pytest.mark.skipif(
    not _can_make_mount_namespaces(),
    reason="needs root and unshare --mount (a private mount namespace) to make / read-only",
)
def test_python_m_service_serves_on_a_read_only_root_filesystem(fake_repo, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    service = ServiceProcess(
        {
            "MODEL_REPOSITORY": str(fake_repo),
            "BACKEND": "onnxruntime-cpu",
            "SCRATCH_DIR": str(scratch),
            "REPO_DIR": str(REPO),
        },
        tmp_path / "service.log",
        wrapper=[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            READ_ONLY_ROOT,
            "sh",
            str(scratch),
        ],
    )
    try:
        wait_ready(service.url, timeout_s=60)
        for model in ("mobilenet_v2", "shufflenet_v2"):
            response = httpx.post(f"{service.url}/classify?model={model}", content=JPEG, headers=HEADERS)
            assert response.status_code == 200, (response.text, service.output()[-3000:])
        multipart = httpx.post(
            f"{service.url}/classify?model=mobilenet_v2",
            files=[("file", ("a.jpg", JPEG, "image/jpeg")), ("file", ("b.jpg", JPEG, "image/jpeg"))],
        )
        assert multipart.status_code == 200 and len(multipart.json()["results"]) == 2
        assert httpx.get(f"{service.url}/metrics").status_code == 200
        assert httpx.get(f"{service.url}/").status_code == 200
    finally:
        service.stop()
    log = service.output()
    assert "write-probe" not in log and "still writable" not in log, log[-3000:]
    assert "Read-only file system" not in log and "not a writable directory" not in log, log[-3000:]
    # The namespace is gone with the server: the host's mounts were never touched.
    assert not os.path.ismount(scratch)
    assert os.access(REPO, os.W_OK)


# --- the dependency audit ------------------------------------------------------------------------------
def _audit_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_audit", REPO / "deploy" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_audit_pins_the_runtime_closure_and_fails_when_pip_audit_does(monkeypatch, capsys):
    audit = _audit_module()
    pins = audit.closure(audit.roots())
    # The runtime dependencies and what they pull in (uvicorn[standard] brings uvloop and httptools) ...
    assert {"fastapi", "starlette", "uvicorn", "uvloop", "httptools", "onnxruntime", "pillow"} <= set(pins)
    # ... at their installed versions, and nothing that is build- or test-only.
    assert pins["fastapi"] == audit.md.version("fastapi")
    assert not {"torch", "pytest", "schemathesis", "pip-audit"} & set(pins)
    seen = {}

    def fake_run(command, check):
        seen["command"] = command
        seen["pinned"] = Path(command[-1]).read_text().split()
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(audit.subprocess, "run", fake_run)
    monkeypatch.setattr(audit.shutil, "which", lambda *args, **kwargs: "/usr/bin/pip-audit")
    assert audit.main([]) == 1
    assert "--strict" in seen["command"] and "--no-deps" in seen["command"]
    assert f"fastapi=={pins['fastapi']}" in seen["pinned"]
    assert "FAILED" in capsys.readouterr().err
