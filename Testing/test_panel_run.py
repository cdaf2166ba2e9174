"""Running from the panel, end to end and headless: the real .ui (PySide6 offscreen, stand-ins
for the Slicer widgets), the real run logic on a real MRML scene (slicer-core), the real
local backend (a warm child process) and the bundled demo models with 2 sampler steps.

Apply turns into Cancel, the progress bar reaches 100 %, the results land in the scene and
the frame slider moves the sequence browser's proxy; Cancel stops within a second and
leaves nothing; bad input gets a clear message and leaves nothing half-made.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness
import torch
from LongitudinalDiffusionSlicer import mrml, results
from LongitudinalDiffusionSlicer.panel import INTERPOLATE

torch.set_num_threads(1)
DOCS_IMAGES = os.environ.get("LONGDIFF_DOCS_IMAGES")
# subjectFolder (a real simulated BIDS subject) is in conftest.py


@pytest.fixture(scope="module")
def segmenter():
    return results.TissueSegmenter("tissue-seg-brain-demo")


@pytest.fixture
def gui(qtbot, monkeypatch, tmp_path, segmenter):
    with mrml_harness.panelOnScene(
        qtbot, monkeypatch, tmp_path / "home", segmenter, consentAnswer=False, size=(420, 1320)
    ) as gui:
        yield gui


def loadSubject(gui, folder: Path) -> None:
    assert gui.panel.loadSubjectFrom(folder) is not None
    assert gui.ui.timepointsTable.rowCount() == 28


def chooseModel(gui, name: str) -> None:
    names = [card.name for card in gui.panel.models()]
    gui.ui.modelComboBox.setCurrentIndex(names.index(name))


def prepareAgesRun(gui, folder: Path, steps: int) -> None:
    """The subject loaded, age 7.5 months asked of cas-diffcom-demo with ``steps`` sampler steps."""
    loadSubject(gui, folder)
    gui.ui.agesLineEdit.setText("7.5")
    chooseModel(gui, "cas-diffcom-demo")
    gui.ui.stepsSpinBox.setValue(steps)


def applyAndWait(gui, timeout: float = 60.0) -> tuple[str, str]:
    gui.finished.clear()
    gui.ui.applyButton.click()
    gui.qtbot.waitUntil(lambda: bool(gui.finished), timeout=int(timeout * 1000))
    return gui.finished[-1]


# --------------------------------------------------------------------------------- tests


def test_apply_runs_shows_progress_places_results_and_the_slider_moves_the_frame(gui, subjectFolder, segmenter):
    ui, panel = gui.ui, gui.panel
    prepareAgesRun(gui, subjectFolder, 2)
    ui.samplesSpinBox.setValue(2)
    assert ui.applyButton.isEnabled(), ui.statusLabel.text()

    seen = []
    ui.progressBar.valueChanged.connect(seen.append)
    ui.applyButton.click()
    assert panel.isRunning() and ui.applyButton.text() == "Cancel" and ui.applyButton.isEnabled()
    assert not ui.taskCollapsibleButton.isEnabled()
    gui.qtbot.waitUntil(lambda: bool(gui.finished), timeout=60000)
    assert gui.finished[-1] == ("done", ""), ui.logTextEdit.toPlainText()
    assert ui.applyButton.text() == "Apply" and ui.taskCollapsibleButton.isEnabled()
    assert ui.progressBar.value() == 100 and max(seen) == 100
    assert "generate" in ui.logTextEdit.toPlainText()
    assert ui.statusLabel.text().startswith("Done:")
    # both networks ran in the local job process: the tissue segmenter was never loaded here
    backend = gui.logic._localBackend
    assert backend.child_pid not in (None, os.getpid()) and backend.stats["loads"] >= 2
    assert segmenter._loaded is None

    view = panel.results()
    (placed,) = view.placed
    assert placed.volumeNodes and placed.uncertaintyNodes and placed.chartNode is not None
    assert ui.uncertaintyCheckBox.isEnabled() and ui.showChartButton.isEnabled()
    ui.uncertaintyCheckBox.setChecked(True)
    assert view.foreground is placed.uncertaintyNodes[0]

    # the slider moves the browser, and the proxy shows that frame
    assert ui.seriesComboBox.count() == 1 and "timeline" in ui.seriesComboBox.itemText(0)
    series = view.series(0)
    assert ui.frameSlider.maximum() == 7
    generatedIndex = series.generated.index(True)
    ui.frameSlider.setValue(generatedIndex)
    assert series.browser.GetSelectedItemNumber() == generatedIndex
    proxy = mrml.imageFromVolumeNode(series.proxyVolume())
    assert np.allclose(proxy.array, mrml.imageFromVolumeNode(placed.volumeNodes[0]).array)
    assert "(generated)" in ui.frameLabel.text()
    ui.frameSlider.setValue(0)
    assert series.browser.GetSelectedItemNumber() == 0 and "(real)" in ui.frameLabel.text()

    # segmentation visibility and opacity
    display = series.proxySegmentation().GetDisplayNode()
    ui.segmentationOpacitySlider.setValue(30)
    assert display.GetOpacity2DOutline() == pytest.approx(0.3)
    ui.segmentationVisibleCheckBox.setChecked(False)
    assert not display.GetVisibility()
    ui.segmentationVisibleCheckBox.setChecked(True)

    if DOCS_IMAGES:
        ui.frameSlider.setValue(generatedIndex)
        gui.root.grab().save(str(Path(DOCS_IMAGES) / "panel_results.png"))


def test_cancel_stops_within_a_second_and_leaves_nothing(gui, subjectFolder):
    ui, panel = gui.ui, gui.panel
    prepareAgesRun(gui, subjectFolder, 400)
    nodes, items = gui.scene.GetNumberOfNodes(), mrml_harness.shItemCount(gui.scene)
    ui.applyButton.click()
    gui.qtbot.waitUntil(lambda: ui.progressBar.value() > 0 and "generate" in ui.progressBar.format(), timeout=30000)
    assert "ETA" in ui.progressBar.format() and "/400" in ui.progressBar.format()
    started = time.monotonic()
    ui.applyButton.click()  # Cancel
    gui.qtbot.waitUntil(lambda: bool(gui.finished), timeout=5000)
    assert time.monotonic() - started < 1.0
    assert gui.finished[-1][0] == "cancelled"
    assert "nothing was added" in ui.statusLabel.text()
    assert gui.scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(gui.scene) == items
    assert results.resultNodeIds(gui.scene) == [] and panel.results() is None
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()


def test_a_volume_deleted_during_the_run_stops_it_cleanly(gui, subjectFolder):
    ui = gui.ui
    prepareAgesRun(gui, subjectFolder, 400)
    ui.applyButton.click()
    gui.qtbot.waitUntil(lambda: ui.progressBar.value() > 0, timeout=30000)
    victim = mrml.subjectVolumes(gui.scene)[0]
    gui.scene.RemoveNode(victim)
    nodes = gui.scene.GetNumberOfNodes()
    gui.qtbot.waitUntil(lambda: bool(gui.finished), timeout=5000)
    state, error = gui.finished[-1]
    assert state == "cancelled" and "removed from the scene" in error
    assert "removed from the scene" in ui.statusLabel.text()
    assert gui.scene.GetNumberOfNodes() == nodes and results.resultNodeIds(gui.scene) == []


def test_bad_input_gets_clear_messages(gui, subjectFolder, tmp_path):
    ui, panel = gui.ui, gui.panel
    # no subject, or a subject with no timepoints: nothing reaches the scene
    assert not ui.applyButton.isEnabled() and "Load a subject first" in ui.statusLabel.text()
    empty = tmp_path / "manifest.tsv"
    empty.write_text("file\tage\tmodality\n")
    nodes = gui.scene.GetNumberOfNodes()
    assert panel.loadSubjectFrom(empty) is None
    assert "Could not load the subject" in ui.statusLabel.text() and str(empty) in ui.statusLabel.text()
    assert gui.scene.GetNumberOfNodes() == nodes

    loadSubject(gui, subjectFolder)
    chooseModel(gui, "cas-diffcom-demo")
    # an age outside the model's range: a warning, and Apply waits
    ui.agesLineEdit.setText("30")
    assert not ui.applyButton.isEnabled()
    warning = ui.statusLabel.text()
    assert warning.startswith("Warning: 30.0 months lie outside") and "0.15 to 24" in warning

    # a missing model (its card deleted after it was listed)
    ui.agesLineEdit.setText("7.5")
    assert ui.applyButton.isEnabled()
    folder = tmp_path / "models"
    folder.mkdir()
    card = next(c for c in panel.models() if c.name == "cas-diffcom-demo")
    copy = folder / "cas-diffcom-copy.json"
    shutil.copyfile(card.path, copy)
    shutil.copyfile(card.path.with_suffix(".safetensors"), folder / card.path.with_suffix(".safetensors").name)
    import LongitudinalDiffusionLib.catalog as catalog

    panel.refreshModels([catalog.ModelCard("cas-diffcom-copy", copy, card.card), *panel.models()])
    chooseModel(gui, "cas-diffcom-copy")
    assert ui.applyButton.isEnabled()
    copy.unlink()
    panel.updateApplyState()
    assert not ui.applyButton.isEnabled() and "cas-diffcom-copy.json is missing" in ui.statusLabel.text()

    # mismatched geometry: interpolating between two scans of different grids says so
    panel.refreshModels()
    panel.setTask(INTERPOLATE)
    chooseModel(gui, "ddm-demo")
    subject = panel.subject()
    rows = [i for i, tp in enumerate(subject.timepoints) if tp.modality.value == "T1w"][:2]
    first = subject.timepoints[rows[0]]
    moved = first.image.affine.copy()
    moved[:3, 3] += 4.0
    subject.timepoints[rows[1]].image.affine = moved
    ui.timepointsTable.selectRow(rows[0])
    from PySide6 import QtCore

    ui.timepointsTable.selectionModel().select(
        ui.timepointsTable.model().index(rows[1], 0),
        QtCore.QItemSelectionModel.SelectionFlag.Select | QtCore.QItemSelectionModel.SelectionFlag.Rows,
    )
    panel.updateApplyState()
    assert "different geometries" in ui.statusLabel.text() and "resampled" in ui.statusLabel.text()

    # a remote run asks before uploading; declining runs nothing
    ui.remoteRadioButton.setChecked(True)
    ui.serverUrlLineEdit.setText("https://gpu.example.org:8000")
    nodes = gui.scene.GetNumberOfNodes()
    ui.applyButton.click()
    assert len(gui.consent["asked"]) == 1 and gui.consent["asked"][0].serverUrl == "https://gpu.example.org:8000"
    assert not panel.isRunning() and "declined" in ui.statusLabel.text()
    assert gui.scene.GetNumberOfNodes() == nodes


def test_blocking_run_for_scripts(gui, subjectFolder):
    """The scripting form: logic.run blocks and returns the placed results."""
    from LongitudinalDiffusionSlicer.panel import RunRequest

    from LongitudinalDiffusionLib.catalog import find_model

    subject = gui.logic.loadSubject(subjectFolder)
    request = RunRequest("complete-ages", subject, find_model("interval-demo"), ages=(15.0,), steps=2)
    view = gui.logic.run(request, timeout=60)
    (placed,) = view.placed
    assert float(placed.volumeNodes[0].GetAttribute(mrml.AGE_ATTRIBUTE)) == 15.0
    assert placed.tableNodes["generated"] is not None
    assert "1 generated volume(s)" in view.summary()
