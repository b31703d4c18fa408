"""How many CPUs this process may use: the size the decode pool and the inference threads start from.

``os.cpu_count()`` counts the machine's cores. A process may use fewer: its affinity mask (a cpuset
narrows it) and its cgroup's CPU limit. A Kubernetes or Docker CPU limit is a quota, not an affinity
mask: counted from the cores alone, a pod limited to 2 CPUs on a 64-core node would start 65
inference threads per model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_count() -> int:
    """CPUs this process may use, at least 1: the CPUs its affinity mask allows, and no more than its
    cgroup's CPU limit, rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
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
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
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
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
