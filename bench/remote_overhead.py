"""Overhead of the remote worker against a local run, for a 160x192x160 subject.

    python bench/remote_overhead.py [--repeats 3] [--steps 2]

Starts ``longdiff-worker serve`` on loopback, runs the same complete-ages job (3 T1w scans
of 160x192x160 voxels, a tiny untrained model) locally and remotely, and prints the
wall-clock times of upload, queue, run and download and the ratio remote / local. The
model is tiny on purpose: what is measured is what the worker adds, not the network.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LongitudinalDiffusionLib.backends.remote import RemoteBackend  # noqa: E402
from LongitudinalDiffusionLib.catalog import create_untrained  # noqa: E402
from LongitudinalDiffusionLib.imaging import Image, save_image  # noqa: E402
from LongitudinalDiffusionLib.jobs import JobInput, JobSpec, run_job  # noqa: E402

SHAPE = (160, 192, 160)
TOKEN = "bench-token-0123456789abcdef"


def subject_files(folder: Path) -> list[JobInput]:
    rng = np.random.default_rng(0)
    yy, xx, zz = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    brain = (xx**2 + yy**2 + zz**2 < 0.6).astype(np.float32)
    inputs = []
    for age in (3.0, 9.0, 12.0):
        array = brain * (100 + 10 * age) + rng.normal(0, 5, SHAPE).astype(np.float32)
        path = save_image(Image(array.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), folder / f"t1-{age:g}.nii.gz")
        inputs.append(JobInput(str(path), age, "T1w"))
    return inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        create_untrained("interval", models, scale="tiny")
        os.environ["LONGDIFF_MODELS"] = str(models)
        spec = JobSpec("complete-ages", "interval-tiny-untrained", "bench", subject_files(tmp),
                       {"ages": [6.0]}, {"steps": args.steps, "seed": 0, "device": "cpu"})  # fmt: skip
        size = sum(Path(i.path).stat().st_size for i in spec.inputs) / 2**20
        run_job(spec)  # warm-up (imports, first allocation)
        local = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run_job(spec)
            local.append(time.perf_counter() - t0)
        port = free_port()
        env = {**os.environ, "LONGDIFF_WORKER_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "serve", "--port", str(port)]
        server = subprocess.Popen([*cmd, "--data", str(tmp / "data")], env=env, stderr=subprocess.DEVNULL)
        try:
            client = RemoteBackend(f"http://127.0.0.1:{port}", TOKEN, retries=20, backoff=0.25)
            client.check()
            rows = []
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                job = client.submit(spec)
                t_up = time.perf_counter()
                started = finished = None
                while finished is None:
                    for e in client.poll(job):
                        if e.kind == "started":
                            started = time.perf_counter()
                        if e.final:
                            finished = time.perf_counter()
                    time.sleep(0.01)
                client.result(job)
                t_end = time.perf_counter()
                client.delete(job)
                if i:  # the first remote run warms the worker up, as the local warm-up did
                    rows.append((t_up - t0, (started or t_up) - t_up, finished - (started or t_up), t_end - finished))
            client.close()
        finally:
            server.terminate()
            server.wait(15)
    med = [statistics.median(col) for col in zip(*rows)]
    remote_total, local_total = sum(med), statistics.median(local)
    print(f"subject: 3 T1w scans of {'x'.join(map(str, SHAPE))} voxels ({size:.1f} MB gzip), steps {args.steps}")
    print(f"local run:       {local_total:.2f} s")
    print(f"remote upload:   {med[0]:.2f} s   queue: {med[1]:.2f} s   run: {med[2]:.2f} s   download: {med[3]:.2f} s")
    print(f"remote total:    {remote_total:.2f} s")
    print(f"ratio remote/local: {remote_total / local_total:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
