"""How many CPU threads a job's network forwards use: chosen on purpose, never oversubscribed.

PyTorch on its own takes every core it sees, whatever else runs; on a busy machine that is
slower than one thread (docs/performance.md, "Threads on purpose": 2 threads on a 2-core
machine with a competing process spinning are several times slower than 1). The policy,
applied by every task (:func:`use_threads`, called when a task's options are read) on the
thread that runs the task:

1. **Asked for**: ``threads`` of the run (``--threads``, ``RunOptions.threads``, the job
   option ``threads``) is taken as given, at most the usable cores.
2. **The environment**: ``OMP_NUM_THREADS`` (or ``LONGDIFF_THREADS``, which wins), if set,
   is this process's share; it is divided among the jobs running at once in the process.
3. **Otherwise the free cores**: the cores this process may run on
   (``os.sched_getaffinity``, else ``os.cpu_count()``) minus the cores busy with other
   processes' work - measured over a quarter of a second from ``/proc/stat`` on Linux
   (the load average lags a minute behind: a competitor started seconds ago would not show
   in it), else the 1-minute load average; this process's own CPU use is never counted
   against itself - divided among the jobs running at once in this process
   (:func:`job_slot`: every job run through ``jobs.run_job``, i.e. in the warm job process
   and the worker's runner threads, holds one while it runs); at least 1.

The choice is made when a job starts; a job already running keeps its threads. Inside
Slicer, a job runs in the warm job process (its own process), so the application's own
threads are not changed by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: environment variable with the thread count of this process (wins over OMP_NUM_THREADS)
THREADS_ENV = "LONGDIFF_THREADS"

_lock = threading.Lock()
_active = 0
#: (wall clock, process CPU seconds) when the process started and when last sampled
_samples: list[tuple[float, float]] = [(time.monotonic(), time.process_time())]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def own_load() -> float:
    """This process's CPU use (cores busy, e.g. 1.0 for one thread running flat out) over the
    last minute or so, sampled between calls; it is part of the load average and must not
    count as someone else's work."""
    now, cpu = time.monotonic(), time.process_time()
    with _lock:
        # keep the oldest sample at most ~60 s old (the load average's own horizon)
        while len(_samples) > 1 and now - _samples[1][0] >= 60.0:
            _samples.pop(0)
        t0, c0 = _samples[0]
        _samples.append((now, cpu))
        del _samples[:-32]
    wall = now - t0
    return max(0.0, (cpu - c0) / wall) if wall > 0.5 else 0.0


def _cpu_times(cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) jiffies of the CPUs ``cpus`` (all if None) from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or len(fields) < 5:
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        total += sum(values)
        busy += sum(values) - idle
    return (busy, total) if total > 0 else None


def measured_busy(window: float = 0.25) -> float | None:
    """Cores of this process's CPU set busy with other processes' work, measured now over
    ``window`` seconds (/proc/stat, Linux); None where that cannot be read."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    first = _cpu_times(cpus)
    if first is None:
        return None
    t0, c0 = time.monotonic(), time.process_time()
    time.sleep(window)
    second = _cpu_times(cpus)
    wall, own = time.monotonic() - t0, time.process_time() - c0
    if second is None or second[1] <= first[1]:
        return None
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    share = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, share * n - own / max(wall, 1e-6))


def busy_cores() -> float:
    """Cores busy with other processes' work: measured over a quarter of a second where the
    system tells (:func:`measured_busy`), else the 1-minute load average minus this
    process's own recent use (:func:`own_load`); 0 where the system tells neither."""
    now = measured_busy()
    if now is not None:
        return now
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    return max(0.0, load - own_load())


def free_cores() -> int:
    """Usable cores minus the busy ones (rounded to the nearest core), at least 1."""
    cores = usable_cores()
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


def _env_threads() -> tuple[int, str] | None:
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                log.warning("%s=%r is not a whole number; ignored", name, text)
                continue
            if value >= 1:
                return value, name
    return None


def active_jobs() -> int:
    """Jobs of this process holding a :func:`job_slot` now."""
    with _lock:
        return _active


@contextlib.contextmanager
def job_slot() -> Iterator[int]:
    """Hold one of this process's running-job slots while a job runs; yields the number of
    jobs running at once (this one included). The share of cores of each new job is divided
    by it (:func:`choose_threads`)."""
    global _active
    with _lock:
        _active += 1
        n = _active
    try:
        yield n
    finally:
        with _lock:
            _active -= 1


def choose_threads(requested: int | None = None, concurrent: int | None = None) -> tuple[int, str]:
    """The thread count for a job starting now, and why (a short phrase for the log).

    ``requested``: the run's ``threads`` (None: not asked for). ``concurrent``: jobs running
    at once in this process, this one included (default :func:`active_jobs`, at least 1).
    """
    cores = usable_cores()
    if requested is not None:
        if requested < 1:
            from ..errors import LongitudinalDiffusionError

            raise LongitudinalDiffusionError(f"threads must be at least 1, not {requested}")
        return min(int(requested), cores), "asked for"
    jobs = max(1, concurrent if concurrent is not None else active_jobs())
    env = _env_threads()
    if env is not None:
        total, why = env[0], f"{env[1]}={env[0]}"
    else:
        total = free_cores()
        why = f"{total} of {cores} core(s) free"
    if jobs > 1:
        why += f", shared by {jobs} jobs"
    return max(1, total // jobs), why


def use_threads(requested: int | None = None, concurrent: int | None = None) -> int:
    """Apply :func:`choose_threads` to PyTorch on the calling thread (the one that will run
    the job's forwards); returns the count."""
    import torch

    n, why = choose_threads(requested, concurrent)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.debug("using %d CPU thread(s) (%s)", n, why)
    return n
