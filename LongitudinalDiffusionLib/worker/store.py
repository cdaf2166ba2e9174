"""Jobs on disk: a SQLite database (jobs and their events) and one folder per job.

Layout under the data folder::

    worker.sqlite3            jobs (FIFO by ``seq``) and events
    jobs/<id>/spec.json       the spec, its inputs named by the server (paths relative to the data folder)
    jobs/<id>/input-NNN.nii.gz  validated uploads, compressed as received
    audit.log                 who submitted, cancelled, downloaded, deleted which job (JSON lines)
    results/<id>/             Result.save() output (written atomically)
    results/<id>.zip          the same, as downloaded

The data folder holds patients' images: it is created owner-only (0700) and the worker
warns if it is readable by others. A job that expires leaves a tombstone (its id and when
it expired) so that clients asking for it learn it expired (HTTP 410), not merely that it
is unknown; tombstones themselves go after :data:`TOMBSTONE_DAYS`.

A job's state only moves forward (queued -> running -> done | failed | cancelled); an
event arriving after the final one is ignored, so a late report from a GPU machine can
never resurrect a cancelled job.
"""

from __future__ import annotations

import builtins  # Store.list shadows list in the class's annotations
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..jobs import FINAL_KINDS, JobEvent, JobExpired, JobSpec, UnknownJob

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the worker stopped while this job was running; submit it again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    message TEXT NOT NULL DEFAULT '',
    error_type TEXT NOT NULL DEFAULT '',
    runner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS expired (
    id TEXT PRIMARY KEY,
    finished REAL NOT NULL,
    expired REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
#: tombstones of expired jobs are kept this long (then an expired job is simply unknown)
TOMBSTONE_DAYS = 30.0


class Store:
    """Thread-safe access to the job database and files."""

    def __init__(self, data: Path) -> None:
        self.data = Path(data)
        private_folder(self.data)
        for sub in ("jobs", "results"):
            (self.data / sub).mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data / "worker.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table in ("jobs", "expired"):  # databases of earlier versions: jobs had no owner
            columns = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if "owner" not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self.changed = threading.Condition(self._lock)
        #: called with a job id (from any thread) when the job has a new event or is deleted
        self.listeners: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ paths

    def job_dir(self, job_id: str) -> Path:
        return self.data / "jobs" / job_id

    def result_dir(self, job_id: str) -> Path:
        return self.data / "results" / job_id

    def result_zip(self, job_id: str) -> Path:
        return self.data / "results" / f"{job_id}.zip"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    # ------------------------------------------------------------------ jobs

    def add(self, job_id: str, spec: JobSpec, owner: str = "") -> None:
        """Record a queued job whose inputs are already in :meth:`job_dir`."""
        text = json.dumps(spec.to_dict())
        (self.job_dir(job_id) / "spec.json").write_text(text, encoding="utf-8")
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, task, model, spec, created, owner) VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, spec.task, spec.model, text, time.time(), owner),
            )
            self._event(job_id, JobEvent(job_id, "queued", message=f"{spec.task} with {spec.model}"))

    def get(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """The job's record; with ``owner``, another user's job is unknown (never "forbidden":
        a job id does not tell whether it exists)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            gone = None if row else self._db.execute("SELECT * FROM expired WHERE id = ?", (job_id,)).fetchone()
        if owner is not None:
            row = row if row is not None and row["owner"] == owner else None
            gone = gone if gone is not None and gone["owner"] == owner else None
        if gone is not None:
            ended = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(gone["finished"]))
            deleted = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(gone["expired"]))
            raise JobExpired(
                f"job {job_id} expired: it ended {ended} and was deleted with its result {deleted}, "
                "after this worker's expiry time; submit it again"
            )
        if row is None:
            raise UnknownJob(f"no job {job_id!r} on this worker (never submitted, deleted or expired)")
        return dict(row)

    def spec(self, job_id: str) -> JobSpec:
        """The job's spec with absolute paths on this machine."""
        spec = JobSpec.from_dict(json.loads(self.get(job_id)["spec"]))
        for item in spec.inputs:
            item.path = str(self.data / item.path)
            if item.labels:
                item.labels = str(self.data / item.labels)
        return spec

    def status(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        row = self.get(job_id, owner)
        with self._lock:
            last = self._db.execute(
                "SELECT data FROM events WHERE job_id = ? AND data LIKE '%\"progress\"%' ORDER BY seq DESC LIMIT 1",
                (job_id,),
            ).fetchone()
            position = None
            if row["state"] == "queued":
                position = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row["seq"],)
                ).fetchone()[0]
        return {
            "job_id": job_id,
            "owner": row["owner"] or None,
            "state": row["state"],
            "task": row["task"],
            "model": row["model"],
            "created": row["created"],
            "started": row["started"],
            "finished": row["finished"],
            "message": row["message"],
            "error_type": row["error_type"] or None,
            "runner": row["runner"] or None,
            "queue_position": position,
            "progress": json.loads(last["data"]) if last else None,
            "result_available": row["state"] == "done" and self.result_zip(job_id).is_file(),
        }

    def list(self, limit: int = 1000, owner: str | None = None) -> builtins.list[dict[str, Any]]:
        """The newest jobs (with ``owner``: that user's only)."""
        with self._lock:
            if owner is None:
                rows = self._db.execute("SELECT id FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                query = "SELECT id FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?"
                rows = self._db.execute(query, (owner, limit)).fetchall()
        out = []
        for r in rows:
            try:
                out.append(self.status(r["id"]))
            except UnknownJob:  # deleted meanwhile
                pass
        return out

    def next_queued(self, runner: str) -> str | None:
        """Take the oldest queued job for ``runner`` (marks it running)."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self.add_event(JobEvent(row["id"], "started", message=runner), runner=runner)
            return row["id"]

    def exists(self, job_id: str) -> bool:
        return self.state(job_id) is not None

    def state(self, job_id: str) -> str | None:
        """The job's state, None if there is no such job."""
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row["state"]

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel the job if it is still queued (atomically: no runner can take it meanwhile)."""
        with self._lock:
            if self.state(job_id) != "queued":
                return False
            event = JobEvent(job_id, "cancelled", message="cancelled before it started")
            return self.add_event(event, error_type="Cancelled")

    def add_event(self, event: JobEvent, *, error_type: str = "", runner: str = "") -> bool:
        """Append an event and move the job's state; False (ignored) once the job has ended."""
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (event.job_id,)).fetchone()
            if row is None or row["state"] in FINAL_KINDS:
                return False
            now = time.time()
            if event.kind == "started":
                self._db.execute(
                    "UPDATE jobs SET state = 'running', started = ?, runner = ? WHERE id = ?",
                    (now, runner or event.message, event.job_id),
                )
            elif event.kind in FINAL_KINDS:
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished = ?, message = ?, error_type = ? WHERE id = ?",
                    (event.kind, now, event.message, error_type, event.job_id),
                )
            self._event(event.job_id, event)
            return True

    def _event(self, job_id: str, event: JobEvent) -> None:
        seq = self._db.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
        event.seq = seq
        self._db.execute(
            "INSERT INTO events (job_id, seq, data) VALUES (?, ?, ?)", (job_id, seq, json.dumps(event.to_dict()))
        )
        self.changed.notify_all()
        self._tell(job_id)

    def _tell(self, job_id: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(job_id)
            except Exception:  # a listener must never break the store
                log.exception("event listener failed")

    def events(self, job_id: str, after: int = -1) -> builtins.list[JobEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
            ).fetchall()
        return [JobEvent.from_dict(json.loads(r["data"])) for r in rows]

    def wait_change(self, timeout: float) -> None:
        with self._lock:
            self.changed.wait(timeout)

    # ------------------------------------------------------------------ life cycle

    def recover(self) -> builtins.list[str]:
        """At start-up: jobs that were running when the process died are failed (their partial
        output is removed); queued jobs stay queued. Returns the interrupted jobs' ids."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()
        ids = [r["id"] for r in rows]
        for job_id in ids:
            self.add_event(JobEvent(job_id, "failed", message=INTERRUPTED), error_type="Interrupted")
            self.discard_partial(job_id)
        for stale in (self.data / "results").glob(".*"):  # Result.save's temporary folders
            shutil.rmtree(stale, ignore_errors=True)
        return ids

    def discard_partial(self, job_id: str) -> None:
        """Remove the inputs (and any unfinished result) of a job that ended without a result."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        shutil.rmtree(self.result_dir(job_id), ignore_errors=True)
        self.result_zip(job_id).unlink(missing_ok=True)
        for stale in (self.data / "results").glob(f".{job_id}*"):  # Result.save's and the zip's temporaries
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def delete(self, job_id: str) -> None:
        self.get(job_id)
        with self._lock:
            self._db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self.discard_partial(job_id)
        self._tell(job_id)

    def expire(self, hours: float) -> builtins.list[str]:
        """Delete jobs (record, events, inputs, result) that ended more than ``hours`` ago
        (0: never), leaving a tombstone each; returns their ids."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM expired WHERE expired < ?", (now - TOMBSTONE_DAYS * 86400,))
        if hours <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT id, finished, owner FROM jobs WHERE finished IS NOT NULL AND finished < ?",
                (now - hours * 3600,),
            ).fetchall()
        for r in rows:
            with self._lock:  # one transaction: tombstone and deletion together
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(
                        "INSERT OR REPLACE INTO expired (id, finished, expired, owner) VALUES (?, ?, ?, ?)",
                        (r["id"], r["finished"], now, r["owner"]),
                    )
                    self._db.execute("DELETE FROM events WHERE job_id = ?", (r["id"],))
                    self._db.execute("DELETE FROM jobs WHERE id = ?", (r["id"],))
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            self.discard_partial(r["id"])
            self._tell(r["id"])
        return [r["id"] for r in rows]

    def counts(self, owner: str | None = None) -> dict[str, int]:
        with self._lock:
            if owner is None:
                rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
            else:
                query = "SELECT state, COUNT(*) AS n FROM jobs WHERE owner = ? GROUP BY state"
                rows = self._db.execute(query, (owner,)).fetchall()
        return {r["state"]: r["n"] for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


_INPUT_FILE = re.compile(r"jobs/[0-9a-f]{32}/input-(\d{3})\.nii(?:\.gz)?")
_ABS_PATH = re.compile(r"(?<![\w.:/\\])/(?:[^\s/:'\"(),]+/)+([^\s/:'\"(),]+)")


def public_message(text: str, data: Path) -> str:
    """A message fit for a client: the worker's paths never leave it. An uploaded file
    becomes "file N" (as the client numbered it), the data folder "<worker data>", and any
    other absolute path its last component."""
    data = Path(data)
    for root in {str(data.resolve()), str(data.absolute())}:
        text = text.replace(root.rstrip("/") + "/", "")
    text = _INPUT_FILE.sub(lambda m: f"file {int(m.group(1))}", text)
    for root in {str(data.resolve()), str(data.absolute())}:
        text = text.replace(root, "<worker data>")
    return _ABS_PATH.sub(r"\1", text)


def private_folder(path: Path) -> None:
    """Create ``path`` owner-only (0700), or warn if it exists and others may read it."""
    path = Path(path)
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # whatever the umask
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is open to other users (mode %o): it holds patients' images; chmod 700 it", path,
                    stat.S_IMODE(mode))  # fmt: skip


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk: a result reported done survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_result(data: Path, job_id: str, result: Any) -> None:
    """Write a finished job's result folder and its zip (atomically: both or neither), and
    flush them to the disk before the job may be reported done."""
    folder = data / "results" / job_id
    result.save(folder, overwrite=True)
    zpath = data / "results" / f"{job_id}.zip"
    tmp = zpath.with_name(f".{job_id}.zip.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    # NIfTI is already gzip-compressed; deflating it again costs time for nothing
                    kind = zipfile.ZIP_STORED if path.name.endswith(".gz") else zipfile.ZIP_DEFLATED
                    zf.write(path, path.relative_to(folder).as_posix(), compress_type=kind)
        _fsync(tmp)
        tmp.replace(zpath)
        _fsync(zpath.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        raise
