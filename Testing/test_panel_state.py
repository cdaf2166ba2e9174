"""The panel's state like a Slicer module's: a parameter node saved with the scene (a real
``.mrb`` round trip on PyPI slicer-core), Close Scene resetting the panel, a scene read
restoring it, and the observers removed on cleanup. The real .ui on PySide6 offscreen.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import zipfile

import pytest
import requires

requires.slicer()

import mrml_harness
import qt_shim
from LongitudinalDiffusionSlicer import mrml, state
from LongitudinalDiffusionSlicer.panel import INTERPOLATE, SYNTHESIZE_MODALITY, Panel

from LongitudinalDiffusionLib.subject import load_subject


@pytest.fixture
def gui(qtbot, monkeypatch, tmp_path, subjectFolder):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the bundled demo models only
    monkeypatch.delenv("LONGDIFF_MODELS", raising=False)
    qt = qt_shim.installQtModule(monkeypatch)
    headless = mrml_harness.bootstrapScene()
    root, ui = qt_shim.loadUi(qt_shim.UI_FILE)
    qtbot.addWidget(root)
    panel = Panel(ui, qt)
    binding = state.SceneBinding(panel, headless.scene)
    subject = load_subject(subjectFolder)
    loaded = mrml.loadSubjectIntoScene(subject, headless.scene)
    panel.setSubject(mrml.subjectFromVolumes(loaded.volumeNodes, subject.subject_id, headless.scene))
    yield type("Gui", (), dict(ui=ui, panel=panel, binding=binding, scene=headless.scene, subject=subject))
    binding.cleanup()
    headless.close()


def choose(gui):
    """Choices a user makes: interpolation, 7 steps, 3 samples, a remote server with a token."""
    ui, panel = gui.ui, gui.panel
    panel.setTask(INTERPOLATE)
    ui.framesSpinBox.setValue(5)
    ui.stepsSpinBox.setValue(7)
    ui.samplesSpinBox.setValue(3)
    ui.preprocessComboBox.setCurrentIndex(2)  # never: the scans are already aligned
    ui.agesLineEdit.setText("4, 9.5")
    ui.remoteRadioButton.setChecked(True)
    ui.serverUrlLineEdit.setText("https://gpu.example.org:8000")
    ui.tokenLineEdit.setText("very-secret-token")


def test_choices_go_into_the_parameter_node_at_once(gui):
    choose(gui)
    node = gui.scene.GetSingletonNode("LongitudinalDiffusion", "vtkMRMLScriptedModuleNode")
    assert node is not None and node.GetName() == "LongitudinalDiffusionParameters"
    saved = state.PanelParameters(node).read()
    assert saved["task"] == INTERPOLATE and saved["steps"] == 7 and saved["samples"] == 3 and saved["frames"] == 5
    assert saved["backend"] == "remote" and saved["serverUrl"] == "https://gpu.example.org:8000"
    assert saved["ages"] == "4, 9.5" and saved["preprocess"] == "never"
    assert "very-secret-token" not in [node.GetParameter(n) for n in node.GetParameterNames()]


def test_the_preprocess_choice_reaches_the_job_spec(gui, tmp_path):
    from LongitudinalDiffusionSlicer.run import jobSpecsFromRequest

    ui, panel = gui.ui, gui.panel
    ui.localRadioButton.setChecked(True)
    specs = {}
    for index, expected in enumerate((None, True, False)):
        ui.preprocessComboBox.setCurrentIndex(index)
        ui.agesLineEdit.setText("4")
        request = panel.request()
        assert request.preprocess is expected
        [(_label, spec)] = jobSpecsFromRequest(request, tmp_path)
        specs[expected] = spec.options.get("preprocess")  # what the job process and the worker receive
    assert specs == {None: None, True: True, False: False}


def test_close_scene_resets_the_panel(gui):
    choose(gui)
    assert gui.ui.timepointsTable.rowCount() == len(gui.subject.timepoints)
    gui.scene.Clear(False)  # File > Close Scene
    assert gui.ui.timepointsTable.rowCount() == 0 and gui.panel.subject() is None
    assert not gui.ui.applyButton.isEnabled()
    assert gui.panel.statusReason().startswith("Load a subject first")
    assert gui.panel.results() is None
    # a fresh parameter node holds the choices that stay (task, steps, ...)
    node = gui.scene.GetSingletonNode("LongitudinalDiffusion", "vtkMRMLScriptedModuleNode")
    assert node is not None and state.PanelParameters(node).read()["steps"] == 7


def test_the_choices_and_the_subject_come_back_with_the_saved_scene(gui, tmp_path):
    choose(gui)
    bundle = mrml.sceneToMrb(gui.scene, tmp_path / "session.mrb")
    with zipfile.ZipFile(bundle) as archive:
        text = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".mrml"))
    assert b"LongitudinalDiffusionParameters" in text and b"very-secret-token" not in text

    gui.scene.Clear(False)
    ui, panel = gui.ui, gui.panel
    panel.setTask(SYNTHESIZE_MODALITY)  # the user changes things in the empty scene
    ui.stepsSpinBox.setValue(2)
    ui.localRadioButton.setChecked(True)

    mrml.mrbToScene(bundle, gui.scene, clear=True)  # File > Load Scene
    assert panel.currentTask() == INTERPOLATE
    assert ui.stepsSpinBox.value() == 7 and ui.samplesSpinBox.value() == 3 and ui.framesSpinBox.value() == 5
    assert panel.preprocessChoice() is False
    assert panel.isRemote() and panel.serverUrl() == "https://gpu.example.org:8000"
    assert ui.tokenLineEdit.text() == "very-secret-token"  # typed this session, never saved
    assert ui.timepointsTable.rowCount() == len(gui.subject.timepoints)
    assert panel.subject().ages() == gui.subject.ages()


def test_cleanup_removes_the_observers(gui):
    scene = gui.scene
    before = [scene.HasObserver(e) for e in (scene.StartCloseEvent, scene.EndCloseEvent, scene.EndImportEvent)]
    assert all(before) and gui.binding.observerCount() == 3
    gui.binding.cleanup()
    assert gui.binding.observerCount() == 0
    scene.Clear(False)
    assert gui.ui.timepointsTable.rowCount() == len(gui.subject.timepoints)  # nobody reset the panel
    gui.binding.cleanup = lambda: None  # already done (the fixture calls it again)


def test_without_parameter_node_wrapper_the_plain_node_is_used():
    # slicer-core has no slicer.parameterNodeWrapper; Slicer 5.8+ has (the module file uses it there)
    assert state.wrapperClass() is None
