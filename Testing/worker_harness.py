"""Shared pieces of the job, backend and worker tests: a tiny cohort, tiny untrained models,
specs built from them, and a real ``longdiff-worker`` process on loopback."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

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


def self_signed_cert(folder: Path) -> tuple[Path, Path] | None:
    """A throw-away certificate for 127.0.0.1/localhost and its key (PEM), made with the
    ``openssl`` command line, else the ``cryptography`` package; None if neither exists."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    openssl = shutil.which("openssl")
    if openssl:
        cmd = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"]
        cmd += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)]
        subprocess.run(cmd, check=True, capture_output=True)
        return cert, key
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2)).add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pkey, hashes.SHA256())
    )  # fmt: skip
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


class WorkerProcess:
    """``longdiff-worker serve`` in a child process, on a free loopback port.

    ``ca``: the certificate to trust when the worker is started with ``--tls-cert`` (its
    address is then ``https://``). ``preamble``: Python run in the worker process before
    the command line (tests only - e.g. to make a model fail the way a GPU would).
    """

    def __init__(
        self,
        data: Path,
        models: Path | str,
        *extra: str,
        token: str = "test-token",
        port: int | None = None,
        ca: Path | None = None,
        preamble: str = "",
    ):
        self.data, self.models, self.extra, self.token = data, models, extra, token
        self.port = port or free_port()
        self.ca, self.preamble = ca, preamble
        self.url = f"{'https' if '--tls-cert' in extra else 'http'}://127.0.0.1:{self.port}"
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
        if self.preamble:
            main = "import sys\nfrom LongitudinalDiffusionLib.worker.cli import main\nsys.exit(main(sys.argv[1:]))"
            cmd = [sys.executable, "-c", f"{self.preamble}\n{main}", "serve", "--host", "127.0.0.1"]
        else:
            cmd = [sys.executable, "-m", "LongitudinalDiffusionLib.worker", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--data", str(self.data), *self.extra]
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                verify = ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
                if httpx.get(f"{self.url}/v1/health", timeout=1.0, verify=verify).status_code == 200:
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


# ----------------------------------------------------------------------------- raw API helpers
# (requests as a hostile client would send them: by hand, with httpx)

HARNESS_MODEL = "interval-tiny-untrained"


def nifti(shape=(32, 40, 32), gz=True, seed=0) -> bytes:
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    raw = nib.Nifti1Image(data, np.diag([5.0, 5.0, 5.0, 1.0])).to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def spec(n_inputs: int = 1, **changes) -> str:
    inputs = [{"path": f"upload:{i}", "age_months": 3.0 + 3 * i, "modality": "T1w"} for i in range(n_inputs)]
    body = {"task": "complete-ages", "model": HARNESS_MODEL, "subject_id": "sub-x", "inputs": inputs,
            "params": {"ages": [20.0]}, "options": {"steps": 2}}  # fmt: skip
    for key, value in changes.items():
        if key in ("steps", "seed", "capture"):
            body["options"][key] = value
        else:
            body[key] = value
    return json.dumps(body)


def submit(url: str, headers: dict, text: str, n_files: int = 1, body: bytes | None = None) -> httpx.Response:
    files = [("files", (f"f{i}.nii.gz", body if body is not None else nifti(seed=i))) for i in range(n_files)]
    return httpx.post(f"{url}/v1/jobs", headers=headers, data={"spec": text}, files=files, timeout=60)


def wait_state(url: str, headers: dict, job: str, states, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/v1/jobs/{job}", headers=headers, timeout=30).json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def traces_of(data: Path, job: str) -> list[str]:
    """Every file or folder under the data folder whose name carries the job's id."""
    return [str(p.relative_to(data)) for p in data.rglob("*") if job in p.name]


def one_line_json(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str), r.text
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    return body["detail"]
