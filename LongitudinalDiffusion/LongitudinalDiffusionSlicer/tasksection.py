"""The panel's task inputs: the chosen task, the ages to generate, the modality to
synthesize, the frames to interpolate, and the check of them for a run."""

from __future__ import annotations

import re
from typing import Any

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.subject import Modality, Subject, parse_age

from .panelkit import _
from .runrequest import COMPLETE_AGES, INTERPOLATE, SYNTHESIZE_MODALITY, TASKS, normalizeTask


class TaskSection:
    """The Task section's inputs (a part of :class:`~.panel.Panel`).

    Uses the panel's ``ui``, ``_subject``, ``selectedTimepoints``, ``_fillModelCombo`` and
    ``updateApplyState``.
    """

    #: Ages typed closer than this (months) to a scan's age are that scan's age: half the
    #: table's 0.1-month resolution, so "6" matches a scan shown as "6.0".
    AGE_MATCH_MONTHS = 0.05

    ui: Any
    _subject: Subject | None

    def currentTask(self) -> str:
        """The chosen task's id (one of :data:`TASKS`)."""
        index = self.ui.taskComboBox.property("currentIndex")
        return TASKS[index] if isinstance(index, int) and 0 <= index < len(TASKS) else TASKS[0]

    def setTask(self, task: str) -> None:
        """Choose a task by id (also accepts the spellings :func:`normalizeTask` knows)."""
        task = normalizeTask(task) or task
        self.ui.taskComboBox.setCurrentIndex(TASKS.index(task))

    def onTaskChanged(self, *_args: Any) -> None:
        """Show only the inputs of the chosen task, list its models, re-check Apply."""
        ui, task = self.ui, self.currentTask()
        inputs = {
            COMPLETE_AGES: (ui.agesLabel, ui.agesLineEdit),
            SYNTHESIZE_MODALITY: (ui.targetModalityLabel, ui.targetModalityComboBox),
            INTERPOLATE: (ui.framesLabel, ui.framesSpinBox),
        }
        for owner, widgets in inputs.items():
            for widget in widgets:
                widget.setVisible(owner == task)
        self._fillModelCombo()
        self.updateApplyState()

    def parsedAges(self) -> list[float]:
        """The ages typed in the ages field, in months, ascending.

        Ages are separated by commas, semicolons or spaces (``"6, 9.5 12"`` gives
        ``[6.0, 9.5, 12.0]``); decimals take a point.

        Raises:
            InputError: empty field; a token that is not an age (the message quotes it);
                negative or impossible ages; an age given twice; an age the subject
                already has.
        """
        where = _("Ages")
        text = self.ui.agesLineEdit.property("text") or ""
        tokens = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
        if not tokens:
            raise InputError(where, _("enter the ages to generate, in months (e.g. 6, 9, 12)"))
        ages: list[float] = []
        for token in tokens:
            try:
                age = parse_age(token, "months")
            except InputError as exc:
                raise InputError(where, exc.problem) from None
            for earlier in ages:
                if abs(age - earlier) <= self.AGE_MATCH_MONTHS + 1e-9:
                    raise InputError(where, _("{age} is given twice").format(age=token))
            if self._subject is not None:
                for tp in self._subject.timepoints:
                    if abs(age - tp.age) <= self.AGE_MATCH_MONTHS + 1e-9:
                        session = f", {tp.session}" if tp.session else ""
                        raise InputError(
                            where,
                            _(
                                "the subject already has scans at {age} months ({scanAge:.1f} mo{session}); "
                                "remove it from the list"
                            ).format(age=token, scanAge=tp.age, session=session),
                        )
            ages.append(age)
        return sorted(ages)

    def targetModality(self) -> Modality:
        return Modality(self.ui.targetModalityComboBox.property("currentText"))

    def missingAges(self, modality: Modality | str) -> list[float]:
        """The subject's ages that have scans, but none of ``modality``."""
        if self._subject is None:
            return []
        modality = Modality(modality)
        have = {tp.age for tp in self._subject.timepoints if tp.modality is modality}
        return [a for a in self._subject.ages() if all(abs(a - h) > Subject.AGE_TOL for h in have)]

    def frames(self) -> int:
        return int(self.ui.framesSpinBox.property("value"))

    def _taskInputs(self) -> tuple[str, dict[str, Any]]:
        """Check the chosen task's inputs: ``("", fields of the request)`` or ``(reason, {})``."""
        task, subject = self.currentTask(), self._subject
        if task == COMPLETE_AGES:
            try:
                ages = self.parsedAges()
            except InputError as exc:
                return str(exc), {}
            return "", {"ages": tuple(ages)}
        if task == SYNTHESIZE_MODALITY:
            modality = self.targetModality()
            missing = self.missingAges(modality)
            if not missing:
                return (
                    _("{subject} already has {modality} at every age: nothing to synthesize.").format(
                        subject=subject.subject_id, modality=modality.value
                    ),
                    {},
                )
            return "", {"modality": modality, "ages": tuple(missing)}
        scans = self.selectedTimepoints()
        if len(scans) < 2:
            return _("Select the two scans to interpolate between in the table (Ctrl+click the second)."), {}
        if len(scans) > 2:
            return _("Select only two scans in the table ({count} are selected).").format(count=len(scans)), {}
        if scans[0].modality is not scans[1].modality:
            return (
                _("The two scans must have the same modality ({first} and {second} are selected).").format(
                    first=scans[0].describe(), second=scans[1].describe()
                ),
                {},
            )
        return "", {"scans": tuple(scans), "frames": self.frames()}

    def _notices(self, inputs: dict[str, Any]) -> tuple[str, ...]:
        """What the user should know before running (e.g. which scan is resampled onto which)."""
        notices = []
        scans = inputs.get("scans") or ()
        if len(scans) == 2:
            first, second = scans
            if first.image is not None and second.image is not None and not first.image.same_geometry(second.image):
                notices.append(
                    _(
                        "The two scans have different geometries: {second} is resampled onto the grid of {first}, "
                        "and the frames land on {first}'s geometry."
                    ).format(first=first.describe(), second=second.describe())
                )
        return tuple(notices)
