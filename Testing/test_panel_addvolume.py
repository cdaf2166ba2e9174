"""Add from scene: an ordinary scene volume (no module attributes) joins the subject after a
real Qt dialog asks its age and modality, with defaults from its DICOM tags. Real MRML
(slicer-core), the real .ui and dialog on PySide6 offscreen; the DICOM database is the
application's, so its tag lookup is a dictionary here.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path

import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness
import qt_shim
from LongitudinalDiffusionSlicer import addvolume, mrml
from LongitudinalDiffusionSlicer.panel import Panel
from PySide6 import QtCore, QtWidgets

from LongitudinalDiffusionLib.imaging import Image
from LongitudinalDiffusionLib.subject import Modality, load_subject

DOCS_IMAGES = os.environ.get("LONGDIFF_DOCS_IMAGES")


@pytest.fixture
def gui(qtbot, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LONGDIFF_MODELS", raising=False)
    qt = qt_shim.installQtModule(monkeypatch)
    headless = mrml_harness.bootstrapScene()
    root, ui = qt_shim.loadUi(qt_shim.UI_FILE)
    qtbot.addWidget(root)
    ui.sceneVolumeSelector.setMRMLScene(headless.scene)
    panel = Panel(ui, qt)
    yield type("Gui", (), dict(ui=ui, panel=panel, scene=headless.scene, qt=qt, qtbot=qtbot, root=root))
    headless.close()


def plainVolume(scene, name="Ax T2 FLAIR 3mm", dicom=True):
    """A volume as DICOM import leaves it: voxels, geometry, the instance UIDs, nothing of ours."""
    image = Image(np.random.default_rng(0).random((12, 14, 10), dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    node = mrml.volumeNodeFromImage(image, name, scene)
    if dicom:
        node.SetAttribute(addvolume.INSTANCE_UIDS_ATTRIBUTE, "1.2.3.4.5 1.2.3.4.6")
    return node


def answerDialog(qtbot, age=None, modality=None, accept=True, seen=None):
    """Answer the next modal dialog as a user would: read it, set values, press OK (or Cancel)."""

    def answer():
        dialog = QtWidgets.QApplication.activeModalWidget()
        assert dialog is not None and dialog.objectName() == "volumeDetailsDialog"
        ageBox = dialog.findChild(QtWidgets.QDoubleSpinBox, "ageSpinBox")
        modalityBox = dialog.findChild(QtWidgets.QComboBox, "modalityComboBox")
        if seen is not None and DOCS_IMAGES:  # the picture in docs/slicer.md
            assert dialog.grab().save(str(Path(DOCS_IMAGES) / "add_from_scene_dialog.png"))
        if seen is not None:
            seen.update(
                age=ageBox.value(), modality=modalityBox.currentText(), text=dialog.findChild(QtWidgets.QLabel).text()
            )
        if age is not None:
            ageBox.setValue(age)
        if modality is not None:
            modalityBox.setCurrentText(modality)
        buttons = dialog.findChild(QtWidgets.QDialogButtonBox)
        role = (
            QtWidgets.QDialogButtonBox.StandardButton.Ok if accept else QtWidgets.QDialogButtonBox.StandardButton.Cancel
        )
        qtbot.mouseClick(buttons.button(role), QtCore.Qt.MouseButton.LeftButton)

    QtCore.QTimer.singleShot(50, answer)


def test_dicom_ages_and_modality_guesses():
    assert addvolume.ageFromPatientAge("012M") == 12.0
    assert addvolume.ageFromPatientAge("002Y") == 24.0
    assert addvolume.ageFromPatientAge("006W") == pytest.approx(6 * 7 / addvolume.DAYS_PER_MONTH)
    assert addvolume.ageFromPatientAge("") is None and addvolume.ageFromPatientAge("12 months") is None
    assert addvolume.ageFromDates("20240315", "20230315") == pytest.approx(12.0, abs=0.05)
    assert addvolume.ageFromDates("20230101", "20240101") is None  # study before birth
    assert addvolume.ageFromDates("2024-03-15", "20230315") is None
    assert addvolume.guessModality("Ax T2 FLAIR 3mm") is Modality.FLAIR
    assert addvolume.guessModality("sag_MPRAGE") is Modality.T1W
    assert addvolume.guessModality(None, "T1 post Gd") in (Modality.T1W, Modality.T1CE)
    assert addvolume.guessModality("localizer") is None


def test_an_ordinary_dicom_volume_is_added_after_the_dialog(gui):
    node = plainVolume(gui.scene)
    tags = {addvolume.PATIENT_AGE: "", addvolume.STUDY_DATE: "20240315", addvolume.BIRTH_DATE: "20230915"}
    seen = {}
    answerDialog(gui.qtbot, seen=seen)  # accept the defaults
    added = addvolume.addSceneVolume(gui.panel, node, gui.qt, lambda n, tag: tags.get(tag), parent=gui.root)
    assert added
    assert seen["age"] == pytest.approx(6.0, abs=0.05) and seen["modality"] == "FLAIR"
    assert "StudyDate - PatientBirthDate" in seen["text"]
    assert gui.ui.timepointsTable.rowCount() == 1
    assert gui.ui.timepointsTable.item(0, 1).text() == "6.0" and gui.ui.timepointsTable.item(0, 2).text() == "FLAIR"
    assert node.GetAttribute(mrml.AGE_ATTRIBUTE) is not None and node.GetAttribute(mrml.MODALITY_ATTRIBUTE) == "FLAIR"
    assert gui.panel.subject().timepoints[0].image.array.shape == (12, 14, 10)


def test_the_user_corrects_the_defaults_and_patient_age_wins(gui, subjectFolder):
    subject = load_subject(subjectFolder)
    gui.panel.setSubject(subject)
    node = plainVolume(gui.scene, name="series 7")
    tags = {addvolume.PATIENT_AGE: "030M", addvolume.STUDY_DATE: "20240315", addvolume.BIRTH_DATE: "20230915"}
    seen = {}
    answerDialog(gui.qtbot, age=31.5, modality="T2w", seen=seen)
    assert addvolume.addSceneVolume(gui.panel, node, gui.qt, lambda n, tag: tags.get(tag), parent=gui.root)
    assert seen["age"] == 30.0 and "PatientAge" in seen["text"]
    added = [tp for tp in gui.panel.subject().timepoints if abs(tp.age - 31.5) < 1e-6]
    assert len(added) == 1 and added[0].modality is Modality.T2W
    assert gui.panel.subject().subject_id == subject.subject_id
    assert gui.ui.timepointsTable.rowCount() == len(subject.timepoints) + 1


def test_cancel_adds_nothing_and_a_clash_leaves_the_node_as_it_was(gui, subjectFolder):
    node = plainVolume(gui.scene, dicom=False)
    answerDialog(gui.qtbot, accept=False)
    assert not addvolume.addSceneVolume(gui.panel, node, gui.qt, None, parent=gui.root)
    assert gui.panel.subject() is None and node.GetAttribute(mrml.AGE_ATTRIBUTE) is None
    assert "cancelled" in gui.ui.statusLabel.text()

    subject = load_subject(subjectFolder)
    gui.panel.setSubject(subject)
    first = subject.timepoints[0]
    answerDialog(gui.qtbot, age=first.age, modality=first.modality.value)  # that scan exists already
    assert not addvolume.addSceneVolume(gui.panel, node, gui.qt, None, parent=gui.root)
    assert "Could not add the scan" in gui.ui.statusLabel.text()
    assert node.GetAttribute(mrml.AGE_ATTRIBUTE) is None and node.GetAttribute(mrml.MODALITY_ATTRIBUTE) is None
    assert len(gui.panel.subject().timepoints) == len(subject.timepoints)
