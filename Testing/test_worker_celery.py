"""Scale-out: ``serve --broker`` queues jobs on a real redis-server (loopback), and two
``longdiff-worker gpu`` processes share the queue; results, progress and cancel work as in
the embedded mode. The project's set-up installs redis-server (scripts/setup_tools.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import pytest
from worker_harness import (
    ROOT,
    WorkerProcess,
    ages_spec,
    free_port,
    make_cohort,
    make_models,
    redis_server_path,
    spec,
    submit,
    traces_of,
    wait_state,
)

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


def _gpu(redis_url: str, data, env, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "gpu", "--broker", redis_url]
    cmd += ["--data", str(data), "--device", "cpu", "--name", "gpu-c"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def test_cancel_and_delete_in_every_state_through_the_queue(tmp_path, redis_url):
    """Queued (no GPU machine yet), running, done and failed: cancel answers 202 and delete
    204 in each, and a deleted job leaves nothing in the data folder."""
    models = make_models(tmp_path / "models")
    data = tmp_path / "data"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    final = ("done", "failed", "cancelled")
    with WorkerProcess(data, models["interval"].parent, "--broker", redis_url, token=TOKEN) as server:
        url = server.url
        # queued: no GPU process runs yet, so the jobs wait in the queue
        cancelled = submit(url, auth, spec()).json()["job_id"]
        deleted = submit(url, auth, spec()).json()["job_id"]
        r = httpx.post(f"{url}/v1/jobs/{cancelled}/cancel", headers=auth)
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "cancelled" and traces_of(data, cancelled) == []
        assert httpx.delete(f"{url}/v1/jobs/{deleted}", headers=auth).status_code == 204
        assert traces_of(data, deleted) == []

        gpu = _gpu(redis_url, data, server.env(), tmp_path / "gpu.log")
        try:
            running = submit(url, auth, spec(steps=5000)).json()["job_id"]
            wait_state(url, auth, running, ("running",), 120)
            assert httpx.post(f"{url}/v1/jobs/{running}/cancel", headers=auth).status_code == 202
            assert wait_state(url, auth, running, final, 60)["state"] == "cancelled"
            # the cancelled and deleted queued jobs never ran on the GPU machine
            assert httpx.get(f"{url}/v1/jobs/{cancelled}", headers=auth).json()["started"] is None
            running2 = submit(url, auth, spec(steps=5000)).json()["job_id"]
            wait_state(url, auth, running2, ("running",), 60)
            assert httpx.delete(f"{url}/v1/jobs/{running2}", headers=auth).status_code == 204
            done = submit(url, auth, spec()).json()["job_id"]
            failed = submit(url, auth, spec(params={"ages": [3.0]})).json()["job_id"]  # has that age already
            assert wait_state(url, auth, done, final, 60)["state"] == "done"
            assert wait_state(url, auth, failed, final, 60)["state"] == "failed"
            for job, state in ((done, "done"), (failed, "failed")):
                r = httpx.post(f"{url}/v1/jobs/{job}/cancel", headers=auth)
                assert r.status_code == 202 and r.json()["state"] == state
            for job in (done, failed, running, cancelled):
                assert httpx.delete(f"{url}/v1/jobs/{job}", headers=auth).status_code == 204
            deadline = time.monotonic() + 20  # the GPU machine drops the deleted running job within a step
            jobs = (cancelled, deleted, running, running2, done, failed)
            while any(traces_of(data, j) for j in jobs):
                assert time.monotonic() < deadline, [traces_of(data, j) for j in jobs]
                time.sleep(0.2)
        finally:
            gpu.terminate()
            try:
                gpu.wait(15)
            except subprocess.TimeoutExpired:
                gpu.kill()
