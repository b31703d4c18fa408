"""CPU time from Linux's /proc: a server's event-loop thread, its other threads, and the machine.

``make bench`` says how far the served path falls short of the same work in-process; these figures
say where the difference goes. With every core busy, requests/s is cores / (CPU per request), so the
served path's CPU per request (its event loop, its inference and decode threads, the load generator
that shares the machine) against the in-process CPU per request, plus the cores left idle, accounts
for the whole gap.

The server's main thread is where uvicorn runs its event loop; every other thread of the process
(inference, decode, log writer) is counted together. The kernel counts in clock ticks (10 ms
usually): over a level of several seconds and thousands of requests, a few microseconds a request.
Where there is no /proc, :func:`read` returns None and the figures are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# What CpuTimes.per_request reports, by name (results.json and the report read them back).
PER_REQUEST_KEYS = ("event_loop_ms_per_request", "other_threads_ms_per_request", "machine_idle_percent")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuTimes:
    """Seconds of CPU since boot (or, as a difference, over a window)."""

    main_thread_s: float  # the process's first thread: the event loop
    process_s: float  # every thread of the process, exited ones included
    machine_busy_s: float  # all cores, everything but idle and waiting for I/O
    machine_idle_s: float

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(
            self.main_thread_s - other.main_thread_s,
            self.process_s - other.process_s,
            self.machine_busy_s - other.machine_busy_s,
            self.machine_idle_s - other.machine_idle_s,
        )

    def per_request(self, requests: int) -> dict[str, float] | None:
        """ms of each kind of CPU per request, and the machine's idle share, over a window."""
        machine = self.machine_busy_s + self.machine_idle_s
        if requests <= 0 or machine <= 0:
            return None
        values = (
            1000 * self.main_thread_s / requests,
            1000 * (self.process_s - self.main_thread_s) / requests,
            100 * self.machine_idle_s / machine,
        )
        return dict(zip(PER_REQUEST_KEYS, values, strict=True))


def read(pid: int) -> CpuTimes | None:
    """The process's and the machine's CPU times now; None without /proc or once the process is gone."""
    try:
        main = _thread_ticks(Path(f"/proc/{pid}/task/{pid}/stat"))
        process = _thread_ticks(Path(f"/proc/{pid}/stat"))
        busy, idle = _machine_ticks()
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(main / _TICKS_PER_S, process / _TICKS_PER_S, busy / _TICKS_PER_S, idle / _TICKS_PER_S)


def _thread_ticks(stat: Path) -> int:
    # proc(5): utime and stime are fields 14 and 15; the command name before them may hold spaces.
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _machine_ticks() -> tuple[int, int]:
    # proc(5) /proc/stat "cpu": user nice system idle iowait irq softirq steal (guest is within user).
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, idle
