"""What the load generator shows and writes: the progress bar while a level runs, the summary table on
the terminal, and ``load.json`` + ``load.csv`` (one row per model, protocol and level).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.load_results import LevelResult
from benchmarks.text_table import text_table

Progress = Callable[[str, float, int, float], None]  # label, elapsed_s, requests, duration_s


def progress_bar(stream=sys.stderr) -> Progress | None:
    """A one-line progress bar on ``stream`` when it is a terminal, else None (no progress output)."""
    if not stream.isatty():
        return None

    def show(label: str, elapsed_s: float, sent: int, duration_s: float) -> None:
        done = min(1.0, elapsed_s / duration_s) if duration_s > 0 else 1.0
        bar = "#" * round(done * 24)
        rate = sent / elapsed_s if elapsed_s > 0 else 0.0
        stream.write(
            f"\r{label:<36} [{bar:<24}] {elapsed_s:5.1f}/{duration_s:.0f} s {sent:6d} req {rate:7.1f}/s"
        )
        stream.flush()
        if done >= 1.0:
            stream.write("\r" + " " * 98 + "\r")

    return show


CSV_COLUMNS = (
    "model",
    "protocol",
    "mode",
    "level",
    "duration_s",
    "requests",
    "ok",
    "images",
    "requests_per_s",
    "images_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "errors",
    "server_decode_ms",
    "server_queue_ms",
    "server_inference_ms",
    "server_total_ms",
    "server_p50_bucket_ms",
    "server_p99_bucket_ms",
    "client_cpu_percent",
    "client_cpu_us_per_request",
    "server_event_loop_ms_per_request",
    "server_other_threads_ms_per_request",
    "machine_idle_percent",
)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bucket_text(result: LevelResult, name: str) -> str:
    histogram = result.server_histogram or {}
    entry = histogram.get(name)
    if not isinstance(entry, dict) or not entry.get("bucket_ms"):
        return "-"
    low, high = entry["bucket_ms"]
    return f"({low:g},{high:g}]"


def _errors_text(errors: dict[str, int]) -> str:
    return " ".join(f"{code}:{n}" for code, n in errors.items()) or "0"


def csv_row(result: LevelResult) -> dict[str, object]:
    stages = result.server_timings_ms
    cpu = result.server_cpu or {}
    return {
        "model": result.model,
        "protocol": result.protocol,
        "mode": result.mode,
        "level": result.level,
        "duration_s": round(result.duration_s, 3),
        "requests": result.requests,
        "ok": result.ok,
        "images": result.images,
        "requests_per_s": round(result.requests_per_s, 2),
        "images_per_s": round(result.images_per_s, 2),
        **{f"{k}_ms": _round(result.latency_ms.get(k)) for k in ("p50", "p90", "p95", "p99", "mean")},
        "errors": _errors_text(result.errors),
        **{
            f"server_{s}_ms": _round(stages.get(s, {}).get("mean"))
            for s in ("decode", "queue", "inference", "total")
        },
        "server_p50_bucket_ms": _bucket_text(result, "p50"),
        "server_p99_bucket_ms": _bucket_text(result, "p99"),
        "client_cpu_percent": round(result.client_cpu_percent, 2),
        "client_cpu_us_per_request": round(result.client_cpu_us_per_request, 1),
        "server_event_loop_ms_per_request": _round(cpu.get("event_loop_ms_per_request")),
        "server_other_threads_ms_per_request": _round(cpu.get("other_threads_ms_per_request")),
        "machine_idle_percent": _round(cpu.get("machine_idle_percent")),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def format_table(results: Sequence[LevelResult]) -> str:
    """perf_analyzer-style summary: one row per model, protocol and level."""
    header = (
        "model",
        "protocol",
        "load",
        "req/s",
        "img/s",
        "p50 ms",
        "p90",
        "p95",
        "p99",
        "errors",
        "decode",
        "queue",
        "infer",
        "server p50 bucket",
        "server p99 bucket",
        "client CPU",
    )
    with_server_cpu = any(r.server_cpu for r in results)
    if with_server_cpu:
        header += ("loop ms/req", "threads ms/req", "idle")
    rows = [header]
    for r in results:
        stages = r.server_timings_ms
        cpu = r.server_cpu or {}
        server_cells = (
            (
                _fmt(cpu.get("event_loop_ms_per_request"), 3),
                _fmt(cpu.get("other_threads_ms_per_request"), 3),
                _fmt(cpu.get("machine_idle_percent")) + ("%" if cpu else ""),
            )
            if with_server_cpu
            else ()
        )
        rows.append(
            (
                r.model,
                r.protocol,
                r.label,
                _fmt(r.requests_per_s),
                _fmt(r.images_per_s),
                *(_fmt(r.latency_ms.get(k), 2) for k in ("p50", "p90", "p95", "p99")),
                _errors_text(r.errors),
                *(_fmt(stages.get(s, {}).get("mean"), 2) for s in ("decode", "queue", "inference")),
                _bucket_text(r, "p50"),
                _bucket_text(r, "p99"),
                f"{r.client_cpu_percent:.1f}%",
                *server_cells,
            )
        )
    return (
        text_table(rows, left_aligned=3)
        + "\nlatencies in ms; decode/queue/infer: server means from timings_ms; client CPU: % of one core"
        + (
            "; loop/threads: the server's event-loop thread and its other threads, CPU ms per request;"
            " idle: the machine's idle share"
            if with_server_cpu
            else ""
        )
    )


def write_results(out_dir: Path, results: Sequence[LevelResult], meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "load.json"
    json_path.write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    csv_path = out_dir / "load.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(csv_row(result))
    return json_path, csv_path
