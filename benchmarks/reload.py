"""Latency while a model is reloaded under load, beside latency between reloads, in the same run.

    python -m benchmarks.reload [--repository model_repository] [--model shufflenet_v2] [--duration 60]
                                [--concurrency 16] [--interval 3] [--settle 0.5] [--fail-every 0] [--out DIR]

It copies the built model into a scratch repository as version 1, with a second copy set aside as
version 2, and starts ``python -m service`` on it with the repository API on (``REPOSITORY_API=true``).
The load generator's closed loop (``benchmarks/load.py``) keeps ``--concurrency`` requests to
``/classify`` in flight for ``--duration`` seconds while a reloader, every ``--interval`` seconds of
steady serving, moves version 2 into the model's directory or out of it (a rename: the files appear
and disappear at once, as an operator's ``mv`` of a finished build would) and asks the server to load
the model (``POST /v2/repository/models/{model}/load``): the model's name switches to version 2, then
back to version 1, and so on. With ``--fail-every N``, every Nth time version 2 is a broken build (its
ONNX file does not match its manifest's digest): that load must fail and leave version 1 serving.

Each request's start and end are recorded. A request belongs to a "reload" window when it overlaps a
load call (from its start to ``--settle`` seconds after its answer, which covers the release of the
replaced version), and to "steady" otherwise. Per window kind: requests, answers that were not 200,
p50 and p99; then p99(reload) / p99(steady) against the goal of 1.5 (reported, never failed on: speed
is measured, not asserted). Also reported: which version answered how many requests, the server's
``classifier_model_loads_total`` and ``classifier_model_load_failures_total`` before and after, and
its resident memory after each reload (the replaced runtimes must be freed).

Output: a table on the terminal and ``reload.json`` (with the server's log) under ``--out`` (default
``benchmarks/results/<timestamp>/``). Exits 1 when a request was answered other than 200 or a load
was answered other than planned (a correctness failure, not a speed one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import load
from benchmarks.bench import Server
from benchmarks.classify_requests import generated_images
from benchmarks.http_client import HttpError, http_get, http_post
from benchmarks.load_protocols import protocol_client
from benchmarks.load_results import latency_summary, percentile
from benchmarks.text_table import text_table
from contract import layout

RESULTS_DIR = Path(__file__).resolve().parent / "results"
P99_RATIO_GOAL = 1.5
LOADS = "classifier_model_loads"
LOAD_FAILURES = "classifier_model_load_failures"
STEADY, RELOAD = "steady", "reload"
RESERVE_VERSION = 2  # the version the reloader moves in and out


@dataclass
class Request:
    started: float  # perf_counter seconds
    ended: float
    status: int | str
    version: int | None = None  # of a 200 answer, read after the run


@dataclass
class Reload:
    action: str  # "add" (version 2 in), "add-broken" (a broken version 2 in), "remove" (version 2 out)
    started: float
    ended: float
    status: int | str
    expected_status: int
    error: str | None = None


class RequestLog:
    """The load generator's recorder (``load.closed_loop`` calls ``record``): every request's times."""

    def __init__(self) -> None:
        self.sent = 0
        self.requests: list[Request] = []
        self.bodies: list[tuple[Request, bytes]] = []  # 200 answers, read once the run is over

    def record(self, seconds: float, status: int | str, body: bytes, images: int) -> None:
        ended = time.perf_counter()
        request = Request(ended - seconds, ended, status)
        self.requests.append(request)
        if status == 200:
            self.bodies.append((request, body))

    def read_versions(self) -> None:
        for request, body in self.bodies:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                request.version = json.loads(body)["version"]
        self.bodies.clear()


class _Discard:
    """The warm-up's recorder: nothing is kept."""

    sent = 0

    def record(self, seconds: float, status: int | str, body: bytes, images: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The scratch repository


@dataclass
class ScratchRepository:
    """``root/<model>/1`` (served throughout) and version 2 kept beside the repository until moved in."""

    root: Path
    model: str
    reserve: Path  # version 2, while it is out of the repository
    broken: Path  # a version 2 whose ONNX file does not match its manifest, while it is out

    @property
    def version_dir(self) -> Path:
        return layout.model_directory(self.root, self.model, RESERVE_VERSION)

    def move_in(self, broken: bool) -> None:
        os.rename(self.broken if broken else self.reserve, self.version_dir)

    def move_out(self, broken: bool) -> None:
        os.rename(self.version_dir, self.broken if broken else self.reserve)


def make_scratch_repository(source_repository: Path, model: str, scratch: Path) -> ScratchRepository:
    """Version 1 and the set-aside versions 2 of ``model``, copies of its highest built version."""
    built = layout.versions(source_repository / model)
    if not built:
        raise SystemExit(
            f"{source_repository / model} holds no built model: build it first "
            f"(python build_engines.py --models {model} --out {source_repository})"
        )
    source = built[max(built)]

    def other_versions(directory: str, names: list[str]) -> list[str]:
        # A flat model directory may hold version directories of its own: copy the one version only.
        return [name for name in names if name.isdigit()] if Path(directory) == source else []

    root = scratch / "repository"
    scratch_repository = ScratchRepository(root, model, scratch / "reserve", scratch / "broken")
    shutil.copytree(source, layout.model_directory(root, model, 1), ignore=other_versions)
    shutil.copytree(source, scratch_repository.reserve, ignore=other_versions)
    shutil.copytree(source, scratch_repository.broken, ignore=other_versions)
    _corrupt(scratch_repository.broken / "model.onnx")
    return scratch_repository


def _corrupt(path: Path) -> None:
    """Flip bytes in the middle, keeping the size: only the manifest's digest can tell."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunConfig:
    url: str
    model: str
    concurrency: int = 16
    duration_s: float = 60.0
    interval_s: float = 3.0  # steady serving between the end of one reload and the start of the next
    settle_s: float = 0.5
    warmup_s: float = 2.0
    timeout_s: float = 30.0
    load_timeout_s: float = 300.0
    fail_every: int = 0  # every Nth version 2 moved in is a broken build (0: never)
    image_count: int = 8


@dataclass
class Measured:
    requests: list[Request]
    reloads: list[Reload]
    started: float  # perf_counter at the start of the measured part
    counters_before: dict[str, float]
    counters_after: dict[str, float]
    # Bytes, one per reload, read when the steady interval after it ends (or the run does).
    rss_after_reload: list[int | None] = field(default_factory=list)


async def _reloader(
    config: RunConfig,
    repository: ScratchRepository,
    stop: asyncio.Event,
    server_pid: int | None,
    rss: list[int | None],
) -> list[Reload]:
    """Version 2 in, load; version 2 out, load; ... with ``interval_s`` of steady serving before each.

    The server's memory is read when the steady interval after each reload ends, by when the replaced
    version has been released (that waits only for the requests it had admitted), or the run does."""
    path = f"/v2/repository/models/{config.model}/load"
    reloads: list[Reload] = []
    added = 0
    broken = False
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.interval_s):
                await stop.wait()
        if reloads:
            rss.append(_rss_bytes(server_pid) if server_pid is not None else None)
        if stop.is_set():
            return reloads
        if repository.version_dir.exists():
            repository.move_out(broken)
            action, expected = "remove", 200
        else:
            added += 1
            broken = config.fail_every > 0 and added % config.fail_every == 0
            repository.move_in(broken)
            # A broken build fails to load and leaves version 1 serving: Triton's answer is 400.
            action, expected = ("add-broken", 400) if broken else ("add", 200)
        started = time.perf_counter()
        error = None
        try:
            status, body = await http_post(config.url, path, timeout_s=config.load_timeout_s)
        except (HttpError, TimeoutError) as exc:
            status, body = "connection", str(exc).encode()
        ended = time.perf_counter()
        if status != 200:
            error = body.decode("utf-8", "replace")[:500]
        reloads.append(Reload(action, started, ended, status, expected, error))


async def measure(
    config: RunConfig, repository: ScratchRepository, server_pid: int | None = None
) -> Measured:
    """Warm up, then ``duration_s`` of closed-loop load with the reloader running beside it."""
    images = generated_images(config.image_count)
    client = protocol_client("classify", config.url, None, config.model, images)
    connections = client.clients(config.concurrency)
    requests, send = client.requests, client.send
    try:
        if config.warmup_s > 0:
            budget = load.Budget(None, time.perf_counter() + config.warmup_s)
            await load.closed_loop(send, connections, requests, 1, budget, _Discard(), config.timeout_s)
        before = await _counters(config.url, config.model)
        log = RequestLog()
        stop = asyncio.Event()
        rss: list[int | None] = []
        started = time.perf_counter()
        reloader = asyncio.create_task(_reloader(config, repository, stop, server_pid, rss))
        budget = load.Budget(None, started + config.duration_s)
        try:
            await load.closed_loop(send, connections, requests, 1, budget, log, config.timeout_s)
        finally:
            stop.set()
            reloads = await reloader  # a load in progress is waited for
        after = await _counters(config.url, config.model)
    finally:
        await client.close()
    log.read_versions()
    return Measured(log.requests, reloads, started, before, after, rss)


async def _counters(url: str, model: str) -> dict[str, float]:
    """The server's load counters for ``model`` (absent ones: 0)."""
    status, body = await http_get(url, "/metrics")
    if status != 200:
        raise SystemExit(f"GET {url}/metrics answered {status}")
    values = {LOADS: 0.0, LOAD_FAILURES: 0.0}
    for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
        if family.name in values:
            values[family.name] = sum(
                sample.value
                for sample in family.samples
                if sample.name == f"{family.name}_total" and sample.labels.get("model") == model
            )
    return values


def _rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` (VmRSS, Linux); None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Windows and the summary


def reload_windows(reloads: list[Reload], settle_s: float) -> list[tuple[float, float]]:
    """Each load call from its start to ``settle_s`` after its answer."""
    return [(reload.started, reload.ended + settle_s) for reload in reloads]


def window_of(request: Request, windows: list[tuple[float, float]]) -> str:
    """RELOAD when the request overlaps any of ``windows``, else STEADY."""
    overlaps = any(request.started < end and request.ended > start for start, end in windows)
    return RELOAD if overlaps else STEADY


def _window_summary(requests: list[Request]) -> dict[str, object]:
    ok = [r.ended - r.started for r in requests if r.status == 200]
    errors = Counter(str(r.status) for r in requests if r.status != 200)
    return {
        "requests": len(requests),
        "ok": len(ok),
        "non_200": len(requests) - len(ok),
        "errors": dict(sorted(errors.items())),
        "latency_ms": latency_summary(ok),
    }


def summarize(measured: Measured, config: RunConfig) -> dict[str, object]:
    """What reload.json holds, but for the run's description (added by the caller)."""
    windows = reload_windows(measured.reloads, config.settle_s)
    by_kind: dict[str, list[Request]] = {STEADY: [], RELOAD: []}
    for request in measured.requests:
        by_kind[window_of(request, windows)].append(request)
    summaries = {kind: _window_summary(requests) for kind, requests in by_kind.items()}
    p99 = {kind: summary["latency_ms"]["p99"] for kind, summary in summaries.items()}  # type: ignore[index]
    ratio = p99[RELOAD] / p99[STEADY] if p99[RELOAD] is not None and p99[STEADY] else None
    versions = Counter(str(r.version) for r in measured.requests if r.status == 200)
    load_calls = [reload.ended - reload.started for reload in measured.reloads]
    rss = [value for value in measured.rss_after_reload if value is not None]
    # The first reload's memory against the last one that left the server in the same state (the
    # same versions loaded): what stays behind after every reload in between.
    first_action = measured.reloads[0].action if measured.reloads else None
    alike = [
        (i, value)
        for i, (reload, value) in enumerate(zip(measured.reloads, measured.rss_after_reload, strict=False))
        if reload.action == first_action and value is not None
    ]
    return {
        "windows": summaries,
        "p99_ratio": ratio,
        "p99_ratio_goal": P99_RATIO_GOAL,
        "p99_ratio_met": None if ratio is None else ratio <= P99_RATIO_GOAL,
        "requests": len(measured.requests),
        "non_200": sum(summary["non_200"] for summary in summaries.values()),  # type: ignore[misc]
        "answers_by_version": dict(sorted(versions.items())),
        "reloads": [
            {
                "action": reload.action,
                "started_s": reload.started - measured.started,
                "seconds": reload.ended - reload.started,
                "status": reload.status,
                "expected_status": reload.expected_status,
                "error": reload.error,
            }
            for reload in measured.reloads
        ],
        "reloads_as_planned": sum(r.status == r.expected_status for r in measured.reloads),
        "load_call_ms": {
            "p50": None if not load_calls else percentile(load_calls, 0.5) * 1000,  # type: ignore[operator]
            "max": None if not load_calls else max(load_calls) * 1000,
        },
        "server_counters": {
            "loads_total": {
                "before": measured.counters_before[LOADS],
                "after": measured.counters_after[LOADS],
            },
            "load_failures_total": {
                "before": measured.counters_before[LOAD_FAILURES],
                "after": measured.counters_after[LOAD_FAILURES],
            },
        },
        "server_rss_mib": {
            "after_first_reload": alike[0][1] / 2**20 if alike else None,
            # The last reload of the first one's kind, and how many reloads later it came.
            "after_last_alike_reload": alike[-1][1] / 2**20 if alike else None,
            "reloads_later": alike[-1][0] - alike[0][0] if alike else None,
            "growth": (alike[-1][1] - alike[0][1]) / 2**20 if alike else None,
            "after_each_reload": [round(value / 2**20, 1) for value in rss],
        },
    }


def _ms(value: object) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_summary(summary: dict[str, object]) -> str:
    windows: dict = summary["windows"]  # type: ignore[assignment]
    rows: list[list[object]] = [["window", "requests", "non-200", "p50 ms", "p99 ms", "max ms"]]
    for kind in (STEADY, RELOAD):
        window = windows[kind]
        latency = window["latency_ms"]
        rows.append(
            [
                kind,
                window["requests"],
                window["non_200"],
                _ms(latency["p50"]),
                _ms(latency["p99"]),
                _ms(latency["max"]),
            ]
        )
    reloads: list[dict] = summary["reloads"]  # type: ignore[assignment]
    actions = Counter(reload["action"] for reload in reloads)
    ratio = summary["p99_ratio"]
    verdict = "-" if ratio is None else f"{ratio:.2f} ({'met' if summary['p99_ratio_met'] else 'not met'})"
    counters: dict = summary["server_counters"]  # type: ignore[assignment]
    rss: dict = summary["server_rss_mib"]  # type: ignore[assignment]
    calls: dict = summary["load_call_ms"]  # type: ignore[assignment]
    lines = [
        text_table(rows, left_aligned=1),
        "",
        f"p99 reload / p99 steady: {verdict}; goal <= {summary['p99_ratio_goal']}",
        f"reloads: {len(reloads)} ({', '.join(f'{n} {a}' for a, n in sorted(actions.items())) or 'none'}), "
        f"{summary['reloads_as_planned']} answered as planned; load call p50 {_ms(calls['p50'])} ms, "
        f"max {_ms(calls['max'])} ms",
        "answers by version: "
        + (", ".join(f"{v}: {n}" for v, n in summary["answers_by_version"].items()) or "none"),  # type: ignore[attr-defined]
        f"server loads_total {counters['loads_total']['before']:g} -> {counters['loads_total']['after']:g}, "
        f"load_failures_total {counters['load_failures_total']['before']:g} -> "
        f"{counters['load_failures_total']['after']:g}",
    ]
    if rss["after_first_reload"] is not None:
        lines.append(
            f"server RSS after the first reload {rss['after_first_reload']:.1f} MiB, "
            f"{rss['reloads_later']} reloads later (the same versions loaded) "
            f"{rss['after_last_alike_reload']:.1f} MiB ({rss['growth']:+.1f} MiB)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reload",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="the built models")
    parser.add_argument("--model", default="shufflenet_v2", help="the model to reload")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load before")
    parser.add_argument(
        "--interval", type=float, default=3.0, help="seconds of steady serving before each reload"
    )
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds after a load's answer still counted as its window"
    )
    parser.add_argument(
        "--fail-every", type=int, default=0, help="every Nth version 2 moved in is a broken build (0: never)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before a request counts as failed"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default benchmarks/results/TIME)"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.settle < 0 or args.warmup < 0:
        parser.error("--duration and --interval must be > 0, --settle and --warmup >= 0")
    if args.concurrency < 1 or args.fail_every < 0:
        parser.error("--concurrency must be >= 1 and --fail-every >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now().astimezone()
    # The machine's load around the run: on a shared machine, others' work shows up in the windows.
    load_before = os.getloadavg()[0]
    out: Path = args.out or RESULTS_DIR / f"{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reload-bench-") as scratch:
        repository = make_scratch_repository(args.repository, args.model, Path(scratch))
        # MODEL_VERSIONS emptied: a pin in the caller's environment would stop version 2 from serving.
        env = {"REPOSITORY_API": "true", "MODEL_VERSIONS": ""}
        with Server(repository.root, [args.model], out / "server.log", env=env) as server:
            assert server.process is not None
            config = RunConfig(
                url=server.url,
                model=args.model,
                concurrency=args.concurrency,
                duration_s=args.duration,
                interval_s=args.interval,
                settle_s=args.settle,
                warmup_s=args.warmup,
                timeout_s=args.timeout,
                fail_every=args.fail_every,
            )
            print(
                f"{args.model}: concurrency {args.concurrency} for {args.duration:g} s, a reload after every "
                f"{args.interval:g} s of steady serving ({server.command})",
                file=sys.stderr,
            )
            measured = load.run(measure(config, repository, server.process.pid))
    summary = summarize(measured, config)
    document = {
        "benchmark": "reload",
        "started": started.isoformat(timespec="seconds"),
        "model": args.model,
        "repository": str(args.repository.resolve()),
        "config": {k: v for k, v in asdict(config).items() if k != "url"},
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        },
        **summary,
    }
    path = out / "reload.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(format_summary(summary))
    machine = document["machine"]
    print(
        f"machine: {machine['cpus']} CPUs, 1-minute load average {machine['loadavg_1m_before']:.1f} before, "
        f"{machine['loadavg_1m_after']:.1f} after"
    )
    print(f"wrote {path}")
    planned = summary["reloads_as_planned"] == len(measured.reloads)
    return 0 if summary["non_200"] == 0 and planned else 1


if __name__ == "__main__":
    sys.exit(main())
