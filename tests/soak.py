"""Soak: a real ``python -m service`` under a steady mix of models and of good and bad input for a
bounded time, its resident memory sampled; ``make soak`` (``SOAK_S=60`` for a short run).

    python -m tests.soak [--duration S] [--rate R] [--repository DIR | --tiny] [--out FILE]

Every request has an expected status (200 for the good images, the documented error code for each bad one,
taken from the hostile corpus); the run reports, per window and in total, requests, answers by
status code, p50/p99 latency of the good requests, and resident memory. It fails (exit 1) on any
unexpected 5xx, any lost request (sent on an open connection and never answered, or missing from
the server's own request counter), or memory growth over ``--max-growth-mib`` between the end of
the warm-up window and the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from contract.photos import encode, make_photo, photo_jpeg
from contract.zoo import DEFAULT_MODELS
from tests.live_server import REPO, ServiceProcess, wait_ready
from tests.workloads import MIB, RawClient, hostile_cases, rss_bytes, write_heavy_model

BUILT_REPOSITORY = REPO / ".cache" / "test-model-repository"
QUEUE_SIZE = 64
# Cases whose answer depends on the model's input size (the tiny test models resize to 36, the real
# ones to 256: a 1 x 20000 strip is fine for one and too large for the other).
_SIZE_DEPENDENT = {"1x20000-png", "20000x1-jpeg"}


@dataclass(frozen=True)
class Request:
    kind: str  # "good" or the hostile case's name
    target: str
    body: bytes
    headers: dict[str, str]
    expected: int


@dataclass
class Window:
    started_s: float
    codes: Counter = field(default_factory=Counter)
    good_seconds: list[float] = field(default_factory=list)
    unexpected: int = 0
    lost: int = 0
    rss: list[int] = field(default_factory=list)


def workload(models: list[str], bad_share: float, seed: int) -> tuple[list[Request], list[Request]]:
    """Good requests (photos of several sizes and formats, every model) and bad ones (the corpus)."""
    photos = [
        (photo_jpeg(500, 375, seed=1), "image/jpeg"),
        (photo_jpeg(1024, 768, seed=2), "image/jpeg"),
        (photo_jpeg(375, 500, seed=3), "image/jpeg"),
        (encode(make_photo(320, 240, seed=4), "PNG"), "image/png"),
        (encode(make_photo(400, 300, seed=5), "WEBP", quality=85), "image/webp"),
    ]
    good = [
        Request("good", f"/classify?model={model}&top_k=5", body, {"Content-Type": content_type}, 200)
        for model in models
        for body, content_type in photos
    ]
    bad = []
    rng = random.Random(seed)
    for case in hostile_cases(QUEUE_SIZE):
        if case.name in _SIZE_DEPENDENT:
            continue
        query = case.query.replace("model=mobilenet_v2", f"model={rng.choice(models)}")
        headers = case.headers | ({"Content-Type": case.content_type} if case.content_type else {})
        bad.append(Request(case.name, f"/classify?{query}", case.body, headers, case.status))
    return good, bad


async def run(
    service: ServiceProcess,
    good: list[Request],
    bad: list[Request],
    *,
    duration_s: float,
    rate: float,
    bad_share: float,
    window_s: float,
    connections: int,
    seed: int,
) -> list[Window]:
    rng = random.Random(seed)
    started = time.monotonic()
    windows: list[Window] = []

    last_window = max(0, math.ceil(duration_s / window_s) - 1)

    def window() -> Window:
        # An answer that lands after the end belongs to the last window.
        index = min(last_window, int((time.monotonic() - started) // window_s))
        while len(windows) <= index:
            windows.append(Window(len(windows) * window_s))
        return windows[index]

    async def sender(index: int) -> None:
        client = RawClient("127.0.0.1", service.port)
        interval_s = connections / rate
        send_at = started + index * interval_s / connections
        while send_at < started + duration_s:
            await asyncio.sleep(max(0.0, send_at - time.monotonic()))
            send_at += interval_s
            request = rng.choice(bad) if rng.random() < bad_share else rng.choice(good)
            try:
                reply = await client.request("POST", request.target, request.body, request.headers)
            except ConnectionError as exc:
                window().lost += 1
                print(f"lost: {request.kind}: {exc}", file=sys.stderr)
                continue
            current = window()
            current.codes[reply.status] += 1
            if reply.status != request.expected:
                current.unexpected += 1
                print(
                    f"unexpected: {request.kind} -> {reply.status} (expected {request.expected}): "
                    f"{reply.body[:200]!r}",
                    file=sys.stderr,
                )
            if request.kind == "good" and reply.status == 200:
                current.good_seconds.append(reply.seconds)
        await client.close()

    async def sample_memory() -> None:
        while time.monotonic() - started < duration_s:
            window().rss.append(rss_bytes(service.process.pid))
            await asyncio.sleep(1.0)

    await asyncio.gather(*(sender(i) for i in range(connections)), sample_memory())
    return windows


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def served_by_the_server(url: str) -> int:
    """classifier_requests_total summed over every model and code: the server's own count."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("classifier_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def build_repository(tiny: bool, repository: Path | None) -> tuple[Path, list[str]]:
    if tiny:
        root = Path(tempfile.mkdtemp(prefix="soak-")) / "model_repository"
        names = ["mobilenet_v2", "shufflenet_v2"]
        for seed, name in enumerate(names):
            write_heavy_model(root, name, seed=seed)
        return root, names
    root = repository or BUILT_REPOSITORY
    if repository is None:  # the same build the slow tests use; skipped when up to date
        command = [sys.executable, str(REPO / "build_engines.py"), "--models", *DEFAULT_MODELS]
        command += ["--weights", "random", "--out", str(root)]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    names = sorted(p.name for p in root.iterdir() if (p / "model.json").is_file())
    if not names:
        raise SystemExit(f"no models in {root}")
    return root, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--rate", type=float, default=20, help="requests per second (default 20)")
    parser.add_argument("--bad-share", type=float, default=0.3, help="share of bad requests (default 0.3)")
    parser.add_argument("--window", type=float, default=0, help="report window in s (default: duration/10)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repository", type=Path, help="model repository (default: the four models, built)")
    parser.add_argument("--tiny", action="store_true", help="two small test models instead (no build)")
    parser.add_argument("--max-growth-mib", type=float, default=32, help="memory growth bound (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = parser.parse_args(argv)
    window_s = args.window or max(5.0, args.duration / 10)

    root, models = build_repository(args.tiny, args.repository)
    good, bad = workload(models, args.bad_share, args.seed)
    log_path = Path(tempfile.mkdtemp(prefix="soak-log-")) / "service.log"
    service = ServiceProcess(
        {
            "MODEL_REPOSITORY": str(root),
            "BACKEND": "onnxruntime-cpu",
            "MAX_QUEUE_SIZE": str(QUEUE_SIZE),
            "LOG_LEVEL": "WARNING",
        },
        log_path,
    )
    try:
        wait_ready(service.url, timeout_s=180)
        before = served_by_the_server(service.url)
        print(
            f"soak: {args.duration:g} s at {args.rate:g} req/s, {args.bad_share:.0%} bad, models "
            f"{', '.join(models)}; server pid {service.process.pid}, log {log_path}",
            flush=True,
        )
        windows = asyncio.run(
            run(
                service,
                good,
                bad,
                duration_s=args.duration,
                rate=args.rate,
                bad_share=args.bad_share,
                window_s=window_s,
                connections=args.connections,
                seed=args.seed,
            )
        )
        counted = served_by_the_server(service.url) - before
        alive = service.process.poll() is None
    finally:
        service.stop()

    print(f"{'window':>8} {'requests':>9} {'good p50 ms':>12} {'good p99 ms':>12} {'rss MiB':>8}  codes")
    for w in windows:
        rss = f"{w.rss[-1] / MIB:.1f}" if w.rss else "-"
        codes = " ".join(f"{code}:{count}" for code, count in sorted(w.codes.items()))
        print(
            f"{w.started_s:>7.0f}s {sum(w.codes.values()):>9} {ms(quantile(w.good_seconds, 0.5)):>12} "
            f"{ms(quantile(w.good_seconds, 0.99)):>12} {rss:>8}  {codes}"
        )
    codes = sum((w.codes for w in windows), Counter())
    answered = sum(codes.values())
    lost = sum(w.lost for w in windows)
    unexpected = sum(w.unexpected for w in windows)
    unexpected_5xx = sum(count for code, count in codes.items() if code >= 500)
    good_seconds = [s for w in windows for s in w.good_seconds]
    samples = [rss for w in windows for rss in w.rss]
    warm = windows[0].rss[-1] if windows and windows[0].rss else samples[0]
    end = samples[-1]
    growth_mib = (end - warm) / MIB
    report = {
        "duration_s": args.duration,
        "rate_per_s": args.rate,
        "models": models,
        "requests": answered + lost,
        "answered": answered,
        "codes": {str(code): count for code, count in sorted(codes.items())},
        "unexpected": unexpected,
        "unexpected_5xx": unexpected_5xx,
        "lost": lost,
        "server_counted": counted,
        "good_p50_ms": round(1000 * (quantile(good_seconds, 0.5) or 0), 1),
        "good_p99_ms": round(1000 * (quantile(good_seconds, 0.99) or 0), 1),
        "p99_ms_per_window": [round(1000 * (quantile(w.good_seconds, 0.99) or 0), 1) for w in windows],
        "rss_mib_start": round(samples[0] / MIB, 1),
        "rss_mib_after_warmup": round(warm / MIB, 1),
        "rss_mib_end": round(end / MIB, 1),
        "rss_mib_max": round(max(samples) / MIB, 1),
        "growth_mib": round(growth_mib, 1),
        "growth_bound_mib": args.max_growth_mib,
        "server_alive": alive,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    problems = []
    if unexpected_5xx:
        problems.append(f"{unexpected_5xx} unexpected 5xx")
    if unexpected:
        problems.append(f"{unexpected} answers other than expected")
    if lost or counted != answered:
        problems.append(f"{lost} lost; the server counted {counted} of {answered} answered")
    if growth_mib > args.max_growth_mib:
        problems.append(f"memory grew {growth_mib:.1f} MiB (bound {args.max_growth_mib:g})")
    if not alive:
        problems.append("the server died")
    print("soak: " + ("FAILED: " + "; ".join(problems) if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
