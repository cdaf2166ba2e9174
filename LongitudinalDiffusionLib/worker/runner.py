"""Running queued jobs: in this process (one thread per device, oldest job first) or on GPU
machines through Celery (:mod:`.celery_app`), whose reports come back over Redis.

Both paths use :func:`execute`, so a job gives the same result wherever it runs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..jobs import FINAL_KINDS, JobEvent, JobSpec, run_job
from ..progress import Cancelled, CancelToken, ProgressEvent
from .store import Store, save_result

log = logging.getLogger(__name__)

Report = Callable[[JobEvent, str], None]  # (event, error_type)
#: progress events of one stage are sent at most this often (the last step always is)
PROGRESS_INTERVAL = 0.1


def execute(data: Path, job_id: str, spec: JobSpec, device: str, cancel: CancelToken, report: Report) -> str:
    """Run one job and store its result under ``data``; every outcome is reported, never raised.

    Returns the final kind (done, failed or cancelled).
    """
    from ..backends.local import describe_error

    spec.options = {**spec.options, "device": device}  # the worker decides where jobs run
    last: dict[str, float] = {}

    def progress(e: ProgressEvent) -> None:
        now = time.monotonic()
        if e.step < e.total and now - last.get(e.stage, 0.0) < PROGRESS_INTERVAL:
            return
        last[e.stage] = now
        report(JobEvent.from_progress(job_id, e), "")

    t0 = time.perf_counter()
    try:
        result = run_job(spec, progress=progress, cancel=cancel)
        cancel.check("saving")
        save_result(data, job_id, result)
    except Cancelled as exc:
        _discard(data, job_id)
        report(JobEvent(job_id, "cancelled", message=str(exc)), "Cancelled")
        return "cancelled"
    except BaseException as exc:  # a failed job must never take the worker down
        log.warning("job %s failed: %s", job_id, exc, exc_info=not isinstance(exc, InputError))
        _discard(data, job_id)
        report(JobEvent(job_id, "failed", message=describe_error(exc)), type(exc).__name__)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return "failed"
    finally:
        _free_gpu_memory()
    report(JobEvent(job_id, "done", message=f"finished in {time.perf_counter() - t0:.1f} s"), "")
    return "done"


def _discard(data: Path, job_id: str) -> None:
    import shutil

    shutil.rmtree(data / "results" / job_id, ignore_errors=True)
    (data / "results" / f"{job_id}.zip").unlink(missing_ok=True)
    shutil.rmtree(data / "jobs" / job_id, ignore_errors=True)


def _free_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


def worker_devices() -> tuple[str, ...]:
    """One slot per GPU here, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return ("cpu",)


class EmbeddedRunner:
    """One thread per device; each takes the oldest queued job, runs it, and goes on."""

    def __init__(self, store: Store, devices: tuple[str, ...], expiry_hours: float = 0.0) -> None:
        self.store = store
        self.devices = devices or worker_devices()
        self.expiry_hours = expiry_hours
        self._tokens: dict[str, CancelToken] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(d,), name=f"longdiff-runner-{d}", daemon=True)
            for d in self.devices
        ]
        self._wake = threading.Event()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submitted(self, job_id: str) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        status = self.store.get(job_id)["state"]
        if status == "queued":
            if self.store.add_event(JobEvent(job_id, "cancelled", message="cancelled before it started"), "Cancelled"):
                self.store.discard_partial(job_id)
        with self._lock:
            token = self._tokens.get(job_id)
        if token is not None:
            token.cancel()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            for token in self._tokens.values():
                token.cancel()
        for t in self._threads:
            t.join(timeout=30)

    def _loop(self, device: str) -> None:
        last_expiry = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_expiry > 60:
                last_expiry = time.monotonic()
                for gone in self.store.expire(self.expiry_hours):
                    log.info("job %s expired and was deleted", gone)
            job_id = self.store.next_queued(f"{device} (embedded)")
            if job_id is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            token = CancelToken()
            with self._lock:
                self._tokens[job_id] = token
            try:
                spec = self.store.spec(job_id)
                execute(self.store.data, job_id, spec, device, token, self._report)
            except Exception as exc:  # the spec vanished (deleted meanwhile): end the job
                self._report(JobEvent(job_id, "failed", message=str(exc)), type(exc).__name__)
            finally:
                with self._lock:
                    self._tokens.pop(job_id, None)
                self._wake.set()  # another thread may be waiting for work

    def _report(self, event: JobEvent, error_type: str) -> None:
        self.store.add_event(event, error_type=error_type)


class CeleryDispatcher:
    """Sends jobs to the Celery queue and records what the GPU machines report.

    GPU workers push their events (JSON) onto one Redis list; a thread here pops them into
    the job database. A cancel is a Redis key the GPU worker checks between steps.
    """

    def __init__(self, store: Store, broker: str, expiry_hours: float = 0.0) -> None:
        from .celery_app import EVENTS_KEY, cancel_key, make_celery, redis_client

        self.store = store
        self.celery = make_celery(broker)
        self.redis = redis_client(broker)
        self._events_key, self._cancel_key = EVENTS_KEY, cancel_key
        self.expiry_hours = expiry_hours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="longdiff-celery-events", daemon=True)

    def start(self) -> None:
        self.redis.ping()
        self._thread.start()

    def submitted(self, job_id: str) -> None:
        from .celery_app import TASK_NAME

        self.celery.send_task(TASK_NAME, args=[job_id])

    def cancel(self, job_id: str) -> None:
        self.redis.set(self._cancel_key(job_id), "1", ex=7 * 24 * 3600)
        if self.store.get(job_id)["state"] == "queued":
            if self.store.add_event(JobEvent(job_id, "cancelled", message="cancelled before it started"), "Cancelled"):
                self.store.discard_partial(job_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _pump(self) -> None:
        last_expiry = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_expiry > 60:
                last_expiry = time.monotonic()
                self.store.expire(self.expiry_hours)
            try:
                item = self.redis.blpop([self._events_key], timeout=1)
            except Exception as exc:  # Redis restarting: keep trying
                log.warning("cannot read events from the broker (%s); retrying", exc)
                time.sleep(1.0)
                continue
            if item is None:
                continue
            try:
                payload: dict[str, Any] = json.loads(item[1])
                event = JobEvent.from_dict(payload["event"])
                self.store.add_event(event, error_type=payload.get("error_type", ""), runner=payload.get("runner", ""))
                if event.kind in FINAL_KINDS:
                    self.redis.delete(self._cancel_key(event.job_id))
            except Exception as exc:
                log.warning("ignored a malformed event from a GPU worker (%s)", exc)
