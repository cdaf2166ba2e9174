"""Scale-out: GPU machines share one Celery queue on a Redis broker.

``longdiff-worker serve --broker redis://...`` validates uploads, stores them under its
``--data`` folder and sends the job id to the queue. Each ``longdiff-worker gpu --broker
redis://... --data DIR`` process takes one job at a time (prefetch 1, acknowledged after
the job ends, so a job of a crashed machine goes back to the queue), runs it with the
library, writes the result under the same data folder (shared storage, e.g. NFS) and
pushes its events onto a Redis list the server reads. Cancelling sets a Redis key the GPU
worker checks between sampler steps.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..jobs import JobEvent
from ..progress import CancelToken

log = logging.getLogger(__name__)

QUEUE = "longdiff"
TASK_NAME = "longdiff.run_job"
EVENTS_KEY = "longdiff:events"


def cancel_key(job_id: str) -> str:
    return f"longdiff:cancel:{job_id}"


def redis_client(broker: str):
    import redis

    return redis.Redis.from_url(broker, socket_timeout=10, socket_connect_timeout=5)


def make_celery(broker: str):
    from celery import Celery

    app = Celery("longdiff", broker=broker)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,  # a job whose GPU machine died is delivered again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one job per GPU process, the rest stay in the shared queue
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_ignore_result=True,
    )
    return app


class _Cancel(CancelToken):
    """A cancel token that also looks at the job's Redis key (at most twice a second)."""

    def __init__(self, redis: Any, job_id: str) -> None:
        super().__init__()
        self._redis, self._key, self._last = redis, cancel_key(job_id), 0.0

    @property
    def cancelled(self) -> bool:
        import time

        if not super().cancelled and time.monotonic() - self._last > 0.5:
            self._last = time.monotonic()
            if self._redis.exists(self._key):
                self.cancel()
        return super().cancelled

    def check(self, stage: str = "") -> None:
        if self.cancelled:
            super().check(stage)


def gpu_worker(broker: str, data: Path, device: str = "auto", name: str | None = None) -> int:
    """Consume jobs from the queue until stopped (the ``gpu`` command)."""
    from ..diffusion.device import resolve_device
    from .execution import execute
    from .store import Store

    data = Path(data)
    store = Store(data)  # only for its paths: the database belongs to the server
    store.close()
    dev = str(resolve_device(device))
    runner = name or f"{socket.gethostname()}-{os.getpid()} ({dev})"
    app = make_celery(broker)
    redis = redis_client(broker)

    def report(event: JobEvent, error_type: str) -> None:
        payload = {"event": event.to_dict(), "error_type": error_type, "runner": runner}
        redis.rpush(EVENTS_KEY, json.dumps(payload))

    @app.task(name=TASK_NAME, bind=True)
    def run(self: Any, job_id: str) -> str:
        token = _Cancel(redis, job_id)
        if token.cancelled:
            report(JobEvent(job_id, "cancelled", message="cancelled before it started"), "Cancelled")
            return "cancelled"
        spec_file = data / "jobs" / job_id / "spec.json"
        try:
            from ..jobs import JobSpec

            spec = JobSpec.from_dict(json.loads(spec_file.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            report(JobEvent(job_id, "failed", message=f"job files not found on {runner} ({exc})"), "OSError")
            return "failed"
        for item in spec.inputs:
            item.path = str(data / item.path)
            if item.labels:
                item.labels = str(data / item.labels)
        report(JobEvent(job_id, "started", message=runner), "")
        return execute(data, job_id, spec, dev, token, report)

    log.info("GPU worker %s consuming queue '%s' on %s", runner, QUEUE, broker)
    argv = ["worker", "--pool=solo", "--concurrency=1", f"--queues={QUEUE}", "--loglevel=INFO"]
    argv += [f"--hostname=longdiff-{os.getpid()}@%h", "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0
