"""Running queued jobs: in this process (one thread per device, oldest job first) or on GPU
machines through Celery (:mod:`.celery_app`), whose reports come back over Redis.

Both paths use :func:`.execution.execute`, so a job gives the same result wherever it runs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from ..jobs import FINAL_KINDS, JobEvent
from ..progress import CancelToken
from .execution import execute
from .store import INTERRUPTED, Store, public_message

log = logging.getLogger(__name__)


def worker_devices() -> tuple[str, ...]:
    """One slot per GPU here, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return ("cpu",)


def _sweep_expired(store: Store, expiry_hours: float, every_seconds: float, last_sweep: float) -> float:
    """Delete the expired jobs if the last sweep (a ``time.monotonic()``) is ``every_seconds``
    old or more; returns the time of the last sweep (the new one, or ``last_sweep``)."""
    if time.monotonic() - last_sweep < every_seconds:
        return last_sweep
    last_sweep = time.monotonic()
    for gone in store.expire(expiry_hours):
        log.info("job %s expired and was deleted", gone)
    return last_sweep


class EmbeddedRunner:
    """One thread per device; each takes the oldest queued job, runs it, and goes on.

    When the worker is stopped, running jobs are stopped within a sampler step and marked
    failed as interrupted (as after a crash), not as cancelled: nobody cancelled them.
    """

    def __init__(
        self, store: Store, devices: tuple[str, ...], expiry_hours: float = 0.0, expiry_sweep_seconds: float = 60.0
    ) -> None:
        self.store = store
        self.devices = devices or worker_devices()
        self.expiry_hours, self.expiry_sweep_seconds = expiry_hours, expiry_sweep_seconds
        self._user_cancelled: set[str] = set()
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
        if self.store.cancel_queued(job_id):  # atomic: a runner thread cannot take it meanwhile
            self.store.discard_partial(job_id)
            return
        with self._lock:
            token = self._tokens.get(job_id)
            if self.store.get(job_id)["state"] == "running":
                self._user_cancelled.add(job_id)  # also seen by a thread that took it but has no token yet
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
        last_expiry = -float("inf")
        while not self._stop.is_set():
            last_expiry = _sweep_expired(self.store, self.expiry_hours, self.expiry_sweep_seconds, last_expiry)
            job_id = self.store.next_queued(f"{device} (embedded)")
            if job_id is None:
                self._wake.wait(min(1.0, max(self.expiry_sweep_seconds, 0.05)))
                self._wake.clear()
                continue
            token = CancelToken()
            with self._lock:
                self._tokens[job_id] = token
                if job_id in self._user_cancelled:
                    token.cancel()
            try:
                spec = self.store.spec(job_id)
                execute(self.store.data, job_id, spec, device, token, self._report)
            except Exception as exc:  # the spec vanished (deleted meanwhile): end the job
                message = public_message(str(exc), self.store.data)
                self._report(JobEvent(job_id, "failed", message=message), type(exc).__name__)
            finally:
                with self._lock:
                    self._tokens.pop(job_id, None)
                    self._user_cancelled.discard(job_id)
                if not self.store.exists(job_id):  # deleted while it ran: nothing of it may stay
                    self.store.discard_partial(job_id)
                self._wake.set()  # another thread may be waiting for work

    def _report(self, event: JobEvent, error_type: str) -> None:
        if event.kind == "cancelled" and self._stop.is_set():
            with self._lock:
                by_user = event.job_id in self._user_cancelled
            if not by_user:  # stopped by the worker's shutdown
                event = JobEvent(event.job_id, "failed", message=INTERRUPTED)
                error_type = "Interrupted"
        self.store.add_event(event, error_type=error_type)


class CeleryDispatcher:
    """Sends jobs to the Celery queue and records what the GPU machines report.

    GPU workers push their events (JSON) onto one Redis list; a thread here pops them into
    the job database. A cancel is a Redis key the GPU worker checks between steps.
    """

    def __init__(
        self, store: Store, broker: str, expiry_hours: float = 0.0, expiry_sweep_seconds: float = 60.0
    ) -> None:
        from .celery_app import EVENTS_KEY, cancel_key, make_celery, redis_client

        self.store = store
        self.celery = make_celery(broker)
        self.redis = redis_client(broker)
        self._events_key, self._cancel_key = EVENTS_KEY, cancel_key
        self.expiry_hours, self.expiry_sweep_seconds = expiry_hours, expiry_sweep_seconds
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
        if self.store.cancel_queued(job_id):
            self.store.discard_partial(job_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _pump(self) -> None:
        last_expiry = -float("inf")
        while not self._stop.is_set():
            last_expiry = _sweep_expired(self.store, self.expiry_hours, self.expiry_sweep_seconds, last_expiry)
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
                added = self.store.add_event(
                    event, error_type=payload.get("error_type", ""), runner=payload.get("runner", "")
                )
                if event.kind in FINAL_KINDS:
                    self.redis.delete(self._cancel_key(event.job_id))
                    if not added and event.kind == "done" and self.store.state(event.job_id) != "done":
                        # cancelled or deleted while a GPU machine finished it: its result must go
                        self.store.discard_partial(event.job_id)
            except Exception as exc:
                log.warning("ignored a malformed event from a GPU worker (%s)", exc)
