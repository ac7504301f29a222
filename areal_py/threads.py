"""How many torch threads a process may use without oversubscribing the machine.

torch's CPU ops run on OpenMP threads that spin at every barrier. When a process has more
threads than the cores actually free, a spinning thread burns the time slice its partner needs
and a step of the tiny models here gets several times slower, not merely shared (docs/threads.md).
One thread too few costs at most the parallel speed-up; one too many costs far more. So every
choice below rounds down and never goes under one thread per process.

`choose_threads` and `role_threads` are pure (cores, busy cores and processes in, threads out) so
the policy is tested on its own; `available_cores` and `busy_cores` read the machine.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def choose_threads(cores: int, busy: float, processes: int = 1) -> int:
    """Threads for each of `processes` processes computing at once, on `cores` usable cores of which
    `busy` are used by others: the free cores (rounded to the nearest whole core) shared evenly, at
    least 1. Never more than `cores // processes` (rounded up to 1), whatever `busy` says."""
    if cores < 1 or processes < 1:
        raise ValueError(f"cores and processes must be >= 1, got cores={cores}, processes={processes}")
    free = min(cores, max(0.0, cores - max(0.0, busy)))
    return max(1, int(free + 0.5) // processes)


def role_threads(role: str, mode: str, num_servers: int, cores: int, busy: float, configured: int = 0) -> int:
    """Threads of one role of a run. `configured` (run.torch_threads) wins when set. The controller
    does no tensor work worth a second thread. In sync mode trainer and servers take turns, so each
    may use all free cores; in async mode the trainer and every server compute at once and share them."""
    if configured:
        return configured
    if role == "controller":
        return 1
    processes = 1 if mode == "sync" else 1 + num_servers
    return choose_threads(cores, busy, processes)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = 0.5) -> float:
    """Cores that other processes keep busy now: the machine's busy share over `sample_s` seconds
    (this process sleeps meanwhile), in cores. Returns 0 where /proc/stat cannot be read.

    Not the load average: it lags a change by about a minute, so right after one run ends it still
    reads ~2 on an idle 2-core machine, and every run of a sweep or benchmark that starts then
    would get one thread where two are free."""
    try:
        b0, t0 = _proc_stat()
        time.sleep(sample_s)
        b1, t1 = _proc_stat()
    except (OSError, ValueError):
        return 0.0
    machine = os.cpu_count() or 1
    return machine * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def auto_threads(processes: int = 1) -> int:
    """`choose_threads` for this machine as it is now."""
    return choose_threads(available_cores(), busy_cores(), processes)
