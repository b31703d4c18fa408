"""What recording Prometheus metrics costs on the request path, measured two ways in one run.

1. The exact metric calls one single-image ``/classify`` makes (request, decode, queue, batch),
   timed in a tight loop: the cost per request in microseconds.
2. The whole request path in-process (ASGI app, real model, real decode, the real batcher), with the
   real :class:`service.core.metrics.Metrics` and with a subclass whose recording methods do nothing,
   alternated in rounds so that machine noise hits both alike; medians reported.

    python -m benchmarks.metrics_overhead --repository model_repository --model shufflenet_v2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from service.core.metrics import Metrics


class NullMetrics(Metrics):
    """Metrics that record nothing: the 'without' side of the comparison."""

    def observe_request(self, model, status_code, seconds):
        pass

    def observe_decode(self, model, seconds):
        pass

    def observe_queue(self, model, seconds):
        pass

    def observe_batch(self, model, backend, batch_size, seconds):
        pass


def recording_cost_us(model: str, calls: int = 200_000) -> float:
    """Microseconds the metric calls of one single-image request take."""
    metrics = Metrics([model])
    started = time.perf_counter()
    for _ in range(calls):
        metrics.observe_decode(model, 0.002)
        metrics.observe_queue(model, 0.0001)
        metrics.observe_batch(model, "onnxruntime-cpu", 1, 0.004)
        metrics.observe_request(model, 200, 0.007)
    return (time.perf_counter() - started) / calls * 1e6


def request_path_ms(repository: Path, model: str, image: bytes, requests: int, rounds: int) -> dict:
    """Median per-request time through the app with and without recording, alternated by round."""
    from fastapi.testclient import TestClient

    import service.app as app_module
    from service.config import Settings

    settings = Settings(model_repository=repository, models=[model], log_level="WARNING")
    timings: dict[str, list[float]] = {"with": [], "without": []}
    clients = {}
    for side, metrics_class in (("with", Metrics), ("without", NullMetrics)):
        app_module.Metrics = metrics_class
        try:
            client = TestClient(app_module.create_app(settings))
        finally:
            app_module.Metrics = Metrics
        client.__enter__()
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        clients[side] = client
    try:
        url = f"/classify?model={model}"
        headers = {"content-type": "image/jpeg"}
        for round_index in range(rounds):
            order = list(clients.items()) if round_index % 2 == 0 else list(clients.items())[::-1]
            for side, client in order:
                for _ in range(requests):
                    started = time.perf_counter()
                    response = client.post(url, content=image, headers=headers)
                    timings[side].append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)
    return {side: statistics.median(values) * 1e3 for side, values in timings.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="shufflenet_v2")
    parser.add_argument("--requests", type=int, default=100, help="requests per side per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)

    from contract.photos import photo_jpeg

    cost_us = recording_cost_us(args.model)
    path = request_path_ms(args.repository, args.model, photo_jpeg(500, 375), args.requests, args.rounds)
    difference = path["with"] - path["without"]
    print(f"metric calls per single-image request: {cost_us:.1f} us")
    print(
        f"request path, median of {args.requests * args.rounds} requests each ({args.model}, 500x375 JPEG): "
        f"with metrics {path['with']:.3f} ms, without {path['without']:.3f} ms, "
        f"difference {difference * 1e3:+.0f} us ({difference / path['without'] * 100:+.2f}%)"
    )


if __name__ == "__main__":
    main()
