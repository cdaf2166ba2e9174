"""The running state of one worker application, kept on ``app.state.worker``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import Settings
from .store import Store
from .users import Audit, Users

if TYPE_CHECKING:  # the runners import the engine (torch): only when the worker starts
    from .hub import EventHub
    from .runner import CeleryDispatcher, EmbeddedRunner


class WorkerState:
    """What the routes of one worker application share: its settings and users (from
    :func:`create_app`), its store, runner, event hub and audit log (from the lifespan,
    set when the application starts), the event streams open per user and the last
    probe of the data folder."""

    store: Store
    runner: EmbeddedRunner | CeleryDispatcher
    hub: EventHub
    audit: Audit

    def __init__(self, settings: Settings, users: Users) -> None:
        self.settings = settings
        self.users = users
        self.streams: dict[str, int] = {}
        #: (time.monotonic() of the last probe, its problem or None)
        self.health: tuple[float, str | None] = (0.0, None)
