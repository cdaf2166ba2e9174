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


class OutOfMemory(LongitudinalDiffusionError):
    """A step ran out of device memory.

    Args:
        where: the step and what it was given (e.g. ``"generate: the CPU ran out of memory for a
            batch of shape (2, 1, 8, 8, 8)"``), kept apart so a caller can quote it.
        advice: what the user can do about it.
    """

    def __init__(self, where: str, advice: str):
        self.where = where
        self.advice = advice
        super().__init__(f"{where}; {advice}")


class ModelNotFound(InputError):
    """No installed model has the name asked for.

    Attributes:
        name: the name asked for.
        installed: the names of the models that are installed.
        searched: the folders searched.
    """

    def __init__(self, name: str, installed: list[str], searched: list[str]):
        self.name = name
        self.installed = list(installed)
        self.searched = list(searched)
        have = ", ".join(self.installed) or "none"
        super().__init__(None, f"no model named '{name}' (installed models: {have}; searched {', '.join(searched)})")
