"""Local jobs: :class:`LocalBackend` runs them in a warm child Python process
(:class:`~.process.ProcessBackend`); :class:`ThreadBackend` on a thread of this process.

The Slicer panel uses :class:`LocalBackend` when no worker is configured: the GUI thread
submits a spec, drains events with ``poll`` on a timer and never blocks. The work runs in a
child process because inside Slicer the main thread holds Python's GIL while the event
loop idles: a thread of the application would advance only during timer ticks (see
``docs/performance.md``, "Local jobs in a child process").

:class:`ThreadBackend` is the former in-process backend, kept for what a child process
cannot do: running a runner function given by the caller (a test's instrumented runner) and
the comparison of ``bench/gil_starvation.py``. Cancelling sets the job's
:class:`~LongitudinalDiffusionLib.progress.CancelToken`; the sampler stops within a step and
nothing is kept (results live in memory until taken; nothing is written).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LongitudinalDiffusionError
from ..jobs import JobEvent, JobSpec, run_job
from ..progress import Cancelled, CancelToken, ProgressEvent
from .jobtable import JobTable
from .process import ProcessBackend

log = logging.getLogger(__name__)

Runner = Callable[..., Any]  # run_job(spec, progress=..., cancel=...) -> Result


@dataclass
class _Job:
    job_id: str
    spec: JobSpec
    cancel: CancelToken = field(default_factory=CancelToken)
    events: list[JobEvent] = field(default_factory=list)
    cursor: int = 0  # events already handed out by poll()
    state: str = "queued"
    result: Any = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class LocalBackend(ProcessBackend):
    """The local backend: jobs in a warm child process (see :class:`~.process.ProcessBackend`
    for the arguments: ``python``, ``progress_interval``, ``idle_timeout``, ``cache_size``,
    ``keep_free_mb``, ``cancel_grace``, ``env``)."""


class ThreadBackend(JobTable[_Job]):
    """Runs jobs with :func:`~LongitudinalDiffusionLib.jobs.run_job` on one background thread.

    Args:
        runner: what runs a spec (tests pass their own); ``run_job`` by default.
        progress_interval: progress events of one stage closer than this (seconds) are
            merged (the last step of a stage is always kept).

    Thread-safe: every method may be called from any thread.
    """

    def __init__(self, *, runner: Runner = run_job, progress_interval: float = 0.0) -> None:
        self._runner = runner
        self._interval = progress_interval
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="longdiff-local-backend", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ Backend

    def submit(self, spec: JobSpec) -> str:
        spec.validate()
        job = _Job(uuid.uuid4().hex, spec)
        with self._lock:
            if self._closed:
                raise LongitudinalDiffusionError("the local backend is closed")
            self._jobs[job.job_id] = job
            self._emit(job, JobEvent(job.job_id, "queued", message=f"{spec.task} with {spec.model}"))
            self._queue.append(job.job_id)
            self._wake.notify_all()
        return job.job_id

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self._get(job_id)
            if job.state == "queued":
                self._queue.remove(job_id)
                self._finish(job, "cancelled", error=Cancelled("queue"), message="cancelled before it started")
            elif job.state == "running":
                job.cancel.cancel()

    def wait(self, job_id: str, timeout: float | None = None) -> Any:
        with self._lock:
            job = self._get(job_id)
        if not job.finished.wait(timeout):
            raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s")
        return self._outcome(job)

    def delete(self, job_id: str) -> None:
        """Forget a job (cancelling it first if it has not finished)."""
        self.cancel(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.finished.wait()
            with self._lock:
                self._jobs.pop(job_id, None)

    def close(self) -> None:
        """Cancel every job and stop the thread."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.state == "queued":
                    self._finish(job, "cancelled", error=Cancelled("queue"), message="the backend was closed")
                elif job.state == "running":
                    job.cancel.cancel()
            self._queue.clear()
            self._wake.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def __enter__(self) -> ThreadBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _emit(self, job: _Job, event: JobEvent) -> None:
        event.seq = len(job.events)
        job.events.append(event)

    def _finish(self, job: _Job, state: str, *, result: Any = None, error: BaseException | None = None,
                message: str = "") -> None:  # fmt: skip
        job.state, job.result, job.error = state, result, error
        self._emit(job, JobEvent(job.job_id, state, message=message))
        job.finished.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                job = self._jobs[self._queue.popleft()]
                job.state = "running"
                self._emit(job, JobEvent(job.job_id, "started"))
            self._run(job)

    def _run(self, job: _Job) -> None:
        last: dict[str, float] = {}

        def progress(e: ProgressEvent) -> None:
            now = time.monotonic()
            if self._interval and e.step < e.total and now - last.get(e.stage, 0.0) < self._interval:
                return
            last[e.stage] = now
            with self._lock:
                self._emit(job, JobEvent.from_progress(job.job_id, e))

        t0 = time.perf_counter()
        try:
            result = self._runner(job.spec, progress=progress, cancel=job.cancel)
        except Cancelled as exc:
            with self._lock:
                self._finish(job, "cancelled", error=exc, message=str(exc))
        except BaseException as exc:  # every failure ends the job, never the thread
            log.debug("job %s failed", job.job_id, exc_info=True)
            with self._lock:
                self._finish(job, "failed", error=exc, message=describe_error(exc))
        else:
            with self._lock:
                if job.cancel.cancelled:  # cancelled after the last step: honour it, keep nothing
                    self._finish(job, "cancelled", error=Cancelled("finishing"), message="cancelled")
                else:
                    self._finish(job, "done", result=result, message=f"finished in {time.perf_counter() - t0:.1f} s")


def describe_error(exc: BaseException) -> str:
    """A one-line message for a failed job; GPU out-of-memory gets advice."""
    from ..diffusion.device import is_out_of_memory

    if is_out_of_memory(exc):
        return (
            "the GPU ran out of memory; try fewer samples (n_samples), a smaller model, "
            "or free the GPU and submit again"
        )
    if isinstance(exc, LongitudinalDiffusionError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
