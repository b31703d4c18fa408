"""Generates ``dashboards/classifier.json``, the Grafana dashboard that compares the served models.

    python monitoring/grafana/generate_dashboard.py          # rewrite the JSON
    python monitoring/grafana/generate_dashboard.py --check  # exit 1 if the JSON is out of date

The JSON is committed (Grafana provisioning and the Kubernetes ConfigMap read it as is) and
tests/test_monitoring.py checks it equals this script's output, so edit here, never the JSON.
Plain dicts, standard library only: nothing to install to regenerate it.

Every query aggregates to ``model`` (summing over replicas), filters on the ``$model`` variable and
uses raw metrics rather than recording rules, so the dashboard follows the time picker and works
against any Prometheus that scrapes the service. FLOPs here are multiply-adds, as the papers and
``classifier_model_flops`` count them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

UID = "classifier-models"
TITLE = "Classifier: models compared"
DATASOURCE_UID = "prometheus"  # provisioning/datasources/prometheus.yml
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "classifier.json"
GRID_WIDTH = 24

Panel = dict[str, Any]
Target = dict[str, Any]

M = 'model=~"$model"'
NOT_2XX = M + ', code!~"2.."'
RATE = "[$__rate_interval]"
# The table and the distribution summarise the whole selected range rather than its last moments.
RANGE = "[$__range]"
# Loads are rare events: a counter's changes over a minute, evaluated every minute, mark each one once.
LOAD_STEP = "1m"


def _rate(metric: str, window: str = RATE, selector: str = M) -> str:
    return f"sum by (model) (rate({metric}{{{selector}}}{window}))"


def _mean(histogram: str, window: str = RATE) -> str:
    """Mean observation per event over the window, from a histogram's _sum and _count."""
    return f"{_rate(histogram + '_sum', window)}\n/\n{_rate(histogram + '_count', window)}"


def _quantile(q: float, histogram: str, window: str = RATE) -> str:
    return f"histogram_quantile({q}, sum by (le, model) (rate({histogram}_bucket{{{M}}}{window})))"


def _flops() -> str:
    # max, not sum: every replica reports the same analytic cost.
    return f"max by (model) (classifier_model_flops{{{M}}})"


def _target(ref: str, expr: str, legend: str = "{{model}}", **extra: Any) -> Target:
    return {"datasource": DATASOURCE, "refId": ref, "expr": expr, "legendFormat": legend, **extra}


def _table_target(ref: str, expr: str) -> Target:
    return _target(ref, expr, "__auto", format="table", instant=True, range=False)


def _grid(x: int, y: int, w: int, h: int) -> dict[str, int]:
    return {"x": x, "y": y, "w": w, "h": h}


def _row(title: str, y: int) -> Panel:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": _grid(0, y, GRID_WIDTH, 1),
        "panels": [],
    }


def _timeseries(
    title: str,
    description: str,
    grid: dict[str, int],
    targets: list[Target],
    unit: str,
    *,
    min_zero: bool = True,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 0, "showPoints": "never"},
    }
    if min_zero:
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "showLegend": True,
                "calcs": ["mean", "lastNotNull"],
                "sortBy": "Mean",
                "sortDesc": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _unit_override(column: str, unit: str, decimals: int | None = None) -> dict[str, Any]:
    properties: list[dict[str, Any]] = [{"id": "unit", "value": unit}]
    if decimals is not None:
        properties.append({"id": "decimals", "value": decimals})
    return {"matcher": {"id": "byName", "options": column}, "properties": properties}


def _mapping_override(column: str, mapping: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Colours a text column's cells by value: {value: (display text, colour)}."""
    options = {
        value: {"text": text, "color": color, "index": i}
        for i, (value, (text, color)) in enumerate(mapping.items())
    }
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [
            {"id": "mappings", "value": [{"type": "value", "options": options}]},
            {"id": "custom.cellOptions", "value": {"type": "color-background", "mode": "basic"}},
        ],
    }


def _table(
    title: str,
    description: str,
    grid: dict[str, int],
    columns: list[tuple[str, str]],
    *,
    overrides: list[dict[str, Any]],
    keep_labels: list[str],
    sort_by: str,
    hide: tuple[str, ...] = (),
) -> Panel:
    """One instant query per column, joined on ``model`` by a merge transformation.

    ``columns`` pairs the column's title with its query; refIds follow the column order, so the
    merged frame's ``Value #A`` is the first column.
    """
    refs = [chr(ord("A") + i) for i in range(len(columns))]
    rename = {f"Value #{ref}": name for ref, (name, _) in zip(refs, columns, strict=True)}
    order = [*keep_labels, *rename]
    excluded = {"Time": True, **{f"Value #{ref}": True for ref in hide}}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": [_table_target(ref, expr) for ref, (_, expr) in zip(refs, columns, strict=True)],
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": excluded,
                    "indexByName": {name: i for i, name in enumerate(order)},
                    "renameByName": rename,
                },
            },
        ],
        "fieldConfig": {
            "defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": overrides,
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "sortBy": [{"displayName": sort_by, "desc": False}],
        },
    }


def _panels() -> list[Panel]:
    panels: list[Panel] = []
    add = panels.append

    # --- throughput and latency ----------------------------------------------------------------
    add(_row("Throughput and latency", 0))
    add(
        _timeseries(
            "Images/s per model",
            "Images classified per second (a multi-file request counts each file).",
            _grid(0, 1, 12, 8),
            [_target("A", _rate("classifier_images_total"))],
            "short",
        )
    )
    add(
        _timeseries(
            "Requests/s per model and status code",
            "Answers to /classify per second, by HTTP status code.",
            _grid(12, 1, 12, 8),
            [
                _target(
                    "A",
                    f"sum by (model, code) (rate(classifier_requests_total{{{M}}}{RATE}))",
                    "{{model}} {{code}}",
                )
            ],
            "reqps",
        )
    )
    for i, (q, name) in enumerate(((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))):
        add(
            _timeseries(
                f"Request latency {name} per model",
                f"End-to-end /classify latency, {name} over all replicas (decode + queue + inference + "
                "response). Bucket resolution: 0.5 ms to 2.5 s.",
                _grid(8 * i, 9, 8, 8),
                [_target("A", _quantile(q, "classifier_request_duration_seconds"))],
                "s",
            )
        )

    # --- where the time goes -------------------------------------------------------------------
    add(_row("Where the time goes", 17))
    stages = (
        ("decode", "classifier_decode_duration_seconds", "decode + preprocess, per image"),
        ("queue", "classifier_queue_duration_seconds", "wait in the model's queue, per request"),
        ("inference", "classifier_inference_duration_seconds", "runtime, per batch"),
    )
    bar_columns = [(stage, _mean(metric, RANGE)) for stage, metric, _ in stages]
    bar = _table(
        "Mean time per stage (selected range)",
        "Where a request's time goes, per model: "
        + "; ".join(f"{stage} = {what}" for stage, _, what in stages)
        + ". A request waits for its whole batch, so the bars add up to roughly its latency.",
        _grid(0, 18, 12, 9),
        bar_columns,
        overrides=[],
        keep_labels=["model"],
        sort_by="inference",
    )
    # Same queries and join as a table, drawn as stacked bars with the model on the x axis.
    bar.update(
        type="barchart",
        fieldConfig={"defaults": {"unit": "s", "min": 0, "custom": {"fillOpacity": 80}}, "overrides": []},
        options={
            "xField": "model",
            "orientation": "horizontal",
            "stacking": "normal",
            "showValue": "auto",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
    )
    add(bar)
    add(
        _timeseries(
            "Mean time per stage over time",
            "The same means as the bars, over time: "
            + "; ".join(f"{stage} = {what}" for stage, _, what in stages)
            + ".",
            _grid(12, 18, 12, 9),
            [
                _target(chr(ord("A") + i), _mean(metric), f"{{{{model}}}} {stage}")
                for i, (stage, metric, _) in enumerate(stages)
            ],
            "s",
        )
    )

    # --- batching and queue --------------------------------------------------------------------
    add(_row("Batching and queue", 27))
    add(
        _timeseries(
            "Average batch size per model",
            "Images per batch handed to the runtime. 1 means requests arrive too sparsely to batch.",
            _grid(0, 28, 8, 8),
            [_target("A", _mean("classifier_batch_size"))],
            "short",
        )
    )
    add(
        _timeseries(
            "Queue depth per model",
            "Requests waiting in the model's queue, summed over replicas. At MAX_QUEUE_SIZE the "
            "service answers 429.",
            _grid(8, 28, 8, 8),
            [_target("A", f"sum by (model) (classifier_queue_depth{{{M}}})")],
            "short",
        )
    )
    add(
        _timeseries(
            "Inference time per image",
            "Runtime time divided by the images it classified: what batching buys per image.",
            _grid(16, 28, 8, 8),
            [
                _target(
                    "A",
                    f"{_rate('classifier_inference_duration_seconds_sum')}\n/\n"
                    f"{_rate('classifier_images_total')}",
                )
            ],
            "s",
        )
    )
    add(
        {
            "type": "bargauge",
            "title": "Batch sizes: $model (selected range)",
            "description": "How many batches of each size (upper bucket bound) the runtime ran.",
            "datasource": DATASOURCE,
            "gridPos": _grid(0, 36, 6, 8),
            # One panel per selected model, side by side.
            "repeat": "model",
            "repeatDirection": "h",
            "maxPerRow": 4,
            "targets": [
                _target(
                    "A",
                    f"sum by (le) (increase(classifier_batch_size_bucket{{{M}}}{RANGE}))",
                    "{{le}}",
                    format="heatmap",
                    instant=True,
                    range=False,
                )
            ],
            "fieldConfig": {"defaults": {"unit": "short", "min": 0, "decimals": 0}, "overrides": []},
            "options": {
                "orientation": "vertical",
                "displayMode": "gradient",
                "showUnfilled": True,
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            },
        }
    )

    # --- errors --------------------------------------------------------------------------------
    add(_row("Errors", 44))
    all_requests = _rate("classifier_requests_total")
    add(
        _timeseries(
            "Error ratio per model",
            "Share of requests not answered 2xx. 0 (not empty) while a model serves without errors.",
            _grid(0, 45, 12, 8),
            [
                _target(
                    "A",
                    # The `or 0 * ...` arm keeps a model without errors on the chart at 0.
                    f"(\n  {_rate('classifier_requests_total', selector=NOT_2XX)}\n"
                    f"or\n  0 * {all_requests}\n)\n/\n{all_requests}",
                )
            ],
            "percentunit",
        )
    )
    add(
        _timeseries(
            "Error ratio by status code",
            "Share of each model's requests answered with each non-2xx code: 400 invalid_image, "
            "404 unknown_model, 413 too large, 415 media type, 422 parameter, 429 overloaded (queue "
            "full), 503 model unavailable, 504 timeout in queue.",
            _grid(12, 45, 12, 8),
            [
                _target(
                    "A",
                    f"sum by (model, code) (rate(classifier_requests_total{{{NOT_2XX}}}{RATE}))\n"
                    f"/ on (model) group_left\n{all_requests}",
                    "{{model}} {{code}}",
                )
            ],
            "percentunit",
        )
    )

    # --- analytic cost vs measured speed -------------------------------------------------------
    add(_row("Analytic cost vs measured speed: FLOPs are not speed", 53))
    p50_range = _quantile(0.5, "classifier_request_duration_seconds", RANGE)
    images_range = _rate("classifier_images_total", RANGE)
    gflops = f"({_flops()} / 1e9)"
    add(
        _table(
            "Analytic cost beside measured speed (selected range)",
            "FLOPs (multiply-adds), parameters and memory access cost per image, as the build step "
            "counted them, beside what this hardware measured. Achieved FLOP/s = FLOPs x images/s; "
            "latency per GFLOP = p50 request latency / GFLOPs. Sorted by FLOPs: where latency does "
            "not follow, FLOPs are not speed.",
            _grid(0, 54, 24, 8),
            [
                ("FLOPs", _flops()),
                ("parameters", f"max by (model) (classifier_model_parameters{{{M}}})"),
                ("memory access cost", f"max by (model) (classifier_model_memory_access_cost{{{M}}})"),
                ("p50 latency", p50_range),
                ("images/s", images_range),
                ("achieved FLOP/s", f"{_flops()}\n* on (model)\n{images_range}"),
                ("p50 latency per GFLOP", f"{p50_range}\n/ on (model)\n{gflops}"),
                (
                    "inference per image",
                    f"{_rate('classifier_inference_duration_seconds_sum', RANGE)}\n/\n{images_range}",
                ),
            ],
            overrides=[
                _unit_override("FLOPs", "short", 2),
                _unit_override("parameters", "short", 2),
                _unit_override("memory access cost", "short", 2),
                _unit_override("p50 latency", "s", 2),
                _unit_override("images/s", "short", 1),
                _unit_override("achieved FLOP/s", "flops", 2),
                _unit_override("p50 latency per GFLOP", "s", 2),
                _unit_override("inference per image", "s", 2),
            ],
            keep_labels=["model"],
            sort_by="FLOPs",
        )
    )
    add(
        _timeseries(
            "Achieved FLOP/s per model",
            "Multiply-adds per second the model delivers: FLOPs per image x images/s.",
            _grid(0, 62, 12, 8),
            [_target("A", f"{_flops()}\n* on (model)\n{_rate('classifier_images_total')}")],
            "flops",
        )
    )
    add(
        _timeseries(
            "p50 latency per GFLOP",
            "Median request latency divided by the model's GFLOPs (multiply-adds). Equal values "
            "would mean latency follows FLOPs; it does not.",
            _grid(12, 62, 12, 8),
            [
                _target(
                    "A",
                    f"{_quantile(0.5, 'classifier_request_duration_seconds')}\n/ on (model)\n{gflops}",
                )
            ],
            "s",
        )
    )

    # --- what is served ------------------------------------------------------------------------
    add(_row("Served models", 70))
    info_labels = ["model", "family", "backend", "precision", "weights", "input_size"]
    add(
        _table(
            "Served models",
            "What each replica serves. weights = random means no published weights were available "
            "at build time: timings are real, predictions are meaningless. version = the version served "
            "to requests that name none (the highest over replicas); last load time = how long the "
            "last load of a version took; loads and failed loads over the selected range.",
            _grid(0, 71, 24, 7),
            [
                ("info", f"max by ({', '.join(info_labels)}) (classifier_model_info{{{M}}})"),
                ("ready replicas", f"sum by (model) (classifier_model_ready{{{M}}})"),
                ("version", f"max by (model) (classifier_model_version{{{M}}})"),
                ("last load time", f"max by (model) (classifier_model_load_duration_seconds{{{M}}})"),
                ("loads", f"sum by (model) (increase(classifier_model_loads_total{{{M}}}{RANGE}))"),
                (
                    "failed loads",
                    f"sum by (model) (increase(classifier_model_load_failures_total{{{M}}}{RANGE}))",
                ),
            ],
            overrides=[
                _mapping_override(
                    "weights",
                    {
                        "random": ("random (untrained)", "red"),
                        "imagenet": ("imagenet", "green"),
                        "file": ("file", "blue"),
                    },
                ),
                _unit_override("version", "none", 0),
                _unit_override("last load time", "s", 2),
                _unit_override("loads", "short", 0),
                _unit_override("failed loads", "short", 0),
            ],
            keep_labels=info_labels,
            sort_by="model",
            hide=("A",),
        )
    )

    add(
        _timeseries(
            "Version served per model",
            "The version requests that name none get (classifier_model_version), highest and lowest "
            "over replicas: the two differ while replicas are reloaded one by one or an image rolls "
            "out. Reloads and failed loads are marked on every panel (annotations).",
            _grid(0, 78, 24, 6),
            [
                _target("A", f"max by (model) (classifier_model_version{{{M}}})", "{{model}} highest"),
                _target("B", f"min by (model) (classifier_model_version{{{M}}})", "{{model}} lowest"),
            ],
            "none",
        )
    )
    version_panel = panels[-1]
    version_panel["fieldConfig"]["defaults"]["decimals"] = 0
    version_panel["fieldConfig"]["defaults"]["custom"]["lineInterpolation"] = "stepAfter"

    for panel_id, panel in enumerate(panels, start=1):
        panel["id"] = panel_id
    return panels


def _model_variable() -> dict[str, Any]:
    query = "label_values(classifier_model_info, model)"
    return {
        "type": "query",
        "name": "model",
        "label": "Model",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        # Refresh on time-range change, so newly deployed models show up.
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
    }


def _load_annotation(name: str, counter: str, title: str, color: str) -> dict[str, Any]:
    """A mark wherever ``counter`` (loads, or failed loads, of a model) went up: one region per burst,
    since Grafana joins consecutive steps of a series into one."""
    return {
        "name": name,
        "datasource": DATASOURCE,
        "enable": True,
        "hide": False,
        "iconColor": color,
        "expr": f"sum by (model) (changes({counter}{{{M}}}[{LOAD_STEP}])) > 0",
        "step": LOAD_STEP,
        "titleFormat": title,
        "textFormat": "",
        "tagKeys": "model",
        "useValueForTime": False,
    }


def annotations() -> list[dict[str, Any]]:
    """Grafana's own annotations, then reloads (blue) and failed loads (red) from the load counters."""
    return [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        },
        _load_annotation("Model reloads", "classifier_model_loads_total", "reload of {{model}}", "blue"),
        _load_annotation(
            "Failed model loads", "classifier_model_load_failures_total", "failed load of {{model}}", "red"
        ),
    ]


def build_dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": TITLE,
        "description": "The served CNNs side by side: analytic cost (FLOPs, parameters, memory "
        "access cost) beside measured latency and throughput.",
        "tags": ["classifier", "models"],
        "editable": False,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-15m", "to": "now"},
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "annotations": {"list": annotations()},
        "templating": {"list": [_model_variable()]},
        "panels": _panels(),
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
