"""One run of the panel: its jobs on a backend, their events, and the way it ends.

A panel :class:`~.panel.RunRequest` becomes one or more job specs
(:func:`jobSpecsFromRequest`: one per missing age for a modality synthesis, one otherwise),
submitted together to a :class:`~LongitudinalDiffusionLib.jobs.Backend` (the local job
process or the remote worker; this file does not care which). :meth:`Run.poll` never blocks: the
panel calls it from a ``QTimer`` on the main thread and shows what it returns (progress,
stage, ETA, log lines). :meth:`Run.wait` blocks until the end, for scripts.

A run ends ``done`` (every job finished: :attr:`Run.results` holds the results, none of
them in the scene yet), ``failed`` (the first error; the other jobs are cancelled) or
``cancelled``. Results are put into the scene only when every job is done, so a failed or
cancelled run leaves nothing in it. A run may also *prepare* its results before it ends
``done`` - work that needs no scene, such as their tissue segmentation - on a thread of its
own, so that the main thread only has the scene work left (:attr:`Run.prepared`). With the
local backend the segmentation network itself runs in the job process
(:func:`childSegmenter`): inside Slicer a thread of the application advances only while the
main thread runs Python, so the thread only hands images over and takes labels back.

Nothing here imports ``slicer`` or ``qt``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.jobs import Backend, JobEvent, JobSpec
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken, ProgressEvent
from LongitudinalDiffusionLib.subject import Subject

logger = logging.getLogger(__name__)

__all__ = [
    "RUNNING",
    "DONE",
    "FAILED",
    "CANCELLED",
    "Run",
    "RunUpdate",
    "childSegmenter",
    "formatEta",
    "jobSpecsFromRequest",
]

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


def formatEta(seconds: float | None) -> str:
    """``"ETA 1 min 05 s"``, ``"ETA 12 s"``, or "" when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"ETA {seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"ETA {seconds // 60} min {seconds % 60:02d} s"
    return f"ETA {seconds} s"


def jobSpecsFromRequest(
    request: Any, staging: str | Path, options: dict[str, Any] | None = None
) -> list[tuple[str, JobSpec]]:
    """The job specs of a panel request, each with a short label for the log.

    Args:
        request: a :class:`~.panel.RunRequest`.
        staging: a folder for scans that have no file (volumes made in Slicer); they are
            written there as NIfTI.
        options: sampling options (JSON fields of ``RunOptions``); the request's device,
            steps, samples, capture and preprocessing choice are added.

    Raises:
        InputError: the request cannot be expressed as a job (the message says why).
    """
    options = dict(options or {})
    options.setdefault("device", getattr(request, "device", "auto") or "auto")
    for key, attribute in (("n_samples", "samples"), ("steps", "steps"), ("capture", "capture")):
        value = getattr(request, attribute, None)
        if value:
            options.setdefault(key, int(value))
    if getattr(request, "preprocess", None) is not None:
        options.setdefault("preprocess", bool(request.preprocess))
    remote = getattr(request, "backend", "local") == "remote"
    model = request.model.name if remote else str(request.model.path)
    subject: Subject = request.subject
    if request.task == "complete-ages":
        spec = JobSpec.from_subject(
            subject, "complete-ages", model, {"ages": [float(a) for a in request.ages]}, options, staging=staging
        )
        return [(f"ages {', '.join(f'{a:g}' for a in request.ages)} mo", spec)]
    if request.task == "synthesize-modality":
        specs = []
        for age in request.ages:
            visit = [tp for tp in subject.timepoints if abs(tp.age - age) <= Subject.AGE_TOL]
            if not visit:
                raise InputError(f"subject {subject.subject_id}", f"no scans at {age:g} months")
            session = visit[0].session or float(age)
            params = {"target": request.modality.value, "session": session}
            spec = JobSpec.from_subject(subject, "synthesize-modality", model, params, options, staging=staging)
            specs.append((f"{request.modality.value} at {age:.1f} mo", spec))
        return specs
    if request.task == "interpolate":
        first, second = request.scans
        pair = Subject(subject.subject_id, [first, second], subject.source, subject.meta)
        params = {"source": 0, "target": 1, "n_frames": int(request.frames)}
        spec = JobSpec.from_subject(pair, "interpolate", model, params, options, staging=staging)
        spec.inputs[0].labels = None if first.labels is None else str(first.labels)
        return [(f"{request.frames} frames, {first.describe()} to {second.describe()}", spec)]
    raise InputError("task", f"unknown task {request.task!r}")


@dataclass
class RunUpdate:
    """What changed since the previous :meth:`Run.poll`.

    Attributes:
        state: ``running``, ``done``, ``failed`` or ``cancelled``.
        percent: 0-100 for the progress bar (the current stage's steps; 100 when done).
        text: the progress bar's text: job, stage, step/total and ETA.
        log: new lines for the log.
        error: the reason, when failed or cancelled.
    """

    state: str
    percent: int = 0
    text: str = ""
    log: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state != RUNNING


class Run:
    """One request running on a backend as one or more jobs.

    Args:
        backend: where the jobs run (``submit``/``poll``/``cancel``/``result``/``wait``).
        specs: ``(label, JobSpec)`` pairs, e.g. from :func:`jobSpecsFromRequest`.
        request: what the panel asked for (kept for the placement of the results).
        inputCheck: called on every poll; returns a problem (e.g. "the volume X was removed
            from the scene") that stops the run, or "".
        cleanup: called once when the run ends (e.g. removes the staging folder).
        prepare: ``prepare(results, progress, cancel)``, called on a background thread once
            every job is done, before the run reports ``done``; what it returns is kept in
            :attr:`prepared`. It must not touch the scene. It reports through ``progress``
            (``ProgressEvent`` objects, shown like the jobs') and stops with ``Cancelled``
            when ``cancel`` (a ``CancelToken``) is set; any other error fails the run.
    """

    def __init__(
        self,
        backend: Backend,
        specs: Sequence[tuple[str, JobSpec]],
        request: Any = None,
        *,
        inputCheck: Callable[[], str] | None = None,
        cleanup: Callable[[], None] | None = None,
        prepare: Callable[[list[Any], Callable[[ProgressEvent], None], CancelToken], Any] | None = None,
    ) -> None:
        if not specs:
            raise InputError("run", "nothing to run")
        self.backend = backend
        self.request = request
        self.labels = [label for label, _spec in specs]
        self.jobIds: list[str] = []
        self.results: list[Any] = []
        #: what ``prepare`` returned (None without one)
        self.prepared: Any = None
        self.state = RUNNING
        self.error = ""
        self.started = time.monotonic()
        self._inputCheck = inputCheck
        self._cleanup = cleanup
        self._finishedJobs: dict[str, str] = {}
        self._cancelReason = ""
        self._failure = ""
        self._current = 0
        self._percent = 0
        self._text = ""
        self._prepare = prepare
        self._preparing: threading.Thread | None = None
        self._prepareCancel = CancelToken()
        self._prepareEvents: list[ProgressEvent] = []
        self._prepareCursor = 0
        self._prepareError: BaseException | None = None
        try:
            for _label, spec in specs:
                self.jobIds.append(backend.submit(spec))
        except BaseException:
            for jobId in self.jobIds:
                backend.cancel(jobId)
            self._end(FAILED, "")
            raise

    # -------------------------------------------------------------------- state

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def cancel(self, reason: str = "") -> None:
        """Ask every job to stop; :meth:`poll` reports ``cancelled`` once they have."""
        if self.finished:
            return
        self._cancelReason = self._cancelReason or reason
        self._prepareCancel.cancel()
        for jobId in self.jobIds:
            if jobId not in self._finishedJobs:
                try:
                    self.backend.cancel(jobId)
                except LongitudinalDiffusionError as exc:
                    logger.warning("cancelling job %s: %s", jobId, exc)

    def _end(self, state: str, error: str) -> None:
        if self.state != RUNNING and self.state == state:
            return
        self.state, self.error = state, error
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            try:
                cleanup()
            except OSError as exc:
                logger.warning("cleaning up after the run: %s", exc)

    # --------------------------------------------------------------------- poll

    def poll(self) -> RunUpdate:
        """Drain the backend's events (never blocks) and say where the run stands."""
        update = RunUpdate(self.state, self._percent, self._text)
        if self.finished:
            return update
        problem = self._inputCheck() if self._inputCheck is not None else ""
        if problem and not self._cancelReason:
            update.log.append(problem)
            self.cancel(problem)
        if self._preparing is not None:
            self._pollPreparing(update)
            update.state, update.percent, update.text, update.error = self.state, self._percent, self._text, self.error
            return update
        for index, jobId in enumerate(self.jobIds):
            if jobId in self._finishedJobs:
                continue
            for event in self.backend.poll(jobId):
                self._onEvent(index, event, update)
        if len(self._finishedJobs) == len(self.jobIds) or self._failedJob() is not None:
            self._conclude(update)
        update.state, update.percent, update.text, update.error = self.state, self._percent, self._text, self.error
        return update

    def _prefix(self, index: int) -> str:
        return f"job {index + 1}/{len(self.jobIds)} · " if len(self.jobIds) > 1 else ""

    def _onEvent(self, index: int, event: JobEvent, update: RunUpdate) -> None:
        prefix = self._prefix(index)
        if event.kind == "progress":
            self._current = index
            total = max(int(event.total), 1)
            self._percent = int(round(100.0 * min(event.step, total) / total))
            eta = formatEta(event.eta)
            self._text = f"{prefix}{event.stage} {event.step}/{event.total}" + (f" · {eta}" if eta else "")
            if event.step >= event.total:
                update.log.append(f"{prefix}{event.stage}: {event.total} steps in {event.elapsed:.1f} s")
        elif event.kind == "started":
            update.log.append(f"{prefix}started: {self.labels[index]}")
        elif event.kind == "log" and event.message:
            update.log.append(f"{prefix}{event.message}")
        elif event.kind in ("done", "failed", "cancelled"):
            self._finishedJobs[event.job_id] = event.kind
            if event.kind == "done":
                update.log.append(f"{prefix}done: {self.labels[index]} ({event.message})")
            elif event.kind == "failed":
                self._failure = event.message or "the job failed"
                update.log.append(f"{prefix}failed: {self._failure}")
            else:
                update.log.append(f"{prefix}cancelled")

    def _failedJob(self) -> str | None:
        for jobId, kind in self._finishedJobs.items():
            if kind == "failed":
                return jobId
        return None

    def _conclude(self, update: RunUpdate) -> None:
        failed = self._failedJob()
        reason = self._cancelReason
        if failed is not None and not reason:
            others = [j for j in self.jobIds if j not in self._finishedJobs]
            for jobId in others:
                self.backend.cancel(jobId)
            self._end(FAILED, self._failure or "the job failed")
            return
        if len(self._finishedJobs) < len(self.jobIds):
            return  # cancelling: wait for the others to stop
        if reason or any(kind != "done" for kind in self._finishedJobs.values()):
            self._end(CANCELLED, reason or "cancelled")
            self._text = "cancelled"
            return
        try:
            self.results = [self.backend.result(jobId) for jobId in self.jobIds]
        except Exception as exc:  # a backend that lost a result; report it like a failure (and log it)
            logger.exception("collecting the run's results failed")
            self._end(FAILED, f"the results could not be collected: {exc}")
            return
        if self._prepare is not None:
            self._startPreparing()
            return
        self._done()

    def _done(self) -> None:
        self._percent, self._text = 100, f"done in {time.monotonic() - self.started:.1f} s"
        self._end(DONE, "")

    # ------------------------------------------------------------------ prepare

    def _startPreparing(self) -> None:
        def work() -> None:
            try:
                self.prepared = prepare(self.results, self._prepareEvents.append, self._prepareCancel)
            except BaseException as exc:  # reported by the next poll
                self._prepareError = exc

        prepare, self._prepare = self._prepare, None
        self._text = "preparing the results"
        self._preparing = threading.Thread(target=work, name="longdiff-prepare-results", daemon=True)
        self._preparing.start()

    def _pollPreparing(self, update: RunUpdate) -> None:
        thread = self._preparing
        events = self._prepareEvents[self._prepareCursor :]  # appended by the thread: read, never modified
        self._prepareCursor += len(events)
        for event in events:
            total = max(int(event.total), 1)
            self._percent = int(round(100.0 * min(event.step, total) / total))
            eta = formatEta(event.eta)
            self._text = f"{event.stage} {event.step}/{event.total}" + (f" · {eta}" if eta else "")
            if event.step >= event.total:
                update.log.append(f"{event.stage}: {event.total} images in {event.elapsed:.1f} s")
        if thread.is_alive():
            return
        self._preparing = None
        error = self._prepareError
        if self._cancelReason or isinstance(error, Cancelled):
            self.prepared = None
            self._end(CANCELLED, self._cancelReason or "cancelled")
            self._text = "cancelled"
        elif error is not None:
            self.prepared = None
            update.log.append(f"failed: {error}")
            self._end(FAILED, f"preparing the results failed: {error}")
        else:
            self._done()

    # --------------------------------------------------------------------- wait

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[Any]:
        """Block until the run ends (for scripts); returns the results.

        Raises:
            Cancelled: the run was cancelled.
            LongitudinalDiffusionError: a job failed (its message).
            TimeoutError: not finished within ``timeout`` seconds (the run goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            update = self.poll()
            if update.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the run did not finish within {timeout:g} s")
            time.sleep(interval)
        if self.state == CANCELLED:
            raise Cancelled(self.error if self.error != "cancelled" else "")
        if self.state == FAILED:
            raise LongitudinalDiffusionError(self.error)
        return self.results


def childSegmenter(backend: Any, segmenter: Any) -> Any:
    """The segmenter to prepare a run's results with, on ``backend``.

    On a backend with a job process (the local backend) a segmenter that names its model
    (``TissueSegmenter``: a catalog name or card path in ``.model``) becomes a
    :class:`~LongitudinalDiffusionLib.backends.process.ChildSegmenter`: the same model, run
    in the warm job process (loaded there once). Any other segmenter, or backend (the
    remote worker's client), is returned as it is.
    """
    if segmenter is None or not callable(getattr(backend, "submit_segmentation", None)):
        return segmenter
    model = getattr(segmenter, "model", None)
    if not isinstance(model, (str, os.PathLike)):
        return segmenter  # a loaded network or a function: it runs where it is
    from LongitudinalDiffusionLib.backends.process import ChildSegmenter

    return ChildSegmenter(backend, model, device=getattr(segmenter, "device", "cpu") or "cpu")


def stagingFolder() -> tuple[Path, Callable[[], None]]:
    """A temporary folder for scans without a file, and the function that removes it."""
    folder = Path(tempfile.mkdtemp(prefix="longdiff-run-"))
    return folder, lambda: shutil.rmtree(folder, ignore_errors=True)
