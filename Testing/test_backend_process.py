"""The local backend's child process, for real: a real job through ``python -m
LongitudinalDiffusionLib.backends.child`` with tiny untrained models, its events in order,
the process kept warm (same pid, the model loaded once), a polite cancel that keeps it,
a cancel that ends its whole process group, a process killed the way the out-of-memory
killer does, a weights file deleted after it was cached, an interpreter that does not
exist, close() within a second, and segmentation in the child.

And Slicer's condition: a main thread that holds the GIL while its event loop idles
(``usleep`` called through ``ctypes.PyDLL``, which keeps the GIL, 100 ms at a time) with
1 ms timer ticks that call ``poll()``. A run in the child keeps its pace; the same run on
a thread of this process (the former local backend) hardly moves.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ctypes
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from worker_harness import ROOT, ages_spec

from LongitudinalDiffusionLib.backends import LocalBackend, ProcessBackend, ThreadBackend
from LongitudinalDiffusionLib.backends.process import ChildSegmenter, JobProcessError, find_python
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.jobs import Backend, run_job
from LongitudinalDiffusionLib.progress import Cancelled

torch.set_num_threads(1)
POSIX = os.name == "posix"
# the fixtures cohort and models are in conftest.py


@pytest.fixture(scope="module")
def warm():
    """One backend whose child stays up across the tests that do not end it."""
    backend = LocalBackend(progress_interval=0.0)
    yield backend
    backend.close()


def gone(pid: int, within: float = 5.0) -> bool:
    """True once no process has this pid (or it is a zombie nobody reaped)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().split(") ")[1].startswith("Z"):
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.05)
    return False


def wait_for_progress(backend, job: str, timeout: float = 300.0) -> list:  # generous: a busy 2-core machine
    seen, deadline = [], time.monotonic() + timeout
    while not any(e.kind == "progress" for e in seen):
        assert time.monotonic() < deadline, f"no progress within {timeout} s: {seen}"
        seen += backend.poll(job)
        time.sleep(0.02)
    return seen


# ----------------------------------------------------------------------------- runs


def test_a_real_job_runs_in_the_child_with_its_events_in_order(warm, cohort, models):
    assert isinstance(warm, Backend)
    spec = ages_spec(cohort, str(models["interval"]), steps=3, seed=5)
    job = warm.submit(spec)
    result = warm.wait(job, timeout=180)
    events = warm.poll(job)
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done" and kinds.count("done") == 1
    assert [e.seq for e in events] == list(range(len(events)))
    progress = [e for e in events if e.kind == "progress"]
    assert progress and all(e.job_id == job for e in events)
    for a, b in zip(progress, progress[1:]):  # within a stage, steps only go forward
        assert b.stage != a.stage or b.step >= a.step
    assert any(e.step == e.total and e.total == 3 for e in progress)
    assert warm.child_pid not in (None, os.getpid())
    # the same numbers as in this process
    gap = spec.params["ages"][0]
    here = run_job(ages_spec(cohort, str(models["interval"]), steps=3, seed=5))
    assert np.array_equal(result.image("generated", gap).array, here.image("generated", gap).array)
    assert warm.poll(job) == [] and warm.status(job) == "done"


def test_the_child_stays_warm_and_loads_a_model_once(warm, cohort, models):
    first = warm.submit(ages_spec(cohort, str(models["interval"]), seed=1))
    warm.wait(first, timeout=180)
    pid, before = warm.child_pid, dict(warm.stats)
    assert pid is not None and before["pid"] == pid
    again = warm.submit(ages_spec(cohort, str(models["interval"]), seed=2))
    warm.wait(again, timeout=60)
    after = warm.stats
    assert warm.child_pid == pid and after["pid"] == pid and warm.starts == 1
    assert after["hits"] == before["hits"] + 1 and after["loads"] == before["loads"]  # a 'model cache hit'


def test_models_are_dropped_while_memory_is_short(cohort, models):
    # more memory asked to stay free than any machine has: only the model in use is kept
    with ProcessBackend(keep_free_mb=1e9) as backend:
        segmenter = ChildSegmenter(backend, "tissue-seg-brain-demo")
        scan = next((cohort / "sub-001").rglob("*T1w.nii.gz"))
        from LongitudinalDiffusionLib.imaging import load_image

        backend.wait(backend.submit(ages_spec(cohort, str(models["interval"]))), timeout=300)
        segmenter(load_image(scan))
        backend.wait(backend.submit(ages_spec(cohort, str(models["interval"]))), timeout=300)
        assert backend.stats["loads"] == 3 and backend.stats["hits"] == 0 and backend.stats["dropped"] == 2
        assert backend.stats["models"] == 1


def test_a_polite_cancel_keeps_the_child(warm, cohort, models):
    job = warm.submit(ages_spec(cohort, str(models["interval"]), steps=400))
    queued = warm.submit(ages_spec(cohort, str(models["interval"])))
    wait_for_progress(warm, job)
    pid = warm.child_pid
    warm.cancel(queued)
    started = time.monotonic()
    warm.cancel(job)
    with pytest.raises(Cancelled):
        warm.wait(job, timeout=30)
    assert time.monotonic() - started < 2.5  # within a step, not the grace period
    with pytest.raises(Cancelled):
        warm.result(queued)
    assert warm.poll(job)[-1].kind == "cancelled" and warm.status(queued) == "cancelled"
    after = warm.submit(ages_spec(cohort, str(models["interval"])))
    assert warm.wait(after, timeout=60).task == "complete-ages"
    assert warm.child_pid == pid


@pytest.mark.skipif(not POSIX, reason="process groups and FIFOs are POSIX")
def test_a_job_that_ignores_cancel_has_its_process_tree_ended(cohort, models, tmp_path):
    # A real way to hang out of reach of the sampler's cancel checks: an input on a
    # filesystem that never answers, here a FIFO nobody writes to (open() blocks).
    stuck = tmp_path / "stuck.nii.gz"
    os.mkfifo(stuck)
    spec = ages_spec(cohort, str(models["interval"]))
    spec.inputs[0].path = str(stuck)
    with ProcessBackend(cancel_grace=0.5) as backend:
        job = backend.submit(spec)
        deadline = time.monotonic() + 300
        while not any(e.kind == "started" for e in backend.poll(job)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = backend.child_pid
        time.sleep(0.5)  # into the blocking open()
        backend.cancel(job)
        with pytest.raises(Cancelled):
            backend.wait(job, timeout=10)
        assert gone(pid), "the job process is still there"
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing is left in its process group
        # the backend goes on with a new process
        again = backend.submit(ages_spec(cohort, str(models["interval"])))
        assert backend.wait(again, timeout=180).task == "complete-ages"
        assert backend.child_pid != pid and backend.starts == 2


@pytest.mark.skipif(not POSIX, reason="SIGKILL is POSIX")
def test_a_killed_child_fails_the_job_with_a_clear_message_and_the_backend_goes_on(cohort, models):
    with ProcessBackend() as backend:
        job = backend.submit(ages_spec(cohort, str(models["interval"]), steps=400))
        wait_for_progress(backend, job)
        pid = backend.child_pid
        os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer sends
        with pytest.raises(JobProcessError, match="SIGKILL") as info:
            backend.wait(job, timeout=30)
        message = str(info.value)
        assert "memory" in message and "its last messages: " in message  # with its last stderr lines
        last = backend.poll(job)[-1]
        assert last.kind == "failed" and last.message == message
        again = backend.submit(ages_spec(cohort, str(models["interval"])))
        assert backend.wait(again, timeout=180).task == "complete-ages"
        assert backend.child_pid != pid


@pytest.mark.skipif(not POSIX, reason="POSIX exit statuses")
def test_exit_statuses_are_told_in_words():
    from LongitudinalDiffusionLib.backends.process import describe_exit

    assert "killed (SIGSEGV)" in describe_exit(-11, [])
    # PythonSlicer is a launcher: it reports its Python's SIGKILL as 128 + 9
    assert "SIGKILL" in describe_exit(137, []) and "memory" in describe_exit(137, [])
    message = describe_exit(1, ["Traceback (most recent call last):", "x" * 500, "ImportError: no torch"])
    assert message.startswith("the job process exited with code 1; its last messages: ")
    assert message.endswith("ImportError: no torch") and len(message) < 600


def test_an_idle_child_ends_itself_and_the_next_job_starts_another(cohort, models):
    with ProcessBackend(idle_timeout=1.0) as backend:
        backend.wait(backend.submit(ages_spec(cohort, str(models["interval"]))), timeout=300)
        pid = backend.child_pid
        assert pid is not None and gone(pid, within=30)
        deadline = time.monotonic() + 10
        while backend.child_pid is not None:  # its exit reaches the backend through the reader thread
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert backend.wait(backend.submit(ages_spec(cohort, str(models["interval"]))), timeout=300)
        assert backend.starts == 2


def test_weights_deleted_after_they_were_cached_fail_clearly(cohort, models, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    card = Path(shutil.copy(models["interval"], folder))
    weights = json.loads(card.read_text())["weights"]["file"]
    shutil.copy(models["interval"].parent / weights, folder / weights)
    with ProcessBackend() as backend:
        backend.wait(backend.submit(ages_spec(cohort, str(card))), timeout=180)
        pid = backend.child_pid
        (folder / weights).unlink()
        job = backend.submit(ages_spec(cohort, str(card)))
        with pytest.raises(InputError, match="weights of model .* are missing"):
            backend.wait(job, timeout=60)
        assert backend.poll(job)[-1].kind == "failed" and backend.child_pid == pid


def test_an_interpreter_that_does_not_exist_fails_the_job_not_the_caller(cohort, models, tmp_path):
    with ProcessBackend(python=tmp_path / "no-python") as backend:
        job = backend.submit(ages_spec(cohort, str(models["interval"])))
        with pytest.raises(JobProcessError, match="cannot start the job process"):
            backend.wait(job, timeout=10)
        assert backend.poll(job)[-1].kind == "failed"
    assert find_python("x") == "x" and find_python() == sys.executable


def test_a_python_without_the_packages_fails_the_job_with_what_is_missing(cohort, models, tmp_path):
    # e.g. a PythonSlicer whose packages were never installed: the process exits with an error
    import venv

    venv.EnvBuilder(with_pip=False).create(tmp_path / "bare")
    bare = tmp_path / "bare" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    with ProcessBackend(python=bare) as backend:
        job = backend.submit(ages_spec(cohort, str(models["interval"])))
        with pytest.raises(JobProcessError, match="exited with code 1.*No module named") as info:
            backend.wait(job, timeout=60)
        assert backend.poll(job)[-1].message == str(info.value)


def test_close_returns_within_a_second_and_ends_the_child(cohort, models):
    backend = ProcessBackend()
    job = backend.submit(ages_spec(cohort, str(models["interval"]), steps=400))
    wait_for_progress(backend, job)
    pid = backend.child_pid
    started = time.monotonic()
    backend.close()
    assert time.monotonic() - started < 1.0
    assert gone(pid)
    with pytest.raises(Cancelled):
        backend.result(job)


def test_the_child_protocol_keeps_stdout_to_json_lines():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    answer = subprocess.run(
        [sys.executable, "-m", "LongitudinalDiffusionLib.backends.child"],
        input=b'not json\n{"op": "bogus"}\n{"op": "quit"}\n',
        capture_output=True,
        env=env,
        timeout=60,
    )
    lines = [json.loads(line) for line in answer.stdout.decode().splitlines()]
    assert [m["type"] for m in lines] == ["ready", "bye"] and lines[1]["reason"] == "quit"
    assert answer.returncode == 0 and b"not a JSON request" in answer.stderr


def test_segmentation_runs_in_the_child(warm, cohort):
    from LongitudinalDiffusionLib.catalog import load_model
    from LongitudinalDiffusionLib.imaging import Image, load_image
    from LongitudinalDiffusionLib.segmentation import segment

    scan = load_image(next((cohort / "sub-001").rglob("*T1w.nii.gz")))
    in_memory = Image(scan.array * 1.0, scan.affine)  # no file: sent as an array
    before = warm.jobs()
    segmenter = ChildSegmenter(warm, "tissue-seg-brain-demo")
    assert segmenter.classes[0] == "background" and len(segmenter.classes) == 4
    from_file, from_memory = segmenter.segment_many([scan, in_memory])
    loaded = load_model("tissue-seg-brain-demo")
    with torch.inference_mode():
        here = segment(loaded.network, scan, config=loaded.config, grid=loaded.card.card.get("grid"))
    assert np.array_equal(from_file.array, here.array) and np.array_equal(from_memory.array, here.array)
    assert np.allclose(from_file.affine, scan.affine) and from_file.array.dtype == np.int16
    assert warm.jobs() == before  # the segmentation job was forgotten
    assert len(set(np.unique(here.array))) > 1


# ----------------------------------------------------------------------------- Slicer's GIL


def _gil_holder():
    """``usleep`` called through ctypes.PyDLL: it blocks while holding the GIL, as Slicer's
    main thread does while Qt's event loop idles (a pure-Python busy loop would not do:
    the interpreter hands the GIL over every 5 ms)."""
    try:
        libc = ctypes.PyDLL(None)
        return libc.usleep
    except (OSError, AttributeError):
        return None


def _drive_with_gil_held(backend, job: str, seconds: float) -> tuple[bool, list[int], float]:
    """Hold the GIL 100 ms at a time with a 1 ms tick that polls the job, for up to
    ``seconds``; returns (finished, the sampling step seen at each tick, time taken)."""
    hold = _gil_holder()
    steps, finished, step = [], False, 0
    started = time.monotonic()
    while time.monotonic() - started < seconds and not finished:
        hold(100_000)
        for event in backend.poll(job):  # the timer tick
            if event.kind == "progress" and event.stage.endswith("generate"):
                step = event.step
            finished = finished or event.final
        steps.append(step)
    return finished, steps, time.monotonic() - started


@pytest.mark.skipif(_gil_holder() is None, reason="needs a C library to hold the GIL with (POSIX)")
def test_a_main_thread_that_holds_the_gil_does_not_slow_the_child(warm, cohort, models):
    steps = 30
    spec = lambda: ages_spec(cohort, str(models["interval"]), steps=steps)  # noqa: E731
    warm.wait(warm.submit(spec()), timeout=180)  # warm: imports and the model cached
    t0 = time.monotonic()
    warm.wait(warm.submit(spec()), timeout=180)
    idle = time.monotonic() - t0

    job = warm.submit(spec())
    finished, seen, busy = _drive_with_gil_held(warm, job, seconds=max(30.0, 10 * idle + 10))
    assert finished, f"the child's run did not finish while the main thread held the GIL ({seen})"
    assert busy < 3 * idle + 3.0, (busy, idle)
    assert len(set(seen)) >= 3  # steps advanced between the ticks, while the GIL was held

    # the same run on a thread of this process: it moves only during the ticks
    with ThreadBackend() as threaded:
        threaded.wait(threaded.submit(spec()), timeout=180)  # imports done, like the child
        job = threaded.submit(spec())
        finished, seen, _ = _drive_with_gil_held(threaded, job, seconds=max(3.0, 2 * busy))
        assert not finished and max(seen) < steps / 2, (seen, busy)
        threaded.cancel(job)
