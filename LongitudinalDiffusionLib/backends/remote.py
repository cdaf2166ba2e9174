"""The HTTP client of a ``longdiff-worker``: the same Backend protocol as the local one.

Submitting uploads the spec's input files (gzip-compressed) - a caller only does so with
the user's consent (the Slicer panel asks; the CLI's ``--remote`` is that consent). Events
are streamed from the worker (server-sent events) by one background thread per job and
handed out by :meth:`RemoteBackend.poll`; the stream reconnects after a network hiccup
without losing or repeating events. Transient failures (connection refused or reset,
502/503/504) are retried with exponential back-off; everything else gets one clear message
at once - TLS failures included (a certificate does not get better by asking again), and a
plain ``http://`` address pointing at a worker that speaks HTTPS is recognised as such.

The client never hangs: whatever ends an event stream early - a malformed event, a
connection that keeps dropping or stalling for ``stream_patience`` seconds - ends the job's
:meth:`~RemoteBackend.wait` with that error (and :meth:`~RemoteBackend.poll` with a
``failed`` event saying so).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import socket
import ssl
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError, LongitudinalDiffusionError
from ..jobs import FINAL_KINDS, JobEvent, JobExpired, JobNotFinished, JobSpec, UnknownJob
from ..progress import Cancelled

log = logging.getLogger(__name__)

CLIENT_API_MAJOR = 1
TRANSIENT_STATUS = (502, 503, 504)


class WorkerUnavailable(LongitudinalDiffusionError):
    """The worker cannot be reached, or refused the connection's security."""


class WorkerRefused(LongitudinalDiffusionError):
    """The worker answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(LongitudinalDiffusionError):
    """The job ran on the worker and failed; the message is the worker's."""


class RemoteBackend:
    """Runs jobs on a ``longdiff-worker``.

    Args:
        url: the worker's address, e.g. ``https://gpu.example.org:8765``.
        token: its access token.
        verify: TLS verification: True (system CAs), False (never in production), or the
            path of a CA bundle / self-signed certificate to trust.
        timeout: seconds for connecting and for each read.
        retries: attempts after the first one for transient failures.
        backoff: first back-off delay (seconds), doubled at each retry.
        stream_timeout: seconds an event stream may stay silent (the worker sends a
            keep-alive every 15 s) before it counts as stalled and is reopened.
        stream_patience: seconds an event stream may keep failing (dropped, stalled,
            refused) before the job's wait() ends with the error.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        verify: bool | str = True,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        stream_timeout: float = 60.0,
        stream_patience: float = 120.0,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self.stream_timeout, self.stream_patience = stream_timeout, stream_patience
        headers = {"User-Agent": f"LongitudinalDiffusion/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, verify=_tls_context(verify), timeout=timeout)
        self._lock = threading.Lock()
        self._events: dict[str, list[JobEvent]] = {}
        self._cursor: dict[str, int] = {}
        self._streams: dict[str, threading.Thread] = {}
        self._ended: dict[str, threading.Event] = {}
        self._failures: dict[str, Exception] = {}
        self._closed = threading.Event()
        self._checked = False

    # ------------------------------------------------------------------ requests

    def _request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any):
        import httpx

        delay = self.backoff
        for attempt in range(self.retries + 1 if retry else 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                err = self._connect_error(exc)
                if _is_tls_error(exc):
                    raise err from None  # not transient: no retry
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError, httpx.TimeoutException) as exc:
                if self.url.startswith("http://") and _speaks_tls(self._http.base_url):
                    raise WorkerUnavailable(
                        f"the worker at {self.url} speaks HTTPS (TLS): use https://{self.url[len('http://') :]}"
                    ) from None
                err = WorkerUnavailable(f"lost the connection to the worker at {self.url} ({type(exc).__name__})")
            else:
                if response.status_code in TRANSIENT_STATUS:
                    try:
                        why = str(response.json().get("detail") or "")[:300]
                    except (ValueError, AttributeError):
                        why = ""
                    why = f": {why}" if why else ""
                    err = WorkerUnavailable(f"the worker at {self.url} is unavailable ({response.status_code}{why})")
                else:
                    self._raise_for(response)
                    return response
            if attempt < (self.retries if retry else 0) and not self._closed.is_set():
                log.info("%s; retrying in %.1f s", err, delay)
                time.sleep(delay)
                delay *= 2
                continue
            raise err
        raise AssertionError("unreachable")

    def _connect_error(self, exc: Exception) -> WorkerUnavailable:
        text = str(exc)
        if _is_tls_error(exc):
            if "WRONG_VERSION_NUMBER" in text.upper() or "RECORD LAYER" in text.upper():
                hint = "the worker may be serving plain http (started without --tls-cert)"
            elif "HOSTNAME" in text.upper() or "IP ADDRESS MISMATCH" in text.upper():
                hint = "the certificate was not issued for this address: connect with the name it was issued for"
            else:
                hint = (
                    "if the worker uses a self-signed certificate or a private CA, trust that certificate: "
                    "--tls-ca cert.pem on the command line, verify='cert.pem' in RemoteBackend"
                )
            return WorkerUnavailable(f"TLS handshake with {self.url} failed ({text}); {hint}")
        return WorkerUnavailable(
            f"cannot reach the worker at {self.url} ({text}): is it running and is the address right?"
        )

    def _raise_for(self, response) -> None:
        code = response.status_code
        if code < 400:
            return
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text[:300]
        if not isinstance(detail, str):
            detail = json.dumps(detail)[:500]
        if code == 401:
            raise WorkerRefused(401, f"the worker refused the access token (401: {detail}); check --token / "
                                "LONGDIFF_WORKER_TOKEN")  # fmt: skip
        if code == 413:
            raise WorkerRefused(413, f"too large for this worker: {detail}")
        if code == 404 and "no job" in detail:
            raise UnknownJob(detail)
        if code == 410:
            raise JobExpired(detail)
        if code in (400, 422):
            raise WorkerRefused(code, detail)
        raise WorkerRefused(code, f"the worker answered {code}: {detail}")

    def check(self) -> dict[str, Any]:
        """The worker's health; refuses a worker that speaks another major API version."""
        health = self._request("GET", "/v1/health").json()
        version = str(health.get("api_version", "0"))
        if version.split(".")[0] != str(CLIENT_API_MAJOR):
            raise WorkerRefused(
                0,
                f"the worker at {self.url} speaks API {version} (longdiff-worker {health.get('version')}), this client "
                f"API {CLIENT_API_MAJOR}.x (LongitudinalDiffusion {__version__}): update the older side",
            )
        self._checked = True
        return health

    def info(self) -> dict[str, Any]:
        """Version, devices, GPU memory, limits and models of the worker."""
        return self._request("GET", "/v1/info").json()

    # ------------------------------------------------------------------ Backend

    def submit(self, spec: JobSpec) -> str:
        spec.validate()
        if not self._checked:
            self.check()
        sent = JobSpec.from_dict(spec.to_dict())
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        index: dict[str, int] = {}
        for item in sent.inputs:
            for key in ("path", "labels"):
                value = getattr(item, key)
                if value is None:
                    continue
                if value not in index:
                    index[value] = len(files)
                    files.append(("files", (f"input-{len(files):03d}.nii.gz", _gzipped(value), "application/gzip")))
                setattr(item, key, f"upload:{index[value]}")
        response = self._request("POST", "/v1/jobs", data={"spec": json.dumps(sent.to_dict())}, files=files)
        job_id = response.json()["job_id"]
        self._follow(job_id)
        return job_id

    def poll(self, job_id: str) -> list[JobEvent]:
        self._follow(job_id)
        with self._lock:
            events = self._events[job_id]
            new = events[self._cursor[job_id] :]
            self._cursor[job_id] = len(events)
            return list(new)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> None:
        self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def result(self, job_id: str) -> Any:
        from ..tasks import Result

        status = self.status(job_id)
        state = status["state"]
        if state == "cancelled":
            raise Cancelled(status.get("message") or "")
        if state == "failed":
            message = status.get("message") or "the job failed"
            if status.get("error_type") == "InputError":
                raise InputError(None, message)
            raise JobFailed(message)
        if state != "done":
            raise JobNotFinished(f"job {job_id} is {state}")
        tmp = Path(tempfile.mkdtemp(prefix="longdiff-remote-"))
        try:
            archive = tmp / "result.zip"
            with self._http.stream("GET", f"/v1/jobs/{job_id}/result") as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                with open(archive, "wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
            folder = tmp / "result"
            _safe_extract(archive, folder)
            return Result.load(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self, job_id: str, timeout: float | None = None) -> Any:
        self._follow(job_id)
        if not self._ended[job_id].wait(timeout):
            raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s")
        with self._lock:
            failure = self._failures.get(job_id)
        if failure is not None:
            raise failure
        return self.result(job_id)

    def delete(self, job_id: str) -> None:
        """Cancel the job if needed and delete it and its result from the worker."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def close(self) -> None:
        """Stop following events and close the connections (at once: an open event stream
        is cut, not waited for)."""
        self._closed.set()
        with self._lock:
            following = list(self._ended)
        for job_id in following:  # whoever waits hears of it now, whatever the stream threads do
            self._fail(job_id, WorkerUnavailable(f"stopped following job {job_id}: the client was closed"))
        self._http.close()
        for t in list(self._streams.values()):
            t.join(timeout=5)

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ event stream

    def _follow(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._streams:
                return
            self._events[job_id], self._cursor[job_id] = [], 0
            self._ended[job_id] = threading.Event()
            t = threading.Thread(target=self._stream, args=(job_id,), name=f"longdiff-events-{job_id[:8]}", daemon=True)
            self._streams[job_id] = t
        t.start()

    def _stream(self, job_id: str) -> None:
        try:
            self._stream_events(job_id)
        except BaseException as exc:  # whatever it is, the waiter hears of it
            if isinstance(exc, (WorkerUnavailable, WorkerRefused)):
                error: Exception = exc
            else:
                error = WorkerUnavailable(f"the event stream of job {job_id} failed ({type(exc).__name__}: {exc})")
                error.__cause__ = exc
            self._fail(job_id, error)
            if not isinstance(exc, Exception):
                raise
        finally:
            if not self._ended[job_id].is_set():  # close() cut it: a waiter must not wait forever
                self._fail(job_id, WorkerUnavailable(f"stopped following job {job_id}: the client was closed"))

    def _fail(self, job_id: str, error: Exception) -> None:
        """End the job for this client's waiters: ``wait`` raises ``error``, ``poll`` gives a failed event."""
        with self._lock:
            if self._ended[job_id].is_set():
                return
            self._failures[job_id] = error
            events = self._events[job_id]
            events.append(JobEvent(job_id, "failed", message=str(error), seq=events[-1].seq + 1 if events else 0))
        self._ended[job_id].set()

    def _stream_events(self, job_id: str) -> None:
        import httpx

        delay = self.backoff
        failing_since: float | None = None  # when the current run of failed connections began
        timeout = httpx.Timeout(30, read=self.stream_timeout)
        while not self._closed.is_set():
            with self._lock:
                after = self._events[job_id][-1].seq if self._events[job_id] else -1
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", params={"after": after}, timeout=timeout
                ) as response:
                    if response.status_code in (401, 404, 410):
                        response.read()
                        try:
                            self._raise_for(response)
                        except LongitudinalDiffusionError as exc:
                            self._add(JobEvent(job_id, "failed", message=str(exc), seq=after + 1))
                        return
                    if response.status_code >= 400:
                        raise WorkerUnavailable(f"event stream answered {response.status_code}")
                    for event in _sse(response.iter_lines()):
                        failing_since, delay = None, self.backoff  # an event or a keep-alive: the stream works
                        if event is None:
                            continue
                        self._add(event)
                        if event.kind in FINAL_KINDS:
                            return
                        if self._closed.is_set():
                            return
                    raise WorkerUnavailable("the stream ended before the job did")
            except (httpx.HTTPError, WorkerUnavailable) as exc:
                if self._closed.is_set():
                    return
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since > self.stream_patience:
                    raise WorkerUnavailable(
                        f"lost the event stream of job {job_id} for over {self.stream_patience:g} s "
                        f"({type(exc).__name__}: {exc or 'no detail'})"
                    ) from None
                log.info("event stream of job %s interrupted (%s); reconnecting in %.1f s", job_id, exc, delay)
            self._closed.wait(delay)
            delay = min(delay * 2, 10.0)

    def _add(self, event: JobEvent) -> None:
        with self._lock:
            events = self._events[event.job_id]
            if events and event.seq <= events[-1].seq:
                return  # already seen (a resumed stream)
            events.append(event)
        if event.kind in FINAL_KINDS:
            self._ended[event.job_id].set()


def _tls_context(verify: bool | str | Any) -> bool | ssl.SSLContext:
    """httpx's ``verify``: True/False as given, a CA file or folder as an SSL context."""
    if isinstance(verify, (bool, ssl.SSLContext)):
        return verify
    path = Path(verify)
    try:
        if path.is_dir():
            return ssl.create_default_context(capath=str(path))
        return ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise InputError(path, f"cannot use this file as the worker's TLS certificate / CA ({reason})") from None


def _is_tls_error(exc: BaseException) -> bool:
    """Whether a failed connection failed in the TLS handshake: an ``ssl.SSLError`` (a
    certificate that does not verify, a protocol mismatch) somewhere in the chain of causes
    httpx and httpcore raise it with."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _speaks_tls(url: Any) -> bool:
    """Whether the server at ``url``'s host and port completes a TLS handshake (the
    certificate is not checked: this only tells which protocol it speaks)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((url.host, url.port or 80), timeout=3) as sock:
            with context.wrap_socket(sock, server_hostname=url.host):
                return True
    except (OSError, ssl.SSLError):
        return False


def _sse(lines) -> Any:
    """JobEvents from server-sent event lines, and None for each keep-alive comment."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield JobEvent.from_dict(json.loads("\n".join(data)))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith(":"):
            yield None


def _gzipped(path: str) -> bytes:
    """The file's bytes, gzip-compressed unless they already are."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read the file to upload ({exc.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        return raw
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


def _safe_extract(archive: Path, folder: Path) -> None:
    """Unzip a result, refusing entries that would land outside ``folder``."""
    folder.mkdir(parents=True)
    root = folder.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (folder / info.filename).resolve()
            if root not in target.parents:
                raise InputError(archive, f"result archive entry '{info.filename}' points outside its folder")
            if info.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
