"""How many CPUs this process may use: the size the decode pool and the inference threads start from.

``os.cpu_count()`` counts the machine's cores. A process may use fewer: its affinity mask (a cpuset
narrows it) and its cgroup's CPU limit. A Kubernetes or Docker CPU limit is a quota, not an affinity
mask: counted from the cores alone, a pod limited to 2 CPUs on a 64-core node would start 65
inference threads per model.

Both readings fail soft, whatever the machine (x86-64, arm64 boards and servers, an emulator): a mask
that cannot be read falls back to ``os.cpu_count()``, and a cgroup file that is missing, unreadable
or not in the expected format counts as no limit; each logs why.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """CPUs this process may use, at least 1: the CPUs its affinity mask allows, and no more than its
    cgroup's CPU limit, rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    except OSError as exc:  # a sandbox (seccomp) or an emulator that refuses the call
        cpus = os.cpu_count() or 1
        log.warning("cannot read this process's CPU affinity (%s): counting the %d cores", exc, cpus)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cgroup_cpu_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The CPU limit of this process's cgroup in CPUs (quota / period), the tightest one on the way
    from the hierarchy's top to its own group; None when there is none (or no cgroups to read).

    cgroup v2: ``cpu.max`` ("max 100000", or "200000 100000" for 2 CPUs). v1: ``cpu.cfs_quota_us``
    (-1: none) over ``cpu.cfs_period_us``, under the cpu controller's mount.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except FileNotFoundError:  # no cgroups (not Linux, or no /proc in a bare chroot)
        return None
    except OSError as exc:
        log.warning("cannot read %s (%s): no cgroup CPU limit applied", proc_cgroup, exc)
        return None
    limits = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            log.warning("unexpected line in %s, skipped: %r", proc_cgroup, line)
            continue
        _, controllers, path = fields
        if controllers == "":
            mount = root
        elif "cpu" in controllers.split(","):
            mount = root / controllers
        else:
            continue
        # In a container the group's own path may not exist under the mount (it is the container's
        # root there): every directory that does exist along the path counts.
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts) + 1):
            limit = _cpu_quota(mount.joinpath(*parts[:depth]), v2=controllers == "")
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _cpu_quota(group: Path, *, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (group / "cpu.max").read_text().split()
        else:
            quota = (group / "cpu.cfs_quota_us").read_text().strip()
            period = (group / "cpu.cfs_period_us").read_text().strip()
    except FileNotFoundError:  # this level of the hierarchy sets no limit, or is not visible here
        return None
    except (OSError, ValueError) as exc:  # unreadable, or not "QUOTA PERIOD"
        log.warning("cannot read the CPU limit in %s (%s): ignored", group, exc)
        return None
    if quota in ("max", "-1"):
        return None
    try:
        limit = int(quota) / int(period)
    except (ValueError, ZeroDivisionError) as exc:
        log.warning("unexpected CPU limit %r / %r in %s (%s): ignored", quota, period, group, exc)
        return None
    return limit if limit > 0 else None
