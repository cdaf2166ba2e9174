"""A Slicer scene without the Slicer application, on PyPI ``slicer-core``.

Batch use (``longdiff ... --scene out.mrb``) and the tests need real MRML where there is no
``slicer.app``. :func:`bootstrapScene` sets up what the application would:

1. a ``vtkMRMLScene`` with the ``default`` crosshair node;
2. a ``vtkSlicerApplicationLogic`` on the scene, its colour logic with the default colour
   nodes, empty slice and view logic collections;
3. the module logics (Colors first: Volumes looks it up; then Volumes, Segmentations,
   Subject Hierarchy, Sequences, Plots, Tables), each given the scene and the application
   logic and registered with it;
4. a ``vtkMRMLRemoteIOLogic`` with a cache folder and ``AddDataIOToScene()`` (reading
   ``.mrb`` bundles needs the data I/O manager);
5. optionally ``slicer.mrmlScene`` set to the new scene.

It installs the resolver through which :func:`.mrml.moduleLogic` finds the logics of a
scene. Inside the Slicer application none of this is needed (or wanted): use
``slicer.mrmlScene``.

Example::

    from LongitudinalDiffusionSlicer import headless
    app = headless.bootstrapScene()
    ...  # mrml / results functions on app.scene
    app.close()
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
import vtk

from . import mrml

__all__ = ["MODULE_LOGICS", "HeadlessSlicer", "bootstrapScene", "inSlicerApplication", "shutdownScene"]

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


def inSlicerApplication() -> bool:
    """True inside the 3D Slicer application (``slicer.app`` exists)."""
    return getattr(slicer, "app", None) is not None


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

    def __enter__(self) -> HeadlessSlicer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
