"""Shared pieces of the job, backend and worker tests: a tiny cohort, tiny untrained models,
specs built from them, and a real ``longdiff-worker`` process on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from LongitudinalDiffusionLib.catalog import create_untrained
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.jobs import JobSpec
from LongitudinalDiffusionLib.subject import Subject, load_bids_subject

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 2, "seed": 0}
METHODS = ("interval", "cwdm", "ddm")


def make_cohort(out: Path) -> Path:
    write_cohort(out, CohortSpec(n_subjects=1, seed=3, shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0)), jobs=1)
    return out


def make_models(folder: Path) -> dict[str, Path]:
    return {m: create_untrained(m, folder, scale="tiny") for m in METHODS}


def gapped_subject(cohort: Path) -> Subject:
    """sub-001's T1w scans without the third visit (its age is ``meta["gap"]``)."""
    full = load_bids_subject(cohort, subject="001")
    gap = sorted(full.ages())[2]
    kept = [tp for tp in full.timepoints if tp.modality.value == "T1w" and abs(tp.age - gap) > 0.01]
    return Subject(full.subject_id, kept, full.source, {**full.meta, "gap": gap})


def ages_spec(cohort: Path, model: str, **options) -> JobSpec:
    subject = gapped_subject(cohort)
    return JobSpec.from_subject(
        subject, "complete-ages", model, {"ages": [subject.meta["gap"]]}, {**FAST, "device": "cpu", **options}
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """``longdiff-worker serve`` in a child process, on a free loopback port."""

    def __init__(self, data: Path, models: Path, *extra: str, token: str = "test-token", port: int | None = None):
        self.data, self.models, self.extra, self.token = data, models, extra, token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data.parent / f"{data.name}-worker.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LONGDIFF_MODELS": str(self.models),
            "LONGDIFF_WORKER_TOKEN": self.token,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--data", str(self.data), *self.extra]
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"worker did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to clean up (a crash, a power cut)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None
    )
