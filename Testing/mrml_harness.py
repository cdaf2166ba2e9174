"""Real MRML without the Slicer application: a scene bootstrapped on PyPI ``slicer-core``.

Tests import this module (it is a plain helper, not a conftest) and call
:func:`bootstrapScene`, which sets up what the Slicer application would:

1. a ``vtkMRMLScene`` with the ``default`` crosshair node;
2. a ``vtkSlicerApplicationLogic`` on the scene, its colour logic with the default colour
   nodes, empty slice and view logic collections;
3. the module logics (Colors first: Volumes looks it up; then Volumes, Segmentations,
   Subject Hierarchy, Sequences, Plots, Tables), each given the scene and the application
   logic and registered with it;
4. a ``vtkMRMLRemoteIOLogic`` with a cache folder and ``AddDataIOToScene()`` (reading
   ``.mrb`` bundles needs the data I/O manager);
5. ``slicer.mrmlScene`` set to the new scene.

It also installs the resolver through which ``LongitudinalDiffusionSlicer.mrml.moduleLogic``
finds the logics of a scene (the Slicer application provides ``slicer.modules`` instead).
The bootstrap itself lives in ``LongitudinalDiffusionSlicer.headless`` (batch scene export
uses it too); this file puts the module on ``sys.path`` and adds counting helpers.
"""

from __future__ import annotations

import sys
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
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

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
    app = types.SimpleNamespace(
        cachePath=str(cacheDir),
        connect=lambda *args: None,
        processEvents=lambda: None,
        layoutManager=lambda: None,
        testingEnabled=lambda: True,
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
