"""What a run of the module panel is: the task ids (the ``longdiff`` command names), their
labels and spellings, the Preprocess choices and :class:`RunRequest`, everything a run needs
as the panel checked it. No widgets here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from LongitudinalDiffusionLib.catalog import ModelCard
from LongitudinalDiffusionLib.subject import Modality, Subject, Timepoint

from .panelkit import _

COMPLETE_AGES = "complete-ages"
SYNTHESIZE_MODALITY = "synthesize-modality"
INTERPOLATE = "interpolate"
#: The tasks, in the order of the task combo box (ids are the `longdiff` command names).
TASKS = (COMPLETE_AGES, SYNTHESIZE_MODALITY, INTERPOLATE)

_TASK_ALIASES = {
    COMPLETE_AGES: ("complete-ages", "complete-age", "completeages", "complete"),
    SYNTHESIZE_MODALITY: (
        "synthesize-modality",
        "synthesise-modality",
        "synthesize",
        "synthesise",
        "modality-synthesis",
    ),
    INTERPOLATE: ("interpolate", "interpolation", "interpolate-frames", "frames"),
}
_TASK_BY_ALIAS = {alias: task for task, aliases in _TASK_ALIASES.items() for alias in aliases}


def taskLabel(task: str) -> str:
    """The task's name as the task combo box shows it."""
    labels = {
        COMPLETE_AGES: _("Complete missing ages"),
        SYNTHESIZE_MODALITY: _("Synthesize a missing modality"),
        INTERPOLATE: _("Interpolate frames between two scans"),
    }
    return labels[task]


def normalizeTask(text: Any) -> str | None:
    """A task id from a card's spelling (``complete_ages``, ``Synthesise-Modality``, ...)."""
    key = re.sub(r"[\s_]+", "-", str(text).strip().lower())
    return _TASK_BY_ALIAS.get(key)


#: The Preprocess combo box's entries, in order: (saved value, ``RunOptions.preprocess``).
PREPROCESS_CHOICES = (("auto", None), ("always", True), ("never", False))


@dataclass(frozen=True)
class RunRequest:
    """Everything a run needs, as checked by the panel (see :meth:`Panel.request`).

    Args:
        task: one of :data:`TASKS`.
        subject: the subject.
        model: the model card.
        ages: months; the ages to generate (complete-ages), or the ages where the
            modality is missing (synthesize-modality).
        modality: the modality to synthesize (synthesize-modality).
        scans: the two scans to interpolate between, younger first (interpolate).
        frames: number of frames between them (interpolate).
        backend: ``"local"`` or ``"remote"``.
        device: ``"auto"``, ``"cuda"`` or ``"cpu"`` (local).
        serverUrl: the server (remote).
        token: the access token (remote); left out of ``repr`` so it never reaches a log.
        samples: number of samples (2 or more: mean + standard-deviation map).
        steps: sampler steps per sample (0: the model card's).
        capture: denoising intermediates kept as frames (0: none).
        preprocess: bring the scans into the model's space first (``tasks.RunOptions.preprocess``):
            None as the model card asks, True always, False never.
        notices: what the user should know about the inputs (e.g. a scan is resampled).
    """

    task: str
    subject: Subject
    model: ModelCard
    ages: tuple[float, ...] = ()
    modality: Modality | None = None
    scans: tuple[Timepoint, ...] = ()
    frames: int | None = None
    backend: str = "local"
    device: str = "auto"
    serverUrl: str = ""
    token: str = field(default="", repr=False)
    samples: int = 1
    steps: int = 0
    capture: int = 0
    preprocess: bool | None = None
    notices: tuple[str, ...] = ()
