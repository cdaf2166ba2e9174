"""Running one job: the piece both job runners share, the in-process one (:mod:`.runner`) and
the GPU machines' Celery task (:mod:`.celery_app`), so a job gives the same result wherever it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, OutOfMemory
from ..jobs import JobEvent, JobSpec, run_job
from ..progress import Cancelled, CancelToken, ProgressEvent
from .store import public_message, save_result

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
        oom = out_of_memory(exc)
        log.warning("job %s failed: %s", job_id, exc, exc_info=not (oom or isinstance(exc, InputError)))
        _discard(data, job_id)
        message = oom_message(exc) if oom else describe_error(exc)
        report(JobEvent(job_id, "failed", message=public_message(message, data)), oom or type(exc).__name__)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return "failed"
    finally:
        _free_gpu_memory()
    report(JobEvent(job_id, "done", message=f"finished in {time.perf_counter() - t0:.1f} s"), "")
    return "done"


def out_of_memory(exc: BaseException) -> str:
    """ "OutOfMemoryError" if ``exc`` is a device out-of-memory error, or the library's
    report of one (the sampler re-raises it with the stage and batch shape), else ""."""
    from ..diffusion.device import is_out_of_memory

    found: BaseException | None = exc
    seen = 0
    while found is not None and seen < 5:
        if is_out_of_memory(found):
            return "OutOfMemoryError"
        found, seen = found.__cause__ or found.__context__, seen + 1
    return ""


def oom_message(exc: BaseException) -> str:
    """What a client is told when its job ran out of GPU memory on the worker."""
    found: BaseException | None = exc
    while found is not None and not isinstance(found, OutOfMemory):
        found = found.__cause__ or found.__context__
    where = f" ({found.where})" if isinstance(found, OutOfMemory) and "\n" not in found.where else ""
    return (
        f"the worker's GPU ran out of memory{where}; try fewer samples (n_samples) or a smaller model, "
        "or submit again when the worker is less busy"
    )


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
    except Exception as exc:  # best effort only: a job still runs without it
        log.debug("cannot empty the CUDA cache (%s)", exc)
