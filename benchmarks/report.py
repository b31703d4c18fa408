"""The ``make bench`` report: markdown tables and a latency-against-FLOPs chart from ``results.json``.

    python -m benchmarks.report benchmarks/results/<timestamp>      (re-renders report.md and the chart)

Everything here is a pure function of the results that :mod:`benchmarks.bench` saved, so a report
can be redrawn, or compared with another run's, without measuring again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks import cpu_time
from benchmarks.experiments import decomposition, guideline1

REPORT_FILE = "report.md"
CHART_FILE = "latency_vs_flops.png"
RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------------------------------
# Summaries


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "low": min(values), "high": max(values), "n": len(values)}


def _protocol(level: dict) -> str:
    """How a served level was sent (results from before the protocols were measured: /classify)."""
    return level.get("protocol", "classify")


def served_levels(results: dict, protocol: str = "classify") -> dict[tuple[str, float], dict]:
    """(model, concurrency) -> medians and spreads over the repeats of that served level in ``protocol``."""
    grouped: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for level in results.get("served", {}).get("levels", []):
        if _protocol(level) == protocol:
            grouped[(level["model"], level["level"])].append(level)
    summary = {}
    for key, runs in grouped.items():
        errors: dict[str, int] = defaultdict(int)
        for run in runs:
            for code, n in run["errors"].items():
                errors[code] += n
        agreement = [
            run["server_histogram"][q]["client_within_one_bucket"]
            for run in runs
            if run.get("server_histogram")
            for q in ("p50", "p99")
        ]
        summary[key] = {
            "requests_per_s": _spread([r["requests_per_s"] for r in runs]),
            "images_per_s": _spread([r["images_per_s"] for r in runs]),
            "p50_ms": _spread([r["latency_ms"]["p50"] for r in runs]),
            "p99_ms": _spread([r["latency_ms"]["p99"] for r in runs]),
            "errors": dict(errors),
            "client_cpu_percent": _spread([r["client_cpu_percent"] for r in runs]),
            "server_split_ms": {
                stage: _spread([r["server_timings_ms"].get(stage, {}).get("mean") for r in runs])
                for stage in ("decode", "queue", "inference")
            },
            "histogram_agrees": all(agreement) if agreement else None,
            "client_cpu_ms_per_request": _spread([r["client_cpu_us_per_request"] / 1000 for r in runs]),
            "served_cpu_ms_per_request": _spread([_served_cpu_ms(r) for r in runs]),
            "server_cpu": {
                key: _spread([(r.get("server_cpu") or {}).get(key) for r in runs])
                for key in cpu_time.PER_REQUEST_KEYS
            },
            "repeats": len(runs),
        }
    return summary


def _served_cpu_ms(level: dict) -> float | None:
    """CPU per request of one served level: the server's threads and the load generator."""
    cpu = level.get("server_cpu")
    if not cpu:
        return None
    server_ms = cpu["event_loop_ms_per_request"] + cpu["other_threads_ms_per_request"]
    return server_ms + level["client_cpu_us_per_request"] / 1000


def _runtime_row(results: dict, model: str, batch: int = 1, threads: int = 1) -> dict | None:
    for row in results.get("runtime", []):
        if row["model"] == model and row["batch_size"] == batch and row["intra_op_threads"] == threads:
            return row
    return None


def _by_repeat(rows: list[dict], key: str) -> dict[int, float]:
    return {row.get("repeat", 0): row[key]["median"] for row in rows}


def inprocess_latency(results: dict) -> dict[str, dict]:
    """model -> p50 and p90 (spread over the repeats) and the p50 of each repeat."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in results.get("pipeline_latency", []):
        grouped[row["model"]].append(row)
    return {
        model: {
            "p50_ms": _spread([r["p50_ms"]["median"] for r in rows]),
            "p90_ms": _spread([r["p90_ms"]["median"] for r in rows]),
            "by_repeat": _by_repeat(rows, "p50_ms"),
        }
        for model, rows in grouped.items()
    }


def inprocess_throughput(results: dict) -> dict[tuple[str, str, int], dict]:
    """(model, arrangement, workers) -> requests/s (spread over the repeats) and each repeat's."""
    grouped: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for row in results.get("pipeline_throughput", []):
        grouped[(row["model"], row["arrangement"], row["workers"])].append(row)
    return {
        key: {
            "requests_per_s": _spread([r["requests_per_s"]["median"] for r in rows]),
            "cpu_ms_per_request": _spread([r.get("cpu_ms_per_request") for r in rows]),
            "by_repeat": _by_repeat(rows, "requests_per_s"),
        }
        for key, rows in grouped.items()
    }


def _served_by_repeat(
    results: dict, model: str, level: float, key: str, protocol: str = "classify"
) -> dict[int, float]:
    return {
        row.get("repeat", 0): (row[key] if key != "p50_ms" else row["latency_ms"]["p50"])
        for row in results.get("served", {}).get("levels", [])
        if row["model"] == model and row["level"] == level and _protocol(row) == protocol
    }


def _paired(served: dict[int, float], inproc: dict[int, float], combine) -> dict | None:
    """``combine(served, in-process)`` repeat by repeat, as a spread."""
    values = [combine(served[r], inproc[r]) for r in sorted(served.keys() & inproc.keys())]
    values = [v for v in values if v is not None]
    return _spread(values) if values else None


def _best_arrangement(
    throughput: dict[tuple[str, str, int], dict], model: str
) -> tuple[tuple[str, str, int] | None, dict | None]:
    """The model's fastest in-process arrangement (median requests/s over the repeats)."""
    arrangements = {key: value for key, value in throughput.items() if key[0] == model}
    best_key = max(arrangements, key=lambda k: arrangements[k]["requests_per_s"]["median"], default=None)
    return best_key, arrangements.get(best_key) if best_key else None


def model_summary(results: dict) -> list[dict]:
    """One row per model: analytic cost, in-process and served speed, and the ratios between them.

    Served and in-process figures of the same repeat were measured minutes apart at most, so the
    comparisons are made repeat by repeat and summarised as a median with its range.
    """
    levels = served_levels(results)
    latency = inprocess_latency(results)
    throughput = inprocess_throughput(results)
    concurrency = sorted({level for _, level in levels}) or [1]
    low_c, high_c = concurrency[0], concurrency[-1]
    rows = []
    for model, facts in results["models"].items():
        runtime = _runtime_row(results, model)
        runtime_ms = runtime["batch_ms"]["median"] if runtime else None
        best_key, best = _best_arrangement(throughput, model)
        served_low = levels.get((model, low_c), {})
        served_high = levels.get((model, high_c), {})
        flops = facts["flops"]
        inproc = latency.get(model)
        ratio = _paired(
            _served_by_repeat(results, model, high_c, "requests_per_s"),
            best["by_repeat"] if best else {},
            lambda served, inproc: served / inproc if inproc else None,
        )
        difference = _paired(
            _served_by_repeat(results, model, low_c, "p50_ms"),
            inproc["by_repeat"] if inproc else {},
            lambda served, inproc: None if served is None else served - inproc,
        )
        served_p50 = served_low.get("p50_ms")
        rows.append(
            {
                "model": model,
                "weights": facts.get("weights", "?"),
                "flops": flops,
                "params": facts["params"],
                "memory_access_cost": facts["memory_access_cost"],
                "runtime_p50_ms": runtime_ms,
                "runtime_p50_range_ms": [runtime["batch_ms"]["low"], runtime["batch_ms"]["high"]]
                if runtime
                else None,
                "runtime_images_per_s": runtime["images_per_s"]["median"] if runtime else None,
                "achieved_gflops": flops / 1e9 / (runtime_ms / 1000) if runtime_ms else None,
                "ms_per_gflop": runtime_ms / (flops / 1e9) if runtime_ms else None,
                "inprocess_p50_ms": inproc["p50_ms"]["median"] if inproc else None,
                "served_p50_ms": served_p50["median"] if served_p50 else None,
                "served_p50_range_ms": [served_p50["low"], served_p50["high"]] if served_p50 else None,
                "served_p50_minus_inprocess_ms": difference,
                "served_concurrency_low": low_c,
                "served_concurrency_high": high_c,
                "served_requests_per_s": (served_high.get("requests_per_s") or {}).get("median"),
                "served_images_per_s": (served_high.get("images_per_s") or {}).get("median"),
                "inprocess_requests_per_s": best["requests_per_s"]["median"] if best else None,
                "inprocess_arrangement": f"{best_key[1]}, {best_key[2]} workers" if best_key else None,
                "served_over_inprocess": ratio,
            }
        )
    return rows


def protocol_summary(results: dict) -> list[dict]:
    """One row per model and protocol other than /classify: its req/s at the highest concurrency and
    its p50 at the lowest, beside /classify's, compared repeat by repeat (each repeat measures the
    protocols back to back at the same level)."""
    protocols = sorted({_protocol(level) for level in results.get("served", {}).get("levels", [])})
    others = [p for p in protocols if p != "classify"]
    if not others:
        return []
    classify = served_levels(results)
    concurrency = sorted({level for _, level in classify})
    if not concurrency:
        return []
    low_c, high_c = concurrency[0], concurrency[-1]
    rows = []
    for protocol in others:
        levels = served_levels(results, protocol)
        for model in results["models"]:
            high, low = levels.get((model, high_c), {}), levels.get((model, low_c), {})
            if not high and not low:
                continue
            errors: dict[str, int] = defaultdict(int)
            for level in (high, low):
                for code, n in level.get("errors", {}).items():
                    errors[code] += n
            rows.append(
                {
                    "model": model,
                    "protocol": protocol,
                    "concurrency_low": low_c,
                    "concurrency_high": high_c,
                    "requests_per_s": high.get("requests_per_s"),
                    "classify_requests_per_s": (classify.get((model, high_c)) or {}).get("requests_per_s"),
                    "over_classify": _paired(
                        _served_by_repeat(results, model, high_c, "requests_per_s", protocol),
                        _served_by_repeat(results, model, high_c, "requests_per_s"),
                        lambda other, classify: other / classify if classify else None,
                    ),
                    "p50_ms": low.get("p50_ms"),
                    "classify_p50_ms": (classify.get((model, low_c)) or {}).get("p50_ms"),
                    "p50_minus_classify_ms": _paired(
                        _served_by_repeat(results, model, low_c, "p50_ms", protocol),
                        _served_by_repeat(results, model, low_c, "p50_ms"),
                        lambda other, classify: (
                            None if other is None or classify is None else other - classify
                        ),
                    ),
                    "client_cpu_ms_per_request": high.get("client_cpu_ms_per_request"),
                    "errors": dict(sorted(errors.items())),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _sp(spread: dict | None, digits: int = 1) -> str:
    """'median (low-high)' for a spread, or '-'."""
    if not spread:
        return "-"
    if spread.get("n", len(spread.get("values", ()))) == 1:
        return f"{spread['median']:.{digits}f}"
    return f"{spread['median']:.{digits}f} ({spread['low']:.{digits}f}-{spread['high']:.{digits}f})"


def _percent(spread: dict | None) -> str:
    if not spread:
        return "-"
    median, low, high = (100 * spread[key] for key in ("median", "low", "high"))
    if spread["n"] == 1:
        return f"{median:.0f}%"
    return f"{median:.0f}% ({low:.0f}-{high:.0f}%)"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    rows = model_summary(results)
    if not rows:
        return "(no models)"
    low_c, high_c = rows[0]["served_concurrency_low"], rows[0]["served_concurrency_high"]
    head = [
        "model",
        "MFLOPs",
        "params (M)",
        "MAC (M)",
        "runtime p50 ms",
        "GFLOP/s",
        "ms/GFLOP",
        f"served p50 ms (c={low_c:g})",
        "in-process p50 ms",
        "difference ms",
        f"served req/s (c={high_c:g})",
        "in-process req/s",
        "served / in-process",
    ]
    body = [
        [
            r["model"],
            _f(r["flops"] / 1e6),
            _f(r["params"] / 1e6, 2),
            _f(r["memory_access_cost"] / 1e6, 1),
            _f(r["runtime_p50_ms"], 2),
            _f(r["achieved_gflops"], 1),
            _f(r["ms_per_gflop"], 1),
            _f(r["served_p50_ms"], 2),
            _f(r["inprocess_p50_ms"], 2),
            _sp(r["served_p50_minus_inprocess_ms"], 2),
            _f(r["served_requests_per_s"], 1),
            _f(r["inprocess_requests_per_s"], 1),
            _percent(r["served_over_inprocess"]),
        ]
        for r in rows
    ]
    return _table(head, body)


def cpu_table(results: dict) -> str:
    """CPU per request at the highest concurrency: in-process against served, part by part."""
    levels = served_levels(results)
    throughput = inprocess_throughput(results)
    concurrency = sorted({level for _, level in levels})
    if not concurrency:
        return "(not run)"
    high_c = concurrency[-1]
    head = [
        "model",
        "in-process ms/req",
        "served: event loop",
        "served: other threads",
        "load generator",
        "served total",
        "served / in-process CPU",
        "idle, served",
    ]
    body = []
    for model in results["models"]:
        served = levels.get((model, high_c))
        _, best = _best_arrangement(throughput, model)
        if served is None:
            continue
        cpu = served["server_cpu"]
        total = served["served_cpu_ms_per_request"]
        inproc = best["cpu_ms_per_request"] if best else None
        idle = cpu["machine_idle_percent"]
        body.append(
            [
                model,
                _sp(inproc, 2),
                _sp(cpu["event_loop_ms_per_request"], 3),
                _sp(cpu["other_threads_ms_per_request"], 3),
                _sp(served["client_cpu_ms_per_request"], 3),
                _sp(total, 2),
                _f(100 * total["median"] / inproc["median"], 0, "%") if total and inproc else "-",
                _sp(idle, 1) + ("%" if idle else ""),
            ]
        )
    return _table(head, body)


def protocol_table(results: dict) -> str:
    """The Open Inference Protocol's front doors beside /classify, model by model."""
    rows = results.get("protocols") or protocol_summary(results)
    if not rows:
        return "(only /classify was measured)"
    low_c, high_c = rows[0]["concurrency_low"], rows[0]["concurrency_high"]
    head = [
        "model",
        "protocol",
        f"req/s (c={high_c:g})",
        "/classify req/s",
        "/ classify",
        f"p50 ms (c={low_c:g})",
        "/classify p50 ms",
        "difference ms",
        "load generator ms/req",
        "errors",
    ]
    body = [
        [
            r["model"],
            r["protocol"],
            _sp(r["requests_per_s"]),
            _sp(r["classify_requests_per_s"]),
            _percent(r["over_classify"]),
            _sp(r["p50_ms"], 2),
            _sp(r["classify_p50_ms"], 2),
            _sp(r["p50_minus_classify_ms"], 2),
            _sp(r["client_cpu_ms_per_request"], 3),
            " ".join(f"{code}:{n}" for code, n in r["errors"].items()) or "0",
        ]
        for r in rows
    ]
    return _table(head, body)


def runtime_table(results: dict) -> str:
    head = ["model", "intra-op threads", "batch", "ms/batch", "ms/image", "images/s"]
    body = [
        [
            row["model"],
            str(row["intra_op_threads"]),
            str(row["batch_size"]),
            _sp(row["batch_ms"], 2),
            _f(row["batch_ms"]["median"] / row["batch_size"], 2),
            _sp(row["images_per_s"], 1),
        ]
        for row in results.get("runtime", [])
    ]
    return _table(head, body)


def pipeline_table(results: dict) -> str:
    latency = inprocess_latency(results)
    head = ["model", "p50 ms, one at a time", "p90 ms", "arrangement", "workers", "requests/s"]
    body = []
    for (model, arrangement, workers), row in inprocess_throughput(results).items():
        lat = latency.get(model)
        body.append(
            [
                model,
                _sp(lat["p50_ms"], 2) if lat else "-",
                _sp(lat["p90_ms"], 2) if lat else "-",
                arrangement,
                str(workers),
                _sp(row["requests_per_s"], 1),
            ]
        )
    return _table(head, body)


def served_table(results: dict) -> str:
    head = [
        "model",
        "concurrency",
        "req/s",
        "img/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "decode ms",
        "queue ms",
        "inference ms",
        "histogram agrees",
        "load generator CPU",
    ]
    body = []
    for (model, level), s in sorted(served_levels(results).items(), key=lambda kv: (kv[0][0], kv[0][1])):
        split = s["server_split_ms"]
        agrees = {True: "yes", False: "NO", None: "-"}[s["histogram_agrees"]]
        body.append(
            [
                model,
                f"{level:g}",
                _sp(s["requests_per_s"]),
                _sp(s["images_per_s"]),
                _sp(s["p50_ms"], 2),
                _sp(s["p99_ms"], 2),
                " ".join(f"{code}:{n}" for code, n in sorted(s["errors"].items())) or "0",
                _sp(split["decode"], 2),
                _sp(split["queue"], 2),
                _sp(split["inference"], 2),
                agrees,
                _sp(s["client_cpu_percent"], 1) + "%",
            ]
        )
    return _table(head, body)


def _guideline_rows(results: dict) -> list[guideline1.Row]:
    from benchmarks.inprocess import Spread

    rows = []
    for row in results.get("guideline1", []):
        spread = row["images_per_s"]
        rows.append(
            guideline1.Row(
                row["ratio"],
                row["width"],
                row["c1"],
                row["c2"],
                row["flops"],
                row["memory_access_cost"],
                Spread(spread["median"], spread["low"], spread["high"], tuple(spread["values"])),
                row["runs"],
            )
        )
    return rows


def _decomposition_rows(results: dict) -> list[decomposition.Decomposition]:
    return [decomposition.Decomposition(**row) for row in results.get("decomposition", [])]


def precision_table(results: dict) -> str:
    rows = results.get("precisions") or []
    if not rows:
        return "(no fp16/int8 builds in the repository: `build_engines.py --precision fp16 int8`)"
    body = []
    for row in rows:
        agreement = row.get("agreement") or {}
        top1 = agreement.get("top1_agreement")
        body.append(
            [
                row["model"],
                row["precision"],
                f"{row['median_ms']:.2f} ({row['spread_ms'][0]:.2f}-{row['spread_ms'][1]:.2f})",
                _f(row.get("speedup"), 2, "x"),
                "-" if top1 is None else f"{top1 * 100:.1f}%",
                _f(agreement.get("max_abs_logit_diff"), 3),
            ]
        )
    return _table(
        ["model", "precision", "p50 ms (range)", "speed-up vs fp32", "top-1 agreement", "max abs logit diff"],
        body,
    )


def markdown(results: dict) -> str:
    machine = results.get("machine", {})
    config = results.get("config", {})
    served = results.get("served", {})
    parts = [
        f"# Benchmark report: {results.get('started', '?')}",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
        f"ONNX Runtime {machine.get('onnxruntime', '?')}, Python {machine.get('python', '?')}. "
        f"Load average before / after: {machine.get('loadavg_before', '?')} / "
        f"{machine.get('loadavg_after', '?')} "
        "(other work on the machine makes every figure noisier). "
        f"Took {results.get('duration_s', 0):.0f} s.",
        "",
        f"Each figure is the median of {config.get('repeats', '?')} repeats, with the range in brackets. "
        "Weights: " + ", ".join(f"{m} {f.get('weights', '?')}" for m, f in results["models"].items()) + ".",
        "",
        "## Summary",
        "",
        summary_table(results),
        "",
        "- runtime p50: the runtime alone, batch 1, one intra-op thread (what the FLOPs predict); "
        "GFLOP/s and ms/GFLOP follow from it.",
        "- served p50 at the lowest concurrency against the in-process p50 of the same work, one request "
        "at a time on one thread: sniff + decode + preprocess + inference + top-5 of the same 500x375 JPEGs.",
        "- served req/s at the highest concurrency against the best in-process throughput of that work with "
        "every core busy: "
        + "; ".join(f"{r['model']} {r['inprocess_arrangement']}" for r in model_summary(results))
        + " (all arrangements below).",
        "- difference and served / in-process are taken repeat by repeat (each repeat measures a model "
        "served and in-process within a minute), then summarised as the median (range).",
        "",
        f"![latency against FLOPs]({CHART_FILE})",
        "",
        "## (a) The runtime alone, in-process",
        "",
        runtime_table(results),
        "",
        "## The server's work, in-process (decode + preprocess + inference + top-5)",
        "",
        pipeline_table(results),
        "",
        "## (b) The served path under the load generator",
        "",
        f"Server: `{served.get('command', '?')}`; "
        + "; ".join(f"{model}: {how}" for model, how in served.get("batching", {}).items())
        + ". "
        f"Levels of {config.get('load_duration_s', '?')} s after {config.get('load_warmup_s', '?')} s of "
        "warm-up. 'histogram agrees': the load generator's p50 and p99 fall within one bucket of the "
        "server's own request-duration histogram for the same requests, in every repeat.",
        "",
        served_table(results),
        "",
        "## Open Inference Protocol beside /classify",
        "",
        "The same models and JPEGs sent through the Open Inference Protocol, in the same repeats as "
        "/classify and right after it at each level: `oip-http` is `POST /v2/models/{model}/infer` with "
        "binary tensor data (a BYTES input of the encoded image, the classification extension's top 5 "
        "as binary output), `oip-grpc` is `ModelInfer` over one gRPC channel with the same tensors in "
        "raw_input_contents. '/ classify' and 'difference' are taken repeat by repeat; the aim is at "
        "least 90% of /classify's requests/s and a p50 at most 1 ms above its. The load generator's "
        "CPU per request counts its gRPC library's threads too.",
        "",
        protocol_table(results),
        "",
        "## Where the served path's CPU goes",
        "",
        "With every core busy, requests/s is the busy cores over the CPU time of one request, so the "
        "served / in-process ratio above is the in-process CPU per request over the served one, less the "
        "cores the served path leaves idle. Per request at the highest concurrency, from /proc: the "
        "in-process CPU of the fastest arrangement; the server's event-loop thread (uvicorn, the app) and "
        "its other threads (decode, inference, ranking, logging); the load generator, which shares the "
        "machine; and the share of the machine left idle while served.",
        "",
        cpu_table(results),
        "",
        "## Reduced precision, in-process",
        "",
        "The runtime alone, batch 1, one intra-op thread, the same preprocessed photo; agreement with fp32 "
        "as the build measured it on held-out images (random weights make top-1 agreement look worse than "
        "it is: their logits are nearly flat).",
        "",
        precision_table(results),
        "",
        "## ShuffleNet v2 guideline 1 (Table 1 layout)",
        "",
        "Images/s at batch 1, one intra-op thread; every configuration of a width has the same FLOPs.",
        "",
        guideline1.table(_guideline_rows(results)) if results.get("guideline1") else "(not run)",
        "",
        "## Run time by operator kind (Figure 2)",
        "",
        "ONNX Runtime's profiler, batch 1, one intra-op thread. 'as served': the server's graph "
        "optimisations (activations and residual additions fused into convolutions); 'unfused': basic "
        "optimisations only.",
        "",
        decomposition.table(_decomposition_rows(results)) if results.get("decomposition") else "(not run)",
        "",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Chart


def chart(results: dict, path: Path) -> Path:
    """Latency against FLOPs (left) and against memory access cost (right), one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = model_summary(results)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for axis, key, label in (
        (axes[0], "flops", "MFLOPs (multiply-adds per image)"),
        (axes[1], "memory_access_cost", "memory access cost (M elements per image)"),
    ):
        served_label = f"served p50 (c={rows[0]['served_concurrency_low']:g})" if rows else "served"
        for series, marker, name in (
            ("runtime_p50_ms", "o", "runtime alone (batch 1, 1 thread)"),
            ("served_p50_ms", "s", served_label),
        ):
            points = [r for r in rows if r[series] is not None]
            if not points:
                continue
            xs = [r[key] / 1e6 for r in points]
            ys = [r[series] for r in points]
            # Error bars: the range over the repeats.
            ranges = [
                r[series.replace("_ms", "_range_ms")] or (y, y) for r, y in zip(points, ys, strict=True)
            ]
            below = [y - low for y, (low, _) in zip(ys, ranges, strict=True)]
            above = [high - y for y, (_, high) in zip(ys, ranges, strict=True)]
            axis.errorbar(xs, ys, yerr=[below, above], fmt=marker, capsize=3, label=name)
            # Of points close together along x, the highest is labelled above and the others below.
            near = 0.12 * max(xs)
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                highest = all(ys[j] <= y for j in range(len(xs)) if abs(xs[j] - x) < near)
                offset = (5, 4) if highest else (5, -11)
                axis.annotate(
                    points[i]["model"], (x, y), textcoords="offset points", xytext=offset, fontsize=8
                )
        axis.set_xlabel(label)
        axis.set_ylabel("latency (ms)")
        axis.set_ylim(bottom=0)
        axis.set_xlim(0, max((r[key] / 1e6 for r in rows), default=1) * 1.25)
        axis.grid(True, alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    machine = results.get("machine", {})
    figure.suptitle(f"FLOPs are not speed: {machine.get('cpu', '')} ({machine.get('cores', '?')} cores)")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write(out_dir: Path, results: dict) -> tuple[Path, Path]:
    """report.md and the chart into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    report = out_dir / REPORT_FILE
    report.write_text(markdown(results))
    return report, chart(results, out_dir / CHART_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a results folder written by make bench")
    args = parser.parse_args(argv)
    results = json.loads((args.directory / RESULTS_FILE).read_text())
    report, chart_path = write(args.directory, results)
    print(f"wrote {report} and {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
