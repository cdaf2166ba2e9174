"""The worker's client never hangs: a real tiny HTTP server on loopback (the standard
library's, no mocks) plays a worker whose event stream misbehaves - malformed events, a
connection dropped mid-stream again and again, a stream that stalls - and every time the
client's wait() ends with a clear error (poll() with a 'failed' event)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from LongitudinalDiffusionLib.backends.remote import RemoteBackend, WorkerUnavailable

JOB = "a" * 32
QUEUED = json.dumps({"job_id": JOB, "kind": "queued", "message": "", "seq": 0})


class FakeWorker(BaseHTTPRequestHandler):
    """Health as a worker answers it; the job's event stream as ``server.mode`` says."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/v1/health"):
            body = json.dumps({"status": "ok", "version": "x", "api_version": "1.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.server.streams += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        mode = self.server.mode
        if mode == "malformed":
            self.wfile.write(f"id: 0\nevent: queued\ndata: {QUEUED}\n\n".encode())
            self.wfile.write(b"id: 1\nevent: progress\ndata: {not json\n\n")
        elif mode == "not an event":
            self.wfile.write(b'data: {"kind": "progress"}\n\n')  # JSON, but no job_id
        elif mode == "drop":
            self.wfile.write(b'id: 0\nevent: queued\ndata: {"job_id"')  # cut mid-event
        elif mode == "stall":
            self.wfile.flush()
            self.server.release.wait(30)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeWorker)
    server.daemon_threads = True
    server.mode, server.streams, server.release = "malformed", 0, threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def wait_in_thread(client: RemoteBackend, timeout: float | None, limit: float = 30.0) -> BaseException:
    """wait() with ``timeout`` in a thread; what it raised (the test fails if it does not end)."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            client.wait(JOB, timeout=timeout)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"wait(timeout={timeout}) did not end within {limit} s"
    assert outcome, "wait() returned without an error"
    return outcome[0]


def test_a_malformed_event_ends_wait_with_that_error(fake):
    with RemoteBackend(url(fake), "t" * 20, retries=0, backoff=0.05) as client:
        t0 = time.monotonic()
        err = wait_in_thread(client, None)
        assert isinstance(err, WorkerUnavailable), repr(err)
        assert f"the event stream of job {JOB} failed (JSONDecodeError" in str(err)
        assert time.monotonic() - t0 < 10
        kinds = [(e.kind, e.seq) for e in client.poll(JOB)]
        assert kinds == [("queued", 0), ("failed", 1)]
        assert "JSONDecodeError" in client._events[JOB][-1].message
        # waiting again says the same at once
        err2 = wait_in_thread(client, 5)
        assert err2 is err


def test_an_event_without_its_fields_ends_wait(fake):
    fake.mode = "not an event"
    with RemoteBackend(url(fake), "t" * 20, retries=0) as client:
        err = wait_in_thread(client, None)
        assert isinstance(err, WorkerUnavailable) and "failed (InputError: job event: not a job event" in str(err), (
            repr(err)
        )


def test_a_connection_dropped_again_and_again_ends_wait(fake):
    fake.mode = "drop"
    with RemoteBackend(url(fake), "t" * 20, retries=0, backoff=0.05, stream_patience=1.5) as client:
        err = wait_in_thread(client, None)
        assert isinstance(err, WorkerUnavailable), repr(err)
        assert f"lost the event stream of job {JOB} for over 1.5 s" in str(err)
        assert fake.streams >= 3  # it did reconnect before giving up
        assert client.poll(JOB)[-1].kind == "failed"


def test_a_stalled_stream_ends_wait(fake):
    fake.mode = "stall"
    with RemoteBackend(url(fake), "t" * 20, retries=0, backoff=0.05) as client:
        # with a timeout: a clear TimeoutError at that time
        t0 = time.monotonic()
        err = wait_in_thread(client, 1.0)
        assert isinstance(err, TimeoutError) and f"job {JOB} did not finish within 1 s" in str(err)
        assert time.monotonic() - t0 < 5
    with RemoteBackend(url(fake), "t" * 20, retries=0, backoff=0.05, stream_timeout=0.5, stream_patience=1.5) as c:
        # without one: the silent stream is reopened, then given up with the reason
        err = wait_in_thread(c, None)
        assert isinstance(err, WorkerUnavailable), repr(err)
        assert "lost the event stream" in str(err) and "ReadTimeout" in str(err)


def test_closing_the_client_ends_a_wait(fake):
    fake.mode = "stall"
    client = RemoteBackend(url(fake), "t" * 20, retries=0)
    threading.Timer(0.5, client.close).start()
    err = wait_in_thread(client, None, limit=3)
    assert isinstance(err, WorkerUnavailable) and "the client was closed" in str(err), repr(err)
