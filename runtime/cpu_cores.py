"""The CPU cores this process may actually use: its affinity mask and its cgroup's CPU quota, not the machine's count.

``os.cpu_count()`` counts the machine. A container limited to 2 CPUs on a 64-core host, or a process pinned with
``taskset``, then starts 64 threads that queue for 2 cores. The quota is read as the kernel applies it: cgroup v2
``cpu.max`` ("max 100000" or "200000 100000") and cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 means no
limit), in the process's own cgroup and every ancestor up to the mount point (the tightest one binds).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MOUNTINFO = Path("/proc/self/mountinfo")


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, set[str]]]:
    """(root inside the hierarchy, mount point, file-system type, super options) of each cgroup mount."""
    mounts = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return mounts


def _cgroup_dirs(mount_root: str, mount_point: str, cgroup_path: str) -> list[Path]:
    """The process's cgroup folder under ``mount_point`` and its ancestors up to the mount point, innermost first.

    Inside a container the hierarchy's root is often mounted at the cgroup itself (the path is not under the mount):
    then only the mount point is read.
    """
    relative = os.path.relpath(cgroup_path, mount_root) if cgroup_path.startswith(mount_root) else "."
    folder, top = Path(mount_point) / relative, Path(mount_point)
    if relative.startswith("..") or not folder.is_dir():
        return [top]
    dirs = [folder]
    while folder != top:
        folder = folder.parent
        dirs.append(folder)
    return dirs


def _read_quota_v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" or float(period) <= 0 else float(quota) / float(period)


def _read_quota_v1(folder: Path) -> float | None:
    try:
        quota = float((folder / "cpu.cfs_quota_us").read_text())
        period = float((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_limit(cgroup_file: Path = PROC_CGROUP, mountinfo: Path = PROC_MOUNTINFO) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None when no quota applies or none is readable."""
    try:
        entries = [line.split(":", 2) for line in cgroup_file.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    limits = []
    for root, mount_point, fs_type, options in _mounts(mountinfo):
        for hierarchy, controllers, path in entries:
            if fs_type == "cgroup2" and hierarchy == "0" and controllers == "":
                read = _read_quota_v2
            elif fs_type == "cgroup" and "cpu" in controllers.split(",") and "cpu" in options:
                read = _read_quota_v1
            else:
                continue
            limits += [q for q in (read(folder) for folder in _cgroup_dirs(root, mount_point, path)) if q is not None]
    return min(limits) if limits else None


def available_cores(cgroup_file: Path = PROC_CGROUP, mountinfo: Path = PROC_MOUNTINFO) -> int:
    """Cores this process may run on: its affinity mask, capped by its cgroup's CPU quota rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_file, mountinfo)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)
