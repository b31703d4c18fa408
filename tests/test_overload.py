"""Overload: a flood several times one model's capacity against a real ``python -m service``.

The flooded model answers 429 with Retry-After instead of queueing without bound; the requests it
admits finish within what its queue can hold; the server's memory stays flat; the other model keeps
its latency within a stated factor of its idle latency (its own queue, and a fair share of the
decode threads and the CPU); and the flooded model serves normally the moment the flood stops.

Both models are the tiny test classifier made slow (~10 ms a request on one core), so the capacity
is small and known; the load generator is a lean HTTP client in this process, sharing the two
cores of the test box with the server, as a real neighbour would.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from contract.photos import encode, make_photo, photo_jpeg
from service.core.batcher import Batcher
from service.core.fair_pool import FairPool
from service.errors import ModelUnavailable, Overloaded
from tests.fake_repository import FakeRuntime
from tests.live_server import ServiceProcess, ready_service
from tests.workloads import MIB, RawClient, Reply, rss_bytes, write_heavy_model

FLOODED, OTHER = "mobilenet_v2", "shufflenet_v2"
QUEUE_SIZE = 8
FLOOD_CONNECTIONS = 128
FLOOD_FACTOR = 3  # offered load, in multiples of the flooded model's capacity
FLOOD_S = 4.0
JPEG = photo_jpeg(500, 375, seed=3)
# The flood sends PNGs: no reduced-scale decoding, so each costs its decode thread a few milliseconds.
FLOOD_PNG = encode(make_photo(320, 240, seed=4), "PNG")
HEADERS = {"Content-Type": "image/jpeg"}
PNG_HEADERS = {"Content-Type": "image/png"}

# Stated bounds, with margin for a shared two-core box where the load generator runs beside the server.
OTHER_P50_FACTOR = 6.0  # the other model's median latency under the flood, against its idle median
OTHER_SLACK_S = 0.050  # plus this much: scheduling noise at millisecond latencies
RSS_GROWTH_MIB = 48  # the server's resident memory, after the flood against before


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload") / "model_repository"
    for seed, name in enumerate((FLOODED, OTHER)):
        write_heavy_model(root, name, seed=seed)
    with ready_service(
        root,
        Path(tmp_path_factory.mktemp("overload-log")) / "service.log",
        MAX_QUEUE_SIZE=str(QUEUE_SIZE),
        DECODE_THREADS="2",
    ) as process:
        yield process


def classify_target(model: str) -> str:
    return f"/classify?model={model}&top_k=1"


async def sequential(client: RawClient, model: str, count: int) -> list[Reply]:
    return [await client.request("POST", classify_target(model), JPEG, HEADERS) for _ in range(count)]


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def flood_scenario(service: ServiceProcess) -> dict:
    host, port = "127.0.0.1", service.port
    probe = RawClient(host, port)
    await sequential(probe, FLOODED, 10)
    await sequential(probe, OTHER, 10)
    idle_other = [r.seconds for r in await sequential(probe, OTHER, 40)]
    idle_flooded = [r.seconds for r in await sequential(probe, FLOODED, 40)]
    # What the flooded model can serve: its two batches in flight (one per core), each taking an idle
    # request's time.
    capacity_per_s = 2 / statistics.median(idle_flooded)
    rss_before = rss_bytes(service.process.pid)

    # The flood: FLOOD_FACTOR times the capacity, spread over FLOOD_CONNECTIONS connections that each
    # send on a fixed schedule (a connection whose answer is late sends its next one on arrival).
    flood_replies: list[Reply] = []
    lost = 0
    started = time.monotonic()
    stop_at = started + FLOOD_S
    interval_s = FLOOD_CONNECTIONS / (FLOOD_FACTOR * capacity_per_s)

    async def flooder(index: int) -> None:
        nonlocal lost
        client = RawClient(host, port)
        send_at = started + index * interval_s / FLOOD_CONNECTIONS
        while send_at < stop_at:
            await asyncio.sleep(max(0.0, send_at - time.monotonic()))
            send_at += interval_s
            try:
                reply = await client.request("POST", classify_target(FLOODED), FLOOD_PNG, PNG_HEADERS)
                flood_replies.append(reply)
            except ConnectionError:
                lost += 1
        await client.close()

    other_replies: list[Reply] = []

    async def neighbour() -> None:
        await asyncio.sleep(0.5)  # let the flood build up first
        while time.monotonic() < stop_at:
            other_replies.append(await probe.request("POST", classify_target(OTHER), JPEG, HEADERS))
            await asyncio.sleep(0.01)

    rss_samples: list[int] = []

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            rss_samples.append(rss_bytes(service.process.pid))
            await asyncio.sleep(0.2)

    await asyncio.gather(*(flooder(i) for i in range(FLOOD_CONNECTIONS)), neighbour(), sample_rss())
    flood_ended = time.monotonic()
    # Recovery: the flooded model, right after the flood, as if nothing had happened.
    recovery = await sequential(probe, FLOODED, 20)
    recovered_after_s = time.monotonic() - flood_ended
    rss_after = rss_bytes(service.process.pid)
    await probe.close()
    return {
        "capacity_per_s": capacity_per_s,
        "flood_s": flood_ended - started,
        "idle_other": idle_other,
        "idle_flooded": idle_flooded,
        "flood": flood_replies,
        "lost": lost,
        "other": other_replies,
        "recovery": recovery,
        "recovered_after_s": recovered_after_s,
        "rss_before": rss_before,
        "rss_peak": max(rss_samples),
        "rss_after": rss_after,
    }


def test_a_flood_on_one_model_is_refused_at_its_door_and_spares_the_other(service):
    result = asyncio.run(flood_scenario(service))
    flood: list[Reply] = result["flood"]
    codes = Counter(r.status for r in flood)
    admitted = [r.seconds for r in flood if r.status == 200]
    other = [r.seconds for r in result["other"]]
    idle_other_p50 = statistics.median(result["idle_other"])
    idle_flooded_p50 = statistics.median(result["idle_flooded"])
    offered_per_s = len(flood) / result["flood_s"]
    served_per_s = codes[200] / result["flood_s"]
    report = {
        "capacity req/s": round(result["capacity_per_s"]),
        "flood requests": len(flood),
        "codes": dict(codes),
        "lost": result["lost"],
        "offered req/s": round(offered_per_s),
        "served req/s": round(served_per_s),
        "admitted p50/p99/max ms": [round(1000 * p(admitted, q), 1) for q in (0.5, 0.99, 1.0)],
        "idle flooded p50 ms": round(1000 * idle_flooded_p50, 1),
        "other idle p50 ms": round(1000 * idle_other_p50, 1),
        "other flooded p50/p95 ms": [round(1000 * p(other, q), 1) for q in (0.5, 0.95)],
        "other requests": len(other),
        "recovery p50 ms": round(1000 * statistics.median(r.seconds for r in result["recovery"]), 1),
        "rss before/peak/after MiB": [
            round(result[k] / MIB, 1) for k in ("rss_before", "rss_peak", "rss_after")
        ],
    }
    print("overload:", json.dumps(report))

    # Nothing lost, nothing but answers and refusals.
    assert result["lost"] == 0, report
    assert set(codes) <= {200, 429} and codes[429] > 0 and codes[200] > 0, report
    assert offered_per_s >= 2.5 * result["capacity_per_s"], f"the flood fell short: {report}"
    for reply in flood:
        if reply.status == 429:
            assert int(reply.headers["retry-after"]) >= 1
            assert json.loads(reply.body)["error"]["code"] == "overloaded"
    # Admitted requests wait at most for what the model's places hold: the queue plus the batches
    # running (two on this box), each an idle request's time; tripled for the CPU the flood's refusals
    # and the load generator take, plus slack. (Before admission moved ahead of the body and the
    # decode, this run gave an admitted p99 of ~1.6 s and the other model a median of ~440 ms.)
    places = QUEUE_SIZE + 2
    bound_s = 3 * (places + 1) * idle_flooded_p50 + 0.5
    assert p(admitted, 0.99) <= bound_s, (bound_s, report)
    # The other model: every request answered, its median within the stated factor of idle.
    assert all(r.status == 200 for r in result["other"]) and len(other) >= 10, report
    assert p(other, 0.5) <= OTHER_P50_FACTOR * idle_other_p50 + OTHER_SLACK_S, report
    # Memory flat: what the flood left behind, and at its peak.
    assert result["rss_after"] - result["rss_before"] <= RSS_GROWTH_MIB * MIB, report
    assert result["rss_peak"] - result["rss_before"] <= 2 * RSS_GROWTH_MIB * MIB, report
    # Recovery at once: the first request after the flood is served, and so is every one after it.
    assert [r.status for r in result["recovery"]] == [200] * len(result["recovery"]), report
    assert statistics.median(r.seconds for r in result["recovery"]) <= 3 * idle_flooded_p50 + OTHER_SLACK_S, (
        report
    )


# --- the parts on their own -----------------------------------------------------------------------
class Arrays:
    """Batcher stages for items that are model inputs already."""

    def prepare(self, item: np.ndarray) -> np.ndarray:
        return item

    def finish(self, item: np.ndarray, row: np.ndarray) -> np.ndarray:
        return row


def test_the_decode_pool_takes_turns_between_models():
    """A backlog of one model's decodes does not queue ahead of another model's next one."""
    order: list[str] = []
    gate = threading.Event()

    def job(name: str) -> str:
        gate.wait(5)
        order.append(name)
        return name

    async def scenario() -> list[str]:
        with ThreadPoolExecutor(1) as executor:
            pool = FairPool(executor, 1)
            flood = [asyncio.ensure_future(pool.run("flooded", job, f"flooded-{i}")) for i in range(20)]
            await asyncio.sleep(0.01)
            other = asyncio.ensure_future(pool.run("other", job, "other"))
            dropped = flood[5]
            dropped.cancel()  # a caller that gives up while waiting: its job never runs
            await asyncio.sleep(0.01)
            gate.set()
            results = await asyncio.gather(*flood, other, return_exceptions=True)
            assert pool.waiting == 0
            return [r for r in results if isinstance(r, str)]

    results = asyncio.run(scenario())
    # The first flooded job was already running; the other model's job went next, not 19 jobs later.
    assert order[:2] == ["flooded-0", "other"], order
    assert "flooded-5" not in order and len(results) == 20


def test_admission_counts_requests_from_arrival_to_answer():
    runtime = FakeRuntime()

    async def scenario() -> None:
        batcher = Batcher("m", runtime, Arrays(), max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
        batcher.start()
        assert batcher.capacity == 3
        with batcher.admit(), batcher.admit(), batcher.admit():
            assert batcher.in_progress == 3
            with pytest.raises(Overloaded) as refused, batcher.admit():
                pass
            assert int(refused.value.headers["Retry-After"]) >= 1
        assert batcher.in_progress == 0
        with batcher.admit():  # places come back however the request ended
            pass
        await batcher.stop(1)
        with pytest.raises(ModelUnavailable), batcher.admit():
            pass

    asyncio.run(scenario())


def test_requests_admitted_together_are_not_refused_by_the_queue_before_the_worker_runs():
    """Admission holds queue + running places; the queue check must agree with it. Two requests
    submitted in one loop turn into an idle one-place model used to find the queue full (429)."""
    runtime = FakeRuntime()

    async def scenario() -> list:
        batcher = Batcher("m", runtime, Arrays(), max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1)
        batcher.start()
        await asyncio.sleep(0)  # the worker waits for its first request
        one = np.full((3, 2, 2), 1, np.float32)
        results = await asyncio.gather(batcher.submit(one), batcher.submit(one), return_exceptions=True)
        await batcher.stop(1)
        return results

    results = asyncio.run(scenario())
    assert not any(isinstance(r, Exception) for r in results), results


def test_one_request_of_many_images_gets_no_more_places_than_the_model_has():
    """Places are counted per request at the door and per image inside, against one capacity: the
    images of a single admitted request (multipart) fill the places and the next one is refused."""
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)

    async def scenario() -> tuple[list, Overloaded]:
        batcher = Batcher("m", runtime, Arrays(), max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
        batcher.start()
        one = np.full((3, 2, 2), 1, np.float32)
        with batcher.admit():
            images = [asyncio.ensure_future(batcher.submit(one)) for _ in range(batcher.capacity)]
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded) as refused:
                await batcher.submit(one)
            gate.set()
            results = await asyncio.gather(*images)
        await batcher.stop(1)
        return results, refused.value

    results, refused = asyncio.run(scenario())
    assert len(results) == 3 and int(refused.headers["Retry-After"]) >= 1
