"""Real MRML without the Slicer application: a scene bootstrapped on PyPI ``slicer-core``.

Tests import this module (it is a plain helper, not a conftest) and call
:func:`bootstrapScene`, which sets up what the Slicer application would (the scene, the
application and module logics, remote I/O and ``slicer.mrmlScene``; the steps are listed in
``LongitudinalDiffusionSlicer.headless``, where the bootstrap lives: batch scene export uses
it too). It also installs the resolver through which ``LongitudinalDiffusionSlicer.mrml.moduleLogic``
finds the logics of a scene (the Slicer application provides ``slicer.modules`` instead).
This file puts the module on ``sys.path`` and adds counting helpers, the Slicer application
stand-ins of the module file's tests and :func:`panelOnScene`, the panel of the run tests.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LongitudinalDiffusion"
for _path in (ROOT, MODULE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import slicer  # noqa: E402
import vtk  # noqa: E402
from LongitudinalDiffusionSlicer import mrml  # noqa: E402, F401
from LongitudinalDiffusionSlicer.headless import (  # noqa: E402, F401  (re-exported for the tests)
    MODULE_LOGICS,
    HeadlessSlicer,
    bootstrapScene,
    shutdownScene,
)


def nodeCount(scene: Any) -> int:
    """Number of nodes in the scene."""
    return scene.GetNumberOfNodes()


def shItemCount(scene: Any) -> int:
    """Number of subject hierarchy items below the scene item (0 without a hierarchy node)."""
    shNode = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
    if shNode is None:
        return 0
    ids = vtk.vtkIdList()
    shNode.GetItemChildren(shNode.GetSceneItemID(), ids, True)
    return ids.GetNumberOfIds()


def installSlicerApplicationStandIns(monkeypatch: Any, cacheDir: Path) -> None:
    """Test-only stand-ins for the parts of the Slicer application that slicer-core lacks, so
    that the module file ``LongitudinalDiffusion.py`` imports and its self-test runs here:

    * ``slicer.i18n`` (``tr``/``translate`` return the text);
    * ``slicer.ScriptedLoadableModule``: the four base classes; the test base class is a
      ``unittest.TestCase`` whose ``delayDisplay`` logs (as Slicer does in testing mode);
    * ``slicer.app``: ``cachePath`` (``cacheDir``), no layout manager, testing mode on;
    * ``qt``: PySide6 through ``qt_shim``.

    Everything the module does with MRML, the library and the logic stays real. Undone by
    ``monkeypatch`` at the end of the test.
    """
    import logging
    import types
    import unittest

    import qt_shim

    qt_shim.installQtModule(monkeypatch)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            pass

    class ScriptedLoadableModuleWidget:
        """Slicer's widget base class, as far as the module uses it: ``setup`` gives a
        ``layout`` (the parent's, or a new panel's), ``resourcePath`` the module's Resources."""

        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

        def setup(self) -> None:
            import qt

            if self.parent is None:
                self.parent = qt.QWidget()
            if self.parent.layout() is None:
                qt.QVBoxLayout(self.parent)
            self.layout = self.parent.layout()

        def resourcePath(self, filename: str) -> str:
            return str(MODULE_DIR / "Resources" / filename)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, msec: int = 1000) -> None:
            logging.info("%s", message)

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleTest,
    ):
        setattr(slm, cls.__name__, cls)
    from PySide6 import QtWidgets

    app = types.SimpleNamespace(
        cachePath=str(cacheDir),
        connect=lambda *args: None,
        processEvents=lambda: None,
        layoutManager=lambda: None,
        testingEnabled=lambda: True,
        setOverrideCursor=QtWidgets.QApplication.setOverrideCursor,
        restoreOverrideCursor=QtWidgets.QApplication.restoreOverrideCursor,
    )
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "i18n", i18n, raising=False)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)


def importModuleFile() -> Any:
    """``LongitudinalDiffusion.py`` as a fresh module (after the stand-ins are installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("LongitudinalDiffusion", MODULE_DIR / "LongitudinalDiffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def panelOnScene(
    qtbot: Any,
    monkeypatch: Any,
    home: Path,
    segmenter: Any,
    consentAnswer: bool,
    testConnections: bool = False,
    size: tuple[int, int] | None = None,
) -> Iterator[types.SimpleNamespace]:
    """The panel as the run tests drive it: the real .ui offscreen (``qt_shim``), and a
    ``Panel`` on the real ``RunLogic`` over a bootstrapped scene, polling every 20 ms.

    ``home`` becomes ``$HOME`` and ``$LONGDIFF_MODELS`` is unset, so only the bundled demo
    models are listed. Upload consent is answered with ``gui.consent["answer"]`` (initially
    ``consentAnswer``; a test may change it), each request kept in ``gui.consent["asked"]``;
    ``testConnections`` hands the logic's connection test to the panel. ``gui.finished``
    collects the ``(state, error)`` of every finished run. On leaving, a run still going is
    cancelled and waited for, and the logic and the scene are closed.
    """
    import qt_shim
    from LongitudinalDiffusionSlicer.logic import RunLogic
    from LongitudinalDiffusionSlicer.panel import Panel

    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LONGDIFF_MODELS", raising=False)
    qt = qt_shim.installQtModule(monkeypatch)
    headless = bootstrapScene()
    logic = RunLogic(headless.scene, segmenter=segmenter)
    root, ui = qt_shim.loadUi(qt_shim.UI_FILE)
    if size is not None:
        root.resize(*size)
    qtbot.addWidget(root)
    consent = {"answer": consentAnswer, "asked": []}

    def askConsent(request: Any) -> bool:
        consent["asked"].append(request)
        return consent["answer"]

    panel = Panel(
        ui,
        qt,
        subjectLoader=logic.loadSubject,
        runFactory=logic.startRun,
        resultPlacer=logic.placeRunSteps,
        uploadConsent=askConsent,
        connectionTester=logic.testConnection if testConnections else None,
        pollIntervalMs=20,
    )
    finished: list[tuple[str, str]] = []
    panel.runFinished.connect(lambda state, error: finished.append((state, error)))
    yield types.SimpleNamespace(
        root=root, ui=ui, panel=panel, logic=logic, scene=headless.scene, qtbot=qtbot, finished=finished,
        consent=consent,
    )  # fmt: skip
    if panel.isRunning():
        panel.cancelRun()
        qtbot.waitUntil(lambda: not panel.isRunning(), timeout=15000)
    logic.close()
    headless.close()
