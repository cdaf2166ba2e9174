"""The job process: ``python -m LongitudinalDiffusionLib.backends.child``.

Started by :class:`~LongitudinalDiffusionLib.backends.process.ProcessBackend`. It reads
requests as JSON lines on stdin and answers with JSON lines on stdout; everything else it
(or a library it uses) prints goes to stderr, so stdout carries nothing but the protocol.

Requests (one per line):

* ``{"op": "run", "job_id": ..., "spec": {JobSpec}, "out": folder, "progress_interval": s}``:
  runs the spec (:func:`~LongitudinalDiffusionLib.jobs.run_job`) and writes its result to
  ``out/result.pickle`` for the parent (or, if it cannot be pickled, saves it in
  ``out/result`` with :meth:`~LongitudinalDiffusionLib.tasks.Result.save`);
* ``{"op": "segment", "job_id": ..., "model": name, "device": d, "images": [{"path": p} |
  {"npy": p, "affine": 4x4}], "out": folder}``: labels of each image with a segmentation
  model, saved as ``out/labels-NNN.npy`` (int16);
* ``{"op": "cancel", "job_id": ...}``: stop that job within a step (or before it starts);
* ``{"op": "quit"}`` or the end of stdin: leave.

Answers: ``{"type": "ready", "pid": ..., "protocol": 1}`` first; then, per job, the
:class:`~LongitudinalDiffusionLib.jobs.JobEvent` dictionaries (``started``, ``progress``...,
then ``done``/``failed``/``cancelled``); final events add ``cache`` (model cache hits and
loads), ``failed`` adds ``error_type``; ``{"type": "bye", "reason": ...}`` last.

Jobs run one after the other on the main thread; a reader thread takes stdin so that a
cancel arrives while a job runs. Loaded models are kept (:class:`ModelCache`) while the
process lives (``--cache-size``, fewer while less than ``--keep-free-mb`` is available); it
ends itself after ``--idle-timeout`` seconds without a request.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pickle
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROTOCOL = 1
log = logging.getLogger("LongitudinalDiffusionLib.backends.child")


def available_mb(device: Any = "cpu") -> float | None:
    """Memory available for another model on ``device`` in MB (None when unknown): the
    GPU's free memory for CUDA; else the system's available memory (Linux ``MemAvailable``,
    or psutil when installed)."""
    if str(getattr(device, "type", device)).startswith("cuda"):
        try:
            import torch

            return torch.cuda.mem_get_info(device)[0] / 2**20
        except Exception:  # no CUDA build, no driver, or the device is busy: the free memory is unknown
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except Exception:  # not installed, or no answer: unknown
        return None


class ModelCache:
    """Loaded models, least recently used dropped first, keyed by the card's path, the
    weights' sha256 and the device. A hit is checked against the weights file (same size
    and modification time), so a replaced or deleted file is never served from memory.

    At most ``size`` models are kept, and fewer while memory is short: before a load and
    after it, the least recently used others are dropped while less than ``keep_free_mb``
    MB are available on the model's device (:func:`available_mb`)."""

    def __init__(self, size: int = 2, keep_free_mb: float = 1024.0) -> None:
        self.size = max(1, int(size))
        self.keep_free_mb = float(keep_free_mb)
        self.hits = 0
        self.loads = 0
        self.dropped = 0
        self._items: collections.OrderedDict[tuple[str, str, str], tuple[Any, Any]] = collections.OrderedDict()

    def _short(self, device: Any) -> bool:
        free = available_mb(device)
        return free is not None and free < self.keep_free_mb

    def _drop_oldest(self, keep: int, device: Any) -> None:
        """Drop the least recently used while more than ``keep`` remain and memory is short."""
        dropped = False
        while len(self._items) > keep and self._short(device):
            key, _ = self._items.popitem(last=False)
            log.info("model cache: dropped %s (memory is short)", Path(key[0]).stem)
            self.dropped += 1
            dropped = True
        if dropped:
            import gc

            gc.collect()

    def get(self, name_or_path: str, device: Any) -> Any:
        from ..catalog import load_model, resolve_card

        card = resolve_card(name_or_path)
        entry = card.card.get("weights") or {}
        weights = card.path.parent / str(entry.get("file", ""))
        try:
            stat = weights.stat()
            stamp: Any = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = None
        key = (str(Path(card.path).resolve()), str(entry.get("sha256", "")), str(device))
        item = self._items.get(key)
        if item is not None and stamp is not None and item[0] == stamp:
            self._items.move_to_end(key)
            self.hits += 1
            log.info("model cache hit: %s", card.name)
            return item[1]
        self._items.pop(key, None)
        self._drop_oldest(0, device)  # room first
        loaded = load_model(card, device)
        self.loads += 1
        self._items[key] = (stamp, loaded)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        self._drop_oldest(1, device)  # the one just loaded stays
        return loaded

    def report(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "loads": self.loads,
            "dropped": self.dropped,
            "models": len(self._items),
            "pid": os.getpid(),
        }


class _Output:
    """The protocol's stdout: whole lines, one writer at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, default=str) + "\n").encode("utf-8")
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]


class Server:
    """Serves the requests of one parent, one job at a time."""

    def __init__(self, out: _Output, cache_size: int = 2, keep_free_mb: float = 1024.0) -> None:
        from ..progress import CancelToken

        self.out = out
        self.cache = ModelCache(cache_size, keep_free_mb)
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._tokens: dict[str, Any] = {}  # job id -> CancelToken, for jobs received and not ended
        self._token_type = CancelToken

    # ---------------------------------------------------------------- stdin

    def read(self, stream: Any) -> None:
        """The reader thread: requests to the inbox, cancels applied at once."""
        for raw in stream:
            try:
                message = json.loads(raw)
            except ValueError:
                log.warning("not a JSON request: %.200r", raw)
                continue
            if not isinstance(message, dict):
                continue
            if message.get("op") == "cancel":
                self.token(str(message.get("job_id"))).cancel()
                continue
            self.inbox.put(message)
            if message.get("op") == "quit":
                return
        # the end of stdin: the parent is gone (or closing): stop what runs, then leave
        with self._lock:
            for token in self._tokens.values():
                token.cancel()
        self.inbox.put(None)

    def token(self, job_id: str) -> Any:
        with self._lock:
            token = self._tokens.get(job_id)
            if token is None:
                token = self._tokens[job_id] = self._token_type()
            return token

    # ---------------------------------------------------------------- serving

    def serve(self, idle_timeout: float) -> str:
        """Handle requests until quit, the end of stdin or ``idle_timeout`` seconds without one."""
        while True:
            try:
                message = self.inbox.get(timeout=idle_timeout if idle_timeout > 0 else None)
            except queue.Empty:
                return "idle"
            if message is None:
                return "eof"
            op = message.get("op")
            if op == "quit":
                return "quit"
            if op in ("run", "segment"):
                self.job(message)
            else:
                log.warning("unknown request %r", op)

    def job(self, message: dict[str, Any]) -> None:
        from ..errors import InputError
        from ..jobs import JobEvent
        from ..progress import Cancelled
        from .local import describe_error

        job_id = str(message.get("job_id"))
        token = self.token(job_id)
        out = Path(message["out"])
        interval = float(message.get("progress_interval") or 0.0)
        last: dict[str, float] = {}

        def progress(e: Any) -> None:
            now = time.monotonic()
            if interval and e.step < e.total and now - last.get(e.stage, 0.0) < interval:
                return
            last[e.stage] = now
            self.out.send(JobEvent.from_progress(job_id, e).to_dict())

        self.out.send(JobEvent(job_id, "started").to_dict())
        t0 = time.perf_counter()
        final: dict[str, Any]
        try:
            token.check("loading")
            if message["op"] == "run":
                extra = self._run(message, out, progress, token)
            else:
                extra = self._segment(message, out, progress, token)
            token.check("saving")
            final = {
                **JobEvent(job_id, "done", message=f"finished in {time.perf_counter() - t0:.1f} s").to_dict(),
                **extra,
            }
        except Cancelled as exc:
            shutil.rmtree(out, ignore_errors=True)
            final = {**JobEvent(job_id, "cancelled", message=str(exc)).to_dict(), "stage": exc.stage}
        except BaseException as exc:  # every failure ends the job, never the process
            log.warning("job %s failed", job_id, exc_info=not isinstance(exc, InputError))
            shutil.rmtree(out, ignore_errors=True)
            error_type = "InputError" if isinstance(exc, InputError) else type(exc).__name__
            final = {**JobEvent(job_id, "failed", message=describe_error(exc)).to_dict(), "error_type": error_type}
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            with self._lock:
                self._tokens.pop(job_id, None)
        final["cache"] = self.cache.report()
        self.out.send(final)

    def _device(self, name: Any) -> Any:
        from ..diffusion import resolve_device

        return resolve_device(name or "auto")

    def _run(self, message: dict[str, Any], out: Path, progress: Any, token: Any) -> dict[str, Any]:
        from ..jobs import JobSpec, run_job

        spec = JobSpec.from_dict(message["spec"])
        log.info("job %s: %s with %s", message["job_id"], spec.task, spec.model)
        model = self.cache.get(spec.model, self._device(spec.options.get("device")))
        result = run_job(spec, progress=progress, cancel=token, model=model)
        token.check("saving")
        try:  # for the parent alone: far quicker to write and read than NIfTI
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # something in it does not pickle: the NIfTI folder then
            log.info("result not picklable (%s): saved as NIfTI", exc)
            result.save(out / "result", overwrite=True)
            return {"folder": str(out / "result"), "format": "nifti"}
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.pickle").write_bytes(data)
        return {"folder": str(out), "format": "pickle"}

    def _segment(self, message: dict[str, Any], out: Path, progress: Any, token: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        from ..imaging import Image, load_image
        from ..progress import Stage
        from ..segmentation import segment

        items = message.get("images") or []
        log.info("job %s: segmenting %d image(s) with %s", message["job_id"], len(items), message.get("model"))
        loaded = self.cache.get(str(message["model"]), self._device(message.get("device")))
        stage = Stage("segmenting", len(items), progress, token).start()
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for i, item in enumerate(items):
            if "path" in item:
                image = load_image(item["path"])
            else:
                image = Image(np.load(item["npy"]), np.asarray(item["affine"], dtype=np.float64))
            with torch.inference_mode():
                labels = segment(loaded.network, image, config=loaded.config, grid=loaded.card.card.get("grid"))
            name = f"labels-{i:03d}.npy"
            np.save(out / name, np.asarray(labels.array, dtype=np.int16))
            files.append(name)
            stage.advance()
        return {"labels": files, "classes": list(loaded.config.get("classes", []))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m LongitudinalDiffusionLib.backends.child", description=__doc__)
    parser.add_argument("--idle-timeout", type=float, default=600.0, help="seconds without a request before leaving")
    parser.add_argument("--cache-size", type=int, default=2, help="models kept loaded")
    parser.add_argument(
        "--keep-free-mb", type=float, default=1024.0, help="drop cached models while less memory is available"
    )
    args = parser.parse_args(argv)
    # stdout is the protocol's alone: anything else written to fd 1 goes to stderr
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = _Output(protocol_fd)
    server = Server(out, args.cache_size, args.keep_free_mb)
    out.send({"type": "ready", "pid": os.getpid(), "protocol": PROTOCOL, "python": sys.version.split()[0]})
    reader = threading.Thread(target=server.read, args=(sys.stdin.buffer,), name="longdiff-child-stdin", daemon=True)
    reader.start()
    reason = server.serve(args.idle_timeout)
    out.send({"type": "bye", "reason": reason})
    log.info("job process %s leaves (%s)", os.getpid(), reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
