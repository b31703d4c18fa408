"""``make bench``: what each model costs in-process, what it costs served, and the ratio between them.

    python -m benchmarks.bench [--repository model_repository] [--models NAME ...] [--repeats 3]
                               [--url http://HOST:PORT [--grpc-url HOST:PORT]] [--quick] [--out DIR]

In one run, on this machine, for each model of the repository:

(a) the runtime alone, in-process, through the server's own backend: batch 1 and the batch sizes the
    batcher can form, at each intra-op thread setting (``benchmarks/inprocess.py``);
(b) the served path: ``python -m service`` started here (or ``--url``, a server already running)
    under the load generator's concurrency sweep (``benchmarks/load.py``), through ``/classify`` and,
    at the lowest and the highest concurrency, through the Open Inference Protocol over HTTP (binary
    tensor data) and over gRPC, each beside ``/classify`` in the same repeat;
(c) the served path against the same work in-process (decode + preprocess + inference + top-5 of the
    same 500x375 JPEGs through the service's own code): requests/s at the highest concurrency over
    the best in-process throughput with every core busy (worker threads, one session shared or one
    each), and the p50 at the lowest concurrency against the in-process p50 of one request at a time;
(d) analytic cost beside measured speed: FLOPs, parameters, memory access cost, latency, images/s,
    achieved GFLOP/s and latency per GFLOP;

plus the ShuffleNet v2 paper's experiments (``benchmarks/experiments/``). Every figure is measured
``--repeats`` times and reported as the median with its range. For (c) each repeat measures a model
in-process and served back to back, so a noisy spell on a shared machine hits both sides of a ratio
alike, and the ratio is taken repeat by repeat. Output: ``benchmarks/results/<timestamp>/`` with
``results.json``, ``report.md``, ``latency_vs_flops.png``, ``guideline1.md``, ``decomposition.md``,
the load generator's ``load.json``/``load.csv`` and the server's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import onnxruntime

from benchmarks import inprocess, load, precision_speed, report
from benchmarks.classify_requests import Image, generated_images
from benchmarks.experiments import decomposition, guideline1
from benchmarks.http_client import HttpError, http_get
from benchmarks.load_output import progress_bar, write_results
from benchmarks.load_protocols import PROTOCOLS
from benchmarks.load_results import LevelResult, levels_from
from contract.manifest import Manifest
from service.core.cpus import cpu_count

DEFAULT_MODELS = ("mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """How long and how often each part measures."""

    repeats: int = 3
    runtime_duration_s: float = 0.5
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    thread_settings: tuple[int, ...] = (1, 2)
    # Long enough that the served/in-process ratio of each repeat is a few percent, not several.
    pipeline_duration_s: float = 3.0
    # In-process worker threads: one per core, and two per core (on a machine shared with other work,
    # more runnable threads win a larger share of the cores, as the server's decode and inference
    # threads do; on a quiet machine one per core is the faster).
    workers: tuple[int, ...] = (cpu_count(), 2 * cpu_count())
    load_duration_s: float = 8.0
    load_warmup_s: float = 1.0
    concurrency: tuple[int, ...] = (1, 4, 16)
    # Measured beside /classify at the lowest and the highest concurrency: req/s and p50 in each.
    protocols: tuple[str, ...] = PROTOCOLS[1:]
    images: int = 8
    guideline_duration_s: float = 0.7
    guideline_widths: tuple[int, ...] = guideline1.WIDTHS
    decomposition_runs: int = 30
    precision_runs: int = 50
    experiments: bool = True

    @classmethod
    def quick(cls) -> Plan:
        """Seconds, not minutes: shows every part works (the tests use it), measures nothing well."""
        return cls(
            repeats=1,
            runtime_duration_s=0.05,
            batch_sizes=(1, 2),
            thread_settings=(1,),
            pipeline_duration_s=0.3,
            workers=(cpu_count(),),
            load_duration_s=0.5,
            load_warmup_s=0.2,
            concurrency=(1, 4),
            images=2,
            guideline_duration_s=0.05,
            guideline_widths=(1,),
            decomposition_runs=3,
            precision_runs=3,
        )


def _say(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "loadavg_before": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------
# The served part


class Server:
    """``python -m service`` on a free local port, for the length of a ``with`` block."""

    def __init__(
        self, repository: Path, models: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.port, self.grpc_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.command = f"GRPC_PORT={self.grpc_port} python -m service --host 127.0.0.1 --port {self.port}"
        # The caller's environment passes through (MAX_BATCH_SIZE=4 make bench measures that setting).
        self.env = os.environ | {
            "MODEL_REPOSITORY": str(Path(repository).resolve()),
            "MODELS": ",".join(models),
            "GRPC_PORT": str(self.grpc_port),
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self._log = open(self.log_path, "wb")  # closed in __exit__
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {self.log_path}")
            try:
                status, _ = load.run(http_get(self.url, "/readyz", timeout_s=2))
            except (HttpError, TimeoutError):
                status = None
            if status == 200:
                return self
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit(f"the server was not ready after 300 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batching(url: str) -> dict[str, str]:
    status, body = load.run(http_get(url, "/models"))
    if status != 200:
        return {}
    described = {}
    for model in json.loads(body)["models"]:
        batching = model.get("batching", {})
        described[model["name"]] = (
            f"{model.get('backend', '?')}, max batch {batching.get('max_batch_size', '?')}, "
            f"delay {batching.get('max_queue_delay_ms', '?')} ms, "
            f"{batching.get('max_concurrent_batches', '?')} batches at a time"
        )
    return described


def compare(
    url: str,
    repository: Path,
    models: list[str],
    plan: Plan,
    images: list[Image],
    server_pid: int | None = None,
    grpc_url: str | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(c): the same work served and in-process, side by side in time.

    Each repeat measures, model by model: the in-process latency one request at a time, every served
    concurrency level (through /classify, and at the lowest and highest concurrency through each of
    ``plan.protocols`` right after it), then the in-process throughput of every arrangement. A noisy
    spell on a shared machine then hits both sides of a ratio alike, and the ratio can be taken repeat
    by repeat. Returns (in-process latency rows, in-process throughput rows, served level rows), each
    with its ``repeat``; a served row's ``protocol`` says how it was sent. With ``server_pid`` (a
    server started here), each served level also says how much CPU the server's threads spent per
    request.
    """
    config = load.LoadConfig(
        url=url,
        duration_s=plan.load_duration_s,
        warmup_s=plan.load_warmup_s,
        server_pid=server_pid,
        grpc_url=grpc_url,
    )
    levels = levels_from(plan.concurrency)
    compared = {levels[0], levels[-1]} if levels else set()
    progress = progress_bar()
    data = [image.data for image in images]
    latency_rows, throughput_rows, served_rows = [], [], []
    for repeat in range(plan.repeats):
        for model in models:
            where = f"{model}, repeat {repeat + 1}/{plan.repeats}"
            _say(f"in-process latency: {where}")
            latency = inprocess.pipeline_latency(
                repository / model, data, duration_s=plan.pipeline_duration_s, repeats=1
            )
            latency_rows.append({**latency.to_dict(), "repeat": repeat})
            for level in levels:
                for protocol in ("classify", *plan.protocols) if level in compared else ("classify",):
                    if progress is None:
                        _say(f"served {level}, {protocol}: {where}")
                    result = load.run(
                        load.run_level(replace(config, protocol=protocol), model, level, images, progress)
                    )
                    served_rows.append({**result.to_dict(), "repeat": repeat})
            _say(f"in-process throughput: {where}")
            for workers in plan.workers:
                for arrangement in inprocess.ARRANGEMENTS:
                    throughput = inprocess.pipeline_throughput(
                        repository / model,
                        data,
                        workers=workers,
                        arrangement=arrangement,
                        duration_s=plan.pipeline_duration_s,
                        repeats=1,
                    )
                    throughput_rows.append({**throughput.to_dict(), "repeat": repeat})
    return latency_rows, throughput_rows, served_rows


# ---------------------------------------------------------------------------------------------
# The run


def run(
    repository: Path,
    models: list[str],
    plan: Plan,
    out_dir: Path,
    url: str | None = None,
    grpc_url: str | None = None,
) -> dict:
    started = datetime.now().astimezone()
    clock = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    jpegs = generated_images(plan.images)
    results: dict = {
        "started": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {
            "repository": str(repository),
            "models": models,
            **{k: v for k, v in plan.__dict__.items()},
        },
        "models": {},
    }
    for model in models:
        manifest = Manifest.load(repository / model)
        results["models"][model] = {
            "flops": manifest.flops,
            "params": manifest.params,
            "memory_access_cost": manifest.memory_access_cost,
            "input_size": manifest.input_size,
            "weights": manifest.weights.source,
        }

    _say("(a) the runtime alone, in-process")
    results["runtime"] = []
    for model in models:
        rows = inprocess.runtime_cost(
            repository / model,
            batch_sizes=plan.batch_sizes,
            thread_settings=plan.thread_settings,
            duration_s=plan.runtime_duration_s,
            repeats=plan.repeats,
        )
        results["runtime"] += [row.to_dict() for row in rows]

    _say("reduced precision beside fp32, in-process (the builds recorded in each manifest)")
    results["precisions"] = [
        asdict(timing)
        for model in models
        if Manifest.load(repository / model).precisions
        for timing in precision_speed.time_precisions(
            repository, model, repeats=plan.precision_runs, rounds=plan.repeats, warmup=2
        )
    ]

    if plan.experiments:
        results["guideline1"] = [
            row.to_dict()
            for row in guideline1.run(
                widths=plan.guideline_widths,
                duration_s=plan.guideline_duration_s,
                repeats=plan.repeats,
                progress=_say,
            )
        ]
        _say("run time by operator kind (ONNX Runtime profiler)")
        results["decomposition"] = []
        for model in models:
            for level in decomposition.OPTIMIZATIONS:
                row = decomposition.profile(
                    repository / model / "model.onnx", runs=plan.decomposition_runs, optimization=level
                )
                results["decomposition"].append(row.to_dict())

    _say("(b) and (c): the served path under the load generator, and the same work in-process")
    with contextlib.ExitStack() as stack:
        server_pid = None
        if url is None:
            server = stack.enter_context(Server(repository, models, out_dir / "server.log"))
            url, grpc_url, command = server.url, server.grpc_url, server.command
            server_pid = server.process.pid if server.process else None
        else:
            command = f"already running at {url}"
        latency, throughput, levels = compare(url, repository, models, plan, jpegs, server_pid, grpc_url)
        results["pipeline_latency"], results["pipeline_throughput"] = latency, throughput
        results["served"] = {
            "command": command,
            "url": url,
            "grpc_url": grpc_url,
            "batching": _batching(url),
            "levels": levels,
        }

    results["machine"]["loadavg_after"] = _loadavg()
    results["duration_s"] = time.perf_counter() - clock
    results["summary"] = report.model_summary(results)
    results["protocols"] = report.protocol_summary(results)
    _write(out_dir, results)
    return results


def _write(out_dir: Path, results: dict) -> None:
    (out_dir / report.RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    report.write(out_dir, results)
    if results.get("guideline1"):
        (out_dir / "guideline1.md").write_text(guideline1.table(report._guideline_rows(results)) + "\n")
    if results.get("decomposition"):
        (out_dir / "decomposition.md").write_text(
            decomposition.table(report._decomposition_rows(results)) + "\n"
        )
    levels = [
        LevelResult(**{k: v for k, v in row.items() if k != "repeat"}) for row in results["served"]["levels"]
    ]
    write_results(out_dir, levels, {"url": results["served"]["url"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every measurement (default 3)")
    parser.add_argument("--url", default=None, help="measure this running server instead of starting one")
    parser.add_argument(
        "--grpc-url",
        default=None,
        help="with --url: its gRPC HOST:PORT (default: the --url's host, port 8001)",
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (numbers meaningless)")
    parser.add_argument(
        "--no-experiments", action="store_true", help="skip guideline 1 and the decomposition"
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<timestamp>")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan(thread_settings=tuple(sorted({1, cpu_count()})))
    if args.repeats is not None:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    if args.no_experiments:
        plan = Plan(**{**plan.__dict__, "experiments": False})
    missing = [m for m in args.models if not (args.repository / m / "model.json").is_file()]
    if missing:
        print(f"not built in {args.repository}: {', '.join(missing)} (make models)", file=sys.stderr)
        return 2
    out = args.out or load.RESULTS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}"
    results = run(args.repository, args.models, plan, out, url=args.url, grpc_url=args.grpc_url)
    print(report.summary_table(results))
    if results["protocols"]:
        print("\n" + report.protocol_table(results))
    print(f"\nwrote {out / report.REPORT_FILE} (took {results['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
