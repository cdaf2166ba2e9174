"""How fast ``/v1/health`` answers while hostile clients press a ``longdiff-worker``.

    python bench/worker_hostile.py [--quick]

Starts ``longdiff-worker serve`` on loopback with its default limits (except the event
stream caps, raised to 2000 so that the cost of many open streams shows) and two queued jobs:
on a Celery queue without GPU machines when redis-server is installed (nothing else uses
the CPU), else in the embedded runner (one job runs, one waits; ``--embedded`` forces
this). Then, one after the other:

* ``streams``: 500 open event streams on the queued job (100 with ``--quick``), from 5
  loopback addresses - and the CPU the event loop's thread used meanwhile;
* ``slowloris``: 300 connections sending a request line and then nothing, from one address
  (the per-address cap is 128; the header timeout 10 s) - and how long they stayed open;
* ``slow bodies``: 50 authenticated uploads that stop after the headers (body timeout 30 s);
* ``flood``: 700 idle connections from 6 addresses (cap 512 in all);
* ``bomb``: a 1 MB gzip declaring a 1 GB image, uploaded 5 times - the answer, its time and
  the worker's peak memory.

For each, the latency of 40 ``/v1/health`` requests (a new connection each, from
127.0.0.1) is printed as median / 95th percentile / max in ms. The figures are in
docs/worker.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LongitudinalDiffusionLib.catalog import create_untrained  # noqa: E402

TOKEN = "bench-hostile-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_latency(url: str, n: int = 40) -> str:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            ok = httpx.get(f"{url}/v1/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            ok = False
        times.append((time.perf_counter() - t0) * 1000 if ok else float("inf"))
        time.sleep(0.02)
    times.sort()
    failed = sum(1 for t in times if t == float("inf"))
    good = [t for t in times if t != float("inf")] or [float("nan")]
    text = f"{statistics.median(good):.1f} / {good[int(0.95 * (len(good) - 1))]:.1f} / {good[-1]:.1f} ms"
    return text + (f" ({failed} of {n} failed)" if failed else "")


def loop_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return s


def submit(url: str, body: bytes, steps: int) -> httpx.Response:
    spec = {"task": "complete-ages", "model": "interval-tiny-untrained", "subject_id": "bench",
            "inputs": [{"path": "upload:0", "age_months": 3.0, "modality": "T1w"}],
            "params": {"ages": [9.0]}, "options": {"steps": steps}}  # fmt: skip
    return httpx.post(f"{url}/v1/jobs", headers=AUTH, data={"spec": json.dumps(spec)},
                      files=[("files", ("a.nii.gz", body))], timeout=120)  # fmt: skip


def bomb_gzip(zeros_mb: int) -> bytes:
    """A NIfTI header declaring 512^3 float64 voxels (1 GB: within the voxel and extent caps),
    followed by ``zeros_mb`` MB of zeros, gzip-compressed (about 1 MB for 1 GB)."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 512))
    header.set_data_dtype(np.float64)
    header.set_qform(np.eye(4), 1)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [packer.compress(header.binaryblock + b"\0" * 4)]
    block = bytes(1 << 20)
    out += [packer.compress(block) for _ in range(zeros_mb)]
    out.append(packer.flush())
    return b"".join(out)


SCENARIOS = ("streams", "slowloris", "bodies", "flood", "bomb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer hostile clients (a smoke test)")
    parser.add_argument("--embedded", action="store_true", help="run the jobs in the worker (one runs meanwhile)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--source", type=Path, help="run the worker of this source tree (e.g. an earlier commit's "
                        "`git archive` export) to compare")  # fmt: skip
    args = parser.parse_args(argv)
    only = set(args.only or SCENARIOS)
    scale = 0.2 if args.quick else 1.0
    worker = Worker(args.source.resolve() if args.source else ROOT, queue=not args.embedded)
    rows: list[tuple[str, str, str]] = []
    try:
        worker.start()
        url, port, proc = worker.url, worker.port, worker.proc
        image = np.random.default_rng(0).random((32, 40, 32)).astype(np.float32)
        body = gzip.compress(nib.Nifti1Image(image, np.diag([5.0, 5.0, 5.0, 1.0])).to_bytes(), 1)
        running = submit(url, body, 10_000).json()["job_id"]
        queued = submit(url, body, 10_000).json()["job_id"]
        if worker.redis is None:
            while httpx.get(f"{url}/v1/jobs/{running}", headers=AUTH).json()["state"] != "running":
                time.sleep(0.1)
        mode = "one job running" if worker.redis is None else "jobs queued, none running"
        rows.append((f"baseline ({mode})", health_latency(url), ""))
        if "streams" in only:
            rows.append(open_streams(port, url, proc, queued, int(500 * scale)))
            time.sleep(1.0)
        if "slowloris" in only:
            rows.append(slow_headers(port, url, int(300 * scale)))
        if "bodies" in only:
            rows.append(stalled_uploads(port, url, int(50 * scale)))
        if "flood" in only:
            rows.append(idle_flood(port, url, int(700 * scale)))
            time.sleep(1.0)
        jobs = [running, queued]
        if "bomb" in only:
            row, accepted = bombs(url, proc, zeros_mb=16 if args.quick else 1024)
            rows.append(row)
            jobs += accepted
        for job in jobs:
            httpx.delete(f"{url}/v1/jobs/{job}", headers=AUTH)
    finally:
        worker.stop()
    print("| hostile load | /health median / p95 / max | what happened |")
    print("|---|---|---|")
    for name, latency, note in rows:
        print(f"| {name} | {latency} | {note} |")
    return 0


class Worker:
    """A worker process of ``source`` on a free loopback port, with a Redis queue and no GPU
    machine when ``queue`` (jobs stay queued: nothing competes for the CPU), else running its
    jobs itself; a tiny untrained model; its own temporary folder."""

    def __init__(self, source: Path, queue: bool) -> None:
        self.source, self.queue = source, queue
        self.tmp = Path(tempfile.mkdtemp(prefix="longdiff-hostile-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None
        self.log: Any = None

    def start(self) -> None:
        tmp = self.tmp
        create_untrained("interval", tmp / "models", scale="tiny")
        env = {**os.environ, "LONGDIFF_MODELS": str(tmp / "models"), "LONGDIFF_WORKER_TOKEN": TOKEN,
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(self.source)}  # fmt: skip
        cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "serve", "--port", str(self.port)]
        cmd += ["--data", str(tmp / "data")]
        usage = subprocess.run([*cmd[:4], "--help"], env=env, capture_output=True, text=True, cwd=self.source).stdout
        if "--max-streams" in usage:
            cmd += ["--max-streams", "2000", "--max-streams-per-user", "2000"]
        if shutil.which("redis-server") and self.queue:
            redis_port = free_port()
            self.redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                          stdout=subprocess.DEVNULL)  # fmt: skip
            cmd += ["--broker", f"redis://127.0.0.1:{redis_port}/0"]
            time.sleep(0.5)
        self.log = open(tmp / "worker.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.source)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, (tmp / "worker.log").read_text()
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.log is not None:
            self.log.close()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_streams(port: int, url: str, proc: Any, job: str, n: int) -> tuple[str, str, str]:
    """1. ``n`` event streams held open on one job: the worker's latency and event-loop CPU."""
    streams = []
    request = f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    for i in range(n):
        s = connect(port, f"127.0.0.{2 + i % 5}")
        s.sendall(request.encode())
        streams.append(s)
    opened = sum(1 for s in streams if s.recv(4096).startswith(b"HTTP/1.1 200"))
    time.sleep(1.0)
    c0, t0 = loop_cpu(proc.pid), time.monotonic()
    latency = health_latency(url)
    cpu = (loop_cpu(proc.pid) - c0) / (time.monotonic() - t0)
    for s in streams:
        s.close()
    return f"{n} open event streams", latency, f"{opened} open; event loop CPU {cpu * 100:.0f} %"


def slow_headers(port: int, url: str, n: int) -> tuple[str, str, str]:
    """2. Slowloris: ``n`` sockets that never finish their headers; when each is closed or refused."""
    slow, t0 = [], time.monotonic()
    for _ in range(n):
        try:
            s = connect(port, "127.0.0.2")
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: w\r\nX-slow: ")
            slow.append(s)
        except OSError:
            pass
    latency = health_latency(url)
    refused, open_for, still = 0, [], 0
    for s in slow:
        s.settimeout(max(0.1, 30 - (time.monotonic() - t0)))
        try:
            data = s.recv(4096)
        except socket.timeout:
            still += 1
            data = None
        except OSError:
            data = b""
        if data is None:
            pass
        elif data.startswith(b"HTTP/1.1 503"):
            refused += 1
        else:
            open_for.append(time.monotonic() - t0)
        s.close()
    longest = max(open_for) if open_for else 0.0
    note = f"{refused} refused at once (503), {len(open_for)} closed by {longest:.1f} s"
    note += f", {still} still open after 30 s" if still else ""
    return f"{n} slow-header sockets", latency, note


def stalled_uploads(port: int, url: str, n: int) -> tuple[str, str, str]:
    """3. ``n`` uploads that send their headers and stop: answered 408, or not."""
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")  # fmt: skip
    bodies, t0 = [], time.monotonic()
    for i in range(n):
        s = connect(port, f"127.0.1.{1 + i % 3}")
        s.sendall(head.encode())
        bodies.append(s)
    latency = health_latency(url)
    answers = []
    for s in bodies:
        s.settimeout(max(0.1, 45 - (time.monotonic() - t0)))
        try:
            answers.append(s.recv(4096)[:12])
        except OSError:
            answers.append(b"")
        s.close()
    got = sum(1 for a in answers if a.startswith(b"HTTP/1.1 408"))
    note = f"{got} answered 408 after {time.monotonic() - t0:.1f} s" if got else "no answer within 45 s"
    return f"{n} stalled uploads", latency, note


def idle_flood(port: int, url: str, n: int) -> tuple[str, str, str]:
    """4. A flood of ``n`` idle connections from six addresses."""
    flood = []
    for i in range(n):
        try:
            flood.append(connect(port, f"127.0.2.{1 + i % 6}"))
        except OSError:
            pass
    time.sleep(0.5)
    latency = health_latency(url)
    for s in flood:
        s.close()
    return f"{n} idle connections", latency, "128 an address, then 503; over 512 in all the oldest idle one goes"


def bombs(url: str, proc: Any, zeros_mb: int) -> tuple[tuple[str, str, str], list[str]]:
    """5. Five decompression bombs: the answers, their time and the worker's peak memory; and
    the ids of any job that was accepted (to delete)."""
    bomb = bomb_gzip(zeros_mb=zeros_mb)
    before = peak_rss_mb(proc.pid)
    t0 = time.perf_counter()
    answers = [submit(url, bomb, 2) for _ in range(5)]
    took = (time.perf_counter() - t0) / 5
    status = {r.status_code for r in answers}
    said = answers[0].json()
    said = said.get("detail") or f"job {said.get('state')}"
    row = (f"bomb: {len(bomb) / 2**20:.2f} MB gzip declaring 1 GB, x5", health_latency(url),
           f"{status} in {took * 1000:.0f} ms each; peak RSS {before:.0f} -> "
           f"{peak_rss_mb(proc.pid):.0f} MB; {str(said)[:90]}")  # fmt: skip
    return row, [r.json().get("job_id") for r in answers if r.status_code == 202]


if __name__ == "__main__":
    sys.exit(main())
