"""How the operating system shares the cores between the event loop and the inference threads.

Under full load every core runs an inference thread, and the event loop thread wakes for each
request that arrives and each answer that comes back. Linux lets a waking thread preempt a running
one at once (the default policy, SCHED_OTHER), so every wake-up interrupted an inference thread
mid-run: two context switches and a cold cache per event, and the loop handling one event per
wake-up. Marked SCHED_BATCH, the loop thread does not preempt when it wakes: it runs as soon as a
core comes free (an inference thread waiting for the GIL, or at the end of a time slice) and then
handles every event that has arrived in the meantime. When a core is idle (light load) a waking
SCHED_BATCH thread takes it at once, so a lone request waits no longer.

Measured on 2 cores at concurrency 16, alternating rounds, three inference threads per model (the
CPU default), ShuffleNet v1: with the loop preempting, 233-245 req/s, 0.53-0.55 ms of the loop's CPU
per request and 1.9-2.4% of the cores idle; with the loop waiting its turn, 258-259 req/s, 0.41-0.46
ms and 1.4-1.6% (two of three rounds; the third was disturbed). Against the previous defaults (two
threads, a preempting loop): ShuffleNet v1 229.5 -> 249.9 req/s (median of 3), ShuffleNet v2 and
MobileNet v2 +2-7% a round. p50 at concurrency 1 unchanged. With two inference threads, the loop
waiting its turn left cores idle (3.5-4.9%) and gained nothing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def stop_preempting() -> bool:
    """Mark the calling thread SCHED_BATCH (see above). Threads it starts afterwards inherit it.

    Returns False where the platform has no SCHED_BATCH (not Linux) or refuses the change.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError as exc:  # a seccomp profile that forbids it, say: serve on, as before
        log.warning("cannot make the event loop thread SCHED_BATCH: %s", exc)
        return False
    return True
