"""Scale-out: ``serve --broker`` queues jobs on a real redis-server (loopback), and two
``longdiff-worker gpu`` processes share the queue; results, progress and cancel work as in
the embedded mode. The project's set-up installs redis-server (scripts/setup_tools.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from worker_harness import ROOT, WorkerProcess, ages_spec, free_port, make_cohort, make_models, redis_server_path

from LongitudinalDiffusionLib.backends.remote import RemoteBackend
from LongitudinalDiffusionLib.progress import Cancelled

TOKEN = "celery-token-0123456789"
REDIS = redis_server_path()
if REDIS is None and os.environ.get("LONGDIFF_REQUIRE_TOOLS") == "1":
    raise RuntimeError("redis-server is missing (scripts/setup_tools.sh installs it)")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server not installed (scripts/setup_tools.sh installs it)")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_two_gpu_workers_share_one_queue(tmp_path, redis_url):
    cohort = make_cohort(tmp_path / "cohort")
    models = make_models(tmp_path / "models")
    data = tmp_path / "data"
    server = WorkerProcess(data, models["interval"].parent, "--broker", redis_url, token=TOKEN)
    gpus = []
    with server:
        env = server.env()
        for name in ("gpu-a", "gpu-b"):
            cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "gpu", "--broker", redis_url]
            cmd += ["--data", str(data), "--device", "cpu", "--name", name]
            log = open(tmp_path / f"{name}.log", "wb")
            gpus.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        try:
            with RemoteBackend(server.url, TOKEN, retries=1) as client:
                assert client.info()["mode"] == "celery"
                ids = [client.submit(ages_spec(cohort, "interval-tiny-untrained", seed=s, steps=3)) for s in range(6)]
                results = [client.wait(j, timeout=120) for j in ids]
                gap = ages_spec(cohort, "x").params["ages"][0]
                assert all(r.image("generated", gap).array.std() > 0 for r in results)
                runners = {client.status(j)["runner"] for j in ids}
                assert runners == {"gpu-a", "gpu-b"}, runners  # both machines took jobs from the one queue
                events = client.poll(ids[0])
                assert [e.kind for e in events][-1] == "done" and any(e.kind == "progress" for e in events)
                # cancel reaches a GPU machine through the broker
                slow = client.submit(ages_spec(cohort, "interval-tiny-untrained", steps=400))
                while not any(e.kind == "progress" for e in client.poll(slow)):
                    time.sleep(0.05)
                client.cancel(slow)
                with pytest.raises(Cancelled):
                    client.wait(slow, timeout=60)
        finally:
            for p in gpus:
                p.terminate()
            for p in gpus:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
