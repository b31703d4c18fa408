"""Prometheus configuration, alert rules and the Grafana dashboard, checked offline and against a live stack.

The offline half runs promtool over the config and rules (syntax, alert unit tests) and checks the
dashboard's structure and that every query parses. The live half builds the four default models with
random weights, serves them, points Debian's Prometheus at the service on loopback, drives load at
every model and evaluates every dashboard query and every recording rule: each must return data for
each model. A SIGHUP under load reloads one model (a new version) and fails to load another (a broken
one), and the load annotations must mark both. promtool and prometheus come from
monitoring/install-prometheus.sh (run by make test).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from contract.zoo import DEFAULT_MODELS
from tests.fake_repository import corrupt

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = (PROMETHEUS_DIR / "recording.yml", PROMETHEUS_DIR / "alerts.yml")
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
GRAFANA_DIR = REPO / "monitoring" / "grafana"
DASHBOARD_JSON = GRAFANA_DIR / "dashboards" / "classifier.json"
GENERATOR = GRAFANA_DIR / "generate_dashboard.py"
DATASOURCES_YML = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS_YML = GRAFANA_DIR / "provisioning" / "dashboards" / "classifier.yml"
# Where docker-compose (and the Grafana image's defaults) put them.
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
GRID_COLUMNS = 24


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run monitoring/install-prometheus.sh (make test installs it)")
    return path


def _run(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=timeout, check=False)


def _output(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _load_annotations(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The annotations that query Prometheus (Grafana's built-in one aside)."""
    return [a for a in dashboard["annotations"]["list"] if not a.get("builtIn")]


def _concrete(expr: str, model: str, rate_interval: str = "20s", range_: str = "1m") -> str:
    """An expr as Grafana sends it: template variables replaced by concrete values."""
    values = {
        "model": model,
        "__rate_interval": rate_interval,
        "__range": range_,
        "__interval": "5s",
    }

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unhandled template variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", substitute, expr)


def _models_regex(models: tuple[str, ...]) -> str:
    return "|".join(re.escape(m) for m in models)


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def render_prometheus_config(service: str, prometheus: str, interval: str = "1s") -> str:
    """The shipped prometheus.yml, scraping ``service`` and evaluating rules every ``interval``."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    targets = {"classifier": service, "prometheus": prometheus}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), jobs
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": [targets[name]]}]
    return yaml.safe_dump(config, sort_keys=False)


# --- Prometheus configuration and rules, offline --------------------------------------------------
def test_promtool_check_config():
    result = _run(_tool("promtool"), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, _output(result)


def test_promtool_check_rules():
    result = _run(_tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, _output(result)


def test_promtool_rule_unit_tests():
    assert RULE_TESTS, "no promtool unit tests under monitoring/prometheus/tests/"
    result = _run(_tool("promtool"), "test", "rules", *map(str, RULE_TESTS), timeout=120)
    assert result.returncode == 0, _output(result)


def test_every_alert_is_unit_tested_firing_and_not_firing():
    alerts = {rule["alert"] for rule in _rules(PROMETHEUS_DIR / "alerts.yml")}
    assert alerts >= {
        "ClassifierDown",
        "ClassifierModelNotReady",
        "ClassifierHighErrorRatio",
        "ClassifierHighP99Latency",
        "ClassifierQueueSaturated",
    }
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts <= firing, f"never tested firing: {sorted(alerts - firing)}"
    assert alerts <= silent, f"never tested silent: {sorted(alerts - silent)}"


def test_every_rule_is_per_model_and_documented():
    for rule in _rules(PROMETHEUS_DIR / "alerts.yml"):
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
    for rule in _rules(PROMETHEUS_DIR / "recording.yml"):
        # level:metric:operations, aggregated to the model (the dashboards' and alerts' unit).
        assert rule["record"].split(":")[0] in {"model", "model_quantile"}, rule["record"]


def test_rendered_test_config_is_valid(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config("127.0.0.1:18000", "127.0.0.1:19090"))
    result = _run(_tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, _output(result)


def test_install_script_is_valid_shell():
    result = _run("sh", "-n", str(REPO / "monitoring" / "install-prometheus.sh"))
    assert result.returncode == 0, _output(result)


# --- Grafana, offline ----------------------------------------------------------------------------
def test_dashboard_json_is_what_the_generator_writes():
    assert DASHBOARD_JSON.read_text() == _generator().render(), (
        f"{DASHBOARD_JSON.relative_to(REPO)} is stale: run python {GENERATOR.relative_to(REPO)}"
    )


def test_provisioning_points_at_the_dashboard_and_datasource():
    datasources = yaml.safe_load(DATASOURCES_YML.read_text())["datasources"]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["uid"] == _generator().DATASOURCE_UID
    assert prometheus["url"] == "http://prometheus:9090"
    scrape_interval = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    # $__rate_interval is derived from it: a mismatch makes rate() windows too short or too long.
    assert prometheus["jsonData"]["timeInterval"] == scrape_interval
    (provider,) = yaml.safe_load(PROVIDERS_YML.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT


def test_dashboard_structure():
    dashboard = _dashboard()
    assert dashboard["uid"] == "classifier-models"
    assert dashboard["title"] == "Classifier: models compared"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"

    datasource_uid = yaml.safe_load(DATASOURCES_YML.read_text())["datasources"][0]["uid"]
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for cell in itertools.product(
            range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        ):
            assert cell not in occupied, f"{panel['title']!r} overlaps {occupied[cell]!r} at {cell}"
            occupied[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), f"{panel['title']}: refIds {refs}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]
            assert 'model=~"$model"' in target["expr"], (
                f"{panel['title']} {target['refId']} ignores the model variable"
            )

    annotations = _load_annotations(dashboard)
    assert annotations, "no annotation marks the model loads"
    for annotation in annotations:
        assert annotation["datasource"]["uid"] == datasource_uid, annotation["name"]
        assert annotation["enable"] is True and annotation["hide"] is False, annotation["name"]
        assert 'model=~"$model"' in annotation["expr"], f"{annotation['name']} ignores the model variable"
        assert "{{model}}" in annotation["titleFormat"], annotation["name"]
        assert annotation["tagKeys"] == "model", annotation["name"]
    names = [a["name"] for a in dashboard["annotations"]["list"]]
    assert len(names) == len(set(names)), names

    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model"
    assert variable["datasource"]["uid"] == datasource_uid
    assert variable["multi"] and variable["includeAll"]
    assert variable["definition"] == "label_values(classifier_model_info, model)"


def test_dashboard_covers_what_the_design_asks_for():
    exprs = "\n".join(t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", []))
    for needle in (
        "rate(classifier_images_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "classifier_decode_duration_seconds_sum",
        "classifier_queue_duration_seconds_sum",
        "classifier_inference_duration_seconds_sum",
        "classifier_batch_size_sum",
        "classifier_batch_size_bucket",
        "classifier_requests_total",
        "classifier_queue_depth",
        "classifier_model_flops",
        "classifier_model_parameters",
        "classifier_model_memory_access_cost",
        "classifier_model_info",
        "classifier_model_version",
        "classifier_model_loads_total",
        "classifier_model_load_failures_total",
        "classifier_model_load_duration_seconds",
    ):
        assert needle in exprs, needle


def test_dashboard_marks_reloads_and_failed_loads_in_different_colours():
    annotations = {a["expr"].split("changes(")[1].split("{")[0]: a for a in _load_annotations(_dashboard())}
    assert set(annotations) == {"classifier_model_loads_total", "classifier_model_load_failures_total"}
    reloads = annotations["classifier_model_loads_total"]
    failures = annotations["classifier_model_load_failures_total"]
    assert reloads["iconColor"] != failures["iconColor"]
    assert reloads["titleFormat"] == "reload of {{model}}"
    assert failures["titleFormat"] == "failed load of {{model}}"
    for annotation in (reloads, failures):
        # A mark only where the counter moved: a quiet model draws nothing.
        assert annotation["expr"].endswith("> 0"), annotation["expr"]


def test_every_dashboard_expr_parses(tmp_path):
    """promtool has no expression checker, so each query becomes a recording rule it must accept."""
    rules = []
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            rules.append(
                {
                    "record": f"dashboard:panel_{panel['id']}:{target['refId'].lower()}",
                    "expr": _concrete(target["expr"], _models_regex(DEFAULT_MODELS)),
                }
            )
    for i, annotation in enumerate(_load_annotations(_dashboard())):
        rules.append(
            {
                "record": f"dashboard:annotation_{i}",
                "expr": _concrete(annotation["expr"], _models_regex(DEFAULT_MODELS)),
            }
        )
    assert rules
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(_tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, _output(result)


# --- live: the service under load, scraped by a real Prometheus ----------------------------------
SERVER_READY_S = 240
LOAD_MIN_S = 15
EVALUATE_S = 90
WORKERS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextlib.contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _wait_until(condition, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: process exited with {process.returncode}\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{_tail(log)}")


def _jpegs() -> list[bytes]:
    try:
        from contract.photos import photo_jpeg
    except ImportError:
        photo_jpeg = None
    if photo_jpeg is not None:
        return [photo_jpeg(seed=seed) for seed in range(4)]
    import numpy as np
    from PIL import Image

    images = []
    for seed in range(4):
        pixels = np.random.default_rng(seed).integers(0, 256, (375, 500, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


class _Load:
    """Requests to every model from a few threads, with a share of bad images so the error panels
    have something to show, until stopped."""

    def __init__(self, base_url: str, models: tuple[str, ...]) -> None:
        self.base_url = base_url
        self.models = models
        self.jpegs = _jpegs()
        self.stop = threading.Event()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(WORKERS)
        ]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _worker(self, worker: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=15) as client:
            for k in itertools.count(worker):
                if self.stop.is_set():
                    return
                model = self.models[k % len(self.models)]
                body = self.jpegs[k % len(self.jpegs)]
                if (k // len(self.models)) % 6 == 0:
                    body = b"this is not an image"
                if k % 97 == 0:
                    model = "no_such_model"
                try:
                    response = client.post(
                        "/classify",
                        params={"model": model},
                        content=body,
                        headers={"content-type": "image/jpeg"},
                    )
                except httpx.HTTPError as error:
                    with self._lock:
                        self.errors.append(f"{model}: {error!r}")
                    continue
                with self._lock:
                    self.statuses[model, response.status_code] += 1


def _query(client: httpx.Client, expr: str) -> list[dict[str, Any]]:
    response = client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert body.get("status") == "success", f"{expr}\n{body}"
    assert body["data"]["resultType"] == "vector", expr
    return body["data"]["result"]


def _finite(sample: dict[str, Any]) -> bool:
    return math.isfinite(float(sample["value"][1]))


def _checks(models: tuple[str, ...], *, reloaded: str, failed: str) -> list[tuple[str, str, set[str] | None]]:
    """(what, concrete expr, models each must return a finite value for; None: any finite value).

    The load annotations mark only the models that were loaded anew (``reloaded`` with success,
    ``failed`` without) while Prometheus watched."""
    checks: list[tuple[str, str, set[str] | None]] = []
    marked = {
        "classifier_model_loads_total": {reloaded, failed},
        "classifier_model_load_failures_total": {failed},
    }
    for annotation in _load_annotations(_dashboard()):
        (counter,) = [name for name in marked if f"changes({name}{{" in annotation["expr"]]
        expr = _concrete(annotation["expr"], _models_regex(models))
        checks.append((f"annotation {annotation['name']!r}", expr, marked[counter]))
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            what = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            if panel.get("repeat") == "model":
                # Grafana runs a repeated panel once per model, with $model that one model.
                checks.extend(
                    (f"{what} [{model}]", _concrete(target["expr"], re.escape(model)), None)
                    for model in models
                )
            else:
                checks.append((what, _concrete(target["expr"], _models_regex(models)), set(models)))
    for rule in _rules(PROMETHEUS_DIR / "recording.yml"):
        checks.append((f"recording rule {rule['record']}", rule["record"], set(models)))
    return checks


def _failure(client: httpx.Client, expr: str, expected: set[str] | None) -> str | None:
    result = [s for s in _query(client, expr) if _finite(s)]
    if expected is None:
        return None if result else "no finite sample"
    missing = expected - {s["metric"].get("model") for s in result}
    return f"no finite sample for {sorted(missing)}" if missing else None


@pytest.fixture(scope="module")
def model_repository(tmp_path_factory) -> Path:
    if not (REPO / "build_engines.py").exists() or not (REPO / "service" / "__main__.py").exists():
        pytest.skip("the server (service/__main__.py) or build_engines.py is not in this tree")
    out = tmp_path_factory.mktemp("model_repository")
    result = _run(
        sys.executable,
        str(REPO / "build_engines.py"),
        "--weights",
        "random",
        "--out",
        str(out),
        "--models",
        *DEFAULT_MODELS,
        timeout=600,
    )
    assert result.returncode == 0, _output(result)
    return out


@pytest.mark.slow
def test_every_panel_and_rule_returns_data_for_every_model_under_load(model_repository, tmp_path):
    prometheus_bin, promtool = _tool("prometheus"), _tool("promtool")
    models = tuple(DEFAULT_MODELS)
    service_port, prometheus_port = _free_port(), _free_port()
    service_url = f"http://127.0.0.1:{service_port}"
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config(f"127.0.0.1:{service_port}", f"127.0.0.1:{prometheus_port}"))
    env = {
        **os.environ,
        "MODEL_REPOSITORY": str(model_repository),
        "MODELS": ",".join(models),
        "HOST": "127.0.0.1",
        "PORT": str(service_port),
        "LOG_FORMAT": "text",
    }
    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"
    with (
        _process([sys.executable, "-m", "service", "--port", str(service_port)], service_log, env) as service,
        _process(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            prometheus_log,
        ) as prometheus,
        httpx.Client(base_url=service_url, timeout=10) as api,
        httpx.Client(base_url=prometheus_url, timeout=10) as prom,
    ):
        _wait_until(
            lambda: prom.get("/-/ready").status_code == 200,
            30,
            "prometheus ready",
            prometheus,
            prometheus_log,
        )
        _wait_until(
            lambda: api.get("/readyz").status_code == 200,
            SERVER_READY_S,
            "service ready",
            service,
            service_log,
        )

        with _Load(service_url, models) as load:
            started = time.monotonic()

            # Scraped at least twice under load, so rate() has two samples for every model.
            def scraped_twice() -> bool:
                result = _query(
                    prom,
                    "count_over_time(classifier_images_total[1m]) >= 2"
                    " and rate(classifier_images_total[1m]) > 0",
                )
                return {s["metric"]["model"] for s in result} >= set(models)

            _wait_until(scraped_twice, 60, "two scrapes under load", prometheus, prometheus_log)
            # Under load and under Prometheus's eye, SIGHUP rescans the repository, where one model has
            # gained a version 2 (it loads and serves) and another a broken one (its load fails and
            # version 1 keeps serving): the load annotations must mark both.
            reloaded, failed = models[0], models[1]
            _add_version(model_repository / reloaded, tmp_path)
            corrupt(_add_version(model_repository / failed, tmp_path))
            service.send_signal(signal.SIGHUP)
            while time.monotonic() - started < LOAD_MIN_S:
                time.sleep(0.5)

            # Rules evaluate every second and windows fill as load goes on: re-check what is still
            # missing until everything answers or the deadline passes, while the load continues.
            pending = _checks(models, reloaded=reloaded, failed=failed)
            failures: dict[str, str] = {}
            deadline = time.monotonic() + EVALUATE_S
            while pending and time.monotonic() < deadline:
                failures = {}
                still = []
                for check in pending:
                    failure = _failure(prom, check[1], check[2])
                    if failure:
                        failures[check[0]] = f"{failure}\n    {check[1]}"
                        still.append(check)
                pending = still
                if pending:
                    time.sleep(1)

            metrics_text = api.get("/metrics").content
            rules = prom.get("/api/v1/rules").json()["data"]["groups"]

        assert load.statuses, f"no request got an answer: {load.errors[:5]}"
        for model in models:
            assert load.statuses[model, 200] > 0, f"{model} never answered 200: {dict(load.statuses)}"
            assert load.statuses[model, 400] > 0, f"{model} never answered 400: {dict(load.statuses)}"
        assert not failures, "queries without data under load:\n" + "\n".join(
            f"  {what}: {why}" for what, why in failures.items()
        )

    unhealthy = [
        f"{rule['name']}: {rule.get('lastError')}"
        for group in rules
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert not unhealthy, unhealthy
    # Every target up and every model warmed: these two must stay quiet (the latency and error
    # alerts depend on how fast this machine is, so they are left to the unit tests).
    states = {
        rule["name"]: rule["state"]
        for group in rules
        for rule in group["rules"]
        if rule["type"] == "alerting"
    }
    assert states["ClassifierDown"] == "inactive", states
    assert states["ClassifierModelNotReady"] == "inactive", states

    checked = _run(promtool, "check", "metrics", stdin=metrics_text)
    assert checked.returncode == 0 and not checked.stdout.strip(), _output(checked)
    text = metrics_text.decode()
    for name in (
        "classifier_requests_total",
        "classifier_images_total",
        "classifier_request_duration_seconds_bucket",
        "classifier_decode_duration_seconds_bucket",
        "classifier_queue_duration_seconds_bucket",
        "classifier_inference_duration_seconds_bucket",
        "classifier_batch_size_bucket",
        "classifier_queue_depth",
        "classifier_model_flops",
        "classifier_model_parameters",
        "classifier_model_memory_access_cost",
        "classifier_model_ready",
        "classifier_model_load_duration_seconds",
        "classifier_model_info",
        "classifier_model_version",
        "classifier_model_loads_total",
        "classifier_model_load_failures_total",
    ):
        for model in models:
            assert re.search(rf'^{name}{{[^}}]*model="{re.escape(model)}"', text, re.M), (name, model)
    assert re.search(rf'^classifier_model_version{{model="{reloaded}"}} 2\.0$', text, re.M), "not reloaded"
    assert re.search(rf'^classifier_model_version{{model="{failed}"}} 1\.0$', text, re.M), "not kept"
    assert re.search(rf'^classifier_model_load_failures_total{{model="{failed}"}} 1\.0$', text, re.M)


def _add_version(model_dir: Path, scratch: Path, version: int = 2) -> Path:
    """A copy of a flat model directory's files as its version ``version``, moved in whole, as an
    operator would (a half-copied version must never be what a rescan sees)."""
    staging = scratch / f"{model_dir.name}-{version}"
    staging.mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, staging / path.name)
    return staging.rename(model_dir / str(version))
