"""Process-wide CPU settings: how OpenMP threads wait, how many run, how many processes load data.

How idle OpenMP threads wait is fixed when torch loads libgomp, from ``OMP_WAIT_POLICY`` and
``GOMP_SPINCOUNT`` in the environment, so it cannot be set here: ``spinedet/__init__.py`` sets
``GOMP_SPINCOUNT=3000`` (unless the environment names a wait policy) before it imports torch.
With libgomp's default, threads spin ~300,000 times at every barrier; when a neighbouring
process holds a core, the spinning thread burns the core its late partner needs (on 2 cores,
one busy process made training 2.1-5.6x slower). ``PASSIVE`` (no spinning) avoids that, but
then every parallel region wakes sleeping threads: 10-25% slower on a quiet machine. A short
spin keeps both (benchmarks/cpu_contention.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ["configure_cpu_threads", "cpu_budget", "loader_workers"]

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host should run 2 threads, not 64)."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def configure_cpu_threads(threads: int | None = None) -> int:
    """Run torch's intra-op work on ``threads`` threads; by default on :func:`cpu_budget`
    (torch counts every core of the host), unless ``OMP_NUM_THREADS`` is set (by the user, or
    by torchrun for several processes per node). Returns the thread count."""
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = threads or cpu_budget()
    torch.set_num_threads(threads)
    return threads


def loader_workers(workers: int | None, device: torch.device) -> int:
    """DataLoader processes: ``workers`` where given; by default (None) none for a CPU run on
    up to 4 cores per process (a loader process takes cores from the step's threads: 2 cores
    trained the quickstart at 6.5 images/s without one and 5.8 with one) and 2 on more; for a
    GPU run one per core the process can spare, up to 8, to keep the GPU fed. The cores are
    shared among the node's processes under torchrun."""
    if workers is not None:
        return workers
    cores = cpu_budget() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.device(device).type == "cpu":
        return 0 if cores <= 4 else 2
    return max(1, min(8, cores - 1))
