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
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "LongitudinalDiffusion"
for _path in (ROOT, MODULE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import slicer  # noqa: E402
import vtk  # noqa: E402
from LongitudinalDiffusionSlicer import mrml  # noqa: E402

#: (module name as in ``slicer.modules``, logic class), in registration order.
MODULE_LOGICS = (
    ("colors", "vtkSlicerColorLogic"),
    ("volumes", "vtkSlicerVolumesLogic"),
    ("segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("subjecthierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("sequences", "vtkSlicerSequencesLogic"),
    ("plots", "vtkSlicerPlotsLogic"),
    ("tables", "vtkSlicerTablesLogic"),
)


@dataclass
class HeadlessSlicer:
    """A bootstrapped scene and the logics that serve it."""

    scene: Any
    applicationLogic: Any
    remoteIOLogic: Any
    cacheDir: Path  # temporary: the data I/O cache and an empty application home
    logics: dict[str, Any] = field(default_factory=dict)

    def logic(self, moduleName: str) -> Any:
        """The registered logic of a module (``"segmentations"``, ...), or None."""
        return self.logics.get(moduleName.lower())

    def close(self) -> None:
        """Empty the scene, drop the logics and the cache folder, unregister."""
        shutdownScene(self)


_registry: list[HeadlessSlicer] = []


def _resolveLogic(moduleName: str, scene: Any) -> Any:
    for headless in _registry:
        if headless.scene is scene:
            return headless.logic(moduleName)
    return None


def bootstrapScene(makeCurrent: bool = True) -> HeadlessSlicer:
    """A new scene with the application logic, module logics and data I/O of real Slicer.

    Args:
        makeCurrent: set ``slicer.mrmlScene`` to the new scene (``slicer.util`` helpers
            and the ``scene=None`` defaults use it).
    """
    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetName("default")
    crosshair.SetSingletonTag("default")
    scene.AddNode(crosshair)

    cacheDir = Path(tempfile.mkdtemp(prefix="longdiff-mrml-"))
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    # No Slicer install to take colour files from: give the application an empty home so the
    # Colors logic finds an empty ColorFiles folder instead of logging an error.
    app.SetHomeDirectory(str(cacheDir / "home"))
    app.SetShareDirectory("share")
    (cacheDir / "home" / "share" / "ColorFiles").mkdir(parents=True)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())

    logics = {}
    for moduleName, className in MODULE_LOGICS:
        logic = getattr(slicer, className)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(moduleName, logic)
        logics[moduleName] = logic

    (cacheDir / "cache").mkdir()
    remoteIO = slicer.vtkMRMLRemoteIOLogic()
    remoteIO.SetMRMLScene(scene)
    remoteIO.GetCacheManager().SetRemoteCacheDirectory(str(cacheDir / "cache"))
    remoteIO.AddDataIOToScene()

    headless = HeadlessSlicer(scene, app, remoteIO, cacheDir, logics)
    _registry.append(headless)
    mrml.setModuleLogicResolver(_resolveLogic)
    if makeCurrent:
        slicer.mrmlScene = scene
    return headless


def shutdownScene(headless: HeadlessSlicer) -> None:
    """Undo :func:`bootstrapScene` for one scene."""
    if headless in _registry:
        _registry.remove(headless)
    headless.scene.Clear(True)
    headless.remoteIOLogic.RemoveDataIOFromScene()
    headless.logics.clear()  # the logics go with their last reference
    if getattr(slicer, "mrmlScene", None) is headless.scene:
        slicer.mrmlScene = _registry[-1].scene if _registry else None
    if not _registry:
        mrml.setModuleLogicResolver(None)
    shutil.rmtree(headless.cacheDir, ignore_errors=True)


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
