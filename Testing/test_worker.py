"""The remote worker, for real: a ``longdiff-worker serve`` process on loopback and the
library's RemoteBackend. End to end (same result as a local run), tokens, a table of bad
inputs (the worker answers each clearly and keeps serving), restart after a kill mid-job,
and 50 parallel submissions finished in order."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
from worker_harness import FAST, WorkerProcess, ages_spec

from LongitudinalDiffusionLib.backends.remote import RemoteBackend, WorkerRefused, WorkerUnavailable
from LongitudinalDiffusionLib.jobs import Backend, JobSpec
from LongitudinalDiffusionLib.progress import Cancelled
from LongitudinalDiffusionLib.tasks import complete_ages

torch.set_num_threads(1)
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "interval-tiny-untrained"
# the fixtures cohort and models are in conftest.py


@pytest.fixture(scope="module")
def worker(tmp_path_factory, models):
    folder = tmp_path_factory.mktemp("served")
    with WorkerProcess(
        folder / "data", models["interval"].parent, "--max-upload-mb", "4", "--max-voxels", "1000000", token=TOKEN
    ) as w:
        yield w


@pytest.fixture
def remote(worker):
    backend = RemoteBackend(worker.url, TOKEN, retries=1, backoff=0.1)
    yield backend
    backend.close()


def spec_for(cohort, **options) -> JobSpec:
    return ages_spec(cohort, MODEL, **options)


def test_end_to_end_matches_a_local_run(remote, cohort, models):
    assert isinstance(remote, Backend)
    spec = spec_for(cohort)
    job = remote.submit(spec)
    events = []
    deadline = time.monotonic() + 120
    while not (events and events[-1].final) and time.monotonic() < deadline:
        events += remote.poll(job)
        time.sleep(0.05)
    kinds = [e.kind for e in events]
    assert kinds[0] == "queued" and "started" in kinds and "progress" in kinds and kinds[-1] == "done"
    assert [e.seq for e in events] == list(range(len(events)))  # none lost, none repeated
    result = remote.result(job)
    gap = spec.params["ages"][0]
    from worker_harness import gapped_subject

    local = complete_ages(gapped_subject(cohort), [gap], models["interval"], device="cpu", **FAST)
    np.testing.assert_array_equal(result.image("generated", gap).array, local.image("generated", gap).array)
    np.testing.assert_allclose(result.image("generated", gap).affine, local.image("generated", gap).affine, atol=1e-4)
    assert [s.name for s in result.series] == [s.name for s in local.series]
    assert result.provenance.model == MODEL and result.provenance.seed == 0
    info = remote.info()
    assert info["mode"] == "embedded" and MODEL in [m["name"] for m in info["models"]]
    assert info["devices"][0]["device"] == "cpu" and "card" in info["models"][0]
    remote.delete(job)
    assert httpx.get(f"{remote.url}/v1/jobs/{job}", headers=AUTH).status_code == 404


def test_cancel_a_running_job(remote, cohort):
    job = remote.submit(spec_for(cohort, steps=400))
    while not any(e.kind == "progress" for e in remote.poll(job)):
        time.sleep(0.05)
    remote.cancel(job)
    with pytest.raises(Cancelled):
        remote.wait(job, timeout=60)
    status = remote.status(job)
    assert status["state"] == "cancelled" and not status["result_available"]


def test_tokens_are_required(worker, tmp_path):
    url = worker.url
    assert httpx.get(f"{url}/v1/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic dTpw"}):
        for method, path in (("GET", "/v1/info"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
                             ("GET", "/v1/openapi.json"), ("GET", f"/v1/jobs/{'0' * 32}/result")):  # fmt: skip
            r = httpx.request(method, url + path, headers=headers)
            assert r.status_code == 401, (headers, path)
            assert "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    with RemoteBackend(url, "wrong-token-wrong-token", retries=0) as bad, pytest.raises(WorkerRefused, match="401"):
        bad.info()
    # The OpenAPI description lists every route the worker serves.
    api = httpx.get(f"{url}/v1/openapi.json", headers=AUTH).json()
    assert {"/v1/health", "/v1/info", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/result"} <= set(api["paths"])  # fmt: skip
    assert "HTTPBearer" in json.dumps(api["components"])


def test_token_created_on_first_start_is_private(tmp_path, models):
    w = WorkerProcess(tmp_path / "data", models["interval"].parent)
    env = w.env()
    env.pop("LONGDIFF_WORKER_TOKEN")
    w.env = lambda: env
    with w:
        token_file = tmp_path / "data" / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        r = httpx.get(f"{w.url}/v1/info", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200


def test_unreachable_worker_and_version_mismatch(worker, monkeypatch):
    with RemoteBackend("http://127.0.0.1:9", TOKEN, retries=1, backoff=0.01) as gone:
        with pytest.raises(WorkerUnavailable, match="cannot reach the worker"):
            gone.check()
    import LongitudinalDiffusionLib.backends.remote as remote_module

    monkeypatch.setattr(remote_module, "CLIENT_API_MAJOR", 2)
    with RemoteBackend(worker.url, TOKEN) as old, pytest.raises(WorkerRefused, match="speaks API 1.0"):
        old.check()


# ----------------------------------------------------------------------------- bad inputs


def _nifti(array, spacing=(5.0, 5.0, 5.0), gz=True) -> bytes:
    img = nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0]))
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def _good_volume() -> np.ndarray:
    return np.random.default_rng(0).random((32, 40, 32)).astype(np.float32)


def _bomb() -> bytes:
    """A header declaring 8^3 voxels followed by 200 MB of zeros, gzipped to ~200 kB."""
    raw = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        gz.write(raw)
        zeros = bytes(1 << 20)
        for _ in range(200):
            gz.write(zeros)
    return buf.getvalue()


GOOD_SPEC = {
    "task": "complete-ages",
    "model": MODEL,
    "subject_id": "sub-x",
    "inputs": [{"path": "upload:0", "age_months": 3.0, "modality": "T1w"}],
    "params": {"ages": [6.0]},
    "options": {"steps": 2},
}


def _with_header(**fields) -> bytes:
    """A small gzipped NIfTI whose header fields are changed after the fact."""
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([5.0, 5.0, 5.0, 1.0]))
    for key, value in fields.items():
        img.header[key] = value
    return gzip.compress(img.header.binaryblock + bytes(4 + 8**3 * 4) + bytes(4 << 20), compresslevel=9)


def _spec(**changes) -> str:
    return json.dumps({**GOOD_SPEC, **changes})


def _nan_volume():
    v = _good_volume()
    v[3, 3, 3] = np.nan
    return v


BAD_INPUTS = [
    # name, spec text, files [(name, bytes)], status, message
    ("spec not JSON", "{task:", [("a.nii.gz", None)], 400, "not valid JSON"),
    ("spec not an object", "[1]", [("a.nii.gz", None)], 400, "must be a JSON object"),
    ("spec nested too deeply", "[" * 100_000, [("a.nii.gz", None)], 400, "nested too deeply"),
    ("unknown task", _spec(task="segment"), [("a.nii.gz", None)], 400, "unknown task"),
    ("malformed options", _spec(options={"steps": "many"}), [("a.nii.gz", None)], 400, "'steps' has the wrong type"),
    ("client path in spec", _spec(inputs=[{"path": "/etc/passwd", "age_months": 3, "modality": "T1w"}]),
     [("a.nii.gz", None)], 400, "must name an uploaded file"),
    ("reference past the files", _spec(inputs=[{"path": "upload:3", "age_months": 3, "modality": "T1w"}]),
     [("a.nii.gz", None)], 400, "refers to file 3"),
    ("unused upload", _spec(), [("a.nii.gz", None), ("b.nii.gz", None)], 400, "not used by the job spec"),
    ("unknown model", _spec(model="no-such-model"), [("a.nii.gz", None)], 422, "no model named 'no-such-model'"),
    ("model path", _spec(model="../../etc/model.json"), [("a.nii.gz", None)], 422, "name of a model installed"),
    ("model for another task", _spec(model="cwdm-tiny-untrained"), [("a.nii.gz", None)], 422, "is for"),
    ("not an image", _spec(), [("a.nii.gz", b"hello, this is not a NIfTI file at all" * 20)], 422, "not a NIfTI"),
    ("empty file", _spec(), [("a.nii.gz", b"")], 422, "empty"),
    ("corrupt gzip", _spec(), [("a.nii.gz", b"\x1f\x8b" + b"\x00garbage" * 50)], 422, "gzip"),
    ("truncated", _spec(), [("a.nii.gz", _nifti(_good_volume(), gz=False)[:20000])], 422, "truncated"),
    ("NaN voxels", _spec(), [("a.nii.gz", _nifti(_nan_volume()))], 422, "not finite"),
    ("4D series", _spec(), [("a.nii.gz", _nifti(np.zeros((8, 8, 8, 3), np.float32)))], 422, "4D image"),
    ("absurd spacing", _spec(), [("a.nii.gz", _nifti(_good_volume(), spacing=(500.0, 5.0, 5.0)))], 422, "voxel size"),
    ("too many voxels", _spec(), [("a.nii.gz", _nifti(np.zeros((300, 300, 300), np.uint8)))], 413, "voxels exceeds"),
    ("decompression bomb", _spec(), [("a.nii.gz", _bomb())], 413, "more data than its header declares"),
    ("bomb behind a huge header offset", _spec(), [("a.nii.gz", _with_header(vox_offset=2**30))], 413, "bytes in"),
    ("complex voxels", _spec(), [("a.nii.gz", _with_header(datatype=1792))], 422, "complex128 is not supported"),
    ("body over the limit", _spec(), [("a.nii.gz", os.urandom(5 * 2**20))], 413, "upload limit of 4 MB"),
    ("no files", _spec(), [], 422, "files"),
]  # fmt: skip


@pytest.mark.parametrize("case, spec, files, status, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_refused_clearly_and_the_worker_keeps_serving(worker, case, spec, files, status, message):
    parts = [("files", (name, _nifti(_good_volume()) if body is None else body)) for name, body in files]
    before = set(os.listdir(worker.data / "jobs"))
    r = httpx.post(f"{worker.url}/v1/jobs", headers=AUTH, data={"spec": spec}, files=parts or None, timeout=60)
    assert r.status_code == status, r.text
    assert message in json.dumps(r.json()["detail"]), r.text
    assert set(os.listdir(worker.data / "jobs")) == before  # nothing kept of a refused job
    assert httpx.get(f"{worker.url}/v1/health").status_code == 200


def test_hostile_file_names_are_never_used(worker):
    names = ["../../../../tmp/evil.nii.gz", "/etc/passwd", "..\\..\\x.nii", "a\x00b.nii.gz"]
    for name in names:
        r = httpx.post(
            f"{worker.url}/v1/jobs",
            headers=AUTH,
            data={"spec": _spec(options={"steps": 1})},
            files=[("files", (name, _nifti(_good_volume())))],
        )
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        assert sorted(os.listdir(worker.data / "jobs" / job)) == ["input-000.nii.gz", "spec.json"]
        httpx.delete(f"{worker.url}/v1/jobs/{job}", headers=AUTH)
    assert not os.path.exists("/tmp/evil.nii.gz")


# ----------------------------------------------------------------------------- restart, load


def test_restart_keeps_results_and_reports_the_interrupted_job(tmp_path, cohort, models):
    w = WorkerProcess(tmp_path / "data", models["interval"].parent, token=TOKEN)
    with w:
        client = RemoteBackend(w.url, TOKEN, retries=0)
        finished = client.submit(spec_for(cohort))
        client.wait(finished, timeout=120)
        running = client.submit(spec_for(cohort, steps=2000))
        while not any(e.kind == "progress" for e in client.poll(running)):
            time.sleep(0.05)
        queued = client.submit(spec_for(cohort, seed=9))
        client.close()
        w.kill()  # mid-job, no clean-up
        w.start()
        with RemoteBackend(w.url, TOKEN, retries=0) as again:
            status = again.status(running)
            assert status["state"] == "failed" and "interrupted" in status["message"]
            assert again.status(finished)["state"] == "done"
            gap = spec_for(cohort).params["ages"][0]
            assert again.result(finished).image("generated", gap).array.std() > 0
            assert again.wait(queued, timeout=120).task == "complete-ages"  # queued work is not lost
            with pytest.raises(Exception, match="interrupted"):
                again.result(running)
        assert not (w.data / "jobs" / running).exists()


def test_fifty_parallel_submissions_none_lost_finished_in_order(worker):
    spec = _spec(options={"steps": 1})

    def submit(i: int) -> tuple[float, str]:
        body = _nifti(_good_volume())
        r = httpx.post(f"{worker.url}/v1/jobs", headers=AUTH, data={"spec": spec}, files=[("files", ("x", body))])
        assert r.status_code == 202, r.text
        return r.json()["created"], r.json()["job_id"]

    with ThreadPoolExecutor(8) as pool:
        submitted = list(pool.map(submit, range(50)))
    ids = [job for _, job in sorted(submitted)]
    assert len(set(ids)) == 50
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=worker.url, headers=AUTH) as client:
        while time.monotonic() < deadline:
            states = [client.get(f"/v1/jobs/{j}").json() for j in ids]
            if all(s["state"] == "done" for s in states):
                break
            time.sleep(0.5)
        assert [s["state"] for s in states] == ["done"] * 50
        finished = [s["finished"] for s in states]
        assert finished == sorted(finished)  # first in, first out
        listed = {j["job_id"] for j in client.get("/v1/jobs").json()}
        assert set(ids) <= listed
        for j in ids:
            client.delete(f"/v1/jobs/{j}")


def test_event_stream_resumes_after_an_event_id(remote, cohort):
    job = remote.submit(spec_for(cohort))
    remote.wait(job, timeout=120)
    with httpx.stream("GET", f"{remote.url}/v1/jobs/{job}/events", headers={**AUTH, "Last-Event-ID": "1"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        ids = [int(line[4:]) for line in r.iter_lines() if line.startswith("id: ")]
    assert ids[0] == 2 and ids == list(range(2, ids[-1] + 1))
    r = httpx.get(f"{remote.url}/v1/jobs/{job}/result", headers=AUTH)
    assert r.headers["content-type"] == "application/zip" and r.content[:2] == b"PK"
    remote.delete(job)


def test_cli_runs_remotely(worker, cohort, tmp_path, capsys):
    from worker_harness import gapped_subject

    from LongitudinalDiffusionLib.cli import main
    from LongitudinalDiffusionLib.tasks import Result

    gap = gapped_subject(cohort).meta["gap"] + 1.5  # between two real scans
    sub = cohort / "sub-001"
    args = ["complete-ages", str(sub), "--ages", f"{gap}", "--model", MODEL, "--steps", "2", "-q"]
    remote = ["--remote", worker.url, "--token", TOKEN]
    assert main([*args, "--out", str(tmp_path / "out"), *remote]) == 0
    result = Result.load(tmp_path / "out")
    assert result.task == "complete-ages" and result.image("generated", gap).array.std() > 0
    assert main([*args, "--out", str(tmp_path / "bad"), "--remote", worker.url, "--token", "wrong-token-wrong"]) == 2
    assert "refused the access token" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
