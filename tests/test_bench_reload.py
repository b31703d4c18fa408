"""``make bench-reload`` (benchmarks/reload.py): its windows, and a short run against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.reload import RELOAD, STEADY, Reload, Request, reload_windows, window_of
from tests.conftest import REPO
from tests.fake_repository import make_repository

MODEL = "shufflenet_v2"


def test_a_request_overlapping_a_load_call_or_its_settle_time_is_in_a_reload_window():
    reloads = [Reload("add", 10.0, 11.0, 200, 200), Reload("remove", 20.0, 20.5, 200, 200)]
    windows = reload_windows(reloads, settle_s=0.5)
    assert windows == [(10.0, 11.5), (20.0, 21.0)]
    cases = {
        (9.0, 9.9): STEADY,  # answered before the load started
        (9.5, 10.1): RELOAD,  # in flight when it started
        (10.2, 10.8): RELOAD,  # inside the call
        (11.2, 11.3): RELOAD,  # in the settle time after the answer
        (11.6, 19.9): STEADY,  # between the two windows
        (19.0, 22.0): RELOAD,  # spans a whole window
        (21.1, 21.2): STEADY,
    }
    for (started, ended), kind in cases.items():
        assert window_of(Request(started, ended, 200), windows) == kind, (started, ended)
    assert window_of(Request(1.0, 2.0, 200), []) == STEADY


def test_reload_benchmark_answers_every_request_while_versions_switch_and_broken_builds_fail(tmp_path):
    repository = make_repository(tmp_path / "model_repository", (MODEL,))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "benchmarks.reload",
        "--repository",
        str(repository),
        "--model",
        MODEL,
        "--duration",
        "4",
        "--warmup",
        "0.3",
        "--interval",
        "0.4",
        "--settle",
        "0.2",
        "--fail-every",
        "3",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "p99 reload / p99 steady" in result.stdout
    report = json.loads((out / "reload.json").read_text())
    assert (out / "server.log").is_file()

    assert report["model"] == MODEL and report["config"]["concurrency"] == 16
    assert set(report["windows"]) == {STEADY, RELOAD}
    for kind, window in report["windows"].items():
        assert window["requests"] > 0, kind
        assert window["ok"] == window["requests"] and window["non_200"] == 0, (kind, window["errors"])
        latency = window["latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"], kind
    assert report["requests"] == sum(w["requests"] for w in report["windows"].values())
    assert report["non_200"] == 0
    expected_ratio = (
        report["windows"][RELOAD]["latency_ms"]["p99"] / report["windows"][STEADY]["latency_ms"]["p99"]
    )
    assert abs(report["p99_ratio"] - expected_ratio) < 1e-9
    assert report["p99_ratio_goal"] == 1.5 and report["p99_ratio_met"] == (report["p99_ratio"] <= 1.5)

    # The reloader alternated, every third version 2 a broken build that the server refused.
    reloads = report["reloads"]
    actions = [reload["action"] for reload in reloads]
    assert actions[:6] == ["add", "remove", "add", "remove", "add-broken", "remove"]
    assert all(reload["status"] == reload["expected_status"] for reload in reloads), reloads
    assert report["reloads_as_planned"] == len(reloads)
    broken = [reload for reload in reloads if reload["action"] == "add-broken"]
    assert all(reload["status"] == 400 and reload["error"] for reload in broken)

    # The server counted each load of version 2 (removing it loads nothing), the broken ones as failed.
    counters = report["server_counters"]
    loads = counters["loads_total"]["after"] - counters["loads_total"]["before"]
    failures = counters["load_failures_total"]["after"] - counters["load_failures_total"]["before"]
    assert loads == actions.count("add") + actions.count("add-broken") >= 3
    assert failures == actions.count("add-broken") >= 1

    # Both versions answered, and nothing else did.
    assert set(report["answers_by_version"]) == {"1", "2"}
    assert sum(report["answers_by_version"].values()) == report["requests"]
    assert len(report["server_rss_mib"]["after_each_reload"]) == len(reloads)


def test_make_bench_reload_runs_the_driver_on_the_built_repository():
    dry_run = subprocess.run(
        ["make", "-n", "bench-reload"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert "build_engines.py" in dry_run.stdout
    assert "-m benchmarks.reload --repository model_repository --model shufflenet_v2" in dry_run.stdout
    help_text = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert "make bench-reload" in help_text.stdout
