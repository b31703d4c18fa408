"""The batcher on its own, with a fake runtime: flush rules, failures, cancellation, deadlines, stop,
and where its stages run."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.core.batcher import Batcher
from service.core.fair_pool import FairPool
from service.core.metrics import Metrics
from service.errors import (
    InternalError,
    InvalidImage,
    InvalidParameter,
    ModelUnavailable,
    Overloaded,
    RequestTimeout,
)
from tests.fake_repository import FakeRuntime


def run(coro):
    return asyncio.run(coro)


def tensor(value: float) -> np.ndarray:
    """A (3, 2, 2) input whose sum is 12 * value: the fake runtime echoes the sum back."""
    return np.full((3, 2, 2), value, dtype=np.float32)


class Arrays:
    """Stages for items that are model inputs already: answers are the output rows as they are."""

    def prepare(self, item: np.ndarray) -> np.ndarray:
        return item

    def finish(self, item: np.ndarray, row: np.ndarray) -> np.ndarray:
        return row


def make(runtime: FakeRuntime, stages=None, **overrides) -> Batcher:
    options = {"max_batch_size": 4, "max_queue_delay_ms": 0, "max_queue_size": 16}
    return Batcher("m", runtime, stages or Arrays(), **(options | overrides))


async def until(condition, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


def test_full_batch_flushes_at_once():
    async def scenario():
        runtime = FakeRuntime()
        batcher = make(runtime, max_batch_size=4, max_queue_delay_ms=2000)
        batcher.start()
        started = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(tensor(i)) for i in range(4)))
        elapsed = time.monotonic() - started
        await batcher.stop()
        return runtime, results, elapsed

    runtime, results, elapsed = run(scenario())
    assert elapsed < 0.5  # nowhere near the 2 s delay
    assert runtime.batch_sizes == [4]
    assert [r.output[0] for r in results] == [12.0 * i for i in range(4)]
    assert all(r.batch_size == 4 for r in results)


def test_partial_batch_flushes_at_the_delay_after_its_first_request():
    async def scenario():
        runtime = FakeRuntime()
        batcher = make(runtime, max_batch_size=8, max_queue_delay_ms=150)
        batcher.start()
        started = time.monotonic()
        first = asyncio.create_task(batcher.submit(tensor(1)))
        await asyncio.sleep(0.08)
        second = asyncio.create_task(batcher.submit(tensor(2)))
        a, b = await asyncio.gather(first, second)
        elapsed = time.monotonic() - started
        await batcher.stop()
        return runtime, a, b, elapsed

    runtime, a, b, elapsed = run(scenario())
    # Closed 150 ms after the first request, not 150 ms after the second (230 ms).
    assert 0.14 <= elapsed < 0.22, elapsed
    assert runtime.batch_sizes == [2]
    assert (a.output[0], b.output[0]) == (12.0, 24.0)
    assert a.queue_s >= 0.14 and b.queue_s < a.queue_s


def test_zero_delay_takes_what_is_queued_without_waiting():
    async def scenario():
        gate = threading.Event()
        runtime = FakeRuntime(gate=gate)
        batcher = make(runtime, max_batch_size=4, max_queue_delay_ms=0, max_concurrent_batches=1)
        batcher.start()
        first = asyncio.create_task(batcher.submit(tensor(0)))
        await until(lambda: runtime.batches)
        rest = [asyncio.create_task(batcher.submit(tensor(i))) for i in range(1, 7)]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(first, *rest)
        await batcher.stop()
        return runtime

    runtime = run(scenario())
    # The six that queued while the first ran leave as full batches, capped at 4.
    assert runtime.batch_sizes == [1, 4, 2]


def test_an_error_fails_only_its_own_batch():
    async def scenario():
        runtime = FakeRuntime(fail_when=lambda batch: bool((batch < 0).any()))
        batcher = make(runtime, max_batch_size=3, max_queue_delay_ms=100)
        batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(tensor(1)),
            batcher.submit(tensor(-1)),
            batcher.submit(tensor(2)),
            return_exceptions=True,
        )
        after = await asyncio.gather(batcher.submit(tensor(3)), batcher.submit(tensor(4)))
        await batcher.stop()
        return runtime, outcomes, after

    runtime, outcomes, after = run(scenario())
    assert all(isinstance(o, InternalError) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 3  # each caller gets its own exception object
    assert "error" in outcomes[0].message
    assert [r.output[0] for r in after] == [36.0, 48.0]
    assert runtime.batch_sizes == [3, 2]


def test_output_length_mismatch_is_an_internal_error():
    class Short(FakeRuntime):
        def run(self, batch):
            return super().run(batch)[:-1]

    async def scenario():
        batcher = make(Short(), max_batch_size=2, max_queue_delay_ms=50)
        batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(tensor(1)), batcher.submit(tensor(2)), return_exceptions=True
        )
        await batcher.stop()
        return outcomes

    assert all(isinstance(o, InternalError) for o in run(scenario()))


def test_a_cancelled_caller_does_not_kill_the_loop():
    async def scenario():
        gate = threading.Event()
        runtime = FakeRuntime(gate=gate)
        batcher = make(runtime, max_batch_size=4, max_queue_delay_ms=0, max_concurrent_batches=1)
        batcher.start()
        running = asyncio.create_task(batcher.submit(tensor(1)))
        cancelled_in_batch = asyncio.create_task(batcher.submit(tensor(2)))
        await until(lambda: runtime.batches)
        queued = asyncio.create_task(batcher.submit(tensor(3)))
        cancelled_in_queue = asyncio.create_task(batcher.submit(tensor(99)))
        await asyncio.sleep(0.01)
        cancelled_in_batch.cancel()
        cancelled_in_queue.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        first, third = await asyncio.gather(running, queued)
        later = await batcher.submit(tensor(4))
        await batcher.stop()
        return runtime, first, third, later, cancelled_in_batch, cancelled_in_queue

    runtime, first, third, later, in_batch, in_queue = run(scenario())
    assert in_batch.cancelled() and in_queue.cancelled()
    assert (first.output[0], third.output[0], later.output[0]) == (12.0, 36.0, 48.0)
    assert [len(b) for b in runtime.batches] == [2, 1, 1]  # the one cancelled while queued never ran
    seen = np.concatenate([batch.reshape(len(batch), -1).sum(1) for batch in runtime.batches])
    assert 12.0 * 99 not in seen


def test_expired_requests_never_reach_the_runtime():
    async def scenario():
        gate = threading.Event()
        runtime = FakeRuntime(gate=gate)
        batcher = make(runtime, max_batch_size=4, max_concurrent_batches=1)
        batcher.start()
        running = asyncio.create_task(batcher.submit(tensor(1)))
        await until(lambda: runtime.batches)
        expiring = asyncio.create_task(batcher.submit(tensor(7), deadline=time.monotonic() + 0.05))
        fresh = asyncio.create_task(batcher.submit(tensor(2), deadline=time.monotonic() + 10))
        await asyncio.sleep(0.1)
        gate.set()
        outcomes = await asyncio.gather(running, expiring, fresh, return_exceptions=True)
        await batcher.stop()
        return runtime, outcomes

    runtime, (running, expiring, fresh) = run(scenario())
    assert isinstance(expiring, RequestTimeout)
    assert running.output[0] == 12.0 and fresh.output[0] == 24.0
    seen = np.concatenate([batch.reshape(len(batch), -1).sum(1) for batch in runtime.batches])
    assert 12.0 * 7 not in seen


def test_a_deadline_already_passed_is_dropped_by_the_worker():
    async def scenario():
        runtime = FakeRuntime()
        batcher = make(runtime)
        batcher.start()
        with pytest.raises(RequestTimeout):
            await batcher.submit(tensor(5), deadline=time.monotonic() - 1)
        await batcher.stop()
        return runtime

    assert run(scenario()).batches == []


def test_a_full_queue_raises_overloaded_with_retry_after():
    async def scenario():
        gate = threading.Event()
        runtime = FakeRuntime(gate=gate)
        batcher = make(runtime, max_batch_size=1, max_queue_size=2, max_concurrent_batches=1)
        batcher.start()
        running = asyncio.create_task(batcher.submit(tensor(1)))
        await until(lambda: runtime.batches)
        queued = [asyncio.create_task(batcher.submit(tensor(i))) for i in (2, 3)]
        await asyncio.sleep(0.01)
        assert batcher.depth == 2
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(tensor(4))
        gate.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return refused.value

    error = run(scenario())
    assert error.status_code == 429
    assert int(error.headers["Retry-After"]) >= 1


def test_stop_drains_queued_work_then_refuses_new():
    async def scenario():
        runtime = FakeRuntime(delay_s=0.02)
        batcher = make(runtime, max_batch_size=2, max_concurrent_batches=1)
        batcher.start()
        callers = [asyncio.create_task(batcher.submit(tensor(i))) for i in range(7)]
        await asyncio.sleep(0)  # let them queue
        await batcher.stop(grace_s=5)
        results = await asyncio.gather(*callers)
        with pytest.raises(ModelUnavailable):
            await batcher.submit(tensor(1))
        return runtime, results

    runtime, results = run(scenario())
    assert [r.output[0] for r in results] == [12.0 * i for i in range(7)]
    assert sum(runtime.batch_sizes) == 7 and max(runtime.batch_sizes) <= 2


def test_stop_past_its_grace_fails_what_is_left():
    async def scenario():
        gate = threading.Event()
        runtime = FakeRuntime(gate=gate)
        batcher = make(runtime, max_batch_size=1, max_concurrent_batches=1)
        batcher.start()
        callers = [asyncio.create_task(batcher.submit(tensor(i))) for i in range(3)]
        await until(lambda: runtime.batches)
        await batcher.stop(grace_s=0.05)
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        gate.set()
        return outcomes

    outcomes = run(scenario())
    assert all(isinstance(o, ModelUnavailable) for o in outcomes), outcomes


def test_concurrent_batches_and_metrics():
    async def scenario():
        metrics = Metrics(["m"])
        runtime = FakeRuntime(delay_s=0.05)
        batcher = Batcher(
            "m",
            runtime,
            Arrays(),
            max_batch_size=4,
            max_queue_delay_ms=0,
            max_queue_size=64,
            max_concurrent_batches=2,
            metrics=metrics,
        )
        batcher.start()
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(tensor(i)) for i in range(2)))
        # Two single-request batches ran side by side, not one after the other.
        assert time.monotonic() - started < 0.09
        await asyncio.gather(*(batcher.submit(tensor(i)) for i in range(16)))
        await batcher.stop()
        return runtime, metrics

    runtime, metrics = run(scenario())
    sample = metrics.registry.get_sample_value
    assert max(runtime.batch_sizes) <= 4
    assert sample("classifier_batch_size_count", {"model": "m"}) == len(runtime.batches)
    assert sample("classifier_batch_size_sum", {"model": "m"}) == 18
    assert sample("classifier_queue_duration_seconds_count", {"model": "m"}) == 18
    assert sample("classifier_images_total", {"model": "m"}) == 18
    assert sample("classifier_inference_duration_seconds_count", {"model": "m", "backend": "fake"}) == len(
        runtime.batches
    )


class Recorded:
    """Stages that note the thread each stage ran in: an item is a value, its input ``tensor(value)``;
    a negative value cannot be prepared and 9 cannot be finished; preparing 1 takes 10 ms."""

    def __init__(self) -> None:
        self.threads: dict[str, set[str]] = {"prepare": set(), "finish": set()}

    def prepare(self, value: float) -> np.ndarray:
        self.threads["prepare"].add(threading.current_thread().name)
        if value < 0:
            raise InvalidImage(f"cannot make input {value}")
        if value == 1:
            time.sleep(0.01)
        return tensor(value)

    def finish(self, value: float, row: np.ndarray) -> str:
        self.threads["finish"].add(threading.current_thread().name)
        if value == 9:
            raise InvalidParameter("cannot finish 9")
        return f"sum={row[0]:g} batch={row[1]:g}"


def test_inputs_prepared_and_outputs_finished_in_the_inference_thread_one_failure_fails_one_request():
    stages = Recorded()

    async def scenario():
        runtime = FakeRuntime()
        batcher = make(runtime, stages, max_batch_size=4, max_queue_delay_ms=200, max_concurrent_batches=1)
        batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(1),
            batcher.submit(-1),
            batcher.submit(2),
            batcher.submit(9),
            return_exceptions=True,
        )
        await batcher.stop()
        return runtime, outcomes

    runtime, (one, bad_input, two, bad_finish) = run(scenario())
    # The input that could not be made is left out of the batch; the others ran together.
    assert runtime.batch_sizes == [3]
    assert (one.output, two.output) == ("sum=12 batch=3", "sum=24 batch=3")
    assert isinstance(bad_input, InvalidImage) and isinstance(bad_finish, InvalidParameter)
    assert one.prepare_s >= 0.01 and two.prepare_s < 0.01
    assert stages.threads == {"prepare": {"infer-m-0"}, "finish": {"infer-m-0"}}


def test_with_a_prepare_pool_inputs_are_prepared_there_before_they_queue():
    stages = Recorded()

    async def scenario():
        runtime = FakeRuntime()
        with ThreadPoolExecutor(2, thread_name_prefix="prepare") as executor:
            batcher = make(
                runtime,
                stages,
                max_batch_size=4,
                max_queue_delay_ms=200,
                max_concurrent_batches=1,
                prepare_pool=FairPool(executor, 2),
            )
            batcher.start()
            outcomes = await asyncio.gather(
                batcher.submit(1),
                batcher.submit(-1),
                batcher.submit(2),
                batcher.submit(9),
                return_exceptions=True,
            )
            await batcher.stop()
        return runtime, outcomes

    runtime, (one, bad_input, two, bad_finish) = run(scenario())
    # An input that cannot be prepared never reaches the queue; the rest are batched ready-made.
    assert runtime.batch_sizes == [3]
    assert (one.output, two.output) == ("sum=12 batch=3", "sum=24 batch=3")
    assert isinstance(bad_input, InvalidImage) and isinstance(bad_finish, InvalidParameter)
    assert one.prepare_s >= 0.01  # the pool's stage, as its caller waited for it
    assert {name.split("_")[0] for name in stages.threads["prepare"]} == {"prepare"}
    assert stages.threads["finish"] == {"infer-m-0"}


def test_inference_threads_take_the_next_batch_without_the_event_loop():
    async def scenario():
        runtime = FakeRuntime(delay_s=0.01)
        batcher = make(runtime, max_batch_size=1, max_concurrent_batches=1)
        batcher.start()
        callers = [asyncio.create_task(batcher.submit(tensor(i))) for i in range(6)]
        await asyncio.sleep(0)  # every request queued
        # The event loop is blocked: only a thread that takes its work from the queue itself can
        # run one batch after another meanwhile.
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
        ran_while_blocked = len(runtime.batches)
        results = await asyncio.gather(*callers)
        await batcher.stop()
        return ran_while_blocked, results

    ran_while_blocked, results = run(scenario())
    assert ran_while_blocked == 6
    assert [r.output[0] for r in results] == [12.0 * i for i in range(6)]


def test_a_fault_outside_the_runtime_fails_its_batch_and_the_thread_serves_on():
    class FaultyMetrics(Metrics):
        faults = 1

        def observe_queue(self, model: str, seconds: float) -> None:
            if self.faults:
                self.faults -= 1
                raise RuntimeError("metrics fault")
            super().observe_queue(model, seconds)

    async def scenario():
        runtime = FakeRuntime()
        batcher = make(runtime, max_batch_size=1, max_concurrent_batches=1, metrics=FaultyMetrics(["m"]))
        batcher.start()
        with pytest.raises(InternalError):
            await batcher.submit(tensor(1), deadline=time.monotonic() + 2)
        after = await batcher.submit(tensor(2), deadline=time.monotonic() + 2)
        await batcher.stop()
        return after

    assert run(scenario()).output[0] == 24.0


def test_a_batch_whose_inputs_all_fail_never_reaches_the_runtime():
    async def scenario():
        runtime = FakeRuntime()
        batcher = make(runtime, Recorded(), max_batch_size=2, max_queue_delay_ms=100)
        batcher.start()
        outcomes = await asyncio.gather(batcher.submit(-1), batcher.submit(-2), return_exceptions=True)
        after = await batcher.submit(3)
        await batcher.stop()
        return runtime, outcomes, after

    runtime, outcomes, after = run(scenario())
    assert all(isinstance(outcome, InvalidImage) for outcome in outcomes)
    assert runtime.batch_sizes == [1] and after.output == "sum=36 batch=1"


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher("m", FakeRuntime(), Arrays(), max_batch_size=0, max_queue_delay_ms=0, max_queue_size=1)
    with pytest.raises(ValueError, match="max_queue_delay_ms"):
        Batcher("m", FakeRuntime(), Arrays(), max_batch_size=1, max_queue_delay_ms=-1, max_queue_size=1)
