"""The module panel, headless: the real .ui loaded by QUiLoader (with stand-ins for the
CTK / qMRML widgets, see qt_shim.py) and driven by ``LongitudinalDiffusionSlicer.panel``.

Runs offscreen with PySide6 and pytest-qt; the subject is a real simulated BIDS subject
written by the demo cohort, and the model cards are real JSON files found by the catalog.
A screenshot of the panel is checked, and copied to $LONGDIFF_DOCS_IMAGES when set
(scripts/make_docs_images.py).
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import qt_shim
from PySide6 import QtCore, QtGui, QtWidgets

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.subject import Modality, Subject, load_subject

ROOT = Path(__file__).resolve().parents[1]
#: Where the screenshot also goes when asked (scripts/make_docs_images.py sets it).
DOCS_IMAGES = os.environ.get("LONGDIFF_DOCS_IMAGES")

# In Slicer the module's folder is on sys.path, so its helper package imports by name.
sys.path.insert(0, str(ROOT / "LongitudinalDiffusion"))
from LongitudinalDiffusionSlicer.panel import (
    COMPLETE_AGES,
    INTERPOLATE,
    SYNTHESIZE_MODALITY,
    Panel,
    RunRequest,
    TorchInfo,
)

W = QtWidgets
EXPECTED_CLASSES = {
    "subjectCollapsibleButton": qt_shim.ctkCollapsibleButton,
    "timepointsTable": W.QTableWidget,
    "addFromSceneButton": W.QPushButton,
    "sceneVolumeSelector": qt_shim.qMRMLNodeComboBox,
    "loadSampleButton": W.QPushButton,
    "subjectPathLineEdit": qt_shim.ctkPathLineEdit,
    "loadPathButton": W.QPushButton,
    "taskCollapsibleButton": qt_shim.ctkCollapsibleButton,
    "taskComboBox": W.QComboBox,
    "agesLineEdit": W.QLineEdit,
    "targetModalityComboBox": W.QComboBox,
    "framesSpinBox": W.QSpinBox,
    "modelComboBox": W.QComboBox,
    "modelCardLabel": W.QLabel,
    "backendCollapsibleButton": qt_shim.ctkCollapsibleButton,
    "localRadioButton": W.QRadioButton,
    "remoteRadioButton": W.QRadioButton,
    "deviceComboBox": W.QComboBox,
    "torchInfoLabel": W.QLabel,
    "serverUrlLineEdit": W.QLineEdit,
    "tokenLineEdit": W.QLineEdit,
    "testConnectionButton": W.QPushButton,
    "runCollapsibleButton": qt_shim.ctkCollapsibleButton,
    "applyButton": W.QPushButton,
    "progressBar": W.QProgressBar,
    "statusLabel": W.QLabel,
    "logTextEdit": W.QPlainTextEdit,
    "resultsCollapsibleButton": qt_shim.ctkCollapsibleButton,
    "resultsPlaceholderLabel": W.QLabel,
}
TASK_INPUTS = {
    COMPLETE_AGES: ("agesLabel", "agesLineEdit"),
    SYNTHESIZE_MODALITY: ("targetModalityLabel", "targetModalityComboBox"),
    INTERPOLATE: ("framesLabel", "framesSpinBox"),
}
CARD = {
    "method": "cas-diffcom",
    "task": "complete-ages",
    "trained_on": {"simulated": True, "description": "LongitudinalDiffusion demo cohort"},
    "grid": {"shape": [96, 112, 96], "spacing": [2, 2, 2], "orientation": "RAS"},
}


# ------------------------------------------------------------------------------ fixtures


# subjectFolder (a real simulated BIDS subject) is in conftest.py


@pytest.fixture(scope="module")
def demoSubject(subjectFolder) -> Subject:
    return load_subject(subjectFolder)


@pytest.fixture
def modelsDir(tmp_path, monkeypatch) -> Path:
    """An empty model folder as the only user-level source of cards (HOME is a tmp dir too)."""
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("LONGDIFF_MODELS", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import LongitudinalDiffusionLib.catalog as catalog

    monkeypatch.setattr(catalog, "BUNDLED_DIR", tmp_path / "no-bundled-models")  # the panel's own cards only
    return folder


@pytest.fixture
def qt(monkeypatch):
    return qt_shim.installQtModule(monkeypatch)


@pytest.fixture
def gui(qtbot, qt, modelsDir):
    """The loaded .ui and a Panel on it (torch not probed unless a test asks)."""
    root, ui = qt_shim.loadUi(qt_shim.UI_FILE)
    qtbot.addWidget(root)
    panel = Panel(ui, qt)
    return types.SimpleNamespace(root=root, ui=ui, panel=panel, qtbot=qtbot, models=modelsDir)


def writeCard(folder: Path, name: str, card: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


def status(gui) -> str:
    return gui.ui.statusLabel.text()


def tableColumn(table: QtWidgets.QTableWidget, column: int) -> list[str]:
    return [table.item(row, column).text() for row in range(table.rowCount())]


def selectRows(table: QtWidgets.QTableWidget, rows) -> None:
    table.clearSelection()
    model, selection = table.model(), table.selectionModel()
    for row in rows:
        selection.select(
            model.index(row, 0),
            QtCore.QItemSelectionModel.SelectionFlag.Select | QtCore.QItemSelectionModel.SelectionFlag.Rows,
        )


# --------------------------------------------------------------------------------- tests


def test_ui_loads_with_every_widget_and_its_settings(qtbot, qtlog):
    root, ui = qt_shim.loadUi(qt_shim.UI_FILE)
    qtbot.addWidget(root)
    problems = [r.message for r in qtlog.records if r.type != QtCore.QtMsgType.QtDebugMsg]
    assert problems == [], "QUiLoader complained while loading the .ui"

    assert type(root) is qt_shim.qMRMLWidget
    for name, cls in EXPECTED_CLASSES.items():
        widget = getattr(ui, name, None)
        assert widget is not None, f"no widget named {name}"
        assert type(widget) is cls, f"{name} is a {type(widget).__name__}, expected {cls.__name__}"
        assert widget.toolTip(), f"{name} has no tooltip"

    assert [ui.taskComboBox.itemText(i) for i in range(ui.taskComboBox.count())] == [
        "Complete missing ages",
        "Synthesize a missing modality",
        "Interpolate frames between two scans",
    ]
    headers = [ui.timepointsTable.horizontalHeaderItem(c).text() for c in range(ui.timepointsTable.columnCount())]
    assert headers == ["Volume", "Age (months)", "Modality"]
    assert ui.agesLineEdit.placeholderText() == "e.g. 6, 9, 12"
    assert (ui.framesSpinBox.minimum(), ui.framesSpinBox.maximum(), ui.framesSpinBox.value()) == (2, 64, 8)
    assert [ui.deviceComboBox.itemText(i) for i in range(3)] == ["auto", "cuda", "cpu"]
    assert ui.tokenLineEdit.echoMode() == QtWidgets.QLineEdit.EchoMode.Password
    assert ui.logTextEdit.isReadOnly()
    assert ui.modelCardLabel.textFormat() == QtCore.Qt.TextFormat.RichText
    assert ui.localRadioButton.isChecked() and not ui.remoteRadioButton.isChecked()
    assert not ui.applyButton.isEnabled()

    # The stand-ins received what the .ui sets, including CTK's flag set and the scene hook.
    assert ui.resultsCollapsibleButton.property("collapsed") is True
    assert ui.resultsPlaceholderLabel.isHidden()
    assert ui.subjectCollapsibleButton.property("collapsed") is False
    assert ui.subjectCollapsibleButton.property("text") == "Subject"
    F = qt_shim.ctkPathLineEdit.Filters
    assert ui.subjectPathLineEdit.property("filters") == F.Dirs | F.Files | F.Readable
    assert "Subject manifest (*.tsv)" in ui.subjectPathLineEdit.property("nameFilters")
    assert ui.sceneVolumeSelector.property("nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert ui.sceneVolumeSelector.property("noneEnabled") is True
    assert root.receivers(QtCore.SIGNAL("mrmlSceneChanged(vtkMRMLScene*)")) == 1


def test_collapsible_stand_in_keeps_hidden_children_hidden(gui):
    section, ages, frames = gui.ui.taskCollapsibleButton, gui.ui.agesLineEdit, gui.ui.framesSpinBox
    assert not ages.isHidden() and frames.isHidden()  # complete-ages is the first task
    section.setProperty("collapsed", True)
    assert ages.isHidden() and gui.ui.taskComboBox.isHidden()
    section.setProperty("collapsed", False)
    assert not ages.isHidden() and frames.isHidden()


def test_panel_code_does_not_import_slicer_or_qt():
    source = (ROOT / "LongitudinalDiffusion" / "LongitudinalDiffusionSlicer" / "panel.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk|PySide6|PythonQt)\b", source, re.M)


def test_qt_shim_is_flat_and_only_installed_for_the_test(qt):
    import qt as imported

    assert imported is qt is sys.modules["qt"]
    assert qt.QLabel is QtWidgets.QLabel and qt.QColor is QtGui.QColor and qt.QTimer is QtCore.QTimer
    assert qt.Qt.AlignLeft == QtCore.Qt.AlignmentFlag.AlignLeft


def test_loading_a_subject_fills_the_table(gui, subjectFolder):
    ui = gui.ui
    ui.subjectPathLineEdit.setProperty("currentPath", str(subjectFolder))
    gui.qtbot.mouseClick(ui.loadPathButton, QtCore.Qt.MouseButton.LeftButton)

    subject = gui.panel.subject()
    assert subject is not None and subject.subject_id == "sub-001"
    table = ui.timepointsTable
    assert table.rowCount() == 28
    ages = [float(a) for a in tableColumn(table, 1)]
    assert ages == sorted(ages) and len(set(ages)) == 7
    assert tableColumn(table, 1)[:4] == [f"{subject.timepoints[0].age:.1f}"] * 4
    assert tableColumn(table, 2) == [tp.modality.value for tp in subject.timepoints]
    assert tableColumn(table, 2)[:4] == ["T1w", "T2w", "FLAIR", "T1ce"]
    assert tableColumn(table, 0)[3] == "sub-001_ses-01_ce-gadolinium_T1w.nii.gz"
    assert "28 scans at 7 ages" in ui.logTextEdit.toPlainText()

    # A bad path keeps the subject and says what is wrong with which path.
    ui.subjectPathLineEdit.setProperty("currentPath", str(subjectFolder / "nowhere"))
    gui.qtbot.mouseClick(ui.loadPathButton, QtCore.Qt.MouseButton.LeftButton)
    assert gui.panel.subject() is subject and table.rowCount() == 28
    assert "nowhere" in status(gui) and "not found" in status(gui)


def test_switching_tasks_shows_only_its_inputs(gui):
    for index, task in enumerate((COMPLETE_AGES, SYNTHESIZE_MODALITY, INTERPOLATE)):
        gui.ui.taskComboBox.setCurrentIndex(index)
        assert gui.panel.currentTask() == task
        for owner, names in TASK_INPUTS.items():
            for name in names:
                assert getattr(gui.ui, name).isHidden() == (owner != task), (task, name)
    gui.panel.setTask("complete_ages")
    assert gui.ui.taskComboBox.currentIndex() == 0


def test_ages_parsing_and_status(gui, demoSubject):
    panel, ages = gui.panel, gui.ui.agesLineEdit
    assert "Load a subject first" in status(gui)
    panel.setSubject(demoSubject)

    ages.setText("")
    assert "enter the ages" in status(gui)

    ages.setText("15, 4 9.5")
    assert panel.parsedAges() == [4.0, 9.5, 15.0]
    ages.setText("6, 9.5 12")  # the subject's scans are at 6.0x and 12.26 months: 6 is there, 12 is not
    with pytest.raises(InputError, match="already has scans at 6 months"):
        panel.parsedAges()
    assert "already has scans at 6 months (6.0 mo, ses-03)" in status(gui)

    ages.setText("9.5; 12")
    assert panel.parsedAges() == [9.5, 12.0]

    ages.setText("4, abc, 12")
    with pytest.raises(InputError, match="'abc' is not a number"):
        panel.parsedAges()
    assert "'abc'" in status(gui) and not gui.ui.applyButton.isEnabled()

    ages.setText("4, -3")
    assert "ages count from birth" in status(gui) and "-3" in status(gui)

    ages.setText("4 4")
    assert "4 is given twice" in status(gui)

    ages.setText(f"{demoSubject.ages()[1]:.1f}")  # as the table shows it: "2.9"
    assert "already has scans at 2.9 months" in status(gui)
    assert not gui.ui.applyButton.isEnabled()


def test_without_model_cards_apply_is_disabled_and_says_why(gui, demoSubject):
    gui.panel.setSubject(demoSubject)
    gui.ui.agesLineEdit.setText("4, 9.5")
    assert gui.ui.modelComboBox.count() == 0
    assert not gui.ui.applyButton.isEnabled()
    text = status(gui)
    assert text.startswith("No model installed for this task (Complete missing ages)")
    assert str(gui.models.parent / "home" / ".longdiff" / "models") in text
    assert "LONGDIFF_MODELS" in text and "longdiff models" in text
    assert gui.ui.modelCardLabel.text() == "No model selected."


def test_a_model_card_is_listed_shown_and_enables_apply(gui, demoSubject, tmp_path):
    writeCard(gui.models, "cas-diffcom-demo", CARD)
    panel, ui = gui.panel, gui.ui
    panel.refreshModels()
    panel.setSubject(demoSubject)
    ui.subjectPathLineEdit.setProperty("currentPath", str(demoSubject.source))
    ui.agesLineEdit.setText("4, 9.5, 15")

    assert [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count())] == ["cas-diffcom-demo (cas-diffcom)"]
    card = ui.modelCardLabel.text()
    assert "simulated data" in card and "cas-diffcom" in card and "background-color" in card
    assert "96 \u00d7 112 \u00d7 96 voxels" in card and "2 \u00d7 2 \u00d7 2 mm" in card
    assert ui.applyButton.isEnabled()
    assert panel.statusReason() == ""
    assert status(gui) == "Ready: the subject at 4.0, 9.5, 15.0 months, with cas-diffcom-demo on this computer (auto)."

    # The screenshot of the docs: the subject loaded, a model chosen, Apply ready.
    panel.refreshBackendInfo()  # the real PyTorch of this environment
    gui.root.resize(420, 1000)  # about the panel's natural height at this width
    gui.root.show()
    gui.qtbot.waitExposed(gui.root)
    ui.logTextEdit.setPlainText("Loaded sub-001: 28 scans at 7 ages (T1w, T2w, FLAIR, T1ce).")
    screenshot = tmp_path / "panel.png"
    assert gui.root.grab().save(str(screenshot))
    image = QtGui.QImage(str(screenshot)).convertToFormat(QtGui.QImage.Format.Format_RGB32)
    assert (image.width(), image.height()) == (420, 1000)
    pixels = np.frombuffer(image.constBits(), np.uint8).reshape(1000, image.bytesPerLine())[:, : 420 * 4]
    colours = np.unique(pixels.reshape(-1, 4)[:, :3], axis=0)
    assert len(colours) > 50 and pixels.std() > 20, "the screenshot is blank"
    if DOCS_IMAGES:
        shutil.copyfile(screenshot, Path(DOCS_IMAGES) / "panel.png")

    # Apply: without an engine connected it says so; with one, it receives the request.
    gui.qtbot.mouseClick(ui.applyButton, QtCore.Qt.MouseButton.LeftButton)
    assert "Running from the panel is not connected" in status(gui)
    received = []
    panel.applyRequested.connect(received.append)
    gui.qtbot.mouseClick(ui.applyButton, QtCore.Qt.MouseButton.LeftButton)
    (request,) = received
    assert isinstance(request, RunRequest)
    assert (request.task, request.ages, request.model.name) == (COMPLETE_AGES, (4.0, 9.5, 15.0), "cas-diffcom-demo")
    assert (request.backend, request.device) == ("local", "auto")

    # The card is for complete-ages only: other tasks do not offer it; a card without a
    # task is offered for every task.
    selectRows(ui.timepointsTable, [0, 4])  # T1w at two ages
    panel.setTask(INTERPOLATE)
    assert ui.modelComboBox.count() == 0
    assert "No model installed for this task (Interpolate frames between two scans)" in status(gui)
    assert "1 installed model(s) are for other tasks" in status(gui)
    writeCard(gui.models, "any-task", {"method": "ddm", "trained_on": {"simulated": False}})
    panel.refreshModels()
    assert ui.modelComboBox.count() == 1 and ui.applyButton.isEnabled()
    assert "simulated data" not in ui.modelCardLabel.text()
    panel.setTask(COMPLETE_AGES)
    assert ui.modelComboBox.count() == 2 and ui.modelComboBox.currentText() == "any-task (ddm)"


def test_synthesize_needs_a_missing_modality(gui, demoSubject, modelsDir):
    writeCard(modelsDir, "any-task", {"method": "ddm"})
    gui.panel.refreshModels()
    gui.panel.setSubject(demoSubject)
    gui.panel.setTask(SYNTHESIZE_MODALITY)
    gui.ui.targetModalityComboBox.setCurrentText("T2w")
    assert "sub-001 already has T2w at every age: nothing to synthesize" in status(gui)

    # Without the T2w scans of the first two sessions, T2w can be synthesized there.
    kept = [tp for tp in demoSubject.timepoints if not (tp.modality is Modality.T2W and tp.session < "ses-03")]
    gui.panel.setSubject(Subject("sub-001", kept, demoSubject.source))
    assert gui.ui.timepointsTable.rowCount() == 26
    assert gui.ui.applyButton.isEnabled()
    assert status(gui).startswith("Ready: T2w at 0.3, 2.9 months, with any-task")
    request = gui.panel.request()
    assert request.modality is Modality.T2W and request.ages == tuple(demoSubject.ages()[:2])


def test_interpolate_needs_two_scans_of_one_modality(gui, demoSubject, modelsDir):
    writeCard(modelsDir, "frames", {"method": "ddm", "tasks": ["interpolation"]})
    gui.panel.refreshModels()
    gui.panel.setSubject(demoSubject)
    gui.panel.setTask(INTERPOLATE)
    table = gui.ui.timepointsTable
    assert "Select the two scans" in status(gui)
    selectRows(table, [0, 5])  # T1w at 0.3 and T2w at 2.9 months
    assert "must have the same modality" in status(gui)
    selectRows(table, [0, 4, 8])
    assert "Select only two scans in the table (3 are selected)" in status(gui)
    selectRows(table, [4, 8])  # T1w at 2.9 and 6.0 months
    gui.ui.framesSpinBox.setValue(12)
    assert gui.ui.applyButton.isEnabled()
    assert status(gui) == (
        "Ready: 12 frames between T1w at 2.9 mo (ses-02) and T1w at 6.0 mo (ses-03), "
        "with frames on this computer (auto)."
    )
    assert [tp.session for tp in gui.panel.request().scans] == ["ses-02", "ses-03"]


def test_remote_backend_fields_and_hidden_token(gui, demoSubject):
    writeCard(gui.models, "cas-diffcom-demo", CARD)
    panel, ui = gui.panel, gui.ui
    panel.refreshModels()
    panel.setSubject(demoSubject)
    ui.agesLineEdit.setText("9.5")
    remoteOnly = (ui.serverUrlLineEdit, ui.tokenLineEdit, ui.testConnectionButton)
    assert not any(w.isEnabled() for w in remoteOnly) and ui.deviceComboBox.isEnabled()

    ui.remoteRadioButton.setChecked(True)
    assert all(w.isEnabled() for w in remoteOnly) and not ui.deviceComboBox.isEnabled()
    assert "Enter the server URL" in status(gui) and not ui.applyButton.isEnabled()
    ui.serverUrlLineEdit.setText("gpu-server")
    assert "must start with https://" in status(gui)
    ui.serverUrlLineEdit.setText("https://gpu.example.org:8000")
    ui.tokenLineEdit.setText("s3cret-token")
    assert ui.tokenLineEdit.echoMode() == QtWidgets.QLineEdit.EchoMode.Password
    assert "s3cret" not in ui.tokenLineEdit.displayText()
    assert ui.applyButton.isEnabled() and "on gpu.example.org" in status(gui)
    request = panel.request()
    assert (request.backend, request.serverUrl, request.token) == (
        "remote",
        "https://gpu.example.org:8000",
        "s3cret-token",
    )
    assert "s3cret" not in repr(request) and "s3cret" not in status(gui)

    gui.qtbot.mouseClick(ui.testConnectionButton, QtCore.Qt.MouseButton.LeftButton)
    assert "not supported in this version" in status(gui)
    calls = []
    panel.testConnectionRequested.connect(lambda url, token: calls.append((url, token)))
    gui.qtbot.mouseClick(ui.testConnectionButton, QtCore.Qt.MouseButton.LeftButton)
    assert calls == [("https://gpu.example.org:8000", "s3cret-token")]

    ui.localRadioButton.setChecked(True)
    assert not any(w.isEnabled() for w in remoteOnly) and ui.deviceComboBox.isEnabled()
    assert panel.request().token == ""


def test_backend_info(gui, demoSubject, modelsDir):
    torch = pytest.importorskip("torch")
    panel, label = gui.panel, gui.ui.torchInfoLabel
    panel.refreshBackendInfo()  # the real PyTorch of this environment
    assert f"PyTorch {torch.__version__}" in label.text()
    if not torch.cuda.is_available():
        assert "no CUDA GPU will be used" in label.text() or "finds no usable GPU" in label.text()

    panel._torchProbe = lambda: None
    panel.refreshBackendInfo()
    assert label.text() == "PyTorch is not installed yet (it is installed on first use, after you agree)."

    def broken():
        raise ImportError("libcudnn.so.9: cannot open shared object file")

    panel._torchProbe = broken
    panel.refreshBackendInfo()
    assert "cannot be loaded: libcudnn.so.9" in label.text()

    panel._torchProbe = lambda: TorchInfo("2.13.0+cu128", "12.8", True, ("NVIDIA RTX 5090",))
    panel.refreshBackendInfo()
    assert label.text() == "PyTorch 2.13.0+cu128 with CUDA 12.8: cuda:0 NVIDIA RTX 5090"

    # Forcing cuda on a build without CUDA blocks Apply with the reason.
    writeCard(modelsDir, "cas-diffcom-demo", CARD)
    panel.refreshModels()
    panel.setSubject(demoSubject)
    gui.ui.agesLineEdit.setText("9.5")
    panel._torchProbe = lambda: TorchInfo("2.13.0+cpu", None, False)
    panel.refreshBackendInfo()
    gui.ui.deviceComboBox.setCurrentText("cuda")
    assert "sees no CUDA GPU: choose auto or cpu" in status(gui) and not gui.ui.applyButton.isEnabled()
    gui.ui.deviceComboBox.setCurrentText("cpu")
    assert gui.ui.applyButton.isEnabled()
