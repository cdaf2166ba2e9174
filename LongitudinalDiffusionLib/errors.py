"""Errors raised for bad input: each names the file (or item) and the problem."""

from __future__ import annotations

import os


class LongitudinalDiffusionError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(LongitudinalDiffusionError, ValueError):
    """Input that cannot be used as given (a file, a manifest row, an age, ...).

    Args:
        source: the file or item at fault (a path or a short description).
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(problem if source is None else f"{self.source}: {problem}")
