"""The panel's Subject section: the scans table, loading a subject (a folder, a manifest, the
sample subject) and adding a scene volume to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.subject import Subject, Timepoint

from .panelkit import _, _volumeName


class SubjectSection:
    """The subject and its table (a part of :class:`~.panel.Panel`).

    Uses the panel's ``ui``, ``qt``, ``_subjectLoader``, the ``sampleRequested`` and
    ``addFromSceneRequested`` signals, ``updateApplyState``, ``setStatus`` and ``appendLog``.
    """

    ui: Any
    qt: Any
    _subject: Subject | None

    def subject(self) -> Subject | None:
        """The loaded subject, or None."""
        return self._subject

    def setSubject(self, subject: Subject | None) -> None:
        """Show ``subject`` in the table (one row per scan, youngest first); None clears it."""
        qt, table = self.qt, self.ui.timepointsTable
        self._subject = subject
        table.blockSignals(True)
        table.clearSelection()
        table.setRowCount(0)
        timepoints = subject.timepoints if subject is not None else []
        table.setRowCount(len(timepoints))
        right = qt.Qt.AlignRight | qt.Qt.AlignVCenter
        for row, tp in enumerate(timepoints):
            name = qt.QTableWidgetItem(_volumeName(tp))
            name.setToolTip(tp.describe() + ("" if tp.source is None else f"\n{tp.source}"))
            age = qt.QTableWidgetItem(f"{tp.age:.1f}")
            age.setTextAlignment(right)
            age.setToolTip(_("{age:g} months").format(age=round(tp.age, 3)))
            modality = qt.QTableWidgetItem(tp.modality.value)
            for column, item in enumerate((name, age, modality)):
                table.setItem(row, column, item)
        table.blockSignals(False)
        self.updateApplyState()

    def loadSubjectFrom(self, path: str | Path) -> Subject | None:
        """Read a subject (BIDS subject or dataset folder, manifest .tsv) and show it.

        On failure the previous subject stays, and the status line and the log say why.
        """
        try:
            subject = self._subjectLoader(Path(path))
        except (LongitudinalDiffusionError, OSError) as exc:
            message = _("Could not load the subject: {error}").format(error=exc)
            self.appendLog(message)
            self.setStatus(message)
            return None
        self.setSubject(subject)
        self.appendLog(
            _("Loaded {subject} from {path}: {scans} scans at {ages} ages ({modalities}).").format(
                subject=subject.subject_id,
                path=path,
                scans=len(subject.timepoints),
                ages=len(subject.ages()),
                modalities=", ".join(m.value for m in subject.modalities()),
            )
        )
        return subject

    def addTimepoint(self, timepoint: Timepoint, subjectId: str = "scene") -> bool:
        """Add one scan (e.g. a scene volume the module converted) to the subject.

        Returns False, with the reason in the status line, when the subject refuses it
        (another scan of that modality at that age).
        """
        current = self._subject
        try:
            if current is None:
                subject = Subject(subjectId, [timepoint])
            else:
                subject = Subject(current.subject_id, [*current.timepoints, timepoint], current.source, current.meta)
        except InputError as exc:
            self.setStatus(_("Could not add the scan: {error}").format(error=exc))
            return False
        self.setSubject(subject)
        self.appendLog(_("Added {scan}.").format(scan=timepoint.describe()))
        return True

    def selectedTimepoints(self) -> list[Timepoint]:
        """The scans whose rows are selected in the table, youngest first."""
        if self._subject is None:
            return []
        rows = sorted({index.row() for index in self.ui.timepointsTable.selectionModel().selectedRows()})
        return [self._subject.timepoints[r] for r in rows if 0 <= r < len(self._subject.timepoints)]

    def onLoadPath(self, *_args: Any) -> None:
        path = (self.ui.subjectPathLineEdit.property("currentPath") or "").strip()
        if not path:
            self.setStatus(_("Choose a BIDS subject folder or a manifest .tsv first."))
            return
        if self.loadSubjectFrom(path) is not None:
            addToHistory = getattr(self.ui.subjectPathLineEdit, "addCurrentPathToHistory", None)
            if addToHistory is not None:
                addToHistory()

    def onLoadSample(self, *_args: Any) -> None:
        if not self.sampleRequested.isConnected():
            self.setStatus(_("The sample subject is offered by Slicer's Sample Data module, not available here."))
            return
        self.sampleRequested.emit()

    def onAddFromScene(self, *_args: Any) -> None:
        selector = getattr(self.ui, "sceneVolumeSelector", None)
        node = selector.currentNode() if selector is not None else None
        if node is None:
            self.setStatus(_("Choose a volume of the scene (left of 'Add from scene') first."))
            return
        if not self.addFromSceneRequested.isConnected():
            self.setStatus(_("Adding scene volumes needs Slicer."))
            return
        self.addFromSceneRequested.emit(node)
