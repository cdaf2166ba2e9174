"""Hostile inputs against a real ``longdiff-worker serve`` on loopback (issue 14): path
traversal through client strings, cancel and delete in every state, bounded resources
(decompressed sizes, captured frames, event streams, slow headers and bodies,
connections), one-line JSON errors (validation, storage, two Authorization headers),
users with their own tokens and jobs, and the audit log."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import nibabel as nib
import numpy as np
import pytest
from worker_harness import ROOT, WorkerProcess, nifti, one_line_json, spec, submit, traces_of, wait_state

TOKEN = "hostile-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def users_file(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A users file made with the command line: alice and bob (users), and their tokens."""
    folder = tmp_path_factory.mktemp("users")
    data = folder / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tokens = {}
    for name in ("alice", "bob"):
        cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "token", "add", name, "--data", str(data)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
        tokens[name] = out.stdout.strip()
        assert len(tokens[name]) >= 40 and "shown only now" in out.stderr
    return data, tokens


@pytest.fixture(scope="module")
def worker(models, users_file):
    """Default limits but for event streams (500); users alice and bob, and the admin token
    from the environment."""
    data, _ = users_file
    extra = ("--max-streams", "500", "--max-streams-per-user", "500")
    with WorkerProcess(data, models["interval"].parent, *extra, token=TOKEN) as w:
        yield w


@pytest.fixture(scope="module")
def tight(tmp_path_factory, models):
    """Small limits: 0.3 MB a file, 0.4 MB a job, 2 captured frames, 2 streams a user and
    3 in all, 1 s for headers and between body pieces."""
    extra = ["--max-file-mb", "0.3", "--max-job-mb", "0.4", "--max-capture", "2", "--max-streams-per-user", "2"]
    extra += ["--max-streams", "3", "--header-timeout", "1", "--body-timeout", "1"]
    folder = tmp_path_factory.mktemp("tight")
    with WorkerProcess(folder / "data", models["interval"].parent, *extra, token=TOKEN) as w:
        yield w


def alice(users_file) -> dict:
    return {"Authorization": f"Bearer {users_file[1]['alice']}"}


def bob(users_file) -> dict:
    return {"Authorization": f"Bearer {users_file[1]['bob']}"}


# ----------------------------------------------------------------------------- 1. path traversal


TRAVERSALS = [
    "{outside}/TRAV",  # absolute
    "../../../../{outside_rel}",
    "..",
    "sub/../../x",
    "..%2F..%2Fx",  # encoded: arrives as these characters
    "%2e%2e",
    "sub\x00x",  # NUL
    "sub\nx",
    "sub-1\n",  # a trailing newline must not slip through a '$'
    "\uff53\uff55\uff42",  # full-width look-alikes of 'sub'
    "sub\u2215x",  # division slash, looks like '/'
    "sub\u2024\u2024x",  # one-dot leaders, look like '..'
    ".hidden",
    "a" * 65,
    "",
    "C:\\x",
    "sub x",
]


def test_client_strings_cannot_reach_a_path(worker, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    rel = os.path.relpath(outside, worker.data / "results")
    before = set(os.listdir(worker.data / "jobs"))
    for form in TRAVERSALS:
        sid = form.format(outside=outside, outside_rel=rel)
        r = submit(worker.url, ADMIN, spec(subject_id=sid))
        assert r.status_code == 400, (sid, r.text)
        assert "subject_id" in one_line_json(r), sid
    # other client strings that could name a file: the model, the upload references
    for model in ("../../etc/model.json", "/etc/model", "m\x00", "model\n"):
        r = submit(worker.url, ADMIN, spec(model=model))
        assert r.status_code == 422 and "name of a model installed" in one_line_json(r), model
    for ref in ("upload:0\n", "upload:../0", "/etc/passwd", "upload:0/../../x"):
        bad = json.loads(spec())
        bad["inputs"][0]["path"] = ref
        r = submit(worker.url, ADMIN, json.dumps(bad))
        assert r.status_code == 400 and "must name an uploaded file" in one_line_json(r), ref
    assert set(os.listdir(worker.data / "jobs")) == before
    assert list(outside.iterdir()) == []
    # a valid id with dots and dashes runs, and its files land in the job's result folder
    r = submit(worker.url, ADMIN, spec(subject_id="sub-01.a_b"))
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    assert wait_state(worker.url, ADMIN, job, FINAL)["state"] == "done"
    names = os.listdir(worker.data / "results" / job)
    assert any(n.startswith("sub-01.a_b_age-") for n in names), names
    httpx.delete(f"{worker.url}/v1/jobs/{job}", headers=ADMIN)
    assert list(outside.iterdir()) == []


def test_seed_and_capture_are_range_checked(worker, tight):
    for seed in (2**100, -1, 2**32):
        r = submit(worker.url, ADMIN, spec(seed=seed))
        assert r.status_code == 400 and "'seed' must lie in 0..4294967295" in one_line_json(r), seed
    r = submit(worker.url, ADMIN, spec(capture=10_000))
    assert r.status_code == 400 and "'capture' must lie in 0..64" in one_line_json(r)
    r = submit(tight.url, ADMIN, spec(capture=3))  # within the library's range, over this worker's
    assert r.status_code == 413 and "captures at most 2" in one_line_json(r)


# ----------------------------------------------------------------------------- 2. cancel and delete


def _long_job(url: str, headers: dict) -> str:
    r = submit(url, headers, spec(steps=5000))
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_cancel_and_delete_in_every_state(worker):
    url, data = worker.url, worker.data
    running = _long_job(url, ADMIN)
    wait_state(url, ADMIN, running, ("running",))
    queued = _long_job(url, ADMIN)  # one device: it waits behind the running one
    assert httpx.get(f"{url}/v1/jobs/{queued}", headers=ADMIN).json()["state"] == "queued"

    # queued: cancelled at once, its uploads gone, and it never runs
    r = httpx.post(f"{url}/v1/jobs/{queued}/cancel", headers=ADMIN)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "cancelled" and r.json()["error_type"] == "Cancelled"
    assert traces_of(data, queued) == []
    # running: cancelled within a sampler step
    assert httpx.post(f"{url}/v1/jobs/{running}/cancel", headers=ADMIN).status_code == 202
    assert wait_state(url, ADMIN, running, FINAL, 60)["state"] == "cancelled"
    assert httpx.get(f"{url}/v1/jobs/{queued}", headers=ADMIN).json()["started"] is None
    assert traces_of(data, running) == []

    done = submit(url, ADMIN, spec()).json()["job_id"]
    failed = submit(url, ADMIN, spec(params={"ages": [3.0]})).json()["job_id"]  # it has that age: fails when run
    assert wait_state(url, ADMIN, done, FINAL)["state"] == "done"
    status = wait_state(url, ADMIN, failed, FINAL)
    assert status["state"] == "failed" and "already has" in status["message"]
    # cancelling a finished job changes nothing
    for job, state in ((done, "done"), (failed, "failed")):
        r = httpx.post(f"{url}/v1/jobs/{job}/cancel", headers=ADMIN)
        assert r.status_code == 202 and r.json()["state"] == state
    assert traces_of(data, done)  # its result is there until deleted

    # delete in every state: 204, then 404, and nothing of the job is left on the disk
    queued2 = None
    blocker = _long_job(url, ADMIN)
    wait_state(url, ADMIN, blocker, ("running",))
    queued2 = _long_job(url, ADMIN)
    for job in (queued2, blocker, done, failed, queued, running):
        r = httpx.delete(f"{url}/v1/jobs/{job}", headers=ADMIN)
        assert r.status_code == 204, (job, r.text)
        assert httpx.get(f"{url}/v1/jobs/{job}", headers=ADMIN).status_code == 404
    time.sleep(1.0)  # the runner thread of the deleted running job ends within a sampler step
    for job in (queued2, blocker, done, failed, queued, running):
        assert traces_of(data, job) == [], job
    assert httpx.get(f"{url}/v1/health").status_code == 200


# ----------------------------------------------------------------------------- 3. bounded resources


def test_uploads_stay_compressed_and_decompressed_sizes_are_capped(tight):
    url, data = tight.url, tight.data
    gz, raw = nifti(), nifti(gz=False)
    r = submit(url, ADMIN, spec(steps=1), body=gz)
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    stored = data / "jobs" / job / "input-000.nii.gz"
    assert stored.read_bytes() == gz  # as received
    wait_state(url, ADMIN, job, FINAL)
    r = submit(url, ADMIN, spec(steps=1), body=raw)
    assert r.status_code == 202, r.text
    stored = data / "jobs" / r.json()["job_id"] / "input-000.nii.gz"
    assert stored.read_bytes()[:2] == b"\x1f\x8b" and stored.stat().st_size < len(raw)
    wait_state(url, ADMIN, r.json()["job_id"], FINAL)

    before = set(os.listdir(data / "jobs"))
    big = nifti((48, 48, 48))  # 0.42 MB decompressed, 0.3 MB allowed a file
    r = submit(url, ADMIN, spec(), body=big)
    assert r.status_code == 413, r.text
    assert "file 0: decompressed size 0.4 MB exceeds this worker's limit of 0.3 MB per file" in one_line_json(r)
    r = submit(url, ADMIN, spec(3), n_files=3)  # 3 x 0.16 MB, 0.4 MB allowed a job
    assert r.status_code == 413, r.text
    assert "file 2: decompressed size 0.2 MB exceeds" in one_line_json(r) and "per job (0.4 MB" in r.text
    # a bomb split over several gzip members is counted across all of them
    members = gzip.compress(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_bytes())
    r = submit(url, ADMIN, spec(), body=members + gzip.compress(bytes(8 << 20), 9))
    assert r.status_code == 413 and "more data than its header declares" in one_line_json(r)
    assert set(os.listdir(data / "jobs")) == before
    assert httpx.get(f"{url}/v1/health").status_code == 200


def _open_stream(url: str, headers: dict, job: str) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(timeout=30)
    response = client.send(client.build_request("GET", f"{url}/v1/jobs/{job}/events", headers=headers), stream=True)
    return client, response


def test_event_streams_are_capped_per_user_and_in_all(tight, models, tmp_path):
    url = tight.url
    job = _long_job(url, ADMIN)
    opened = []
    try:
        for _ in range(2):
            opened.append(_open_stream(url, ADMIN, job))
            assert opened[-1][1].status_code == 200
        client, third = _open_stream(url, ADMIN, job)
        assert third.status_code == 429, third.status_code
        third.read()
        assert "event streams open on this worker, its limit per user" in one_line_json(third)
        assert third.headers["retry-after"] == "5"
        client.close()
        # a stream that ends gives its slot back
        c, r = opened.pop()
        r.close()
        c.close()
        deadline = time.monotonic() + 10
        while True:
            c, r = _open_stream(url, ADMIN, job)
            if r.status_code == 200:
                opened.append((c, r))
                break
            r.read()
            c.close()
            assert time.monotonic() < deadline, "the closed stream's slot was not given back"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/health").status_code == 200
    finally:
        for c, r in opened:
            r.close()
            c.close()
        httpx.delete(f"{url}/v1/jobs/{job}", headers=ADMIN)


def test_idle_event_streams_cost_no_cpu(worker):
    """Streams wait for the job's events instead of polling the database: 400 open streams
    leave the event loop's thread idle (when each queried SQLite every 0.1 s, 500 streams
    took 16 % of it, bench/worker_hostile.py)."""
    running = _long_job(worker.url, ADMIN)
    wait_state(worker.url, ADMIN, running, ("running",))
    queued = _long_job(worker.url, ADMIN)  # waits behind it: its streams see no event
    request = f"GET /v1/jobs/{queued}/events HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    streams = []
    try:
        for i in range(400):  # from 4 addresses: 128 connections an address at most
            s = socket.create_connection(("127.0.0.1", worker.port), timeout=30, source_address=(f"127.0.3.{i % 4}", 0))
            s.sendall(request.encode())
            streams.append(s)
        heads = [s.recv(4096) for s in streams]
        assert all(h.startswith(b"HTTP/1.1 200") for h in heads)
        # the main thread runs the event loop; the job runs in a runner thread
        stat = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/stat")

        def cpu() -> float:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        time.sleep(1.0)
        t0, w0 = cpu(), time.monotonic()
        time.sleep(4.0)
        share = (cpu() - t0) / (time.monotonic() - w0)
        assert share < 0.05, f"the event loop was busy {share:.0%} of the time with 400 idle streams"
        assert httpx.get(f"{worker.url}/v1/health").status_code == 200
        # and news reaches every stream at once: the cancel ends them all
        httpx.post(f"{worker.url}/v1/jobs/{queued}/cancel", headers=ADMIN)
        for s in streams:
            text = b""
            while not text.endswith(b"0\r\n\r\n"):  # the end of the chunked stream
                chunk = s.recv(65536)
                if not chunk:
                    break
                text += chunk
            assert b"event: cancelled" in text, text[-300:]
    finally:
        for s in streams:
            s.close()
        for job in (running, queued):
            httpx.delete(f"{worker.url}/v1/jobs/{job}", headers=ADMIN)


def test_slow_headers_and_bodies_are_cut_off(tight):
    port = tight.port
    sockets = []
    for _ in range(20):  # slowloris: a request line, then nothing
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: w\r\nX-a: ")
        sockets.append(s)
    assert httpx.get(f"{tight.url}/v1/health", timeout=10).status_code == 200
    t0 = time.monotonic()
    for s in sockets:
        assert s.recv(100) == b""  # closed by the worker (header timeout 1 s)
        s.close()
    assert time.monotonic() - t0 < 8
    # a body that stops: 408 with the one-line error
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode())
        answer = b""
        while b"}" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'{"detail": "no part of the request body came for 1 s"}' in answer


def _read_all(s: socket.socket) -> bytes:
    answer = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return answer
        answer += chunk


def test_connections_are_capped(tmp_path, models):
    extra = ("--max-connections", "8", "--max-connections-per-address", "6")
    with WorkerProcess(tmp_path / "data", models["interval"].parent, *extra, token=TOKEN) as w:
        time.sleep(0.5)  # the harness's health checks have closed their connections

        def connect(source: str) -> socket.socket:
            return socket.create_connection(("127.0.0.1", w.port), timeout=10, source_address=(source, 0))

        idle = [connect("127.0.0.1") for _ in range(6)]
        try:
            # a 7th from the same address: 503 with the one-line error, closed at once
            with connect("127.0.0.1") as one_more:
                answer = _read_all(one_more)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b'{"detail": "this worker has too many open connections; try again later"}' in answer
            idle += [connect("127.0.0.2") for _ in range(2)]  # 8 in all: the cap
            time.sleep(0.2)
            # one more from elsewhere takes the place of the oldest idle connection
            with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as other:
                assert other.get(f"{w.url}/v1/health").status_code == 200
            assert _read_all(idle[0]) == b""  # the oldest was closed
        finally:
            for s in idle:
                s.close()


# ----------------------------------------------------------------------------- 6. error answers


def test_every_error_is_one_line_json(worker):
    url = worker.url
    r = httpx.get(f"{url}/v1/jobs", params={"limit": 0}, headers=ADMIN)
    assert r.status_code == 422 and one_line_json(r) == "limit: Input should be greater than or equal to 1"
    r = httpx.post(f"{url}/v1/jobs", headers=ADMIN, data={"spec": spec()})
    assert r.status_code == 422 and one_line_json(r) == "files: Field required"
    r = httpx.get(f"{url}/v1/jobs/{'0' * 32}/events", params={"after": "x"}, headers=ADMIN)
    assert r.status_code == 422 and one_line_json(r).startswith("after: ")
    r = httpx.get(f"{url}/v1/nothing", headers=ADMIN)
    assert r.status_code == 404 and one_line_json(r) == "Not Found"
    r = httpx.put(f"{url}/v1/jobs", headers=ADMIN)
    assert r.status_code == 405 and one_line_json(r) == "Method Not Allowed"
    # requests the HTTP layer cannot parse: a broken request line, 100 kB of headers
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /v1/health HTTP/1.1\r\nHost: w\r\nX-big: " + b"a" * 100_000):
        with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as s:
            s.sendall(raw)
            answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"application/json" in answer and b'{"detail": "malformed HTTP request (' in answer, answer
    # two Authorization headers: refused, whatever they say
    for pair in ((ADMIN["Authorization"], "Bearer wrong"), ("Bearer wrong", ADMIN["Authorization"]),
                 (ADMIN["Authorization"], ADMIN["Authorization"])):  # fmt: skip
        headers = [("Authorization", pair[0]), ("Authorization", pair[1])]
        r = httpx.get(f"{url}/v1/jobs", headers=headers)
        assert r.status_code == 400 and one_line_json(r) == "send one Authorization header, not several"


def _mount(*args: str) -> bool:
    return shutil.which("mount") is not None and subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_a_read_only_data_folder_answers_507_and_health_says_so(tmp_path, models):
    with WorkerProcess(tmp_path / "data", models["interval"].parent, token=TOKEN) as w:
        assert httpx.get(f"{w.url}/v1/health").json()["status"] == "ok"
        if not _mount("--bind", str(w.data), str(w.data)):
            pytest.skip("cannot bind-mount here (needs mount privileges) to make the data folder read-only")
        try:
            assert _mount("-o", "remount,bind,ro", str(w.data))
            time.sleep(1.1)  # the health probe is cached for a second
            r = httpx.get(f"{w.url}/v1/health")
            assert r.status_code == 503 and r.json()["status"] == "error"
            assert "cannot write its data folder (Read-only file system)" in one_line_json(r)
            r = submit(w.url, ADMIN, spec())
            assert r.status_code == 507, r.text
            assert "the worker cannot write its data folder (Read-only file system)" in one_line_json(r)
            from LongitudinalDiffusionLib.backends.remote import RemoteBackend, WorkerUnavailable

            with RemoteBackend(w.url, TOKEN, retries=0) as client, pytest.raises(WorkerUnavailable) as err:
                client.check()
            assert "cannot write its data folder" in str(err.value)
        finally:
            subprocess.run(["umount", str(w.data)], check=True)
        time.sleep(1.1)
        assert httpx.get(f"{w.url}/v1/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------- 8. users


def test_users_see_and_act_on_their_own_jobs_only(worker, users_file):
    url, data = worker.url, worker.data
    a, b = alice(users_file), bob(users_file)
    users = json.loads((data / "users.json").read_text())["users"]
    assert set(users) == {"alice", "bob"} and not users["alice"]["admin"]
    assert users_file[1]["alice"] not in (data / "users.json").read_text()  # only hashes are kept
    assert oct((data / "users.json").stat().st_mode & 0o777) == "0o600"

    job = submit(url, a, spec(subject_id="sub-secret")).json()["job_id"]
    wait_state(url, a, job, FINAL)
    assert httpx.get(f"{url}/v1/jobs/{job}", headers=a).json()["owner"] == "alice"
    # bob: as if the job did not exist, whatever he asks
    for method, path in (("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/events"),
                         ("GET", f"/v1/jobs/{job}/result"), ("POST", f"/v1/jobs/{job}/cancel"),
                         ("DELETE", f"/v1/jobs/{job}")):  # fmt: skip
        r = httpx.request(method, url + path, headers=b)
        assert r.status_code == 404 and f"no job '{job}' on this worker" in one_line_json(r), (method, path)
    assert job not in [j["job_id"] for j in httpx.get(f"{url}/v1/jobs", headers=b).json()]
    assert httpx.get(f"{url}/v1/info", headers=b).json()["user"] == {"name": "bob", "admin": False}
    # alice and the admin see it
    assert job in [j["job_id"] for j in httpx.get(f"{url}/v1/jobs", headers=a).json()]
    assert job in [j["job_id"] for j in httpx.get(f"{url}/v1/jobs", headers=ADMIN).json()]
    assert httpx.get(f"{url}/v1/jobs/{job}/result", headers=a).status_code == 200
    assert httpx.post(f"{url}/v1/jobs/{job}/cancel", headers=ADMIN).status_code == 202
    assert httpx.delete(f"{url}/v1/jobs/{job}", headers=a).status_code == 204

    # the audit log: who did what to which job, when - no subject id, no file names
    lines = [json.loads(x) for x in (data / "audit.log").read_text().splitlines()]
    mine = [(e["user"], e["action"]) for e in lines if e["job_id"] == job]
    assert mine == [("alice", "submit"), ("alice", "download"), ("admin", "cancel"), ("alice", "delete")]
    assert all(e["time"].endswith("Z") for e in lines)
    text = (data / "audit.log").read_text()
    assert "sub-secret" not in text and "f0.nii.gz" not in text

    # a removed user's token stops working without a restart
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "token"]
    listed = subprocess.run([*cmd, "list", "--data", str(data)], env=env, capture_output=True, text=True, check=True)
    assert [line.split("\t")[:2] for line in listed.stdout.splitlines()] == [["alice", "user"], ["bob", "user"]]
    subprocess.run([*cmd, "remove", "bob", "--data", str(data)], env=env, check=True, capture_output=True)
    r = httpx.get(f"{url}/v1/jobs", headers=b)
    assert r.status_code == 401 and "wrong access token" in one_line_json(r)
    assert httpx.get(f"{url}/v1/jobs", headers=a).status_code == 200
