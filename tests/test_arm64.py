"""What the process tweaks do where they cannot apply: each fails soft, logs why, and the server starts.

ARM machines (Jetson's CPU side, Graviton, Ampere), emulators, sandboxes and non-glibc systems can
refuse what x86-64 Linux grants: the CPU affinity mask, the cgroup files, glibc's mallopt, SCHED_BATCH.
Those refusals cannot be produced on demand on this machine, so they are simulated (the tests say so
in their names); the real calls on a real aarch64 userland are checked by ``deploy/arm64_test.py``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from service import process
from service.core import cpus
from service.core.cpus import cgroup_cpu_limit

REPO = Path(__file__).resolve().parents[1]


def _cgroup_files(tmp_path, proc_text: str, files: dict[str, str]):
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_text)
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc, root


# --- CPUs -----------------------------------------------------------------------------------------
def test_cpu_count_falls_back_to_the_cores_when_the_affinity_mask_is_refused_simulated(monkeypatch, caplog):
    def refused(pid: int) -> set[int]:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sched_getaffinity", refused)
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    with caplog.at_level(logging.WARNING, logger="service.core.cpus"):
        assert cpus.cpu_count() == (os.cpu_count() or 1)
    assert "cannot read this process's CPU affinity" in caplog.text


def test_cpu_count_without_sched_getaffinity_counts_the_cores_simulated(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 1.0)
    assert cpus.cpu_count() == 1


def test_a_malformed_proc_cgroup_line_is_skipped_and_the_others_still_count(tmp_path, caplog):
    proc, root = _cgroup_files(tmp_path, "garbage without colons\n0::/pod\n", {"pod/cpu.max": "50000 100000"})
    with caplog.at_level(logging.WARNING, logger="service.core.cpus"):
        assert cgroup_cpu_limit(proc, root) == 0.5
    assert "unexpected line" in caplog.text


@pytest.mark.parametrize(
    "cpu_max",
    ["", "max", "lots 100000", "100000 0", "0 100000"],
    ids=["empty", "one-field", "not-a-number", "zero-period", "zero-quota"],
)
def test_a_cpu_max_that_is_not_quota_and_period_counts_as_no_limit(tmp_path, caplog, cpu_max):
    proc, root = _cgroup_files(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    with caplog.at_level(logging.WARNING, logger="service.core.cpus"):
        assert cgroup_cpu_limit(proc, root) is None
    if cpu_max != "0 100000":
        assert "CPU limit" in caplog.text


def test_an_unreadable_cgroup_file_counts_as_no_limit(tmp_path, caplog):
    # A directory where the file should be: reading it fails with an OSError other than "not found".
    proc, root = _cgroup_files(tmp_path, "0::/\n", {})
    (root / "cpu.max").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="service.core.cpus"):
        assert cgroup_cpu_limit(proc, root) is None
    assert "cannot read the CPU limit" in caplog.text
    unreadable_proc = tmp_path / "proc-dir"
    unreadable_proc.mkdir()
    with caplog.at_level(logging.WARNING, logger="service.core.cpus"):
        assert cgroup_cpu_limit(unreadable_proc, root) is None
    assert f"cannot read {unreadable_proc}" in caplog.text


def test_no_proc_cgroup_at_all_is_no_limit_and_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="service.core.cpus"):
        assert cgroup_cpu_limit(tmp_path / "absent", tmp_path) is None
    assert caplog.text == ""


# --- glibc's allocator --------------------------------------------------------------------------
def test_release_large_blocks_on_this_glibc_applies_both_parameters():
    # Every Linux this project builds for (x86-64 and arm64 Debian/Ubuntu images) has glibc. In a
    # process of its own: the allocator's settings would otherwise outlive the test in this one.
    probe = "from service.process import release_large_blocks as r; raise SystemExit(0 if r() else 1)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_release_large_blocks_without_a_c_library_found_is_false_and_logged_simulated(monkeypatch, caplog):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="service"):
        assert process.release_large_blocks() is False
    assert "no C library found" in caplog.text


class _LibcWithoutMallopt:
    """A C library such as musl's, which has no mallopt."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, symbol: str):
        raise AttributeError(f"{self.name}: undefined symbol: {symbol}")


class _LibcRefusingMallopt:
    """A C library whose mallopt refuses the parameters (returns 0)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def mallopt(self, param: int, value: int) -> int:
        return 0


def test_release_large_blocks_with_a_c_library_without_mallopt_is_false_and_logged_simulated(
    monkeypatch, caplog
):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.musl-aarch64.so.1")
    monkeypatch.setattr(ctypes, "CDLL", _LibcWithoutMallopt)
    with caplog.at_level(logging.WARNING, logger="service"):
        assert process.release_large_blocks() is False
    assert "has no mallopt" in caplog.text


def test_release_large_blocks_when_mallopt_refuses_is_false_and_logged_simulated(monkeypatch, caplog):
    monkeypatch.setattr(ctypes, "CDLL", _LibcRefusingMallopt)
    with caplog.at_level(logging.WARNING, logger="service"):
        assert process.release_large_blocks() is False
    assert "refused mallopt" in caplog.text


def test_release_large_blocks_when_the_c_library_cannot_be_loaded_is_false_and_logged_simulated(
    monkeypatch, caplog
):
    def unloadable(name: str):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", unloadable)
    with caplog.at_level(logging.WARNING, logger="service"):
        assert process.release_large_blocks() is False
    assert "has no mallopt" in caplog.text


# --- SCHED_BATCH ----------------------------------------------------------------------------------
def _in_a_thread(function):
    """Run ``function`` in a thread of its own, so a policy it sets leaves the test's thread alone."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def test_stop_preempting_refused_serves_on_with_a_warning_simulated(monkeypatch, caplog):
    def refused(pid: int, policy: int, param: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    with caplog.at_level(logging.WARNING, logger="service"):
        assert _in_a_thread(process.stop_preempting) is False
    assert "cannot make the event loop thread SCHED_BATCH" in caplog.text


def test_stop_preempting_where_there_is_no_sched_batch_is_false_and_logged_simulated(monkeypatch, caplog):
    monkeypatch.delattr(os, "SCHED_BATCH", raising=False)
    with caplog.at_level(logging.INFO, logger="service"):
        assert _in_a_thread(process.stop_preempting) is False
    assert "no SCHED_BATCH" in caplog.text


# --- the image for another architecture -----------------------------------------------------------
def test_dockerfile_exports_on_the_build_platform_and_serves_on_the_target_one():
    """An arm64 image built on x86-64 runs the torch export natively (the ONNX files are the same on
    every architecture) and everything it serves with on arm64."""
    from tests.test_deploy import _stages

    stages = _stages()
    assert stages["export"][0] == "FROM --platform=${BUILDPLATFORM} ${EXPORT_BASE_IMAGE} AS export"
    assert "ARG EXPORT_BASE_IMAGE=${BASE_IMAGE}" in stages[""]
    for stage in ("base", "runtime-venv", "runtime"):
        assert "--platform" not in stages[stage][0], stage
    assert "COPY --from=export /export/model_repository/ /app/model_repository/" in stages["runtime"]
