"""A thread pool shared fairly: blocking jobs of several keys (models) take turns for its threads.

A plain executor serves its jobs first come, first served, so a burst of one model's uploads queues
ahead of every other model's: one flooded model would add its whole backlog to everyone's decode
time. Here each key has its own line, and whenever a thread frees up the next key in round-robin
order sends one job; a key that had nothing waiting joins at the front. A job whose caller gave up
while it waited is dropped, never run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class FairPool:
    """Runs blocking calls on ``executor``, at most ``workers`` at once, taking turns between keys.

    Use it from one event loop only (the app's): its bookkeeping is not thread-safe.
    """

    def __init__(self, executor: Executor, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self._executor = executor
        self._free = workers
        # Keys with jobs waiting, in turn order: the next turn is the first key. Insertion order of a
        # dict gives O(1) rotation (delete and re-insert a key to send it to the back).
        self._lines: dict[str, deque[_Job]] = {}

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a pool thread, when ``key``'s turn comes. Cancelling it before it starts
        drops it; once started, the call runs to its end in its thread and its result is discarded."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        line = self._lines.get(key)
        if line is None:
            # A key with nothing waiting goes first: a model that was idle waits for no other model's
            # backlog, only for a thread to free up. (Busy keys still alternate among themselves.)
            line = deque()
            self._lines = {key: line, **self._lines}
        line.append((future, fn, args))
        self._dispatch()
        return await future

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _dispatch(self) -> None:
        while self._free > 0 and self._lines:
            key = next(iter(self._lines))
            line = self._lines.pop(key)
            future, fn, args = line.popleft()
            if line:
                self._lines[key] = line  # back of the turn order
            if future.done():  # its caller gave up while it waited
                continue
            try:
                running = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
            except RuntimeError as exc:  # the executor is shut down: the app is stopping
                future.set_exception(exc)
                continue
            self._free -= 1
            running.add_done_callback(lambda done, future=future: self._finished(future, done))

    def _finished(self, future: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
        self._free += 1
        if not future.done():
            if done.cancelled():
                future.cancel()
            elif done.exception() is not None:
                future.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                future.set_result(done.result())
        self._dispatch()
