"""``make tune``: the best serving configuration of each model on this machine, written for the server.

    python -m benchmarks.tune [--repository model_repository] [--models NAME ...] [--p99-ms MS]
                              [--budget-s 210] [--concurrency 1,16] [--min-agreement 0.9] [--out DIR]

For each model, on the machine it runs on, it starts the real server (``python -m service``, one
model, its settings from a ``MODEL_CONFIG`` file written for the trial) and puts it under the load
generator (``benchmarks/load.py``), over and over, searching ``MAX_BATCH_SIZE``,
``MAX_QUEUE_DELAY_MS`` (where batches form), ``MAX_CONCURRENT_BATCHES``, ``INTRA_OP_THREADS`` (CPU)
and the precision (each build recorded in the model's manifest whose top-1 agreement with fp32 is at
least ``--min-agreement``). The objective is requests/s at the highest ``--concurrency``, with its
p99 within ``--p99-ms`` when given; a level that answers with errors is out. The search
(``benchmarks/tune_search.py``) is coordinate descent from the server's defaults with successive
halving over short measurements, then a confirmation of the finalists and the defaults in
interleaved rounds of longer measurements at every concurrency level, within ``--budget-s`` seconds
per model (the default: four models in about 15 minutes on 2 cores).

Output, in ``benchmarks/results/tune-<time>/``: ``model_config.toml`` (one table per model: serve
with ``MODEL_CONFIG=.../model_config.toml``), ``report.md`` (every configuration tried, the finalists
at every level with their spread, the chosen one and its margin over the defaults measured in the
same run), ``tune.png``, ``results.json``, and each trial's config file and server log under
``trials/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import load, tune_report
from benchmarks.bench import Server, loadavg, new_results, say
from benchmarks.classify_requests import Image, generated_images
from benchmarks.http_client import http_get
from benchmarks.load_results import Level
from benchmarks.text_table import text_table
from benchmarks.tune_search import Dimension, Sample, SearchResult, search
from contract import layout
from contract.manifest import Manifest
from contract.zoo import DEFAULT_MODELS
from service.config import CPU_BATCHING, GPU_BACKENDS, GPU_BATCHING
from service.core.cpus import cpu_count
from service.model_config import render_model_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONFIG_FILE = "model_config.toml"
RESULTS_FILE = "results.json"
# Per model: with a server start of ~2 s per trial, about 27 short trials and three rounds of three
# finalists on 2 cores, so the four default models take about 15 minutes.
DEFAULT_BUDGET_S = 210.0
# The variables the tune sets through its trial files: set in the environment they would win over them.
TUNED_VARIABLES = (
    "MAX_BATCH_SIZE",
    "MAX_QUEUE_DELAY_MS",
    "MAX_CONCURRENT_BATCHES",
    "INTRA_OP_THREADS",
    "INTER_OP_THREADS",
    "EXECUTION_MODE",
    "MODEL_CONFIG",
)
# The trial servers listen on loopback for the load generator alone: no token, /metrics on their port.
UNSET_FOR_TRIALS = ("AUTH_TOKEN", "AUTH_TOKEN_FILE", "METRICS_PORT")


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs; the search's knobs."""

    concurrency: tuple[int, ...] = (1, 16)  # the objective is the last; the search measures only it
    search_warmup_s: float = 0.5
    search_duration_s: float = 2.0
    confirm_warmup_s: float = 0.5
    confirm_duration_s: float = 3.0
    repeats: int = 3
    finalists: int = 2
    confirm_rounds: int = 3
    confirm_share: float = 0.4
    images: int = 8


@dataclass(frozen=True)
class Target:
    """What a configuration must achieve: ``p99_ms`` None means the most requests/s, whatever p99."""

    p99_ms: float | None = None


def space_for(backend: str, precisions: Sequence[str], cores: int) -> tuple[list[Dimension], dict[str, Any]]:
    """The dimensions searched on ``backend`` and the start point: the server's own defaults there."""
    precision = Dimension("precision", tuple(precisions))
    delay_applies = lambda config: config["max_batch_size"] > 1  # noqa: E731 - a predicate, named by its field
    if backend in GPU_BACKENDS:
        # A GPU gains from large batches; the CPU threads do not matter to its runtime.
        space = [
            precision,
            Dimension("max_batch_size", _with(GPU_BATCHING.max_batch_size, (1, 4, 8, 32, 64))),
            Dimension(
                "max_queue_delay_ms",
                _with(GPU_BATCHING.max_queue_delay_ms, (0.0, 1.0, 5.0, 10.0)),
                delay_applies,
            ),
            Dimension("max_concurrent_batches", _with(GPU_BATCHING.max_concurrent_batches, (1, 3, 4))),
        ]
        start = {
            "precision": "fp32",
            "max_batch_size": GPU_BATCHING.max_batch_size,
            "max_queue_delay_ms": GPU_BATCHING.max_queue_delay_ms,
            "max_concurrent_batches": GPU_BATCHING.max_concurrent_batches,
        }
        return space, start
    threads_default = cores + 1  # what CPU_BATCHING's 0 means
    space = [
        precision,
        Dimension("max_concurrent_batches", _with(threads_default, (1, cores, 2 * cores))),
        Dimension("intra_op_threads", _with(1, (cores,))),
        Dimension("max_batch_size", _with(CPU_BATCHING.max_batch_size, (2, 4, 8))),
        Dimension(
            "max_queue_delay_ms", _with(CPU_BATCHING.max_queue_delay_ms, (1.0, 2.0, 5.0)), delay_applies
        ),
    ]
    start = {
        "precision": "fp32",
        "max_concurrent_batches": threads_default,
        "intra_op_threads": 1,
        "max_batch_size": CPU_BATCHING.max_batch_size,
        "max_queue_delay_ms": CPU_BATCHING.max_queue_delay_ms,
    }
    return space, start


def _with(first: Any, others: Sequence[Any]) -> tuple[Any, ...]:
    """``first`` (the default: held there where the dimension does not apply), then the others, once."""
    return tuple(dict.fromkeys((first, *sorted(others))))


def precisions_to_try(manifest: Manifest, min_agreement: float) -> tuple[list[str], dict[str, str]]:
    """fp32 and each recorded build agreeing with it at least ``min_agreement`` (top-1); the others
    with the reason they are left out."""
    tried, left_out = ["fp32"], {}
    for variant in manifest.precisions:
        agreement = variant.top1_agreement
        if agreement is not None and agreement < min_agreement:
            left_out[variant.precision] = f"top-1 agreement with fp32 {agreement:.1%} < {min_agreement:.0%}"
        else:
            tried.append(variant.precision)
    return tried, left_out


class Trials:
    """Runs one configuration of one model: a trial file, the server, the load generator."""

    def __init__(
        self, repository: Path, model: str, out_dir: Path, plan: Plan, target: Target, images: list[Image]
    ) -> None:
        self.repository, self.model, self.plan, self.target, self.images = (
            repository,
            model,
            plan,
            target,
            images,
        )
        self.dir = out_dir / "trials"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        # Set in the environment, the tuned variables would win over every trial's file.
        self.env: dict[str, str | None] = {name: None for name in (*TUNED_VARIABLES, *UNSET_FOR_TRIALS)}

    def probe(self) -> dict:
        """The model served with the server's defaults: its entry in /models (backend, precision)."""
        with Server(
            self.repository, [self.model], self.dir / f"{self.model}-probe.log", env=self.env
        ) as server:
            status, body = load.run(http_get(server.url, f"/models/{self.model}"))
        if status != 200:
            raise SystemExit(f"{self.model}: /models/{self.model} answered {status}")
        return json.loads(body)

    def __call__(self, config: Mapping[str, Any], phase: str) -> Sample:
        started = time.perf_counter()
        self.count += 1
        name = f"{self.model}-{self.count:03d}-{phase}"
        config_path = self.dir / f"{name}.toml"
        config_path.write_text(render_model_config({self.model: dict(config)}))
        confirm = phase == "confirm"
        levels = self.plan.concurrency if confirm else self.plan.concurrency[-1:]
        settings = load.LoadConfig(
            url="",
            duration_s=self.plan.confirm_duration_s if confirm else self.plan.search_duration_s,
            warmup_s=self.plan.confirm_warmup_s if confirm else self.plan.search_warmup_s,
            read_metrics=False,
        )
        rows = []
        try:
            env = self.env | {"MODEL_CONFIG": str(config_path)}
            with Server(self.repository, [self.model], self.dir / f"{name}.log", env=env) as server:
                for concurrency in levels:
                    result = load.run(
                        load.run_level(
                            _at(settings, server.url),
                            self.model,
                            Level("concurrency", concurrency),
                            self.images,
                        )
                    )
                    rows.append(_level_row(result))
        except SystemExit as exc:  # the server did not start with this configuration
            details = {"phase": phase, "error": str(exc), "trial": name}
            return Sample(0.0, math.inf, time.perf_counter() - started, details)
        objective = rows[-1]
        penalty = 0.0
        if objective["errors"] or not objective["ok"]:
            # Errors are out, whatever the speed: worse the larger their share.
            penalty += 1e6 * (1 + objective["errors"]) / (1 + objective["ok"])
        elif self.target.p99_ms is not None and objective["p99_ms"] > self.target.p99_ms:
            penalty += objective["p99_ms"] - self.target.p99_ms
        details = {"phase": phase, "levels": rows, "trial": name}
        return Sample(objective["requests_per_s"], penalty, time.perf_counter() - started, details)


def _at(config: load.LoadConfig, url: str) -> load.LoadConfig:
    return load.LoadConfig(**{**asdict(config), "url": url})


def _level_row(result) -> dict:
    errors = sum(result.errors.values())
    return {
        "concurrency": int(result.level),
        "requests_per_s": result.requests_per_s,
        "p50_ms": result.latency_ms["p50"],
        "p99_ms": result.latency_ms["p99"],
        "ok": result.ok,
        "errors": errors,
    }


def tune_model(
    repository: Path,
    model: str,
    out_dir: Path,
    plan: Plan,
    target: Target,
    budget_s: float,
    min_agreement: float,
    images: list[Image],
) -> dict:
    """Search one model; what it found, as ``results.json`` keeps it."""
    # The version the server serves to requests that name none: the highest.
    manifest = Manifest.load(list(layout.versions(repository / model).values())[-1])
    precisions, left_out = precisions_to_try(manifest, min_agreement)
    trials = Trials(repository, model, out_dir, plan, target, images)
    say(f"{model}: the server's defaults (backend, readiness)")
    entry = trials.probe()
    backend = entry.get("backend", "?")
    space, start = space_for(backend, precisions, cpu_count())
    say(
        f"{model} on {backend}: searching {', '.join(f'{d.name} {list(d.values)}' for d in space)} "
        f"for {budget_s:.0f} s"
    )

    def measure(config: Mapping[str, Any], phase: str) -> Sample:
        sample = trials(config, phase)
        say(f"{model} {phase:<7} {_describe(config)}: {_describe_sample(sample)}")
        return sample

    found = search(
        space,
        start,
        measure,
        budget=budget_s,
        repeats=plan.repeats,
        finalists=plan.finalists,
        confirm_rounds=plan.confirm_rounds,
        confirm_share=plan.confirm_share,
    )
    return _model_results(model, backend, space, start, precisions, left_out, found)


def _model_results(
    model: str,
    backend: str,
    space: list[Dimension],
    start: dict[str, Any],
    precisions: list[str],
    left_out: dict[str, str],
    found: SearchResult,
) -> dict:
    def samples(rows: list[Sample]) -> list[dict]:
        return [{"score": s.score, "penalty": s.penalty, "cost_s": s.cost, **dict(s.details)} for s in rows]

    finalists = [point.config for point in found.finalists]
    return {
        "backend": backend,
        "precisions": precisions,
        "precisions_left_out": left_out,
        "space": [{"name": d.name, "values": list(d.values)} for d in space],
        "default": start,
        "chosen": found.best.config,
        "chosen_is_default": found.best is found.start,
        "margin": found.margin,
        "chosen_feasible": found.best.key(True)[0] == 0.0,
        "finalists": finalists,
        "points": [
            {"config": point.config, "search": samples(point.samples), "confirm": samples(point.confirmed)}
            for point in found.points
        ],
        "spent_s": found.spent,
        "budget_s": found.budget,
        "stopped_by_budget": found.stopped_by_budget,
    }


def _describe(config: Mapping[str, Any]) -> str:
    short = {
        "precision": "",
        "max_batch_size": "batch ",
        "max_queue_delay_ms": "delay ",
        "max_concurrent_batches": "conc ",
        "intra_op_threads": "intra ",
    }
    parts = [
        f"{short.get(k, k + ' ')}{v:g}" if isinstance(v, float) else f"{short.get(k, k + ' ')}{v}"
        for k, v in config.items()
    ]
    return ", ".join(parts)


def _describe_sample(sample: Sample) -> str:
    if "error" in sample.details:
        return f"failed: {sample.details['error']}"
    level = sample.details["levels"][-1]
    out = f"{sample.score:.1f} req/s, p99 {level['p99_ms'] or 0:.1f} ms at c={level['concurrency']}"
    return out + (f" (outside the target by {sample.penalty:g})" if sample.penalty else "")


def model_config_text(results: dict) -> str:
    """The MODEL_CONFIG file of the chosen configurations, with what they were chosen for on top."""
    machine = results["machine"]
    target = results["config"]["p99_ms"]
    objective = f"p99 <= {target:g} ms" if target is not None else "the most requests/s, whatever p99"
    comments = (
        f"Written by python -m benchmarks.tune on {results['started']}: {machine['cpu']}, "
        f"{machine['cores']} cores.",
        f"Objective: requests/s at concurrency {results['config']['concurrency'][-1]}, {objective}.",
        "Serve with MODEL_CONFIG=<this file>; MAX_BATCH_SIZE and the other variables, when set, win over it.",
    )
    sections = {}
    for model, found in results["models"].items():
        verdict = (
            "the defaults were best"
            if found["chosen_is_default"]
            else f"{tune_report.margin_text(found)} over the defaults"
        )
        comments += (f"{model} on {found['backend']}: {verdict}.",)
        sections[model] = found["chosen"]
    return render_model_config(sections, comments)


def run(
    repository: Path,
    models: Sequence[str],
    out_dir: Path,
    plan: Plan,
    target: Target,
    budget_s: float,
    min_agreement: float,
) -> dict:
    clock = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    images = generated_images(plan.images)
    results = new_results(
        repository,
        models,
        p99_ms=target.p99_ms,
        budget_s=budget_s,
        min_agreement=min_agreement,
        **asdict(plan),
    )
    for model in models:
        results["models"][model] = tune_model(
            repository, model, out_dir, plan, target, budget_s, min_agreement, images
        )
    results["machine"]["loadavg_after"] = loadavg()
    results["duration_s"] = time.perf_counter() - clock
    config_path = out_dir / CONFIG_FILE
    config_path.write_text(model_config_text(results))
    results["model_config"] = str(config_path)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    tune_report.write(out_dir, results)
    return results


def summary_table(results: dict) -> str:
    """Per model: the defaults against the chosen configuration, both from the same confirmation."""
    rows: list[list[object]] = [["model", "backend", "default req/s", "tuned req/s", "margin", "chosen"]]
    for model, found in results["models"].items():
        default, chosen = (
            tune_report.confirmed(found, found["default"]),
            tune_report.confirmed(found, found["chosen"]),
        )
        rows.append(
            [
                model,
                found["backend"],
                tune_report.median_range(default, "requests_per_s"),
                tune_report.median_range(chosen, "requests_per_s"),
                "defaults best" if found["chosen_is_default"] else tune_report.margin_text(found),
                _describe(found["chosen"]),
            ]
        )
    return text_table(rows, left_aligned=2)


def _models(names: Sequence[str], repository: Path) -> list[str]:
    if names == ["all"]:
        names = layout.model_names(repository)
    for name in names:
        if ":" in name:
            raise SystemExit(f"{name}: name the model without a precision; the tune tries each build")
        if not layout.versions(repository / name):
            raise SystemExit(f"{name}: no model.json in {repository / name} (build it with build_engines.py)")
    return list(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="names, or 'all'")
    parser.add_argument("--p99-ms", type=float, default=None, help="p99 bound at the highest concurrency")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds per model")
    parser.add_argument(
        "--concurrency", default="1,16", help="levels reported; the objective is at the highest"
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="try a reduced-precision build only if its recorded top-1 agreement with fp32 is at least this",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/tune-<time>/")
    args = parser.parse_args(argv)
    try:
        concurrency = tuple(sorted({int(part) for part in args.concurrency.split(",") if part.strip()}))
    except ValueError:
        parser.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not concurrency or concurrency[0] < 1:
        parser.error("--concurrency: expected positive integers")
    if args.p99_ms is not None and args.p99_ms <= 0:
        parser.error("--p99-ms: expected a positive number of milliseconds")
    if args.budget_s <= 0:
        parser.error("--budget-s: expected a positive number of seconds")
    models = _models(args.models, args.repository)
    set_here = [name for name in TUNED_VARIABLES if name in os.environ]
    if set_here:
        say(
            f"ignored while tuning: {', '.join(set_here)}; set when serving, they win over the file "
            "this writes"
        )
    out_dir = args.out or RESULTS_DIR / f"tune-{datetime.now():%Y%m%d-%H%M%S}"
    plan = Plan(concurrency=concurrency)
    results = run(
        args.repository, models, out_dir, plan, Target(args.p99_ms), args.budget_s, args.min_agreement
    )
    print(summary_table(results))
    print(
        f"\nwrote {results['model_config']}, {out_dir / tune_report.REPORT_FILE} and "
        f"{out_dir / tune_report.CHART_FILE}"
    )
    print(f"serve with: MODEL_CONFIG={results['model_config']} python -m service")
    return 0


if __name__ == "__main__":
    sys.exit(main())
