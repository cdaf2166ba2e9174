"""Add from scene: any volume of the scene joins the subject, after a small dialog asks its
age and modality.

The dialog's defaults come from what is known about the volume: the module's own node
attributes (a volume it loaded before), else the DICOM tags of the series it came from
(``PatientAge`` such as ``012M``, or ``StudyDate`` minus ``PatientBirthDate``), and a
modality guessed from the series description or the volume's name (``T2 FLAIR`` ->
FLAIR). The user can change both; Cancel adds nothing.

Pure Python and the ``qt`` module passed in (PythonQt in Slicer, PySide6 in the tests); the
DICOM tags come through a ``tagReader(node, tag)`` function (in Slicer:
``slicer.dicomDatabase.instanceValue`` of the node's first instance UID).

Example (Slicer's Python console)::

    from LongitudinalDiffusionSlicer import addvolume
    details = addvolume.askVolumeDetails(qt, node.GetName(), addvolume.defaultsFor(node, reader))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Optional

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.subject import Modality, parse_modality

from .panel import _  # the panel's translation (slicer.i18n inside Slicer)

#: DICOM tags read for the defaults.
PATIENT_AGE = "0010,1010"
STUDY_DATE = "0008,0020"
BIRTH_DATE = "0010,0030"
SERIES_DESCRIPTION = "0008,103e"
#: Node attribute of a volume loaded from DICOM (space-separated SOP instance UIDs).
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: Days per month for ages (the mean Gregorian month).
DAYS_PER_MONTH = 365.2425 / 12

TagReader = Callable[[Any, str], Optional[str]]


@dataclass(frozen=True)
class VolumeDetails:
    """What the dialog proposes or the user chose: age in months (None: unknown) and modality."""

    age: float | None
    modality: Modality | None
    ageSource: str = ""


def ageFromPatientAge(text: str | None) -> float | None:
    """Months from a DICOM Age String (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``); None if unreadable."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", text or "", re.I)
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2).upper()
    return {"D": value / DAYS_PER_MONTH, "W": value * 7 / DAYS_PER_MONTH, "M": float(value), "Y": value * 12.0}[unit]


def _dicomDate(text: str | None) -> date | None:
    match = re.fullmatch(r"\s*(\d{4})(\d{2})(\d{2})\s*", text or "")
    if not match:
        return None
    try:
        return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None


def ageFromDates(studyDate: str | None, birthDate: str | None) -> float | None:
    """Months between ``PatientBirthDate`` and ``StudyDate`` (DICOM ``YYYYMMDD``); None if unknown."""
    study, birth = _dicomDate(studyDate), _dicomDate(birthDate)
    if study is None or birth is None or study < birth:
        return None
    return (study - birth).days / DAYS_PER_MONTH


def guessModality(*texts: str | None) -> Modality | None:
    """A modality named in a series description or volume name (``"Ax T2 FLAIR"`` -> FLAIR)."""
    for text in texts:
        if not text:
            continue
        words = re.split(r"[\s_\-.()/]+", text.lower())
        joined = "".join(words)
        if "flair" in joined:
            return Modality.FLAIR
        for word in words + [joined]:
            try:
                return parse_modality(word)
            except InputError:
                continue
        if re.search(r"(mprage|spgr|tfl3d|bravo)", joined):
            return Modality.T1W
    return None


def defaultsFor(node: Any, tagReader: TagReader | None = None) -> VolumeDetails:
    """The dialog's defaults for a scene volume (see the module doc)."""
    from . import mrml

    age: float | None = None
    source = ""
    modality: Modality | None = None
    text = node.GetAttribute(mrml.AGE_ATTRIBUTE)
    if text:
        try:
            age, source = float(text), "module"
        except ValueError:
            age = None
    text = node.GetAttribute(mrml.MODALITY_ATTRIBUTE)
    if text:
        try:
            modality = parse_modality(text)
        except InputError:
            modality = None
    description = None
    if tagReader is not None and node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE):
        if age is None:
            age = ageFromPatientAge(tagReader(node, PATIENT_AGE))
            source = "PatientAge" if age is not None else ""
        if age is None:
            age = ageFromDates(tagReader(node, STUDY_DATE), tagReader(node, BIRTH_DATE))
            source = "StudyDate - PatientBirthDate" if age is not None else ""
        description = tagReader(node, SERIES_DESCRIPTION)
    if modality is None:
        modality = guessModality(description, node.GetName())
    return VolumeDetails(age, modality, source)


def dicomTagReader(slicerModule: Any) -> TagReader:
    """``tagReader`` for Slicer: the tag of the volume's first DICOM instance in Slicer's DICOM database."""

    def read(node: Any, tag: str) -> str | None:
        database = getattr(slicerModule, "dicomDatabase", None)
        uids = (node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
        if database is None or not uids:
            return None
        value = database.instanceValue(uids[0], tag)
        return str(value) if value else None

    return read


class VolumeDetailsDialog:
    """The small dialog: age in months and modality, OK and Cancel.

    Args:
        qt: Slicer's ``qt`` module (or PySide6 through the test shim).
        name: the volume's name (shown in the title line).
        defaults: what to show first (:func:`defaultsFor`).
        parent: the parent widget.
    """

    def __init__(self, qt: Any, name: str, defaults: VolumeDetails, parent: Any = None) -> None:
        self.qt = qt
        dialog = self.dialog = qt.QDialog(parent)
        dialog.setWindowTitle(_("Add a scene volume to the subject"))
        dialog.setObjectName("volumeDetailsDialog")
        layout = qt.QFormLayout(dialog)
        known = defaults.ageSource
        intro = qt.QLabel(
            f"<b>{name}</b><br>"
            + _("Age at the scan and modality:")
            + (f"<br><i>{_('age from {source}').format(source=known)}</i>" if known and known != "module" else "")
        )
        intro.setWordWrap(True)
        layout.addRow(intro)
        self.ageSpinBox = qt.QDoubleSpinBox()
        self.ageSpinBox.setObjectName("ageSpinBox")
        self.ageSpinBox.setRange(-9.0, 1200.0)  # gestational ages are negative months
        self.ageSpinBox.setDecimals(2)
        self.ageSpinBox.setSuffix(" " + _("months"))
        self.ageSpinBox.setValue(defaults.age if defaults.age is not None else 0.0)
        layout.addRow(_("Age"), self.ageSpinBox)
        self.modalityComboBox = qt.QComboBox()
        self.modalityComboBox.setObjectName("modalityComboBox")
        for modality in Modality:
            self.modalityComboBox.addItem(modality.value)
        if defaults.modality is not None:
            self.modalityComboBox.setCurrentIndex(list(Modality).index(defaults.modality))
        layout.addRow(_("Modality"), self.modalityComboBox)
        box = qt.QDialogButtonBox
        ok = getattr(box, "Ok", None) or box.StandardButton.Ok
        cancel = getattr(box, "Cancel", None) or box.StandardButton.Cancel
        self.buttons = qt.QDialogButtonBox(ok | cancel)
        self.buttons.accepted.connect(dialog.accept)
        self.buttons.rejected.connect(dialog.reject)
        layout.addRow(self.buttons)

    def details(self) -> VolumeDetails:
        return VolumeDetails(
            float(self.ageSpinBox.property("value")), Modality(self.modalityComboBox.property("currentText"))
        )

    def exec(self) -> VolumeDetails | None:
        """Show the dialog modally; the chosen details, or None after Cancel."""
        run = getattr(self.dialog, "exec", None) or self.dialog.exec_
        accepted = run()
        return self.details() if accepted else None


def setVolumeDetails(node: Any, details: VolumeDetails, subjectId: str) -> None:
    """Record the chosen age, modality and subject on the node (as the module's loader does)."""
    from . import mrml

    node.SetAttribute(mrml.AGE_ATTRIBUTE, repr(float(details.age)))
    node.SetAttribute(mrml.MODALITY_ATTRIBUTE, details.modality.value)
    node.SetAttribute(mrml.SUBJECT_ATTRIBUTE, subjectId)


def addSceneVolume(
    panel: Any,
    node: Any,
    qt: Any,
    tagReader: TagReader | None = None,
    parent: Any = None,
    asker: Callable[[str, VolumeDetails], VolumeDetails | None] | None = None,
) -> bool:
    """The whole "Add from scene": ask (the dialog, or ``asker``), record, add to the panel's subject.

    Returns:
        True when the volume joined the subject; False after Cancel, or when the subject
        refuses it (the panel's status line says why).
    """
    from . import mrml

    defaults = defaultsFor(node, tagReader)
    if asker is None:

        def asker(name: str, proposed: VolumeDetails) -> VolumeDetails | None:
            return VolumeDetailsDialog(qt, name, proposed, parent).exec()

    details = asker(node.GetName() or node.GetID(), defaults)
    if details is None:
        panel.setStatus(_("Not added: {name} (cancelled).").format(name=node.GetName()))
        return False
    current = panel.subject()
    subjectId = current.subject_id if current is not None else (node.GetAttribute(mrml.SUBJECT_ATTRIBUTE) or "scene")
    previous = {
        name: node.GetAttribute(name) for name in (mrml.AGE_ATTRIBUTE, mrml.MODALITY_ATTRIBUTE, mrml.SUBJECT_ATTRIBUTE)
    }
    setVolumeDetails(node, details, subjectId)
    try:
        subject = mrml.subjectFromVolumes([node], subjectId, node.GetScene())
        added = panel.addTimepoint(subject.timepoints[0], subjectId)
    except InputError as exc:
        panel.setStatus(_("Could not add the scan: {error}").format(error=exc))
        added = False
    if not added:  # leave the node as it was
        for name, value in previous.items():
            if value is None:
                node.RemoveAttribute(name)
            else:
                node.SetAttribute(name, value)
    return added
