"""Progress events and cooperative cancellation, shared by samplers, tasks and backends.

Long work reports :class:`ProgressEvent` objects through a plain callback and checks a
:class:`CancelToken` between steps. Neither knows about threads, Qt or HTTP: the Slicer
panel drains events with a timer, the CLI draws a tqdm bar and the worker streams them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .errors import LongitudinalDiffusionError


class Cancelled(LongitudinalDiffusionError):
    """The user cancelled the work; nothing it would have written was written."""

    def __init__(self, stage: str = "") -> None:
        super().__init__(f"cancelled during {stage}" if stage else "cancelled")
        self.stage = stage


@dataclass(frozen=True)
class ProgressEvent:
    """One step of one stage. ``eta`` is the estimated seconds left in this stage."""

    stage: str
    step: int
    total: int
    elapsed: float
    eta: float | None
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Set from any thread; checked by the worker between steps (within one step)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, stage: str = "") -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled(stage)


class Stage:
    """Reports the steps of one named stage: ``start()`` then ``advance()`` per step.

    The ETA is the mean time per finished step times the steps left. ``advance`` checks
    the cancel token first, so a cancel is honoured before the next step begins.
    """

    def __init__(
        self,
        name: str,
        total: int,
        callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.total = int(total)
        self.callback = callback
        self.cancel = cancel
        self.clock = clock
        self.step = 0
        self._t0 = clock()

    def check(self) -> None:
        if self.cancel is not None:
            self.cancel.check(self.name)

    def start(self, message: str = "") -> Stage:
        self.check()
        self._t0 = self.clock()
        self._emit(message)
        return self

    def advance(self, n: int = 1, message: str = "") -> None:
        self.step = min(self.total, self.step + n)
        self._emit(message)
        if self.step < self.total:
            self.check()

    def _emit(self, message: str) -> None:
        if self.callback is None:
            return
        elapsed = self.clock() - self._t0
        eta = elapsed / self.step * (self.total - self.step) if self.step else None
        self.callback(ProgressEvent(self.name, self.step, self.total, elapsed, eta, message))
