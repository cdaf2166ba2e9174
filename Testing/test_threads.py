"""The thread policy (diffusion/threads.py): asked-for threads win, then LONGDIFF_THREADS /
OMP_NUM_THREADS, then the free cores; jobs running at once share them; a job's forwards run
with the count chosen for it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from LongitudinalDiffusionLib.diffusion import threads
from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_asked_for_threads_win_but_never_exceed_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(1) == (1, "asked for")
    n, _ = threads.choose_threads(10_000)
    assert n == threads.usable_cores()
    with pytest.raises(LongitudinalDiffusionError, match="at least 1"):
        threads.choose_threads(0)


def test_environment_is_this_process_share_divided_among_running_jobs(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    assert threads.choose_threads(concurrent=1) == (4, "OMP_NUM_THREADS=4")
    assert threads.choose_threads(concurrent=2)[0] == 2
    assert threads.choose_threads(concurrent=8)[0] == 1  # never below one
    monkeypatch.setenv(threads.THREADS_ENV, "3")  # the library's own variable wins
    assert threads.choose_threads(concurrent=1) == (3, "LONGDIFF_THREADS=3")
    monkeypatch.setenv(threads.THREADS_ENV, "many")  # ignored, with a warning
    assert threads.choose_threads(concurrent=1)[0] == 4


def test_free_cores_are_the_cores_other_processes_leave(no_env, monkeypatch):
    cores = threads.usable_cores()
    assert 1 <= threads.choose_threads(concurrent=1)[0] <= cores  # the real machine, whatever its load
    busy = threads.measured_busy()
    assert busy is None or 0.0 <= busy <= cores + 0.5  # Linux: measured from /proc/stat
    monkeypatch.setattr(threads, "measured_busy", lambda window=0.25: 0.0)
    assert threads.choose_threads(concurrent=1)[0] == cores  # idle: every core
    monkeypatch.setattr(threads, "measured_busy", lambda window=0.25: float(cores))
    n, why = threads.choose_threads(concurrent=1)
    assert n == 1 and f"1 of {cores} core(s) free" in why  # busy: one thread, never zero


def test_without_proc_stat_the_load_average_counts_without_our_own_work(no_env, monkeypatch):
    cores = threads.usable_cores()
    monkeypatch.setattr(threads, "measured_busy", lambda window=0.25: None)
    monkeypatch.setattr(threads, "own_load", lambda: 0.0)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.choose_threads(concurrent=1)[0] == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert threads.choose_threads(concurrent=1)[0] == 1
    # this process's own work is not someone else's load
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    monkeypatch.setattr(threads, "own_load", lambda: float(cores))
    assert threads.choose_threads(concurrent=1)[0] == cores


def test_own_load_sees_this_process_computing(monkeypatch):
    t0, c0 = time.monotonic(), time.process_time()
    monkeypatch.setattr(threads, "_samples", [(t0, c0)])
    while time.process_time() - c0 < 0.6:  # 0.6 s of CPU, however long a busy machine makes it
        pass
    share = (time.process_time() - c0) / (time.monotonic() - t0)
    assert threads.own_load() == pytest.approx(share, rel=0.2)


def test_jobs_running_at_once_share_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seen, hold, inside = [], threading.Event(), threading.Barrier(3)

    def job():
        with threads.job_slot():
            inside.wait()
            seen.append(threads.choose_threads()[0])
            hold.wait()

    workers = [threading.Thread(target=job) for _ in range(2)]
    for w in workers:
        w.start()
    inside.wait()
    time.sleep(0.1)
    assert threads.active_jobs() == 2
    hold.set()
    for w in workers:
        w.join()
    assert seen == [1, 1] and threads.active_jobs() == 0
    assert threads.choose_threads()[0] == 2


def test_a_job_runs_its_forwards_with_the_threads_it_asked_for(cohort, models, monkeypatch):
    from worker_harness import ages_spec

    from LongitudinalDiffusionLib.jobs import run_job

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    during = []
    spec = ages_spec(cohort, str(models["interval"]), threads=1)
    run_job(spec, progress=lambda e: during.append(torch.get_num_threads()))
    assert during and set(during) == {1}
