"""The module file's widget itself (``LongitudinalDiffusionWidget``), set up as Slicer sets it
up: the real .ui through ``slicer.util.loadUI`` (PySide6 offscreen, ``qt_shim``), the scene
on PyPI slicer-core, the application's missing parts as stand-ins
(``mrml_harness.installSlicerApplicationStandIns``).

Checks what a user of the module would notice: opening the panel installs nothing; the
first local run asks, and a decline leaves the retry button; Close Scene empties the panel;
cleanup leaves no observer behind; the sample subject loads in the background.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import functools
import types

import pytest
import requires

requires.slicer()

import mrml_harness
import qt_shim
import slicer
from LongitudinalDiffusionSlicer import dependencies, sampledata
from PySide6 import QtCore


@pytest.fixture
def widget(qtbot, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the bundled demo models only
    monkeypatch.delenv("LONGDIFF_MODELS", raising=False)
    mrml_harness.installSlicerApplicationStandIns(monkeypatch, tmp_path / "cache")
    headless = mrml_harness.bootstrapScene()
    uis = {}

    def loadUI(path):
        root, ui = qt_shim.loadUi(path)
        uis[id(root)] = ui
        return root

    monkeypatch.setattr(slicer.util, "loadUI", loadUI)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: uis[id(root)])
    module = mrml_harness.importModuleFile()
    installs = []

    def ensureDependencies(logic):
        installs.append(True)
        logic.dependencyReport = dependencies.DependencyReport(
            False, [], ["monai>=1.4"], "You declined the installation. Not installed: monai>=1.4.", True
        )
        return False

    monkeypatch.setattr(module.LongitudinalDiffusionLogic, "ensureDependencies", ensureDependencies)
    w = module.LongitudinalDiffusionWidget()
    w.setup()
    qtbot.addWidget(w.parent)
    yield types.SimpleNamespace(w=w, scene=headless.scene, installs=installs, qtbot=qtbot, module=module)
    w.cleanup()
    headless.close()


def test_opening_the_module_installs_nothing_and_binds_the_scene(widget):
    w = widget.w
    assert widget.installs == []
    assert w.panel is not None and w.ui.applyButton is not None
    node = widget.scene.GetSingletonNode("LongitudinalDiffusion", "vtkMRMLScriptedModuleNode")
    assert node is not None and node.GetParameter("task") == "complete-ages"
    meta = widget.module.LongitudinalDiffusion(types.SimpleNamespace()).parent
    assert "user guide" in meta.helpText and widget.module.DOCUMENTATION_URL in meta.helpText
    assert meta.contributors and "LongitudinalDiffusion developers" not in meta.contributors  # no placeholder


def test_the_first_local_run_asks_and_a_decline_leaves_retry(widget, subjectFolder):
    w = widget.w
    w.panel.setSubject(w.logic.loadSubject(subjectFolder))
    w.ui.agesLineEdit.setText("4")
    assert w.ui.applyButton.isEnabled(), w.panel.statusReason()
    widget.qtbot.mouseClick(w.ui.applyButton, QtCore.Qt.MouseButton.LeftButton)
    assert widget.installs == [True] and not w.panel.isRunning()
    assert w.ui.statusLabel.text().startswith("Not started: You declined the installation.")
    assert w.panel.isRetryOffered()


def test_close_scene_empties_the_panel_and_cleanup_removes_the_observers(widget, subjectFolder):
    w = widget.w
    w.panel.setSubject(w.logic.loadSubject(subjectFolder))
    assert w.ui.timepointsTable.rowCount() == 28
    widget.scene.Clear(False)
    assert w.ui.timepointsTable.rowCount() == 0 and not w.ui.applyButton.isEnabled()
    assert w.panel.statusReason().startswith("Load a subject first")
    w.panel.setSubject(w.logic.loadSubject(subjectFolder))
    w.cleanup()
    assert w.sceneBinding is None
    widget.scene.Clear(False)
    assert w.ui.timepointsTable.rowCount() == 28  # no observer left to reset it
    w.cleanup = lambda: None  # done (the fixture calls it again)


def test_load_sample_runs_in_the_background_and_fills_the_table(widget, monkeypatch):
    w = widget.w
    monkeypatch.setattr(sampledata, "SampleSimulation", functools.partial(sampledata.SampleSimulation, coarse=True))
    w.onLoadSample()
    assert not w.ui.loadSampleButton.isEnabled()  # one simulation at a time
    assert w.sampleSimulation.isRunning() and "Simulating the demo subject" in w.ui.statusLabel.text()
    widget.qtbot.waitUntil(lambda: w.ui.timepointsTable.rowCount() == 28, timeout=120000)
    assert w.ui.loadSampleButton.isEnabled() and not w.sampleSimulation.isRunning()
    assert w.panel.subject().subject_id == "sub-001"
