"""``make tune``'s report: ``report.md`` and ``tune.png`` from the ``results.json`` that
``benchmarks/tune.py`` writes (``python -m benchmarks.tune_report DIR`` redraws them).

Per model: the finalists of the confirmation (the defaults among them) at every concurrency level,
each figure the median of the rounds with its range, the chosen one marked with its margin over the
defaults; then every configuration the search tried, with its short measurements. The chart puts
each configuration tried at its p99 and requests/s at the objective's concurrency, one panel per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"
CHART_FILE = "tune.png"
RESULTS_FILE = "results.json"

_SHORT = {
    "precision": "precision",
    "max_batch_size": "batch",
    "max_queue_delay_ms": "delay ms",
    "max_concurrent_batches": "concurrent",
    "intra_op_threads": "intra-op",
}


def confirmed(found: dict, config: dict) -> list[dict]:
    """The confirmation's samples of ``config`` (empty if it was not a finalist)."""
    for point in found["points"]:
        if point["config"] == config:
            return [s for s in point["confirm"] if "levels" in s]
    return []


def _overlap(default: list[dict], chosen: list[dict]) -> bool:
    """Whether the chosen configuration's worst round was no better than the defaults' best."""
    ours, theirs = _level_values(chosen, "requests_per_s"), _level_values(default, "requests_per_s")
    return bool(ours and theirs) and min(ours) <= max(theirs)


def margin_text(found: dict) -> str:
    """The chosen configuration's requests/s over the defaults', as ``x1.23`` (``x?``: not measured)."""
    return "x?" if found["margin"] is None else f"x{found['margin']:.2f}"


def _level_values(samples: list[dict], key: str, concurrency: int | None = None) -> list[float]:
    values = []
    for sample in samples:
        levels = sample["levels"]
        level = (
            levels[-1]
            if concurrency is None
            else next((row for row in levels if row["concurrency"] == concurrency), None)
        )
        if level is not None and level.get(key) is not None:
            values.append(level[key])
    return values


def median_range(samples: list[dict], key: str, concurrency: int | None = None, digits: int = 1) -> str:
    """``median [min-max]`` of ``key`` at ``concurrency`` (None: the objective's level) over ``samples``."""
    values = _level_values(samples, key, concurrency)
    if not values:
        return "-"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def _config_cells(found: dict, config: dict) -> list[str]:
    return [_value(config.get(d["name"])) for d in found["space"]]


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    config, machine = results["config"], results["machine"]
    levels = config["concurrency"]
    objective = f"p99 <= {config['p99_ms']:g} ms" if config["p99_ms"] is not None else "no latency bound"
    parts = [
        "# make tune",
        "",
        f"{results['started']}, {machine['cpu']} ({machine['cores']} cores), ONNX Runtime "
        f"{machine['onnxruntime']}; load average {machine['loadavg_before']} before, "
        f"{machine.get('loadavg_after', '?')} after; {results.get('duration_s', 0):.0f} s in all.",
        "",
        f"Objective: requests/s at concurrency {levels[-1]} ({objective}). Budget {config['budget_s']:g} s "
        f"per model. Search: {config['search_duration_s']:g} s per measurement at c={levels[-1]}; "
        f"confirmation: {config['confirm_rounds']} interleaved rounds of {config['confirm_duration_s']:g} s "
        f"at every level. Figures: median [min-max] over the rounds. The server restarts for every "
        f"measurement, its settings from a MODEL_CONFIG file.",
        "",
        f"Written: `{results.get('model_config', '?')}`.",
        "",
        "Margin: the chosen configuration's median requests/s over the defaults', from the same rounds; "
        "'ranges overlap' where its worst round was no better than the defaults' best (a noisy machine: "
        "measure again, or with a larger --budget-s, before trusting a small margin).",
        "",
    ]
    summary = []
    for model, found in results["models"].items():
        default = confirmed(found, found["default"])
        chosen = confirmed(found, found["chosen"])
        verdict = "defaults best" if found["chosen_is_default"] else margin_text(found)
        if not found["chosen_is_default"] and _overlap(default, chosen):
            verdict += " (ranges overlap)"
        summary.append(
            [
                model,
                found["backend"],
                median_range(default, "requests_per_s"),
                median_range(chosen, "requests_per_s"),
                verdict,
                ", ".join(f"{_SHORT.get(k, k)} {_value(v)}" for k, v in found["chosen"].items()),
            ]
        )
    parts += _table(
        [
            "model",
            "backend",
            f"defaults req/s c={levels[-1]}",
            f"chosen req/s c={levels[-1]}",
            "margin",
            "chosen",
        ],
        summary,
    )
    for model, found in results["models"].items():
        names = [d["name"] for d in found["space"]]
        parts += ["", f"## {model} ({found['backend']})", ""]
        if found["precisions_left_out"]:
            left_out = "; ".join(f"{p}: {why}" for p, why in found["precisions_left_out"].items())
            parts += [f"Precisions left out: {left_out}.", ""]
        parts += [
            f"Spent {found['spent_s']:.0f} s of {found['budget_s']:g} s"
            + (" (the budget ended the search)." if found["stopped_by_budget"] else "."),
            "",
            "Finalists (confirmation):",
            "",
        ]
        settings = [_SHORT.get(n, n) for n in names]
        header = list(settings)
        for c in levels:
            header += [f"req/s c={c}", f"p50 ms c={c}", f"p99 ms c={c}"]
        rows = []
        for finalist in found["finalists"]:
            samples = confirmed(found, finalist)
            row = _config_cells(found, finalist)
            for c in levels:
                row += [
                    median_range(samples, "requests_per_s", c),
                    median_range(samples, "p50_ms", c, 2),
                    median_range(samples, "p99_ms", c, 2),
                ]
            marks = []
            if finalist == found["chosen"]:
                marks.append("**chosen**")
            if finalist == found["default"]:
                marks.append("defaults")
            rows.append([" ".join(marks) or "", *row])
        parts += _table(["", *header], rows)
        parts += ["", "Every configuration tried (search, short measurements):", ""]
        rows = []
        for point in found["points"]:
            search = [s for s in point["search"] if "levels" in s]
            failed = [s["error"] for s in point["search"] if "error" in s]
            rows.append(
                [
                    *_config_cells(found, point["config"]),
                    str(len(point["search"])),
                    median_range(search, "requests_per_s"),
                    median_range(search, "p99_ms", None, 2),
                    failed[0] if failed else "",
                ]
            )
        parts += _table([*settings, "n", f"req/s c={levels[-1]}", f"p99 ms c={levels[-1]}", "failed"], rows)
    parts += ["", f"![configurations tried]({CHART_FILE})", ""]
    return "\n".join(parts)


def chart(results: dict, path: Path) -> Path:
    """One panel per model: every configuration tried at its median p99 and requests/s (search), the
    defaults and the chosen one from the confirmation with their ranges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    columns = min(2, len(models)) or 1
    rows = (len(models) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False, constrained_layout=True
    )
    bound = results["config"]["p99_ms"]
    for axis, model in zip(axes.flat, models, strict=False):
        found = results["models"][model]
        xs, ys = [], []
        for point in found["points"]:
            search = [s for s in point["search"] if "levels" in s]
            p99, rps = _level_values(search, "p99_ms"), _level_values(search, "requests_per_s")
            if p99 and rps:
                xs.append(statistics.median(p99))
                ys.append(statistics.median(rps))
        axis.scatter(xs, ys, s=18, color="0.6", label="tried (search)")
        for config, label, color in (
            (found["default"], "defaults", "tab:blue"),
            (found["chosen"], "chosen", "tab:red"),
        ):
            samples = confirmed(found, config)
            p99, rps = _level_values(samples, "p99_ms"), _level_values(samples, "requests_per_s")
            if not p99:
                continue
            x, y = statistics.median(p99), statistics.median(rps)
            axis.errorbar(
                [x],
                [y],
                xerr=[[x - min(p99)], [max(p99) - x]],
                yerr=[[y - min(rps)], [max(rps) - y]],
                fmt="o" if label == "defaults" else "*",
                markersize=7 if label == "defaults" else 12,
                color=color,
                capsize=3,
                label=f"{label} (confirmation)",
            )
        if bound is not None:
            axis.axvline(bound, color="tab:orange", linestyle="--", label=f"p99 bound {bound:g} ms")
        concurrency = results["config"]["concurrency"][-1]
        axis.set_title(f"{model} ({found['backend']})", fontsize=10)
        axis.set_xlabel(f"p99 latency at c={concurrency} (ms)")
        axis.set_ylabel(f"requests/s at c={concurrency}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    for axis in list(axes.flat)[len(models) :]:
        axis.set_visible(False)
    machine = results["machine"]
    figure.suptitle(f"make tune: {machine['cpu']} ({machine['cores']} cores)", fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write(out_dir: Path, results: dict) -> tuple[Path, Path]:
    """report.md and tune.png into ``out_dir``; their paths."""
    report = Path(out_dir) / REPORT_FILE
    report.write_text(markdown(results))
    return report, chart(results, Path(out_dir) / CHART_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tune_report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("directory", type=Path, help="a folder written by make tune")
    args = parser.parse_args(argv)
    report, chart_path = write(args.directory, json.loads((args.directory / RESULTS_FILE).read_text()))
    print(f"wrote {report} and {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
