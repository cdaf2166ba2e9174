"""Python packages are installed on the first local run, with consent: never when the panel
opens; a decline leaves an "Install packages and run" button; a failure shows its message.

The real .ui on PySide6 offscreen (``qt_shim``), the real ``Panel``, and for the decline the
real ``dependencies.ensureDependencies`` on a requirement that is not installed, with the
question answered "Cancel" (only Slicer's dialog and pip are stand-ins). Torch-free: runs
under Python 3.9 and 3.12 too (``Testing/torchfree.txt``). With $LONGDIFF_DOCS_IMAGES set,
the first-run pictures of ``docs/slicer.md`` are written there.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import ast
import json
import sys
import types
from pathlib import Path

import pytest
import qt_shim
from PySide6 import QtCore

from LongitudinalDiffusionLib.subject import load_subject

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LongitudinalDiffusion"))
from LongitudinalDiffusionSlicer import dependencies
from LongitudinalDiffusionSlicer.panel import Panel

DOCS_IMAGES = os.environ.get("LONGDIFF_DOCS_IMAGES")


class FakeRun:
    """A run that is done at the first poll (the engine is not what these tests are about)."""

    def poll(self):
        return types.SimpleNamespace(log=[], percent=100, text="", finished=True, state="done", error="")

    def cancel(self):
        pass


@pytest.fixture(scope="module")
def demoSubject(subjectFolder):
    return load_subject(subjectFolder)


@pytest.fixture
def gui(qtbot, monkeypatch, tmp_path, demoSubject):
    """The panel on the .ui with one model card, the demo subject and ages typed; ``installer``
    answers from ``gui.answers`` and records each call; the run factory records each request."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "demo.json").write_text(json.dumps({"method": "cas-diffcom", "task": "complete-ages"}))
    monkeypatch.setenv("LONGDIFF_MODELS", str(models))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import LongitudinalDiffusionLib.catalog as catalog

    monkeypatch.setattr(catalog, "BUNDLED_DIR", tmp_path / "no-bundled-models")
    qt = qt_shim.installQtModule(monkeypatch)
    root, ui = qt_shim.loadUi(qt_shim.UI_FILE)
    qtbot.addWidget(root)
    state = types.SimpleNamespace(installs=[], runs=[], answers=[])

    def installer():
        state.installs.append(True)
        answer = state.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer

    def runFactory(request):
        state.runs.append(request)
        return FakeRun()

    panel = Panel(ui, qt, runFactory=runFactory, dependencyInstaller=installer, pollIntervalMs=10)
    panel.setSubject(demoSubject)
    ui.agesLineEdit.setText("4")
    state.root, state.ui, state.panel, state.qtbot, state.tmp = root, ui, panel, qtbot, tmp_path
    return state


def click(gui, button):
    gui.qtbot.mouseClick(button, QtCore.Qt.MouseButton.LeftButton)


def snapshot(gui, name):
    if not DOCS_IMAGES:
        return
    gui.root.resize(420, 1000)
    gui.root.show()
    gui.qtbot.waitExposed(gui.root)
    gui.ui.runCollapsibleButton.setProperty("collapsed", False)
    assert gui.root.grab().save(str(Path(DOCS_IMAGES) / name))


def ok():
    return dependencies.DependencyReport(True)


def test_opening_the_panel_installs_nothing(gui):
    gui.panel.refreshModels()
    gui.panel.refreshBackendInfo()
    gui.panel.onTaskChanged()
    assert gui.installs == [] and gui.ui.applyButton.isEnabled()
    assert not gui.panel.isRetryOffered()
    # the module file's setup() does not install either (the widget needs the application)
    source = (ROOT / "LongitudinalDiffusion" / "LongitudinalDiffusion.py").read_text()
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LongitudinalDiffusionWidget")
    setup = next(f for f in widget.body if getattr(f, "name", "") == "setup")
    called = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(setup)
        if isinstance(node, ast.Call)
    }
    assert not called & {"ensureDependencies", "pip_install", "pip_ensure", "installTorch"}


def test_a_declined_installation_leaves_a_retry_button(gui, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("longdiff-test-not-installed-pkg>=1.0\n")
    asked = []

    def confirm(text, windowTitle=None, **kwargs):
        asked.append(text)
        return False  # the user clicks Cancel

    slicerStandIn = types.SimpleNamespace(util=types.SimpleNamespace(confirmOkCancelDisplay=confirm))
    gui.answers.append(
        lambda: dependencies.ensureDependencies(
            requirements, slicerStandIn, torchRequirement="packaging>=1", workDir=tmp_path / "pip"
        )
    )
    click(gui, gui.ui.applyButton)
    assert len(gui.installs) == 1 and len(asked) == 1 and "longdiff-test-not-installed-pkg" in asked[0]
    assert gui.runs == [] and not gui.panel.isRunning()
    status = gui.ui.statusLabel.text()
    assert status.startswith("Not started: You declined the installation.")
    assert "longdiff-test-not-installed-pkg>=1.0" in status
    assert gui.panel.isRetryOffered() and gui.ui.installRetryButton.isEnabled()
    assert "declined" in gui.ui.logTextEdit.toPlainText()
    snapshot(gui, "panel_install_declined.png")

    # Retry: asked again; this time the packages are there, the run starts, the button goes.
    gui.answers.append(ok())
    click(gui, gui.ui.installRetryButton)
    assert len(gui.installs) == 2 and len(gui.runs) == 1
    assert not gui.panel.isRetryOffered()
    gui.qtbot.waitUntil(lambda: not gui.panel.isRunning(), timeout=5000)
    assert gui.ui.statusLabel.text().startswith("Done")


@pytest.mark.parametrize("error", [OSError("pip: network unreachable"), ValueError("bad wheel"), KeyError("x")])
def test_a_failed_installation_shows_its_message(gui, error):
    gui.answers.append(error)
    click(gui, gui.ui.applyButton)
    status = gui.ui.statusLabel.text()
    assert status.startswith("Not started: The installation of the Python packages failed:")
    assert str(error) in status and str(error) in gui.ui.logTextEdit.toPlainText()
    assert gui.runs == [] and gui.panel.isRetryOffered()
    if isinstance(error, OSError):
        snapshot(gui, "panel_install_failed.png")


def test_a_failure_report_is_shown_and_a_success_runs_at_once(gui):
    gui.answers.append(dependencies.DependencyReport(False, [], ["monai>=1.4"], "These packages are still missing"))
    click(gui, gui.ui.applyButton)
    assert "These packages are still missing" in gui.ui.statusLabel.text() and gui.panel.isRetryOffered()
    gui.answers.append(ok())
    click(gui, gui.ui.applyButton)
    assert len(gui.runs) == 1 and not gui.panel.isRetryOffered()


def test_remote_runs_need_no_local_packages(gui):
    gui.ui.remoteRadioButton.setChecked(True)
    gui.ui.serverUrlLineEdit.setText("https://gpu.example.org:8000")
    gui.panel._uploadConsent = lambda request: True
    click(gui, gui.ui.applyButton)
    assert gui.installs == [] and len(gui.runs) == 1 and gui.runs[0].backend == "remote"
