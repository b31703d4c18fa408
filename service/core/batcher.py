"""Dynamic batching for one model: a bounded queue in front of a runtime, and its inference threads.

Callers see only ``with batcher.admit(): ... await batcher.submit(tensor, deadline=...)``. Admission
comes first, as soon as a request arrives: the model has ``max_queue_size`` places plus one per image
it can be running, and a request that finds them all taken is refused (429) before its body is read
or decoded, so a flood on one model never holds the memory and decode threads that the others need,
and an admitted request waits for at most what the places hold.

``max_concurrent_batches`` inference threads take their work from the queue themselves (as a
Triton model instance does): a free thread takes the first queued request, then keeps collecting
until the batch holds ``max_batch_size`` requests or ``max_queue_delay_ms`` have passed since that
first request arrived (not since the thread began waiting: a request that already waited while
the runtime was busy is not made to wait again), runs it and hands the answers to the event loop.
A thread that finishes a batch starts on the next at once: no round trip through the event loop
between batches, during which it would sit idle (on 2 cores, dispatching each batch from the loop
cost ShuffleNet v2 ~5% of its throughput at concurrency 16). Requests whose caller has gone or
whose deadline has passed are dropped before the runtime sees them. One failing batch fails its
own requests only.

The batcher knows nothing of HTTP or images. An input is a (3, H, W) array, or a callable that
makes one: then it is called in the inference thread just before its batch runs (a model that runs
one request per batch needs no separate stage, and no hand-off between threads, to prepare its
inputs). A caller may also pass ``finish``, applied to its output row in the inference thread too,
so that turning logits into an answer costs the event loop nothing. An input or finish that raises
fails its own request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.metrics import Metrics
from service.core.runtimes.base import Runtime
from service.errors import InternalError, ModelUnavailable, Overloaded, RequestTimeout

log = logging.getLogger(__name__)


Input = np.ndarray | Callable[[], np.ndarray]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's share of a batch: its output (the row, or what ``finish`` made of it) and where
    its time went."""

    output: Any
    queue_s: float
    inference_s: float
    batch_size: int
    prepare_s: float = 0.0  # making the input in the inference thread, when it was a callable


@dataclass(eq=False, slots=True)
class _Request:
    input: Input
    finish: Callable[[np.ndarray], Any] | None
    future: asyncio.Future[BatchResult]
    enqueued_at: float  # time.monotonic()
    deadline: float  # time.monotonic(); math.inf for none
    request_id: str | None


@dataclass(slots=True)
class _Outcome:
    """What the inference thread made of one request: its output, or why it failed."""

    output: Any = None
    error: BaseException | None = None
    prepare_s: float = 0.0


class BatchOutputMismatch(RuntimeError):
    """The runtime returned a different number of rows than it was given."""


_STOP = object()  # queued by stop(): everything queued before it is still served


class Batcher:
    """The queue and threads of one model. ``start()`` and ``stop()`` belong to the app's lifespan."""

    def __init__(
        self,
        model: str,
        runtime: Runtime,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms!r}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size!r}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches!r}")
        self.model = model
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self._metrics = metrics
        # Unbounded on purpose: submit() enforces max_queue_size, so that stop() can always enqueue _STOP.
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._threads_done: asyncio.Event | None = None
        self._threads_left = 0  # event-loop side: threads that have not yet exited
        self._closed = False
        self._busy = 0  # threads running a batch (written under _busy_lock, read anywhere)
        self._busy_lock = threading.Lock()
        self._admitted = 0  # requests between admit() and their answer
        self._pending: set[_Request] = set()  # submitted and not yet answered
        # Smoothed seconds per batch, for the Retry-After estimate; seeded with a pessimistic guess.
        self._batch_seconds = 0.05

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the inference threads; answers go to the running event loop."""
        if self._threads:
            raise RuntimeError(f"batcher for {self.model} already started")
        self._loop = asyncio.get_running_loop()
        self._threads_done = asyncio.Event()
        self._threads_left = self.max_concurrent_batches
        # Daemon threads: a runtime call stuck past the shutdown grace period cannot be interrupted,
        # and must not keep the process alive.
        self._threads = [
            threading.Thread(target=self._work, name=f"infer-{self.model}-{i}", daemon=True)
            for i in range(self.max_concurrent_batches)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new work, finish everything already queued, then end the threads.

        After ``grace_s`` seconds whatever is still queued or running is failed with 503.
        """
        if not self._threads or self._closed:
            self._closed = True
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        assert self._threads_done is not None
        try:
            async with asyncio.timeout(grace_s):
                await self._threads_done.wait()
        except TimeoutError:
            log.warning(
                "%s: batches still running after %.1f s of shutdown, failing them", self.model, grace_s
            )
            self._drop_queued()
        finally:
            for request in list(self._pending):
                if not request.future.done():
                    request.future.set_exception(ModelUnavailable(f"{self.model} is shutting down"))

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting batches already running)."""
        return self._queue.qsize()

    @property
    def capacity(self) -> int:
        """Requests admitted at once: the queue's places and one per image that can be running."""
        return self.max_queue_size + self.max_concurrent_batches * self.max_batch_size

    @property
    def in_progress(self) -> int:
        """Requests admitted and not yet answered (reading, decoding, queued or running)."""
        return self._admitted

    # --- the caller's side ----------------------------------------------------------------------
    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the model's places from a request's arrival to its answer.

        Raises Overloaded (with a Retry-After estimate) when every place is taken, and
        ModelUnavailable while stopping.
        """
        if self._closed or not self._threads:
            raise ModelUnavailable(f"{self.model} is not accepting requests (shutting down)")
        if self._admitted >= self.capacity:
            retry_after = self._retry_after_s(self._admitted)
            raise Overloaded(
                f"{self.model} is at capacity ({self._admitted} requests in progress); "
                f"retry in about {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def submit(
        self,
        input: Input,
        *,
        deadline: float | None = None,
        request_id: str | None = None,
        finish: Callable[[np.ndarray], Any] | None = None,
    ) -> BatchResult:
        """Queue one input (an array, or a callable that makes it) and wait for its output.

        Raises Overloaded (queue full, with a Retry-After estimate), RequestTimeout (``deadline``, a
        ``time.monotonic()`` value, passed first), ModelUnavailable (stopping) or InternalError.
        """
        if self._closed or not self._threads:
            raise ModelUnavailable(f"{self.model} is not accepting requests (shutting down)")
        depth = self.depth
        # Requests that an idle thread is about to take are not waiting: two requests admitted at
        # once into an empty model must not find its one-place queue full before a thread takes one.
        idle_threads = self.max_concurrent_batches - self._busy
        if depth >= self.max_queue_size + idle_threads * self.max_batch_size:
            retry_after = self._retry_after_s(depth)
            raise Overloaded(
                f"{self.model}'s queue is full ({depth} waiting); retry in about {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        now = time.monotonic()
        assert self._loop is not None
        request = _Request(
            input=input,
            finish=finish,
            future=self._loop.create_future(),
            enqueued_at=now,
            deadline=math.inf if deadline is None else deadline,
            request_id=request_id,
        )
        self._pending.add(request)
        self._queue.put(request)
        try:
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - now)):
                # Cancelling this await (timeout or a caller that gave up) cancels the future, which
                # the inference threads then skip.
                return await request.future
        except TimeoutError:
            raise RequestTimeout(
                f"{self.model}: request deadline passed after {time.monotonic() - now:.3f} s in the server"
            ) from None
        finally:
            self._pending.discard(request)

    def _retry_after_s(self, depth: int) -> int:
        batches_ahead = depth / self.max_batch_size + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds / self.max_concurrent_batches))

    # --- the inference threads' side ------------------------------------------------------------
    def _work(self) -> None:
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._collect()
                if batch:
                    try:
                        self._execute(batch)
                    except Exception:  # a fault outside the runtime: fail the batch, keep the thread
                        self._to_loop(_answer, self._failed(batch, "internal error"))
        finally:
            self._to_loop(self._thread_exited)

    def _collect(self) -> tuple[list[_Request], bool]:
        """One batch: the first live request, then more until full or the delay after it has passed."""
        batch: list[_Request] = []
        close_at = math.inf
        while len(batch) < self.max_batch_size:
            if not batch:
                item = self._queue.get()
            else:
                remaining = close_at - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Request)
            # Reading done() from this thread is a benign race: a caller that gives up just after
            # this check gets nothing, as it would had it given up a moment later.
            if item.future.done():  # the caller gave up (cancelled or timed out) while queued
                continue
            if not batch:
                close_at = item.enqueued_at + self.max_queue_delay_s
            batch.append(item)
        return batch, False

    def _execute(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        answers: list[tuple[_Request, BatchResult | Exception]] = []
        live = []
        for request in batch:
            if request.deadline <= started:
                waited = started - request.enqueued_at
                answers.append(
                    (
                        request,
                        RequestTimeout(
                            f"{self.model}: request deadline passed after {waited:.3f} s in queue"
                        ),
                    )
                )
            elif not request.future.done():
                live.append(request)
        if live:
            if self._metrics is not None:
                for request in live:
                    self._metrics.observe_queue(self.model, started - request.enqueued_at)
            with self._busy_lock:
                self._busy += 1
            try:
                answers += self._run(live, started)
            finally:
                with self._busy_lock:
                    self._busy -= 1
        if answers:
            self._to_loop(_answer, answers)

    def _run(self, live: list[_Request], started: float) -> list[tuple[_Request, BatchResult | Exception]]:
        try:
            outcomes, inference_s = _run_batch(self.runtime, [(r.input, r.finish) for r in live])
        except Exception:
            return self._failed(live, "inference failed")
        # The thread was held for the inputs' preparation and the run: that is what Retry-After waits.
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
        ran = sum(1 for outcome in outcomes if outcome.error is None)
        if self._metrics is not None and inference_s is not None:
            self._metrics.observe_batch(self.model, self.runtime.name, ran, inference_s)
        return [
            (
                request,
                outcome.error
                if outcome.error is not None
                else BatchResult(
                    outcome.output,
                    queue_s=started - request.enqueued_at,
                    inference_s=inference_s or 0.0,
                    batch_size=ran,
                    prepare_s=outcome.prepare_s,
                ),
            )
            for request, outcome in zip(live, outcomes, strict=True)
        ]

    def _failed(self, batch: list[_Request], what: str) -> list[tuple[_Request, BatchResult | Exception]]:
        """Log the exception being handled under a new error id; a 500 naming it for each request."""
        error_id = uuid.uuid4().hex[:12]
        log.exception(
            "%s: batch of %d failed (error %s; requests %s)",
            self.model,
            len(batch),
            error_id,
            ", ".join(request.request_id or "-" for request in batch),
        )
        # One exception object per caller: a shared one would collect every caller's traceback.
        return [(request, InternalError(f"{what} (error {error_id})")) for request in batch]

    # --- back on the event loop -----------------------------------------------------------------
    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _thread_exited(self) -> None:
        self._threads_left -= 1
        if self._threads_left == 0 and self._threads_done is not None:
            self._threads_done.set()

    def _drop_queued(self) -> None:
        """Empty the queue (its requests are failed by stop()), keeping one _STOP per live thread."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in range(self._threads_left):
            self._queue.put(_STOP)


def _answer(answers: list[tuple[_Request, BatchResult | Exception]]) -> None:
    for request, answer in answers:
        if request.future.done():
            continue
        if isinstance(answer, Exception):
            request.future.set_exception(answer)
        else:
            request.future.set_result(answer)


def _run_batch(
    runtime: Runtime, requests: list[tuple[Input, Callable[[np.ndarray], Any] | None]]
) -> tuple[list[_Outcome], float | None]:
    """One batch, in an inference thread: make the inputs that are callables, stack, run, finish.

    Returns each request's outcome and the seconds the runtime took (None when no input could be
    made). Stacking copies every tensor, which is no work for the event loop; a batch of one is a
    view, not a copy. A failure of the runtime itself raises: it fails the whole batch.
    """
    outcomes = [_Outcome() for _ in requests]
    tensors: list[np.ndarray] = []
    ready: list[tuple[_Outcome, Callable[[np.ndarray], Any] | None]] = []
    for outcome, (input, finish) in zip(outcomes, requests, strict=True):
        if callable(input):
            started = time.monotonic()
            try:
                input = input()
            except Exception as exc:
                outcome.error = exc
                continue
            finally:
                outcome.prepare_s = time.monotonic() - started
        tensors.append(input)
        ready.append((outcome, finish))
    if not tensors:
        return outcomes, None
    started = time.monotonic()
    logits = runtime.run(tensors[0][np.newaxis] if len(tensors) == 1 else np.stack(tensors))
    inference_s = time.monotonic() - started
    if len(logits) != len(tensors):
        raise BatchOutputMismatch(f"runtime returned {len(logits)} rows for a batch of {len(tensors)}")
    for (outcome, finish), row in zip(ready, logits, strict=True):
        try:
            outcome.output = row if finish is None else finish(row)
        except Exception as exc:
            outcome.error = exc
    return outcomes, inference_s
