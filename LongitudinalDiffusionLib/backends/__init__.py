"""Where jobs run: :class:`LocalBackend` (a warm child process, :mod:`.process`) and
:class:`RemoteBackend` (the HTTP client of a ``longdiff-worker``). Both implement
:class:`~LongitudinalDiffusionLib.jobs.Backend`, so a caller does not know which it has.

``RemoteBackend`` is imported on first use: it needs ``httpx``, which the local backend does not.
"""

from __future__ import annotations

from typing import Any

from .local import LocalBackend, ThreadBackend
from .process import ProcessBackend

__all__ = ["LocalBackend", "ProcessBackend", "RemoteBackend", "ThreadBackend"]


def __getattr__(name: str) -> Any:
    if name == "RemoteBackend":
        from .remote import RemoteBackend

        return RemoteBackend
    raise AttributeError(name)
