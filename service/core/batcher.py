"""Dynamic batching for one model: a bounded queue in front of a runtime, and its inference threads.

Callers see only ``with batcher.admit(): ... await batcher.submit(item, deadline=...)``. Admission
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

The batcher knows nothing of HTTP or images: it queues opaque items and calls the model's
:class:`Stages` on either side of the runtime, which runs the batch (like LitServe's LitAPI hooks):
``prepare`` turns an item into the model's input, ``finish`` turns the item's row of the output into
its answer, in the inference thread right after its batch, so that making an answer costs the event
loop nothing. Where ``prepare`` runs is fixed when the batcher is made: in the inference thread just
before the item's batch (a model that runs one request per batch then needs no separate stage, and
no hand-off between threads), or, given a ``prepare_pool``, in that pool as soon as the item is
submitted (a batch then collects ready inputs instead of preparing them one after another in its
thread). A ``prepare`` or ``finish`` that raises fails its own request only.
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
from typing import Any, Protocol, TypeVar

import numpy as np

from service.core.fair_pool import FairPool
from service.core.metrics import Metrics
from service.core.runtimes.base import Runtime
from service.errors import InternalError, ModelUnavailable, Overloaded, RequestTimeout

log = logging.getLogger(__name__)

Item = TypeVar("Item", contravariant=True)
Answer = TypeVar("Answer", covariant=True)


class Stages(Protocol[Item, Answer]):
    """What a model's requests go through on either side of its runtime."""

    def prepare(self, item: Item) -> np.ndarray:
        """The model's input for one item, a (3, H, W) array (e.g. one upload decoded)."""
        ...

    def finish(self, item: Item, row: np.ndarray) -> Answer:
        """The item's answer from its row of the batch's output (e.g. the logits ranked). The item
        carries what a request asks beyond its input (e.g. how many classes to rank)."""
        ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's share of a batch: its answer and where its time went."""

    output: Any
    queue_s: float
    inference_s: float
    batch_size: int
    # Preparing the input: in the inference thread, or waiting for and running in the prepare pool.
    prepare_s: float = 0.0


@dataclass(eq=False, slots=True)
class _Request:
    item: Any
    future: asyncio.Future[BatchResult]
    enqueued_at: float  # time.monotonic()
    deadline: float  # time.monotonic(); math.inf for none
    request_id: str | None
    input: np.ndarray | None = None  # prepared in the prepare pool, before it was queued
    prepare_s: float = 0.0
    # What the inference thread made of it: an answer, or why it failed.
    output: Any = None
    error: BaseException | None = None


class BatchOutputMismatch(RuntimeError):
    """The runtime returned a different number of rows than it was given."""


_STOP = object()  # queued by stop(): everything queued before it is still served


class Batcher:
    """The queue and threads of one model. ``start()`` and ``stop()`` belong to the app's lifespan."""

    def __init__(
        self,
        model: str,
        runtime: Runtime,
        stages: Stages[Any, Any],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        prepare_pool: FairPool | None = None,
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
        self._stages = stages
        self._prepare_pool = prepare_pool  # None: prepared in the inference thread
        self._metrics = metrics
        self._capacity = max_queue_size + max_concurrent_batches * max_batch_size
        # Unbounded on purpose: admission bounds what is queued, so that stop() can always enqueue _STOP.
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._threads_done: asyncio.Event | None = None
        self._threads_left = 0  # event-loop side: threads that have not yet exited
        self._closed = False
        self._admitted = 0  # requests between admit() and their answer
        self._pending: set[_Request] = set()  # submitted and not yet answered
        # Smoothed seconds per batch, for the Retry-After estimate; seeded with a pessimistic guess.
        self._batch_seconds = 0.05

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the inference threads; answers go to ``loop``, by default the running one. (A model
        loaded while others serve starts its threads from the thread that loaded it, so that they
        take that thread's scheduling, not the event loop's: see ``service/core/repository.py``.)"""
        if self._threads:
            raise RuntimeError(f"batcher for {self.model} already started")
        self._loop = loop or asyncio.get_running_loop()
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

    async def drain(self, grace_s: float) -> None:
        """Stop once every request already admitted or submitted has its answer: for a model that
        has been replaced, whose batcher no new request can reach any more, but whose last requests
        may still be reading their bodies. After ``grace_s`` seconds it stops regardless."""
        deadline = time.monotonic() + grace_s
        # Polled, not signalled: this runs once per replaced model, and an event set at the last answer
        # would cost every request a check.
        while (self._admitted or self._pending) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await self.stop(max(0.0, deadline - time.monotonic()))

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting batches already running)."""
        return self._queue.qsize()

    @property
    def capacity(self) -> int:
        """The model's places: its queue's, and one per image that can be running."""
        return self._capacity

    @property
    def in_progress(self) -> int:
        """Requests admitted and not yet answered (reading, decoding, queued or running)."""
        return self._admitted

    # --- the caller's side ----------------------------------------------------------------------
    def _claim_place(self, taken: int, counted: str) -> None:
        """The admission rule, the one check behind every 429: a place is free while fewer than
        ``capacity`` are taken. Raises Overloaded (with a Retry-After estimate) when none is, and
        ModelUnavailable while stopping.

        Places are taken at two moments, each counted against the same capacity. At the door, by
        :meth:`admit`: one per request, from its arrival (before its body is read, when how many
        images it holds is not yet known) to its answer. Inside, by :meth:`submit`: one per image,
        from its submission to its answer. A request of one image holds one place at each moment, so
        the second count refuses nothing the first admitted; it binds where images outnumber the
        requests that brought them (a multipart request's several files) and for callers in the
        process that submit without being admitted. Either way no more images are queued or running
        than the places hold.
        """
        if self._closed or not self._threads:
            raise ModelUnavailable(f"{self.model} is not accepting requests (shutting down)")
        if taken >= self._capacity:
            retry_after = self._retry_after_s(taken)
            raise Overloaded(
                f"{self.model} is at capacity ({taken} {counted}); retry in about {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the model's places from a request's arrival to its answer (see _claim_place)."""
        self._claim_place(self._admitted, "requests in progress")
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def submit(
        self, item: Any, *, deadline: float | None = None, request_id: str | None = None
    ) -> BatchResult:
        """Queue one item and wait for its answer: prepared, run in a batch, finished by the stages.

        Raises Overloaded (every place taken, see _claim_place), RequestTimeout (``deadline``, a
        ``time.monotonic()`` value, passed first), ModelUnavailable (stopping), InternalError, or
        what the stages raised for this item.
        """
        self._claim_place(len(self._pending), "images submitted")
        now = time.monotonic()
        assert self._loop is not None
        request = _Request(
            item=item,
            future=self._loop.create_future(),
            enqueued_at=now,
            deadline=math.inf if deadline is None else deadline,
            request_id=request_id,
        )
        self._pending.add(request)
        try:
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - now)):
                if self._prepare_pool is not None:
                    request.input = await self._prepare_pool.run(self.model, self._stages.prepare, item)
                    request.enqueued_at = time.monotonic()
                    # Wall time of the stage, waiting for a pool thread included: that is what it cost.
                    request.prepare_s = request.enqueued_at - now
                    if self._closed:
                        raise ModelUnavailable(f"{self.model} is not accepting requests (shutting down)")
                self._queue.put(request)
                # Cancelling this await (timeout or a caller that gave up) cancels the future, which
                # the inference threads then skip.
                return await request.future
        except TimeoutError:
            raise RequestTimeout(
                f"{self.model}: request deadline passed after {time.monotonic() - now:.3f} s in the server"
            ) from None
        finally:
            self._pending.discard(request)

    def _retry_after_s(self, taken: int) -> int:
        batches_ahead = taken / self.max_batch_size + 1
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
            answers += self._run(live, started)
        if answers:
            self._to_loop(_answer, answers)

    def _run(self, live: list[_Request], started: float) -> list[tuple[_Request, BatchResult | Exception]]:
        try:
            inference_s = _run_batch(self.runtime, self._stages, live, prepare=self._prepare_pool is None)
        except Exception:
            return self._failed(live, "inference failed")
        # The thread was held for the inputs' preparation and the run: that is what Retry-After waits.
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
        ran = sum(1 for request in live if request.error is None)
        if self._metrics is not None and inference_s is not None:
            self._metrics.observe_batch(self.model, self.runtime.name, ran, inference_s)
        return [
            (
                request,
                request.error
                if request.error is not None
                else BatchResult(
                    request.output,
                    queue_s=started - request.enqueued_at,
                    inference_s=inference_s or 0.0,
                    batch_size=ran,
                    prepare_s=request.prepare_s,
                ),
            )
            for request in live
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
    runtime: Runtime, stages: Stages[Any, Any], requests: list[_Request], *, prepare: bool
) -> float | None:
    """One batch, in an inference thread: prepare the inputs (unless the prepare pool has), stack,
    run, finish. Each request's answer or error is left on it.

    Returns the seconds the runtime took (None when no input could be prepared). Stacking copies
    every tensor, which is no work for the event loop; a batch of one is a view, not a copy. A failure
    of the runtime itself raises: it fails the whole batch.
    """
    tensors: list[np.ndarray] = []
    ready: list[_Request] = []
    for request in requests:
        if prepare:
            started = time.monotonic()
            try:
                tensor = stages.prepare(request.item)
            except Exception as exc:
                request.error = exc
                continue
            finally:
                request.prepare_s = time.monotonic() - started
        else:
            assert request.input is not None
            tensor = request.input
        tensors.append(tensor)
        ready.append(request)
    if not tensors:
        return None
    started = time.monotonic()
    logits = runtime.run(tensors[0][np.newaxis] if len(tensors) == 1 else np.stack(tensors))
    inference_s = time.monotonic() - started
    if len(logits) != len(tensors):
        raise BatchOutputMismatch(f"runtime returned {len(logits)} rows for a batch of {len(tensors)}")
    for request, row in zip(ready, logits, strict=True):
        try:
            request.output = stages.finish(request.item, row)
        except Exception as exc:
            request.error = exc
    return inference_s
