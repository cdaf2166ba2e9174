"""Jobs in a child Python process that stays warm between runs.

:class:`ProcessBackend` starts ``python -m LongitudinalDiffusionLib.backends.child`` (see
:mod:`.child`) and sends it one job at a time as a JSON line on its stdin. The child
streams the job's :class:`~LongitudinalDiffusionLib.jobs.JobEvent` objects back as JSON
lines on its stdout and writes the result into a folder this side gives it (pickled: this
backend's private folder, its own child; a result that cannot be pickled is saved as NIfTI
and read with :meth:`~LongitudinalDiffusionLib.tasks.Result.load`). A thread reads it into
memory before the job reports ``done``.

Why a process and not a thread: inside Slicer the main thread holds Python's GIL while Qt's
event loop idles, so a Python thread of the application advances only during the short
moments the main thread runs Python (a timer tick). A child process has a GIL of its own
and runs at full speed; this side only reads its output.

* **Reading**: a reader thread per child blocks in ``os.read`` (which releases the GIL)
  and puts the decoded lines on an inbox; :meth:`ProcessBackend.poll` drains it and never
  blocks, which is what a ``QTimer`` calls.
* **Warm**: the child serves job after job and keeps the models it loaded (an LRU keyed by
  card path, weights sha256 and device, fewer while memory is short); it ends itself after ``idle_timeout`` seconds
  without work and is started again, transparently, when the next job comes or when it died.
* **Cancel**: a polite ``cancel`` line first (the sampler stops within a step and the child
  stays warm); if the job has not ended ``cancel_grace`` seconds later, the process tree is
  terminated (its process group on POSIX, ``taskkill /T`` on Windows), then killed.
* **Failures**: a crash, a non-zero exit or a kill (the out-of-memory killer's SIGKILL)
  ends the running job as ``failed`` with a message that says how the process ended and
  its last stderr lines; the next job starts a new child.
* **Closing**: :meth:`ProcessBackend.close` never blocks for more than about a second.

The interpreter: ``python=`` or the ``LONGDIFF_PYTHON`` environment variable, else this
interpreter, except inside Slicer, whose ``sys.executable`` is the application itself:
then the ``PythonSlicer`` launcher next to it (or on ``PATH``).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, LongitudinalDiffusionError
from ..jobs import EVENT_KINDS, FINAL_KINDS, JobEvent, JobSpec
from ..progress import Cancelled
from .jobtable import JobTable

log = logging.getLogger(__name__)

__all__ = ["ChildSegmenter", "JobProcessError", "ProcessBackend", "find_python"]

#: environment variable naming the interpreter of the job process
PYTHON_ENV = "LONGDIFF_PYTHON"
CHILD_MODULE = "LongitudinalDiffusionLib.backends.child"
#: stderr lines of the child kept for the message of a failed job
STDERR_TAIL = 12
#: the folder that holds the LongitudinalDiffusionLib package (put on the child's PYTHONPATH)
LIBRARY_PARENT = Path(__file__).resolve().parents[2]


class JobProcessError(LongitudinalDiffusionError):
    """The job process could not be started, or a job failed in it (the message says how)."""


def find_python(python: str | os.PathLike | None = None) -> str:
    """The interpreter for the job process: ``python``, else ``$LONGDIFF_PYTHON``, else this
    interpreter; inside Slicer (``sys.executable`` is the Slicer application) the
    ``PythonSlicer`` launcher next to it or on ``PATH``.

    Raises:
        JobProcessError: inside Slicer and no PythonSlicer found.
    """
    if python:
        return str(python)
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    exe = Path(sys.executable or "python")
    stem = exe.stem.lower()
    if stem.startswith("python") or "slicer" not in stem:
        return str(exe)
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    for folder in (exe.parent, exe.parent.parent / "bin", exe.parent.parent):
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("PythonSlicer")
    if found:
        return found
    raise JobProcessError(
        f"cannot find the PythonSlicer launcher next to {exe} or on PATH to run jobs in; "
        f"set the environment variable {PYTHON_ENV} to a Python interpreter that has this module's packages"
    )


def describe_exit(code: int | None, tail: list[str]) -> str:
    """What a job is told when its process ended before the job did."""
    if code is None:
        how = "ended unexpectedly"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"was killed ({name})"
        if -code == getattr(signal, "SIGKILL", 9):
            how += "; the system does this when memory runs out (try fewer samples or a smaller model)"
    else:
        how = f"exited with code {code}"
        if os.name != "nt" and 128 < code < 128 + 65:  # a launcher (PythonSlicer) or shell reporting a signal
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = ""
            if name:
                how += f", its Python killed by {name}"
                if name == "SIGKILL":
                    how += "; the system does this when memory runs out (try fewer samples or a smaller model)"
        if code in (3221225477, -1073741819):  # Windows access violation
            how += " (a crash)"
    message = f"the job process {how}"
    if tail:
        last = [line.strip() if len(line.strip()) <= 240 else line.strip()[:237] + "..." for line in tail[-3:]]
        message += "; its last messages: " + " | ".join(line for line in last if line)
    return message


# ----------------------------------------------------------------------------- child


class _Child:
    """One job process with its reader threads."""

    def __init__(self, backend: ProcessBackend, argv: list[str], env: dict[str, str]) -> None:
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            # Windows-only flags (absent from the module elsewhere)
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0
            )
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel ends the whole tree
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            bufsize=0,
            close_fds=True,
            **kwargs,
        )
        self.pid = self.proc.pid
        if self.proc.stdin is None or self.proc.stdout is None or self.proc.stderr is None:  # pragma: no cover
            raise JobProcessError("the job process started without its pipes")
        # the three pipes, typed: Popen's attributes are Optional, these always exist (PIPE)
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self.backend = backend
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.info: dict[str, Any] = {}
        self.bye = ""
        self.exited = False
        self.returncode: int | None = None
        self._write_lock = threading.Lock()
        self._err = threading.Thread(target=self._read_stderr, name=f"longdiff-child-{self.pid}-stderr", daemon=True)
        self._out = threading.Thread(target=self._read_stdout, name=f"longdiff-child-{self.pid}-stdout", daemon=True)
        self._err.start()
        self._out.start()

    def send(self, message: dict[str, Any]) -> bool:
        """Write one JSON line to the child's stdin; False if it is gone."""
        data = (json.dumps(message) + "\n").encode("utf-8")
        try:
            with self._write_lock:
                self.stdin.write(data)
                self.stdin.flush()
        except (OSError, ValueError):  # broken pipe, closed file: the child is ending
            return False
        return True

    def alive(self) -> bool:
        return not self.exited and self.proc.poll() is None

    def signal_tree(self, kill: bool = False) -> None:
        """Terminate (or kill) the child and every process it started."""
        if self.proc.poll() is not None and os.name == "nt":
            return
        if os.name == "nt":
            if kill:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.pid)], capture_output=True, check=False)
            else:
                self.proc.terminate()
            return
        try:
            os.killpg(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def end(self, timeout: float) -> None:
        """Ask it to quit, then terminate and kill its tree; at most about ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        if self.proc.poll() is None:
            self.send({"op": "quit"})
            try:
                self.stdin.close()
            except OSError:
                pass
        for kill, share in ((False, 0.5), (True, 1.0)):
            left = deadline - time.monotonic()
            try:
                self.proc.wait(timeout=max(0.0, left * share))
            except subprocess.TimeoutExpired:
                self.signal_tree(kill=kill)
        try:
            self.proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            log.warning("job process %s did not end", self.pid)

    def _read_stderr(self) -> None:
        for raw in iter(self.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                log.debug("job process %s: %s", self.pid, line)

    def _read_stdout(self) -> None:
        fd = self.stdout.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)  # blocks without the GIL
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            messages = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    self.tail.append("stdout: " + line[:300].decode("utf-8", "replace"))
                    continue
                if isinstance(message, dict):
                    messages.append(message)
            if messages:
                self.backend._deliver(self, messages)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stdout closed but alive: end it
            self.signal_tree(kill=True)
            code = self.proc.wait()
        self._err.join(timeout=2.0)  # its last words, for the message
        self.returncode = code
        self.backend._deliver(self, [{"type": "exit", "code": code}])


# ----------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    job_id: str
    op: str  # run | segment
    message: dict[str, Any]
    label: str
    events: list[JobEvent] = field(default_factory=list)
    cursor: int = 0
    state: str = "queued"
    child: _Child | None = None
    started: bool = False
    cancel_requested: bool = False
    cancel_deadline: float | None = None
    folder: Path | None = None
    reply: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    affines: list[Any] = field(default_factory=list)
    attempts: int = 0


class ProcessBackend(JobTable["_Job"]):
    """Runs jobs in a warm child Python process, one at a time, first come first served.

    Args:
        python: the child's interpreter (see :func:`find_python`).
        progress_interval: progress events of one stage closer than this (seconds) are
            merged by the child (the last step of a stage is always sent).
        idle_timeout: seconds without work after which the child ends itself (0: never).
        cache_size: models the child keeps loaded (least recently used go first).
        keep_free_mb: the child drops cached models (least recently used first) while less
            than this many MB are available on the model's device.
        cancel_grace: seconds a cancelled job may take to stop by itself before its
            process tree is terminated (0: at once).
        env: extra environment variables of the child.

    Thread-safe; :meth:`poll` never blocks, :meth:`close` returns within about a second.
    """

    def __init__(
        self,
        *,
        python: str | os.PathLike | None = None,
        progress_interval: float = 0.0,
        idle_timeout: float = 600.0,
        cache_size: int = 2,
        keep_free_mb: float = 1024.0,
        cancel_grace: float = 3.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self._python = python
        self._interval = float(progress_interval)
        self._idle = float(idle_timeout)
        self._cache_size = int(cache_size)
        self._keep_free_mb = float(keep_free_mb)
        self._grace = float(cancel_grace)
        self._env = dict(env or {})
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._inbox: collections.deque[tuple[_Child, dict[str, Any]]] = collections.deque()
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._running: _Job | None = None
        self._child: _Child | None = None
        self._closed = False
        self._workdir = Path(tempfile.mkdtemp(prefix="longdiff-jobs-"))
        #: what the child last reported: pid, model cache hits/loads, ...
        self.stats: dict[str, Any] = {}
        #: how many job processes were started
        self.starts = 0

    # ------------------------------------------------------------------ Backend

    def submit(self, spec: JobSpec) -> str:
        spec.validate()
        message = {"op": "run", "spec": spec.to_dict()}
        return self._submit("run", message, f"{spec.task} with {spec.model}")

    def submit_segmentation(self, model: str | os.PathLike, images: list[Any], device: str = "cpu") -> str:
        """Segment ``images`` (library ``Image`` objects) with a segmentation model in the
        child; :meth:`result` gives their label images (int16, on each image's geometry)."""
        if self._closed:
            raise LongitudinalDiffusionError("the local backend is closed")
        job_id = uuid.uuid4().hex
        folder = self._workdir / job_id
        folder.mkdir()
        items, affines = [], []
        import numpy as np

        for i, image in enumerate(images):  # the arrays themselves: an image's "source" may be another file
            affines.append(np.asarray(image.affine, dtype=np.float64))
            path = folder / f"image-{i:03d}.npy"
            np.save(path, np.asarray(image.array, dtype=np.float32))
            items.append({"npy": str(path), "affine": affines[-1].tolist()})
        message = {"op": "segment", "model": str(model), "device": device, "images": items}
        return self._submit("segment", message, f"segmenting {len(items)} image(s) with {model}", job_id, affines)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._drain()
            job = self._get(job_id)
            if job.state == "queued":
                self._queue.remove(job_id)
                self._finish(job, "cancelled", error=Cancelled("queue"), message="cancelled before it started")
            elif job.state == "running" and not job.cancel_requested:
                job.cancel_requested = True
                child = job.child
                if job.reply:  # its process is done with it; the result being read is dropped
                    pass
                elif child is None or not child.send({"op": "cancel", "job_id": job_id}) or self._grace <= 0:
                    self._end_tree(job)
                else:
                    job.cancel_deadline = time.monotonic() + self._grace
                    timer = threading.Timer(self._grace, self._enforce_cancel, args=(job,))
                    timer.daemon = True
                    timer.start()
            self._start_next()

    def wait(self, job_id: str, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            job = self._get(job_id)
            while True:
                self._drain()
                if job.finished.is_set():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s")
                self._changed.wait(0.5 if left is None else min(left, 0.5))
        return self._outcome(job)

    def delete(self, job_id: str) -> None:
        """Forget a job (cancelling it first if it has not finished) and its files."""
        self.cancel(job_id)
        with self._lock:
            job = self._get(job_id)
        if not job.finished.is_set():
            try:
                self.wait(job_id, timeout=self._grace + 5.0)
            except (TimeoutError, LongitudinalDiffusionError):
                pass
        with self._lock:
            self._jobs.pop(job_id, None)
        shutil.rmtree(self._workdir / job_id, ignore_errors=True)

    @property
    def child_pid(self) -> int | None:
        """The pid of the job process (None when none is running)."""
        with self._lock:
            self._drain()
            child = self._child
            return child.pid if child is not None and child.alive() else None

    def start(self) -> int:
        """Start the job process now (it starts with the first job otherwise); returns its pid."""
        with self._lock:
            return self._ensure_child().pid

    def close(self) -> None:
        """Cancel every job and end the job process; returns within about a second."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drain()
            for job in self._jobs.values():
                if not job.finished.is_set():
                    self._finish(job, "cancelled", error=Cancelled("close"), message="the backend was closed")
            self._queue.clear()
            child, self._child = self._child, None
        if child is not None:
            child.end(timeout=0.7)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> ProcessBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            child = self._child
            if child is not None and child.proc.poll() is None:
                child.signal_tree(kill=True)
        except Exception:  # at interpreter exit modules may be gone already; nothing left to tell
            pass

    # ------------------------------------------------------------------ internals

    def _submit(self, op: str, message: dict[str, Any], label: str, job_id: str | None = None,
                affines: list[Any] | None = None) -> str:  # fmt: skip
        job = _Job(job_id or uuid.uuid4().hex, op, message, label, affines=list(affines or []))
        with self._lock:
            if self._closed:
                raise LongitudinalDiffusionError("the local backend is closed")
            self._jobs[job.job_id] = job
            self._emit(job, JobEvent(job.job_id, "queued", message=label))
            self._queue.append(job.job_id)
            self._drain()
            self._start_next()
        return job.job_id

    def _read_result(self, job: _Job, message: str) -> None:
        """Read a finished job's result into memory, off the caller's thread, then mark it
        done (the GUI thread never waits for files or imports)."""
        try:
            result, error = self._load_result(job), None
        except Exception as exc:  # reported as the job's failure
            result, error = None, exc
        with self._lock:
            if job.finished.is_set():
                return
            if job.cancel_requested:
                self._finish(job, "cancelled", error=Cancelled("finishing"), message="cancelled")
            elif error is not None:
                text = f"the job's result could not be read: {error}"
                self._finish(job, "failed", error=JobProcessError(text), message=text)
            else:
                job.result = result
                self._finish(job, "done", message=message)

    def _load_result(self, job: _Job) -> Any:
        folder = job.folder
        if folder is None:
            raise JobProcessError(f"job {job.job_id} reported no result")
        try:
            if job.op == "segment":
                import numpy as np

                from ..imaging import Image

                files = job.reply.get("labels") or []
                out: Any = [Image(np.load(folder / name), job.affines[i]) for i, name in enumerate(files)]
            elif job.reply.get("format") == "pickle":
                # Written by this backend's own child into this backend's private folder
                # (mkdtemp, owner only): one read and one C-level unpickling, ~10x faster than
                # reading the NIfTI files back (see docs/performance.md).
                import pickle

                out = pickle.loads((folder / "result.pickle").read_bytes())
            else:
                from ..tasks import Result

                out = Result.load(folder / "result")
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # in memory now: nothing kept on disk
        return out

    def _emit(self, job: _Job, event: JobEvent) -> None:
        event.seq = len(job.events)
        job.events.append(event)
        if event.kind == "started":
            job.state = "running"

    def _finish(self, job: _Job, state: str, *, error: BaseException | None = None, message: str = "") -> None:
        if job.finished.is_set():
            return
        job.state, job.error = state, error
        self._emit(job, JobEvent(job.job_id, state, message=message))
        job.finished.set()
        if state != "done":
            shutil.rmtree(self._workdir / job.job_id, ignore_errors=True)
        if self._running is job:
            self._running = None
        self._changed.notify_all()

    def _deliver(self, child: _Child, messages: list[dict[str, Any]]) -> None:
        """Called by a child's reader thread: queue its messages; a job's end is handled at
        once so that the next job starts without waiting for a poll."""
        with self._lock:
            self._inbox.extend((child, m) for m in messages)
            if any(m.get("kind") in FINAL_KINDS or m.get("type") == "exit" for m in messages):
                self._drain()
                self._start_next()
            self._changed.notify_all()

    def _sync(self) -> None:  # JobTable: the child's messages first
        self._drain()

    def _drain(self) -> None:
        while self._inbox:
            child, message = self._inbox.popleft()
            try:
                self._handle(child, message)
            except Exception:  # a malformed line must not break the backend
                log.warning("job process %s sent a message that could not be used: %.200r", child.pid, message)

    def _handle(self, child: _Child, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind in EVENT_KINDS:
            job = self._jobs.get(str(message.get("job_id")))
            if job is None or job.finished.is_set() or job.child is not child:
                return
            if isinstance(message.get("cache"), dict):
                self.stats = {**message["cache"], "pid": child.pid}
            event = JobEvent.from_dict(message)
            if kind == "started":
                job.started = True
            if kind == "done":  # the child is free; the job is done once its result is read
                job.folder, job.reply = self._workdir / job.job_id, message
                if self._running is job:
                    self._running = None
                loader = threading.Thread(
                    target=self._read_result, args=(job, event.message), name="longdiff-result", daemon=True
                )
                loader.start()
            elif kind == "failed":
                error_type = message.get("error_type", "")
                error: BaseException = (
                    InputError(None, event.message) if error_type == "InputError" else JobProcessError(event.message)
                )
                self._finish(job, "failed", error=error, message=event.message)
            elif kind == "cancelled":
                self._finish(job, "cancelled", error=Cancelled(message.get("stage", "")), message=event.message)
            else:
                self._emit(job, event)
            return
        kind = message.get("type")
        if kind == "ready":
            child.info = message
        elif kind == "bye":
            child.bye = str(message.get("reason", ""))
        elif kind == "exit":
            child.exited = True
            if self._child is child:
                self._child = None
            job = self._running
            if job is None or job.child is not child or job.finished.is_set():
                return
            self._running = None
            if job.cancel_requested:
                self._finish(
                    job, "cancelled", error=Cancelled("stopping"), message="cancelled (the job process was ended)"
                )
            elif child.bye in ("idle", "gone") and not job.started and job.attempts < 2:
                # it ended for idleness just as the job was sent: send the job again
                job.state, job.child = "queued", None
                self._queue.appendleft(job.job_id)
            else:
                message_text = describe_exit(message.get("code"), list(child.tail))
                self._finish(job, "failed", error=JobProcessError(message_text), message=message_text)

    def _ensure_child(self) -> _Child:
        child = self._child
        if child is not None and child.alive():
            return child
        python = find_python(self._python)
        argv = [python, "-m", CHILD_MODULE, "--idle-timeout", f"{self._idle:g}", "--cache-size", str(self._cache_size)]
        argv += ["--keep-free-mb", f"{self._keep_free_mb:g}"]
        env = {**os.environ, **self._env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIBRARY_PARENT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONIOENCODING", "utf-8")
        try:
            child = _Child(self, argv, env)
        except OSError as exc:
            raise JobProcessError(f"cannot start the job process {python} ({exc.strerror or exc})") from None
        self._child = child
        self.starts += 1
        log.info("job process %s started (%s)", child.pid, python)
        return child

    def _start_next(self) -> None:
        if self._closed or self._running is not None or not self._queue:
            return
        job = self._jobs[self._queue.popleft()]
        try:
            child = self._ensure_child()
        except JobProcessError as exc:
            self._finish(job, "failed", error=exc, message=str(exc))
            self._start_next()
            return
        folder = self._workdir / job.job_id
        folder.mkdir(parents=True, exist_ok=True)
        message = {**job.message, "job_id": job.job_id, "out": str(folder), "progress_interval": self._interval}
        job.child, job.state, job.attempts = child, "running", job.attempts + 1
        self._running = job
        if not child.send(message):  # it is ending: its exit sends the job again (once) or fails it
            log.info("job process %s is gone; the job waits for its exit", child.pid)
            child.bye = child.bye or "gone"

    def _enforce_cancel(self, job: _Job) -> None:
        with self._lock:
            self._drain()
            if job.finished.is_set() or job.child is None or self._running is not job:
                return
            log.info("job %s did not stop within %g s of its cancel: ending its process", job.job_id, self._grace)
            self._end_tree(job)

    def _end_tree(self, job: _Job) -> None:
        child = job.child
        if child is None:
            self._finish(job, "cancelled", error=Cancelled("stopping"), message="cancelled")
            return
        if self._child is child:
            self._child = None
        child.signal_tree(kill=False)

        def reap() -> None:  # kill what did not end on terminate, off the caller's thread
            try:
                child.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                child.signal_tree(kill=True)

        threading.Thread(target=reap, name=f"longdiff-reap-{child.pid}", daemon=True).start()


# ----------------------------------------------------------------------------- segmenter


class ChildSegmenter:
    """A tissue segmenter whose network runs in a :class:`ProcessBackend`'s child process.

    Called with an ``Image`` it returns the int16 labels on the image's geometry, like
    ``TissueSegmenter`` of the Slicer module, but the forward pass happens in the warm job
    process (the model stays loaded there between calls). Blocks the calling thread until
    the labels are back; call it from a background thread.

    Args:
        backend: the process backend.
        model: a catalog name or card path of a segmentation model.
        device: where the child runs it.
        timeout: seconds one call may take.
    """

    def __init__(self, backend: ProcessBackend, model: str | os.PathLike, device: str = "cpu",
                 timeout: float | None = 3600.0) -> None:  # fmt: skip
        self.backend, self.model, self.device, self.timeout = backend, str(model), device, timeout
        self._classes: dict[int, str] | None = None

    @property
    def name(self) -> str:
        from ..catalog import resolve_card

        return resolve_card(self.model).name

    @property
    def classes(self) -> dict[int, str]:
        """The label names of the model's card (read without loading the network)."""
        if self._classes is None:
            from ..catalog import resolve_card

            self._classes = dict(enumerate((resolve_card(self.model).card.get("config") or {}).get("classes", [])))
        return dict(self._classes)

    def segment_many(self, images: list[Any]) -> list[Any]:
        """Labels of several images in one job."""
        job = self.backend.submit_segmentation(self.model, list(images), self.device)
        try:
            return self.backend.wait(job, timeout=self.timeout)
        finally:
            self.backend.delete(job)

    def __call__(self, image: Any) -> Any:
        return self.segment_many([image])[0]
