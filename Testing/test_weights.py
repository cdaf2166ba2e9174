"""Weights fetched on first use (LongitudinalDiffusionLib/weights.py), against a real HTTP
server on loopback: a fresh download with progress, a resumed partial download, a wrong
checksum rejected, an unreachable server, and the bundled copy used when present."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from LongitudinalDiffusionLib import weights
from LongitudinalDiffusionLib.catalog import ModelCard
from LongitudinalDiffusionLib.errors import InputError

PAYLOAD = os.urandom(3 * weights.CHUNK + 12345)  # several chunks, an odd tail
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A real HTTP server on 127.0.0.1 that serves PAYLOAD at /w.safetensors, honours
    ``Range: bytes=N-`` (206), and can drop the connection after ``cutAfter`` bytes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.cutAfter: int | None = None
        self.honourRange = True
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                owner.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                if self.path != "/w.safetensors":
                    self.send_error(404)
                    return
                start = 0
                rangeHeader = self.headers.get("Range", "")
                if owner.honourRange and rangeHeader.startswith("bytes="):
                    start = int(rangeHeader[6:].split("-")[0])
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.cutAfter is not None:
                    self.wfile.write(body[: owner.cutAfter])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the network drops mid-file
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/w.safetensors"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV_VAR, str(folder))
    return folder


def makeCard(folder: Path, url: str | None, digest: str = DIGEST, size: int | None = len(PAYLOAD)) -> ModelCard:
    folder.mkdir(parents=True, exist_ok=True)
    card = {"method": "cas-diffcom", "weights": {"file": "w.safetensors", "sha256": digest}}
    if size is not None:
        card["weights"]["bytes"] = size
    if url:
        card["weights_url"] = url
    path = folder / "w.json"
    path.write_text(json.dumps(card))
    return ModelCard("w", path, card)


def test_downloads_on_first_use_with_progress_then_uses_the_cache(tmp_path, server, cache):
    card = makeCard(tmp_path / "models", server.url)
    seen = []
    path = weights.ensure_weights(card, progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(cache) and path.parent.name == DIGEST[:16]
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _t in seen] == sorted(d for d, _t in seen) and len(seen) >= 4
    assert not list(cache.rglob("*" + weights.PARTIAL_SUFFIX))
    # second use: from the cache, no request
    assert weights.ensure_weights(card) == path and len(server.requests) == 1


def test_an_interrupted_download_is_resumed_with_a_range_request(tmp_path, server):
    card = makeCard(tmp_path / "models", server.url)
    half = len(PAYLOAD) // 2
    server.cutAfter = half
    with pytest.raises(weights.WeightsUnavailable, match="interrupted|could not download"):
        weights.ensure_weights(card)
    partial = weights.cached_path(card).with_name("w.safetensors" + weights.PARTIAL_SUFFIX)
    assert partial.is_file() and 0 < partial.stat().st_size <= half
    kept = partial.stat().st_size
    server.cutAfter = None
    seen = []
    path = weights.ensure_weights(card, progress=lambda done, total: seen.append(done))
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert seen[0] == kept  # only the rest came over the network
    assert not partial.exists()


def test_a_server_that_ignores_range_sends_the_whole_file_again(tmp_path, server):
    card = makeCard(tmp_path / "models", server.url)
    partial = weights.cached_path(card).with_name("w.safetensors" + weights.PARTIAL_SUFFIX)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(PAYLOAD[:1000])
    server.honourRange = False
    assert weights.ensure_weights(card).read_bytes() == PAYLOAD


def test_a_wrong_checksum_is_rejected_and_nothing_is_left(tmp_path, server, cache):
    card = makeCard(tmp_path / "models", server.url, digest="0" * 64)
    with pytest.raises(InputError, match="do not match the card's checksum.*removed"):
        weights.ensure_weights(card)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    # a partial left by an earlier attempt that turns out wrong is removed too
    partial = weights.cached_path(card).with_name("w.safetensors" + weights.PARTIAL_SUFFIX)
    partial.write_bytes(PAYLOAD[:5000])
    with pytest.raises(InputError, match="checksum"):
        weights.ensure_weights(card)
    assert not partial.exists() and not weights.cached_path(card).exists()


def test_an_unreachable_server_gives_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    card = makeCard(tmp_path / "models", f"http://127.0.0.1:{port}/w.safetensors")
    with pytest.raises(weights.WeightsUnavailable) as info:
        weights.ensure_weights(card, timeout=5)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "network" in message and str(weights.cached_path(card)) in message


def test_a_missing_file_on_the_server_is_reported(tmp_path, server):
    card = makeCard(tmp_path / "models", server.url.replace("w.safetensors", "gone.safetensors"))
    with pytest.raises(weights.WeightsUnavailable, match="HTTP 404"):
        weights.ensure_weights(card)


def test_the_bundled_copy_is_used_when_present(tmp_path, server):
    card = makeCard(tmp_path / "models", server.url)
    (tmp_path / "models" / "w.safetensors").write_bytes(PAYLOAD)
    assert weights.ensure_weights(card) == tmp_path / "models" / "w.safetensors"
    assert server.requests == []


def test_no_file_and_no_url_says_what_is_missing(tmp_path):
    card = makeCard(tmp_path / "models", None)
    with pytest.raises(weights.WeightsUnavailable, match="missing.*weights_url"):
        weights.ensure_weights(card)


def test_the_demo_models_run_offline_from_their_bundled_copies(server):
    root = Path(__file__).resolve().parents[1] / "Resources" / "Models"
    cards = sorted(root.glob("*.json"))
    assert cards
    for path in cards:
        card = ModelCard(path.stem, path, json.loads(path.read_text()))
        name, _digest, url, _size = weights.weights_entry(card)
        assert url and url.startswith("https://") and url.endswith("/" + name), path  # where a release puts them
        assert weights.ensure_weights(card) == root / name
    assert server.requests == []


def test_load_model_fetches_missing_weights_on_first_use(tmp_path, server, cache):
    pytest.importorskip("torch")
    from LongitudinalDiffusionLib.catalog import create_untrained, load_model

    card_path = create_untrained("cas-diffcom", tmp_path / "made", name="tiny")
    card = json.loads(card_path.read_text())
    weights_file = card_path.parent / card["weights"]["file"]
    global PAYLOAD
    served, PAYLOAD = PAYLOAD, weights_file.read_bytes()
    try:
        card["weights_url"] = server.url
        release = tmp_path / "release"  # a release build: the card without its weights
        release.mkdir()
        (release / "tiny.json").write_text(json.dumps(card))
        loaded = load_model(release / "tiny.json")
        assert loaded.card.name == "tiny" and len(server.requests) == 1
        assert not (release / card["weights"]["file"]).exists()  # the cache holds it
    finally:
        PAYLOAD = served
