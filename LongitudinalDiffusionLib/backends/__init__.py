"""Where jobs run: :class:`LocalBackend` (a background thread in this process) and
:class:`RemoteBackend` (the HTTP client of a ``longdiff-worker``). Both implement
:class:`~LongitudinalDiffusionLib.jobs.Backend`, so a caller does not know which it has.

``RemoteBackend`` is imported on first use: it needs ``httpx``, which the local backend does not.
"""

from __future__ import annotations

from typing import Any

from .local import LocalBackend

__all__ = ["LocalBackend", "RemoteBackend"]


def __getattr__(name: str) -> Any:
    if name == "RemoteBackend":
        from .remote import RemoteBackend

        return RemoteBackend
    raise AttributeError(name)
