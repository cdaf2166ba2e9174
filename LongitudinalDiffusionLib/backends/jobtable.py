"""The job bookkeeping both local backends share: a table of jobs under one lock, the
events each ``poll`` hands out once, a job's state, and its outcome (the result, or the
error it ended with).

:class:`~.process.ProcessBackend` and :class:`~.local.ThreadBackend` differ in how a job runs
(a child process, a thread) and so in how it is cancelled, waited for and deleted; what a
caller reads about a job is the same, and lives here once.
"""

from __future__ import annotations

import threading
from typing import Any, Generic, Protocol, TypeVar

from ..jobs import JobEvent, JobNotFinished, UnknownJob


class JobRecord(Protocol):
    """What the table reads of a backend's job."""

    job_id: str
    events: list[JobEvent]
    cursor: int  # events already handed out by poll()
    state: str  # queued, running, done, failed or cancelled
    result: Any
    error: BaseException | None


J = TypeVar("J", bound=JobRecord)


class JobTable(Generic[J]):
    """Jobs by id under ``_lock``; a subclass sets both up in its ``__init__`` and may
    override :meth:`_sync`, which runs under the lock before anything is read (the process
    backend takes in its child's messages there)."""

    _lock: threading.RLock | threading.Lock
    _jobs: dict[str, J]

    def poll(self, job_id: str) -> list[JobEvent]:
        """The job's events since the last poll (never blocks)."""
        with self._lock:
            self._sync()
            job = self._get(job_id)
            new = job.events[job.cursor :]
            job.cursor = len(job.events)
            return list(new)

    def status(self, job_id: str) -> str:
        """queued, running, done, failed or cancelled."""
        with self._lock:
            self._sync()
            return self._get(job_id).state

    def result(self, job_id: str) -> Any:
        """The result of a finished job; its error if it failed or was cancelled."""
        with self._lock:
            self._sync()
            job = self._get(job_id)
        return self._outcome(job)

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def _sync(self) -> None:
        """Bring the table up to date before a read (nothing to do by default)."""

    def _get(self, job_id: str) -> J:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id!r}")
        return job

    @staticmethod
    def _outcome(job: JobRecord) -> Any:
        if job.state == "done":
            return job.result
        if job.state in ("failed", "cancelled") and job.error is not None:
            raise job.error
        raise JobNotFinished(f"job {job.job_id} is {job.state}")
