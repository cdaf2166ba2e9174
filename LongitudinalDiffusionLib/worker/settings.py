"""The worker's settings and its single (admin) access token.

The token is read, in this order, from ``--token-file``, from the ``LONGDIFF_WORKER_TOKEN``
environment variable, or from ``<data>/token``, which is created on first start with
owner-only permissions (0600) - unless the users file has users (:mod:`.users`: one token
per user), when it is only read if it exists.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)

TOKEN_ENV = "LONGDIFF_WORKER_TOKEN"
MIN_TOKEN_LENGTH = 16


@dataclass
class Settings:
    """Everything the server needs; built by the command line or by tests.

    Args:
        data: folder of the job database, inputs and results.
        token: the single token (the admin user), or None when only the users file serves.
        max_upload_mb: largest request body accepted (HTTP 413 above).
        max_voxels: largest image accepted (voxels), whatever its file size.
        max_dim: largest extent along any axis (voxels).
        expiry_hours: finished jobs and their results are deleted this long after they
            end (0: kept until deleted).
        expiry_sweep_seconds: how often the worker looks for expired jobs.
        broker: Celery broker URL (``redis://...``); None runs jobs in this process.
        devices: devices of the embedded runner, one job at a time on each.
    """

    data: Path
    token: str | None
    max_upload_mb: float = 512.0
    max_voxels: int = 512**3
    max_dim: int = 2048
    max_inputs: int = 64
    expiry_hours: float = 72.0
    expiry_sweep_seconds: float = 60.0
    broker: str | None = None
    devices: tuple[str, ...] = ()
    #: the users file (one token per user); None: ``DATA/users.json``
    users_file: Path | None = None
    #: decompressed size of one uploaded image, and of all images of a job (MB)
    max_file_mb: float = 512.0
    max_job_mb: float = 2048.0
    #: denoising steps a job may capture as frames (each a full volume in memory)
    max_capture: int = 16
    #: open event streams, per user and in all
    max_streams_per_user: int = 16
    max_streams: int = 256
    #: seconds a client may take to send a request's headers, and between two pieces of a body
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    #: open connections, in all and from one address (more are answered 503 and closed)
    max_connections: int = 512
    max_connections_per_address: int = 128

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def users_path(self) -> Path:
        from .users import USERS_FILE

        return Path(self.users_file) if self.users_file is not None else Path(self.data) / USERS_FILE


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")


def resolve_token(
    data: Path, token_file: str | os.PathLike | None = None, *, create: bool = True
) -> tuple[str | None, str]:
    """The token and where it came from (for the start-up log, never the token itself).
    Without ``create``, a missing ``DATA/token`` is not made (None: the users file serves)."""
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(path, f"cannot read the token file ({exc.strerror})") from exc
        _check_token(token, str(path))
        _warn_if_shared(path)
        return token, str(path)
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        _check_token(env, TOKEN_ENV)
        return env, f"${TOKEN_ENV}"
    path = data / "token"
    if not path.exists() and not create:
        return None, "the users file"
    if not path.exists():
        from .store import private_folder

        private_folder(data)
        _write_private(path, secrets.token_urlsafe(32))
        log.warning("created a new access token in %s (owner-only); give it to the clients", path)
    token = path.read_text(encoding="utf-8").strip()
    _check_token(token, str(path))
    _warn_if_shared(path)
    return token, str(path)


def _check_token(token: str, source: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH:
        raise InputError(source, f"the access token must be at least {MIN_TOKEN_LENGTH} characters long")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise InputError(source, "the access token must be printable without spaces")


def _warn_if_shared(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
