"""The process around the app: the CPUs it may use, and the tweaks only ``python -m service`` makes
(logging, the event loop's scheduling policy), never ``create_app``."""

from __future__ import annotations

import io
import json
import logging
import os
import threading

import pytest

from service import process
from service.app import create_app
from service.core import cpus
from service.core.cpus import cgroup_cpu_limit
from service.logs import BackgroundWriter
from tests.live_server import serving, serving_settings


# --- CPUs -----------------------------------------------------------------------------------------
def _cgroup_tree(tmp_path, proc_line: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return proc, root


def test_cgroup_v2_cpu_limit_is_the_tightest_on_the_path(tmp_path):
    proc, root = _cgroup_tree(
        tmp_path,
        "0::/kubepods/pod1/container",
        {
            "kubepods/cpu.max": "max 100000",
            "kubepods/pod1/cpu.max": "150000 100000",  # the pod's limit: 1.5 CPUs
            "kubepods/pod1/container/cpu.max": "400000 100000",
        },
    )
    assert cgroup_cpu_limit(proc, root) == 1.5


def test_cgroup_v2_in_a_container_reads_its_own_root(tmp_path):
    # With a cgroup namespace the container sees its own group as "/" at the mount's top.
    proc, root = _cgroup_tree(tmp_path, "0::/", {"cpu.max": "200000 100000"})
    assert cgroup_cpu_limit(proc, root) == 2.0
    proc, root = _cgroup_tree(tmp_path / "unlimited", "0::/", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(proc, root) is None


def test_cgroup_v1_cpu_limit_from_the_cpu_controller(tmp_path):
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    lines = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc"
    proc, root = _cgroup_tree(tmp_path, lines, files)
    assert cgroup_cpu_limit(proc, root) == 3.0
    files["cpu,cpuacct/cpu.cfs_quota_us"] = "-1"
    proc, root = _cgroup_tree(tmp_path / "none", lines, files)
    assert cgroup_cpu_limit(proc, root) is None
    assert cgroup_cpu_limit(tmp_path / "no-such-file", root) is None


def test_cpu_count_stops_at_the_cgroup_limit_rounded_up(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 0.5)
    assert cpus.cpu_count() == 1
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: cores - 0.5)
    assert cpus.cpu_count() == cores
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: cores + 8.0)
    assert cpus.cpu_count() == cores


# --- what only python -m service changes ----------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_create_app_leaves_the_scheduling_policy_alone_and_calls_back_once_models_are_loaded(fake_repo):
    seen: list[tuple[int, list[str]]] = []
    app = create_app(serving_settings(fake_repo, event_loop_preempts=False))
    loaded = create_app(
        serving_settings(fake_repo, event_loop_preempts=False),
        on_models_loaded=lambda: seen.append(
            (
                os.sched_getscheduler(0),
                [model.status.value for model in loaded.state.repository.models.values()],
            )
        ),
    )
    for each in (app, loaded):
        with serving(each) as client:
            assert client.get("/readyz").status_code == 200
            # The event loop's thread (the client's portal) kept the default policy.
            assert client.portal.call(os.sched_getscheduler, 0) == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert seen == [(os.SCHED_OTHER, ["ready", "ready"])]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_stop_preempting_marks_the_calling_thread_and_the_threads_it_starts_after():
    seen: dict[str, int] = {}

    def marked() -> None:
        seen["before"] = os.sched_getscheduler(0)
        seen["result"] = process.stop_preempting()
        seen["after"] = os.sched_getscheduler(0)
        child = threading.Thread(target=lambda: seen.setdefault("child", os.sched_getscheduler(0)))
        child.start()
        child.join()

    thread = threading.Thread(target=marked)
    thread.start()
    thread.join()
    assert seen == {
        "before": os.SCHED_OTHER,
        "result": True,
        "after": os.SCHED_BATCH,
        "child": os.SCHED_BATCH,
    }
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this thread was left alone


def test_logging_goes_through_one_writer_that_stop_logging_writes_out_and_ends(monkeypatch):
    root = logging.getLogger()
    saved = (
        root.handlers[:],
        root.level,
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
    )
    saved_srcfile = logging._srcfile  # type: ignore[attr-defined]
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    try:
        process.configure_logging("INFO", "json")
        process.configure_logging("INFO", "json")  # a second call replaces the first writer
        writers = [handler for handler in root.handlers if isinstance(handler, BackgroundWriter)]
        assert len(writers) == 1 and root.handlers == writers
        assert logging._srcfile is None and not logging.logThreads  # type: ignore[attr-defined]
        logging.getLogger("service.test.process").info("one %s", "line")
        process.stop_logging()
        assert not any(isinstance(handler, BackgroundWriter) for handler in root.handlers)
        assert not writers[0]._thread.is_alive()
        assert [json.loads(line)["message"] for line in stderr.getvalue().splitlines()] == ["one line"]
        process.stop_logging()  # nothing left to stop
    finally:
        root.handlers[:], root.level, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = (
            saved
        )
        logging._srcfile = saved_srcfile  # type: ignore[attr-defined]
