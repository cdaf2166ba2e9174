"""Model weights fetched on first use, so that releases need not carry them in git.

A model card names its weights file and sha256 (``"weights": {"file", "sha256", "bytes"}``)
and may name where a release publishes them (``"weights_url"``, or ``"url"`` inside
``"weights"``). :func:`ensure_weights` returns a path to checked weights:

1. the file next to the card when it is there (the bundled demo models in a source checkout
   or an extension built with them): nothing is downloaded;
2. else a copy in the user's cache (``~/.longdiff/cache/weights/<sha256>/<file>``, or under
   ``$LONGDIFF_CACHE``) whose checksum matches;
3. else a download from the card's URL into that cache: resumed with an HTTP ``Range``
   request when an earlier attempt left a partial file, reported through a progress
   callback, and checked against the card's sha256 before it is used. A file that does not
   match is removed (partial included) and the error says so; a server that cannot be
   reached gives an error naming the URL and where to put the file by hand.

Only the standard library is used (``urllib``): it runs before any optional package is
installed, and on Python 3.9 (Slicer 5.8).

Example::

    from LongitudinalDiffusionLib.catalog import find_model
    from LongitudinalDiffusionLib.weights import ensure_weights
    path = ensure_weights(find_model("cas-diffcom-demo"), progress=lambda done, total: print(done, total))
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from .errors import InputError, LongitudinalDiffusionError

#: Environment variable naming the cache folder (default :data:`CACHE_DIR`).
CACHE_ENV_VAR = "LONGDIFF_CACHE"
CACHE_DIR = Path("~/.longdiff/cache")
#: Bytes read per chunk (and between two progress reports).
CHUNK = 1 << 20
#: Suffix of a download in progress (kept when interrupted, resumed next time).
PARTIAL_SUFFIX = ".part"

Progress = Callable[[int, Optional[int]], Any]


class WeightsUnavailable(LongitudinalDiffusionError):
    """The weights are not on this computer and could not be downloaded."""


def cache_dir() -> Path:
    """The cache folder: ``$LONGDIFF_CACHE`` or ``~/.longdiff/cache``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or CACHE_DIR).expanduser()


def weights_entry(card: Any) -> tuple[str, str, str | None, int | None]:
    """``(file, sha256, url, bytes)`` of a :class:`~.catalog.ModelCard`'s weights.

    Raises:
        InputError: the card names no weights file or no sha256.
    """
    data = card.card
    entry = data.get("weights") or {}
    name, digest = entry.get("file"), entry.get("sha256")
    if not name:
        raise InputError(card.path, "model card names no weights file ('weights': {'file': ...})")
    if not digest:
        raise InputError(card.path, "model card has no sha256 of its weights")
    if Path(name).name != name:
        raise InputError(card.path, f"weights file '{name}' must be a plain file name")
    url = data.get("weights_url") or entry.get("url")
    size = entry.get("bytes")
    return name, str(digest).lower(), (str(url) if url else None), (int(size) if size is not None else None)


def cached_path(card: Any) -> Path:
    """Where the cache keeps (or will keep) this card's weights."""
    name, digest, _url, _size = weights_entry(card)
    return cache_dir() / "weights" / digest[:16] / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_weights(card: Any, progress: Progress | None = None, *, timeout: float = 30.0) -> Path:
    """A path to this card's weights, downloaded into the cache on first use (see the module doc).

    Args:
        card: a :class:`~.catalog.ModelCard`.
        progress: called as ``progress(bytes_done, bytes_total)`` while downloading
            (``bytes_total`` is None when neither the card nor the server says).
        timeout: seconds to wait for the server at each step.

    Returns:
        the file next to the card, or the checked copy in the cache. The bundled file's
        checksum is left to the caller (``catalog.load_model`` checks it).

    Raises:
        InputError: the card's weights entry is unusable; a download does not match its sha256.
        WeightsUnavailable: no file here, and no URL, or the server cannot be reached.
    """
    name, digest, url, size = weights_entry(card)
    beside = Path(card.path).parent / name
    if beside.is_file():
        return beside
    target = cached_path(card)
    if target.is_file():
        if _sha256(target) == digest:
            return target
        target.unlink()  # ours (the cache), and wrong: fetch it again
    if not url:
        raise WeightsUnavailable(
            f"{beside}: weights of model '{card.name}' are missing, and its card names no 'weights_url' to "
            f"download them from"
        )
    _download(url, target, digest, size, progress, timeout, card.name)
    return target


def _download(
    url: str, target: Path, digest: str, size: int | None, progress: Progress | None, timeout: float, model: str
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    have = partial.stat().st_size if partial.is_file() else 0
    if size is not None and have > size:  # not a prefix of this file: start again
        partial.unlink()
        have = 0
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise InputError(url, f"the weights URL of model '{model}' must start with https:// (or http://)")
    request = urllib.request.Request(url, headers={"User-Agent": "LongitudinalDiffusion"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    offline = (
        f"could not download the weights of model '{model}' from {url}"
        + " ({reason}). Check the network connection (or proxy) and try again, or download the file by hand "
        + f"and put it at {target}"
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already whole (or bogus): check it below
            response = None
        else:
            raise WeightsUnavailable(offline.format(reason=f"HTTP {exc.code} {exc.reason}")) from exc
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsUnavailable(offline.format(reason=str(reason))) from exc
    if response is not None:
        with response:
            resumed = have > 0 and getattr(response, "status", 200) == 206
            if not resumed:
                have = 0  # the server sent the whole file
            length = response.headers.get("Content-Length")
            end = have + int(length) if length and length.isdigit() else None  # where this response should stop
            total = size if size is not None else end
            done = have
            if progress is not None:
                progress(done, total)
            try:
                with open(partial, "ab" if resumed else "wb") as out:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            except (OSError, socket.timeout, http.client.HTTPException) as exc:
                # keep the partial file: the next attempt resumes it
                raise WeightsUnavailable(offline.format(reason=f"interrupted after {done} bytes: {exc}")) from exc
            if end is not None and done < end:  # the connection closed early: resume next time
                raise WeightsUnavailable(offline.format(reason=f"interrupted after {done} of {end} bytes"))
    actual = _sha256(partial)
    if actual != digest:
        partial.unlink()
        raise InputError(
            url,
            f"the downloaded weights of model '{model}' do not match the card's checksum (sha256 {actual[:12]}..., "
            f"card says {digest[:12]}...); the download was removed",
        )
    os.replace(partial, target)
