"""One-line messages for the worker's own troubles: its data folder and database, and a
request FastAPI refused."""

from __future__ import annotations

import errno
import os
import sqlite3
from typing import Any

from fastapi.exceptions import RequestValidationError

#: errors of a data folder the worker cannot write
STORAGE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}

#: SQLite's primary result codes of a data folder that cannot be written (read-only, full, I/O)
SQLITE_STORAGE_CODES = {
    getattr(sqlite3, name, value)
    for name, value in (("SQLITE_READONLY", 8), ("SQLITE_IOERR", 10), ("SQLITE_FULL", 13), ("SQLITE_CANTOPEN", 14))
}


def storage_problem(exc: BaseException) -> str | None:
    """The one-line message for an error of the data folder (read-only, full...), else None."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        return f"the worker cannot write its data folder ({reason}); tell its administrator"
    if isinstance(exc, sqlite3.OperationalError):
        # sqlite_errorcode is Python 3.11+ (extended codes carry the primary in the low byte)
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            storage = (code & 0xFF) in SQLITE_STORAGE_CODES
        else:  # Python 3.9/3.10 (Slicer 5.8 runs 3.9) give only the message: the fallback
            text = str(exc).lower()
            storage = any(k in text for k in ("readonly", "read-only", "disk", "full", "unable to open"))
        if storage:
            return f"the worker cannot write its job database ({exc}); tell its administrator"
    return None


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: 'where: what' of the first, and how many more."""
    errors = list(exc.errors())
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
    where = ".".join(loc) or "request"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {str(first.get('msg', 'invalid')).splitlines()[0]}{more}"


def data_folder_problem(data: Any) -> str | None:
    """Whether the worker can create a file in its data folder (None) or why not."""
    probe = os.path.join(str(data), f".health-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"the worker cannot write its data folder ({exc.strerror or exc})"
    return None
