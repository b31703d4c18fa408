"""``make bench``: the in-process measurements, the report's arithmetic, and a quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks import inprocess, report
from contract.photos import photo_jpeg
from tests.conftest import REPO

MODEL = "shufflenet_v2"


# --- in-process --------------------------------------------------------------------------------------


def test_runtime_cost_covers_every_batch_size_and_thread_setting(built_repository):
    rows = inprocess.runtime_cost(
        built_repository / MODEL, batch_sizes=(1, 3), thread_settings=(1, 2), duration_s=0.02, repeats=2
    )
    assert [(r.intra_op_threads, r.batch_size) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in rows:
        assert row.backend == "onnxruntime-cpu" and len(row.batch_ms.values) == 2
        assert row.batch_ms.low <= row.batch_ms.median <= row.batch_ms.high
        rates = [1000 * row.batch_size / ms for ms in row.batch_ms.values]
        assert list(row.images_per_s.values) == pytest.approx(rates)


def test_the_in_process_pipeline_gives_the_servers_answer(built_repository):
    from contract.manifest import Manifest

    data = photo_jpeg(500, 375, 1)
    manifest = Manifest.load(built_repository / MODEL)
    runtime = inprocess.load(built_repository / MODEL)
    predictions = inprocess.classify_once(runtime, manifest, data)
    assert len(predictions) == 5 and predictions[0]["label"] == manifest.labels[predictions[0]["class_id"]]

    latency = inprocess.pipeline_latency(built_repository / MODEL, [data], duration_s=0.05, repeats=2)
    assert latency.requests >= 6 and 0 < latency.p50_ms.median <= latency.p90_ms.high
    for arrangement in inprocess.ARRANGEMENTS:
        rate = inprocess.pipeline_throughput(
            built_repository / MODEL, [data], arrangement=arrangement, workers=2, duration_s=0.2, repeats=1
        )
        assert rate.workers == 2 and rate.arrangement == arrangement
        assert rate.requests > 0 and rate.requests_per_s.median == pytest.approx(rate.requests / 0.2)
    with pytest.raises(ValueError, match="arrangement"):
        inprocess.pipeline_throughput(built_repository / MODEL, [data], arrangement="processes")


# --- the report's arithmetic ---------------------------------------------------------------------------


def _spread(*values: float) -> dict:
    return {
        "median": sorted(values)[len(values) // 2],
        "low": min(values),
        "high": max(values),
        "values": values,
    }


def _level(model: str, level: int, repeat: int, rps: float, p50: float) -> dict:
    return {
        "model": model,
        "level": level,
        "repeat": repeat,
        "requests_per_s": rps,
        "images_per_s": rps,
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "errors": {},
        "client_cpu_percent": 2.0,
        "client_cpu_us_per_request": 200.0,
        "server_cpu": {
            "event_loop_ms_per_request": 0.5,
            "other_threads_ms_per_request": 7.5 + repeat / 10,
            "machine_idle_percent": 3.0,
        },
        "server_timings_ms": {"decode": {"mean": 3.0}, "queue": {"mean": 0.1}, "inference": {"mean": 5.0}},
        "server_histogram": {
            "p50": {"client_within_one_bucket": True},
            "p99": {"client_within_one_bucket": True},
        },
    }


def _throughput(arrangement: str, repeat: int, rps: float) -> dict:
    return {
        "model": "m",
        "arrangement": arrangement,
        "workers": 2,
        "repeat": repeat,
        "requests_per_s": _spread(rps),
        "cpu_ms_per_request": 2000 / rps,  # two busy cores
    }


def _results() -> dict:
    """Three repeats; each pairs a served measurement with the in-process one next to it."""
    return {
        "models": {"m": {"flops": 200_000_000, "params": 2_000_000, "memory_access_cost": 5_000_000}},
        "runtime": [
            {
                "model": "m",
                "batch_size": 1,
                "intra_op_threads": 1,
                "batch_ms": _spread(4.0, 5.0, 6.0),
                "images_per_s": _spread(200.0),
            },
        ],
        "pipeline_latency": [
            {"model": "m", "repeat": r, "p50_ms": _spread(p50), "p90_ms": _spread(9.0), "requests": 10}
            for r, p50 in enumerate((8.0, 8.5, 7.5))
        ],
        "pipeline_throughput": [
            *(_throughput("shared-session", r, rps) for r, rps in enumerate((200.0, 210.0, 190.0))),
            *(_throughput("session-per-worker", r, rps) for r, rps in enumerate((250.0, 240.0, 260.0))),
        ],
        "served": {
            "levels": [
                _level("m", 1, 0, 100.0, 9.0),
                _level("m", 1, 1, 90.0, 10.0),
                _level("m", 1, 2, 110.0, 9.5),
                _level("m", 16, 0, 200.0, 80.0),
                _level("m", 16, 1, 180.0, 90.0),
                _level("m", 16, 2, 190.0, 85.0),
            ]
        },
    }


def test_model_summary_compares_served_with_in_process_repeat_by_repeat():
    (row,) = report.model_summary(_results())
    assert row["runtime_p50_ms"] == 5.0
    assert row["achieved_gflops"] == pytest.approx(0.2 / 0.005)
    assert row["ms_per_gflop"] == pytest.approx(25.0)
    # The best in-process arrangement (by its median) is the yardstick.
    assert row["inprocess_requests_per_s"] == 250.0
    assert row["inprocess_arrangement"] == "session-per-worker, 2 workers"
    assert row["served_requests_per_s"] == 190.0  # median of the three repeats at the highest concurrency
    # Paired by repeat: 200/250, 180/240, 190/260.
    ratio = row["served_over_inprocess"]
    assert ratio["median"] == pytest.approx(0.75) and ratio["n"] == 3
    assert (ratio["low"], ratio["high"]) == (pytest.approx(190 / 260), pytest.approx(0.8))
    # 9.0 - 8.0, 10.0 - 8.5, 9.5 - 7.5.
    difference = row["served_p50_minus_inprocess_ms"]
    assert (difference["median"], difference["low"], difference["high"]) == (1.5, 1.0, 2.0)
    assert row["served_p50_ms"] == 9.5 and row["inprocess_p50_ms"] == 8.0
    assert (row["served_concurrency_low"], row["served_concurrency_high"]) == (1, 16)


def test_report_markdown_and_chart(tmp_path):
    results = _results() | {"machine": {"cpu": "test cpu", "cores": 2}, "config": {"repeats": 3}}
    report_path, chart_path = report.write(tmp_path, results)
    text = report_path.read_text()
    summary = (
        "| m | 200.0 | 2.00 | 5.0 | 5.00 | 40.0 | 25.0 | 9.50 | 8.00 | 1.50 (1.00-2.00) | 190.0 | 250.0 |"
    )
    assert summary + " 75% (73-80%) |" in text
    assert "| m | 16 | 190.0 (180.0-200.0) |" in text
    assert (
        "| m | 8.00 (7.50-8.50) | 9.00 (9.00-9.00) | session-per-worker | 2 | 250.0 (240.0-260.0) |" in text
    )
    with Image.open(chart_path) as chart:
        assert chart.format == "PNG" and chart.width > 600


def _with_protocols() -> dict:
    """The results above plus oip-http and oip-grpc at the lowest and highest concurrency."""
    results = _results()
    for protocol, scale in (("oip-http", 0.9), ("oip-grpc", 1.1)):
        for repeat, (rps, p50) in enumerate(((200.0, 9.0), (180.0, 10.0), (190.0, 9.5))):
            for level, rate, latency in ((1, rps / 2, p50), (16, rps * scale, p50 * 9)):
                row = _level("m", level, repeat, rate, latency + (0.5 if level == 1 else 0.0))
                results["served"]["levels"].append({**row, "protocol": protocol})
    return results


def test_other_protocols_are_compared_with_classify_and_leave_its_figures_alone():
    results = _with_protocols()
    # /classify's own figures are those of _results(): the other protocols' levels are kept apart.
    (row,) = report.model_summary(results)
    assert row["served_requests_per_s"] == 190.0 and row["served_p50_ms"] == 9.5
    assert row["served_over_inprocess"]["median"] == pytest.approx(0.75)
    rows = {r["protocol"]: r for r in report.protocol_summary(results)}
    assert set(rows) == {"oip-http", "oip-grpc"}
    http = rows["oip-http"]
    assert (http["concurrency_low"], http["concurrency_high"]) == (1, 16)
    # Repeat by repeat against /classify at c=16 (200, 180, 190 req/s): 0.9 each time.
    assert http["over_classify"]["median"] == pytest.approx(0.9) and http["over_classify"]["n"] == 3
    assert http["requests_per_s"]["median"] == pytest.approx(171.0)
    assert rows["oip-grpc"]["over_classify"]["low"] == pytest.approx(1.1)
    # p50 at c=1: 0.5 ms above /classify in every repeat.
    difference = http["p50_minus_classify_ms"]
    assert (difference["median"], difference["low"], difference["high"]) == (0.5, 0.5, 0.5)
    assert http["p50_ms"]["median"] == 10.0 and http["classify_p50_ms"]["median"] == 9.5
    table = report.protocol_table(results)
    assert "| m | oip-http | 171.0 (162.0-180.0) | 190.0 (180.0-200.0) | 90% (90-90%) | 10.00" in table
    assert "## Open Inference Protocol beside /classify" in report.markdown(results)
    assert report.protocol_summary(_results()) == []
    assert "only /classify" in report.protocol_table(_results())


def test_cpu_table_puts_the_served_parts_beside_the_in_process_cpu_per_request():
    table = report.cpu_table(_results())
    # In-process: the fastest arrangement's 2000/250, 2000/240, 2000/260 ms. Served per repeat: event
    # loop 0.5 + other threads 7.5/7.6/7.7 + load generator 0.2; 8.3 / 8.0 = 104%.
    assert (
        "| m | 8.00 (7.69-8.33) | 0.500 (0.500-0.500) | 7.600 (7.500-7.700) | 0.200 (0.200-0.200) "
        "| 8.30 (8.20-8.40) | 104% | 3.0 (3.0-3.0)% |"
    ) in table
    # A run whose server was not started here (--url) has no server CPU: the parts stay empty.
    results = _results()
    for level in results["served"]["levels"]:
        level["server_cpu"] = None
    assert "| m | 8.00 (7.69-8.33) | - | - | 0.200 (0.200-0.200) | - | - | - |" in report.cpu_table(results)


# --- end to end ------------------------------------------------------------------------------------------


def test_quick_bench_writes_report_chart_tables_and_load_files(built_repository, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--quick",
            "--repository",
            str(built_repository),
            "--models",
            MODEL,
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "served / in-process" in result.stdout
    for name in (
        "results.json",
        "report.md",
        "latency_vs_flops.png",
        "guideline1.md",
        "decomposition.md",
        "load.json",
        "load.csv",
        "server.log",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    (row,) = results["summary"]
    assert row["model"] == MODEL and row["served_over_inprocess"]["median"] > 0 and row["served_p50_ms"] > 0
    assert {level["level"] for level in results["served"]["levels"]} == {1, 4}
    # Each protocol at the lowest and the highest concurrency, beside /classify in the same run.
    protocols = {(level["protocol"], level["level"]) for level in results["served"]["levels"]}
    assert protocols == {(p, c) for p in ("classify", "oip-http", "oip-grpc") for c in (1, 4)}
    assert all(level["errors"] == {} for level in results["served"]["levels"]), results["served"]["levels"]
    assert {row["protocol"] for row in results["protocols"]} == {"oip-http", "oip-grpc"}
    assert all(row["over_classify"]["median"] > 0 for row in results["protocols"])
    assert len(results["guideline1"]) == 4 and len(results["decomposition"]) == 2
    # The server was started here: each level says what its threads cost per request, from /proc. The
    # inference threads do the decoding and the inference, far more than the event loop.
    for level in results["served"]["levels"]:
        cpu = level["server_cpu"]
        assert 0 < cpu["event_loop_ms_per_request"] < cpu["other_threads_ms_per_request"], level
        assert 0 <= cpu["machine_idle_percent"] <= 100
    for row in results["pipeline_throughput"]:
        assert row["cpu_ms_per_request"] > 0
    text = (out / "report.md").read_text()
    for heading in (
        "## Summary",
        "## (a)",
        "## (b)",
        "## Open Inference Protocol beside /classify",
        "## Where the served path's CPU goes",
        "## Reduced precision",
        "guideline 1",
        "operator kind",
    ):
        assert heading in text


def test_bench_refuses_models_that_are_not_built(tmp_path, capsys):
    from benchmarks import bench

    assert bench.main(["--repository", str(tmp_path), "--models", MODEL, "--quick"]) == 2
    assert "make models" in capsys.readouterr().err


def test_make_bench_runs_the_driver_on_the_built_repository():
    result = subprocess.run(["make", "-n", "bench"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "build_engines.py" in result.stdout and "-m benchmarks.bench" in result.stdout


def test_precision_table_shows_speedup_and_agreement_per_variant():
    from benchmarks import report

    row = {
        "model": "mobilenet_v2",
        "median_ms": 3.2,
        "spread_ms": [3.1, 3.5],
        "agreement": {"top1_agreement": 0.844, "max_abs_logit_diff": 0.16, "mean_abs_logit_diff": 0.02},
    }
    table = report.precision_table(
        {
            "precisions": [
                {**row, "precision": "fp32", "median_ms": 7.2, "speedup": 1.0, "agreement": {}},
                {**row, "precision": "int8", "speedup": 2.25},
            ]
        }
    )
    lines = table.splitlines()
    assert "speed-up vs fp32" in lines[0]
    assert "| mobilenet_v2 | int8 | 3.20 (3.10-3.50) | 2.25x | 84.4% | 0.160 |" in lines
    assert "fp16/int8 builds" in report.precision_table({"precisions": []})
