"""The worker's users: one token each, and an audit log of what they did.

Users live in ``DATA/users.json`` (owner-only, 0600)::

    {"users": {"alice": {"sha256": "<hex digest of the token>", "admin": false, "created": "2026-..."}}}

Only a hash of each token is stored: a token is 32 random bytes (256 bits), so a plain
SHA-256 cannot be reversed or guessed (a slow hash such as PBKDF2 protects guessable
passwords, which these are not). ``longdiff-worker token add NAME`` prints a new token
once. The single-token setup (``--token-file``, ``$LONGDIFF_WORKER_TOKEN`` or
``DATA/token``) keeps working: that token is the admin user :data:`ADMIN`.

A user sees and acts on their own jobs only; an admin on all. The audit log
(``DATA/audit.log``, JSON lines, and the ``longdiff.worker.audit`` logger) has one line
per submit, cancel, download and delete: when, who, what, which job - never image content
or names sent by the client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

log = logging.getLogger(__name__)
audit_log = logging.getLogger("longdiff.worker.audit")

USERS_FILE = "users.json"
AUDIT_FILE = "audit.log"
#: the user of the single-token setup
ADMIN = "admin"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False


def token_hash(token: str | bytes) -> str:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def read_users(path: Path) -> dict[str, dict[str, Any]]:
    """The users of a users file ({} if it does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InputError(path, f"cannot read the users file ({exc.strerror})") from exc
    try:
        users = json.loads(text)["users"]
        if not isinstance(users, dict):
            raise TypeError
        for name, entry in users.items():
            if not USER_NAME.match(name) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
                raise ValueError(name)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        expected = '{"users": {NAME: {"sha256": HEX, "admin": BOOL}}}'
        raise InputError(path, f"not a users file (expected {expected})") from exc
    return users


def _write_users(path: Path, users: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"users": users}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_user(path: Path, name: str, admin: bool = False) -> str:
    """Add a user and return their new token (shown once: only its hash is kept)."""
    if not USER_NAME.match(name):
        raise InputError(name, "a user name is 1 to 64 letters, digits, '.', '_', '@' or '-'")
    users = read_users(path)
    if name in users:
        raise InputError(name, "this user exists already (remove them first to issue a new token)")
    token = secrets.token_urlsafe(32)
    users[name] = {"sha256": token_hash(token), "admin": bool(admin), "created": _now()}
    _write_users(path, users)
    return token


def remove_user(path: Path, name: str) -> None:
    users = read_users(path)
    if name not in users:
        raise InputError(name, f"no such user (users: {', '.join(sorted(users)) or 'none'})")
    del users[name]
    _write_users(path, users)


class Users:
    """Who a token belongs to: the users file (re-read when it changes) and the single admin token."""

    def __init__(self, path: Path | None, admin_token: str | None = None) -> None:
        self.path = path
        self._admin = admin_token.encode() if admin_token else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: list[tuple[bytes, User]] = []
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            entries = read_users(self.path) if stamp else {}
        except InputError as exc:  # keep the users read before; say why
            log.error("%s", exc)
            return
        self._users = [(e["sha256"].encode(), User(n, bool(e.get("admin")))) for n, e in entries.items()]
        self._stamp = stamp

    def __len__(self) -> int:
        return len(self._users) + (1 if self._admin else 0)

    def lookup(self, token: bytes) -> User | None:
        """The user whose token this is, else None (constant-time comparisons, every entry)."""
        with self._lock:
            self._reload()
            users = self._users
        digest = token_hash(token).encode()
        found = None
        for stored, user in users:
            if hmac.compare_digest(digest, stored) and found is None:
                found = user
        if self._admin is not None and hmac.compare_digest(token, self._admin) and found is None:
            found = User(ADMIN, True)
        return found


class Audit:
    """Appends one JSON line per action to ``DATA/audit.log`` and to the audit logger."""

    def __init__(self, data: Path) -> None:
        self.path = Path(data) / AUDIT_FILE
        self._lock = threading.Lock()

    def __call__(self, user: User, action: str, job_id: str, **extra: Any) -> None:
        entry = {"time": _now(), "user": user.name, "action": action, "job_id": job_id, **extra}
        line = json.dumps(entry, sort_keys=True)
        audit_log.info("%s", line)
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
        except OSError as exc:
            log.error("cannot write the audit log %s (%s): %s", self.path.name, exc.strerror, line)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
