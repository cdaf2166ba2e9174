"""Event push inside the worker: the store's listeners wake the event streams of a job."""

from __future__ import annotations

import asyncio


class EventHub:
    """Wakes the event streams of a job when the store records an event for it (or deletes
    it), from whatever thread did so: the streams wait instead of polling the database."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, job_id: str) -> None:  # any thread
        if job_id in self.waiters:
            try:
                self.loop.call_soon_threadsafe(self._wake, job_id)
            except RuntimeError:  # the loop has closed (shutdown)
                pass

    def _wake(self, job_id: str) -> None:
        for event in self.waiters.get(job_id, ()):
            event.set()

    def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self.waiters.setdefault(job_id, set()).add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        waiting = self.waiters.get(job_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self.waiters[job_id]
