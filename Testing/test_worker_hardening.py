"""The worker's hardening, for real: TLS with a throw-away certificate, expiry of old
results, a GPU out-of-memory error inside a job, the front door (the token is checked and
the upload limit enforced before a body is read), the OpenAPI description against the
routes the client uses, and the fixes of the review (no server paths in messages, deep
JSON, header-declared sizes, a deleted job's stream, a stopped worker's running job,
owner-only data, results flushed before they are reported done)."""

from __future__ import annotations

import gzip
import logging
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
from worker_harness import ROOT, WorkerProcess, self_signed_cert

from LongitudinalDiffusionLib.backends.remote import JobFailed, RemoteBackend, WorkerUnavailable
from LongitudinalDiffusionLib.catalog import create_untrained
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.jobs import JobEvent, JobExpired, JobInput, JobSpec, UnknownJob
from LongitudinalDiffusionLib.progress import CancelToken
from LongitudinalDiffusionLib.worker import store as store_module
from LongitudinalDiffusionLib.worker.runner import execute
from LongitudinalDiffusionLib.worker.store import Store, public_message, save_result
from LongitudinalDiffusionLib.worker.uploads import UploadRejected, store_upload

torch.set_num_threads(1)
TOKEN = "hardening-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "interval-tiny-untrained"
OOM_MODEL = "interval-oom"

#: Run in the worker process before its command line (tests only). The network of a model
#: whose catalog name ends in "-oom" raises what torch raises when a CUDA allocation fails,
#: from inside its forward pass - where a real out-of-memory error happens - so the real
#: worker's runner, store and API handle it; production code knows nothing of it.
OOM_PREAMBLE = """
import torch
from LongitudinalDiffusionLib.tasks import common

_load_model = common.load_model

def _load_model_on_a_small_gpu(name, device="cpu"):
    loaded = _load_model(name, device=device)
    if loaded.card.name.endswith("-oom"):
        def forward(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 7.79 GiB total capacity; "
                "6.12 GiB already allocated; 1.01 GiB free; 6.50 GiB reserved in total by PyTorch)"
            )
        loaded.network.forward = forward
    return loaded

common.load_model = _load_model_on_a_small_gpu
"""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    """Two catalog folders: the tiny interval model, and the same architecture as 'interval-oom'."""
    folder = tmp_path_factory.mktemp("models")
    create_untrained("interval", folder / "a", scale="tiny")
    create_untrained("interval", folder / "b", scale="tiny", name=OOM_MODEL)
    return f"{folder / 'a'}{os.pathsep}{folder / 'b'}"


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[JobInput]:
    """Three small T1w scans of one subject (ages 3, 6 and 12 months)."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(1)
    inputs = []
    for age in (3.0, 6.0, 12.0):
        path = folder / f"t1w-{age:g}.nii.gz"
        data = rng.random((32, 40, 32)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([5.0, 5.0, 5.0, 1.0])), path)
        inputs.append(JobInput(str(path), age, "T1w"))
    return inputs


def make_spec(scans: list[JobInput], model: str = MODEL, **options) -> JobSpec:
    opts = {"steps": 2, "seed": 0, **options}
    return JobSpec("complete-ages", model, "sub-h", [JobInput(**i.to_dict()) for i in scans], {"ages": [9.0]}, opts)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, models):
    """A plain-http worker whose 'interval-oom' model runs out of GPU memory; 2 MB uploads."""
    folder = tmp_path_factory.mktemp("oom")
    with WorkerProcess(folder / "data", models, "--max-upload-mb", "2", token=TOKEN, preamble=OOM_PREAMBLE) as w:
        yield w


def _wait_for_progress(client: RemoteBackend, job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.kind == "progress" for e in client.poll(job)):
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- TLS


def test_tls_end_to_end_and_clear_errors_without_the_certificate(tmp_path, models, scans, capsys):
    pair = self_signed_cert(tmp_path / "tls")
    if pair is None:
        pytest.skip("neither the openssl command nor the cryptography package is available")
    cert, key = pair
    extra = ("--tls-cert", str(cert), "--tls-key", str(key), "--expiry-hours", "0.001", "--expiry-sweep-seconds", "0.2")
    with WorkerProcess(tmp_path / "data", models, *extra, token=TOKEN, ca=cert) as w:
        assert w.url.startswith("https://")
        # trusted: a whole job over TLS
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the CA is given to httpx as it wants it
            client = RemoteBackend(w.url, TOKEN, verify=str(cert))
        with client:
            job = client.submit(make_spec(scans))
            result = client.wait(job, timeout=60)
            assert result.image("generated", 9.0).array.std() > 0
            finished = client.status(job)["finished"]

        with pytest.raises(InputError, match="cannot use this file as the worker's TLS certificate"):
            RemoteBackend(w.url, TOKEN, verify=str(tmp_path / "missing.pem"))
        with pytest.raises(InputError, match="cannot use this file"):
            RemoteBackend(w.url, TOKEN, verify=str(key))  # a key is not a certificate

        # not trusted: one clear message at once (no retries), from the library and the CLI
        t0 = time.monotonic()
        with RemoteBackend(w.url, TOKEN) as untrusted, pytest.raises(WorkerUnavailable) as err:
            untrusted.check()
        assert "TLS handshake" in str(err.value) and "--tls-ca" in str(err.value)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
        assert time.monotonic() - t0 < 3

        from LongitudinalDiffusionLib.cli import main

        manifest = tmp_path / "manifest.tsv"
        manifest.write_text("file\tage_months\tmodality\n" + "".join(f"{i.path}\t{i.age_months}\tT1w\n" for i in scans))
        out = tmp_path / "cli"
        args = ["complete-ages", str(manifest), "--ages", "9", "--model", MODEL, "--steps", "2", "-q"]
        args += ["--remote", w.url, "--token", TOKEN]
        assert main([*args, "--out", str(out / "untrusted")]) == 2
        stderr = capsys.readouterr().err
        assert "TLS handshake" in stderr and "--tls-ca" in stderr and "Traceback" not in stderr
        assert not (out / "untrusted").exists()
        assert main([*args, "--out", str(out / "trusted"), "--tls-ca", str(cert)]) == 0
        assert (out / "trusted" / "result.json").is_file()

        # plain http to the TLS port: never answered in clear text, and the client says why
        with pytest.raises(httpx.HTTPError):
            httpx.get(w.url.replace("https://", "http://") + "/v1/health", timeout=5)
        t0 = time.monotonic()
        with RemoteBackend(w.url.replace("https://", "http://"), TOKEN) as plain:
            with pytest.raises(WorkerUnavailable, match="speaks HTTPS .*: use https://127.0.0.1"):
                plain.check()
        assert time.monotonic() - t0 < 3

        # expiry (0.001 h = 3.6 s): the job and its files go; asking for it says it expired
        deadline = time.monotonic() + 30
        with RemoteBackend(w.url, TOKEN, verify=str(cert)) as client:
            while True:
                try:
                    client.status(job)
                except JobExpired as exc:
                    assert f"job {job} expired" in str(exc) and "submit it again" in str(exc)
                    break
                assert time.monotonic() < deadline, "the job did not expire"
                time.sleep(0.2)
            assert time.time() - finished >= 3.6
            ca = ssl.create_default_context(cafile=str(cert))
            r = httpx.get(f"{w.url}/v1/jobs/{job}/result", headers=AUTH, verify=ca)
            assert r.status_code == 410 and "expired" in r.json()["detail"]
            assert job not in {j["job_id"] for j in client._request("GET", "/v1/jobs").json()}
        assert not (w.data / "jobs" / job).exists() and not (w.data / "results" / job).exists()
        assert not (w.data / "results" / f"{job}.zip").exists()


# ----------------------------------------------------------------------------- expiry on a real store


def _finished_job(store: Store, scans: list[JobInput], kind: str = "done") -> str:
    job = store.new_id()
    store.job_dir(job).mkdir(parents=True)
    (store.job_dir(job) / "input-000.nii").write_bytes(b"x")
    store.add(job, make_spec(scans))
    store.add_event(JobEvent(job, "started", message="cpu"))
    if kind == "done":
        store.result_dir(job).mkdir()
        (store.result_dir(job) / "result.json").write_text("{}")
        store.result_zip(job).write_bytes(b"PK")
    store.add_event(JobEvent(job, kind, message="x"))
    return job


def test_expiry_deletes_old_jobs_files_and_rows_and_reports_them_expired(tmp_path, scans):
    store = Store(tmp_path / "data")
    old, old_failed, recent = (_finished_job(store, scans, k) for k in ("done", "failed", "done"))
    running = store.new_id()
    store.job_dir(running).mkdir()
    store.add(running, make_spec(scans))
    store.add_event(JobEvent(running, "started"))
    two_days_ago = time.time() - 48 * 3600
    store._db.execute("UPDATE jobs SET finished = ? WHERE id IN (?, ?)", (two_days_ago, old, old_failed))
    store._db.execute("UPDATE jobs SET created = ?, started = ? WHERE id = ?", (two_days_ago, two_days_ago, running))

    assert store.expire(0) == []  # 0: never
    assert sorted(store.expire(24)) == sorted([old, old_failed])
    for job in (old, old_failed):
        assert not store.job_dir(job).exists() and not store.result_dir(job).exists()
        assert not store.result_zip(job).exists()
        assert store._db.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (job,)).fetchone()[0] == 0
        assert store._db.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job,)).fetchone()[0] == 0
        with pytest.raises(JobExpired, match=f"job {job} expired: it ended .* after this worker's expiry time"):
            store.status(job)
    assert store.status(recent)["result_available"] and store.status(running)["state"] == "running"
    assert store.expire(24) == []
    # tombstones go after a month: then the job is merely unknown
    store._db.execute("UPDATE expired SET expired = ?", (time.time() - 31 * 86400,))
    store.expire(24)
    with pytest.raises(UnknownJob) as err:
        store.get(old)
    assert not isinstance(err.value, JobExpired)
    store.close()


# ----------------------------------------------------------------------------- out of memory


def test_gpu_out_of_memory_fails_the_job_clearly_and_the_worker_goes_on(worker, scans):
    with RemoteBackend(worker.url, TOKEN, retries=1, backoff=0.1) as client:
        oom = client.submit(make_spec(scans, OOM_MODEL))
        with pytest.raises(JobFailed) as err:
            client.wait(oom, timeout=60)
        # the sampler's report (stage, batch) and the worker's advice, in one line
        assert str(err.value).startswith("the worker's GPU ran out of memory (generate: the CPU ran out of memory")
        assert "try fewer samples (n_samples) or a smaller model" in str(err.value)
        status = client.status(oom)
        assert status["state"] == "failed" and status["error_type"] == "OutOfMemoryError"
        assert not (worker.data / "jobs" / oom).exists() and not status["result_available"]
        assert [e.kind for e in client.poll(oom)][-1] == "failed"
        # the same worker (and its only device slot) takes the next job
        ok = client.submit(make_spec(scans))
        assert client.wait(ok, timeout=60).image("generated", 9.0).array.std() > 0
        assert client.info()["jobs"] == {"failed": 1, "done": 1}
        client.delete(oom)
        client.delete(ok)


def test_https_to_a_plain_http_worker_says_so(worker):
    with RemoteBackend(worker.url.replace("http://", "https://"), TOKEN) as client:
        with pytest.raises(WorkerUnavailable, match="TLS handshake .* plain http"):
            client.check()


# ----------------------------------------------------------------------------- the front door


def _raw(port: int, head: str, body_chunks=(), timeout: float = 10.0) -> bytes:
    """Send a request by hand (headers, then body chunks) and return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the worker answered and closed before taking everything
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 20:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except TimeoutError:
            pass
    return answer


def test_the_token_is_checked_before_any_body_is_read(worker):
    # 1 MB announced, none sent: the worker must answer at once instead of waiting for it
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: w\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    t0 = time.monotonic()
    answer = _raw(worker.port, head, timeout=8)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"missing access token" in answer and time.monotonic() - t0 < 5
    answer = _raw(worker.port, head.replace("Host: w", "Host: w\r\nAuthorization: Bearer not-the-token"), timeout=8)
    assert answer.startswith(b"HTTP/1.1 401") and b"wrong access token" in answer
    # unknown paths too: no route enumeration without the token
    assert httpx.get(f"{worker.url}/v1/nothing-here").status_code == 401
    assert httpx.get(f"{worker.url}/v1/health").status_code == 200


def test_a_chunked_upload_over_the_limit_gets_413_while_streaming(worker):
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\n'
    pieces = [part] + [os.urandom(256 * 1024) for _ in range(12)]  # a well-formed file part of 3 MB > 2 MB
    chunks = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces]
    before = set(os.listdir(worker.data / "jobs"))
    answer = _raw(worker.port, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"upload limit of 2 MB" in answer
    assert set(os.listdir(worker.data / "jobs")) == before
    assert httpx.get(f"{worker.url}/v1/health").status_code == 200


def test_deep_json_spec_is_a_400_not_a_crash(worker):
    files = [("files", ("a.nii.gz", b"\x1f\x8b"))]
    r = httpx.post(f"{worker.url}/v1/jobs", headers=AUTH, data={"spec": "[" * 200_000}, files=files)
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"]


# ----------------------------------------------------------------------------- OpenAPI


def _client_routes() -> set[tuple[str, str]]:
    """(method, path) of every request RemoteBackend makes, read from its source."""
    source = (ROOT / "LongitudinalDiffusionLib" / "backends" / "remote.py").read_text()
    found = re.findall(r'"(GET|POST|PUT|PATCH|DELETE)",\s*f?"(/v1/[^"]*)"', source)
    return {(m.lower(), p) for m, p in found}


def test_openapi_describes_every_route_the_client_uses_with_auth(worker):
    r = httpx.get(f"{worker.url}/v1/openapi.json", headers=AUTH)
    assert r.status_code == 200
    api = r.json()
    assert api["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "description": "the worker's access token",
        "scheme": "bearer",
    }
    used = _client_routes()
    assert len(used) >= 8, used
    for method, path in used:
        assert path in api["paths"] and method in api["paths"][path], (method, path)
    operations = [(m, p, op) for p, ops in api["paths"].items() for m, op in ops.items()]
    for method, path, op in operations:
        if path == "/v1/health":
            assert "security" not in op
            continue
        assert op.get("security") == [{"HTTPBearer": []}], (method, path)
        assert "401" in op["responses"], (method, path)
        if "{job_id}" in path:
            assert {"404", "410"} <= set(op["responses"]), (method, path)
    submit = api["paths"]["/v1/jobs"]["post"]
    assert "202" in submit["responses"] and {"400", "413", "422"} <= set(submit["responses"])
    form = submit["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = api["components"]["schemas"][form["$ref"].split("/")[-1]] if "$ref" in form else form
    assert {"spec", "files"} <= set(form["properties"])
    assert "409" in api["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]
    assert "204" in api["paths"]["/v1/jobs/{job_id}"]["delete"]["responses"]
    assert "text/event-stream" in api["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]


# ----------------------------------------------------------------------------- review fixes


def test_deleting_a_running_job_ends_its_event_stream(worker, scans):
    with RemoteBackend(worker.url, TOKEN, retries=1, backoff=0.1) as client:
        job = client.submit(make_spec(scans, steps=2000))
        _wait_for_progress(client, job)
        client.delete(job)
        t0 = time.monotonic()
        with pytest.raises(UnknownJob, match="no job"):
            client.wait(job, timeout=20)
        assert time.monotonic() - t0 < 10
    assert not (worker.data / "jobs" / job).exists()


def test_a_stopped_worker_marks_its_running_job_interrupted_not_cancelled(tmp_path, models, scans):
    w = WorkerProcess(tmp_path / "data", models, token=TOKEN)
    with w:
        client = RemoteBackend(w.url, TOKEN, retries=0)
        job = client.submit(make_spec(scans, steps=2000))
        _wait_for_progress(client, job)
        t0 = time.monotonic()
        client.close()
        assert time.monotonic() - t0 < 2  # closing a client cuts its event stream at once
        w.stop()  # SIGTERM: a clean shutdown
        assert "Application shutdown complete" in w.log.read_text()
        w.start()
        with RemoteBackend(w.url, TOKEN, retries=0) as client:
            status = client.status(job)
            assert status["state"] == "failed" and status["error_type"] == "Interrupted"
            assert "interrupted" in status["message"] and "submit it again" in status["message"]
    assert not (w.data / "jobs" / job).exists()


def test_failed_jobs_never_show_the_workers_paths(tmp_path, scans):
    data = (tmp_path / "srv" / "longdiff").resolve()
    store = Store(data)
    job = store.new_id()
    spec = make_spec(scans)
    spec.inputs[1].path = str(data / "jobs" / job / "input-001.nii")  # gone: the run fails reading it
    events: list[tuple[JobEvent, str]] = []
    assert execute(data, job, spec, "cpu", CancelToken(), lambda e, t: events.append((e, t))) == "failed"
    message = events[-1][0].message
    assert message == "file 1: file not found", message
    assert str(tmp_path) not in message
    text = f"{data}/results/x.zip: broken; see {data}; weights /home/u/.longdiff/models/m.safetensors bad"
    assert public_message(text, data) == "results/x.zip: broken; see <worker data>; weights m.safetensors bad"
    assert public_message("https://gpu.example.org/v1 and 3/4 done", data) == "https://gpu.example.org/v1 and 3/4 done"
    store.close()


def test_header_declared_sizes_are_bounded_before_inflating(tmp_path):
    def upload(hdr_changes: dict, payload: bytes) -> UploadRejected:
        img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
        for key, value in hdr_changes.items():
            img.header[key] = value
        raw = img.header.binaryblock + b"\0" * 4 + payload
        src = tmp_path / "up.gz"
        src.write_bytes(gzip.compress(raw, compresslevel=1))
        with open(src, "rb") as fh, pytest.raises(UploadRejected) as err:
            store_upload(fh, tmp_path / "input-000.nii", "file 0", max_voxels=10**6, max_dim=512)
        assert not (tmp_path / "input-000.nii").exists()
        return err.value

    t0 = time.monotonic()
    # voxels declared 1 GB into the file: a bomb of zeros would otherwise be inflated to 1 GB
    err = upload({"vox_offset": 2**30}, bytes(64 << 20))
    assert err.status == 413 and "bytes in" in err.problem
    assert time.monotonic() - t0 < 5
    err = upload({"datatype": 1792}, b"")  # complex128: 16 bytes a voxel
    assert err.status == 422 and "voxel type complex128 is not supported" in err.problem


def test_data_folder_is_owner_only(tmp_path, caplog):
    old = os.umask(0o022)
    try:
        Store(tmp_path / "fresh").close()
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        with caplog.at_level(logging.WARNING):
            Store(shared).close()
    finally:
        os.umask(old)
    for folder in ("fresh", "fresh/jobs", "fresh/results"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder
    assert "open to other users" in caplog.text and "chmod 700" in caplog.text


def test_results_are_flushed_to_disk_before_the_job_is_done(tmp_path, monkeypatch):
    class FakeResult:
        def save(self, folder, overwrite=False):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "result.json").write_text("{}")

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    data = tmp_path / "data"
    (data / "results").mkdir(parents=True)
    save_result(data, "a" * 32, FakeResult())
    assert synced == [str(data / "results" / f".{'a' * 32}.zip.tmp"), str(data / "results")]
    assert (data / "results" / f"{'a' * 32}.zip").is_file()


def test_worker_cli_creates_an_owner_only_data_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "token", "--data", str(tmp_path / "new")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert len(out.stdout.strip()) >= 32
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
