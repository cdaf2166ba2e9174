"""The panel's state in the scene: a parameter node, saved with the scene, and the scene
events that reset and restore the panel.

:class:`PanelParameters` reads and writes the panel's choices (task, ages, modality, model,
backend, device, server URL, samples, steps, frames, preprocessing; never the access token) as parameters
of a ``vtkMRMLScriptedModuleNode``. It needs nothing beyond that node, so it runs on
PyPI ``slicer-core`` as in Slicer. Where Slicer has ``slicer.parameterNodeWrapper`` (5.2 and
newer), :func:`wrapperClass` gives the module's typed ``@parameterNodeWrapper`` class over the
same parameter names; the wrapper stores ``str`` fields as they are and ``int`` fields as
their decimal text, as :class:`PanelParameters` does, so each reads what the other wrote.

:class:`SceneBinding` ties a panel to a scene: panel changes go into the parameter node;
closing the scene (``StartCloseEvent``) stops a run and empties the panel (no subject, no
results, Apply disabled saying to load a subject); after a scene is read
(``EndImportEvent``, e.g. a ``.mrb``) the panel takes the scene's parameter node and its
subject volumes. :meth:`SceneBinding.cleanup` removes every observer it added.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: The parameter node's name, and the module name the scene uses to find it.
MODULE_NAME = "LongitudinalDiffusion"

#: The saved fields, their types and defaults (the panel's own defaults).
FIELDS: dict[str, tuple[type, Any]] = {
    "task": (str, "complete-ages"),
    "ages": (str, ""),
    "modality": (str, ""),
    "model": (str, ""),
    "backend": (str, "local"),
    "device": (str, "auto"),
    "serverUrl": (str, ""),
    "samples": (int, 1),
    "steps": (int, 0),
    "frames": (int, 0),
    "preprocess": (str, "auto"),
}


def findOrCreateParameterNode(scene: Any) -> Any:
    """The scene's parameter node of this module (a ``vtkMRMLScriptedModuleNode``), made when absent.

    Looked up as ``ScriptedLoadableModuleLogic.getParameterNode`` does: the singleton tag is
    the module name.
    """
    import slicer

    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetName(f"{MODULE_NAME}Parameters")
        node.SetSingletonTag(MODULE_NAME)
        node.SetModuleName(MODULE_NAME)
        node = scene.AddNode(node)
    return node


class PanelParameters:
    """The panel's fields on a plain ``vtkMRMLScriptedModuleNode`` (see the module doc)."""

    def __init__(self, node: Any) -> None:
        self.node = getattr(node, "parameterNode", node)  # a parameterNodeWrapper instance, or the node

    def read(self) -> dict[str, Any]:
        """The saved fields; a field never saved, or unreadable, has its default."""
        values = {}
        for name, (kind, default) in FIELDS.items():
            raw = self.node.GetParameter(name)
            try:
                values[name] = kind(raw) if raw not in (None, "") else default
            except ValueError:
                logger.warning("parameter %s=%r is not a %s; using %r", name, raw, kind.__name__, default)
                values[name] = default
        return values

    def write(self, values: dict[str, Any]) -> None:
        """Save the known fields of ``values`` (one Modified event for all)."""
        wasModifying = self.node.StartModify()
        try:
            for name, value in values.items():
                if name in FIELDS:
                    self.node.SetParameter(name, str(FIELDS[name][0](value)))
        finally:
            self.node.EndModify(wasModifying)


@functools.cache
def wrapperClass() -> Any:
    """The module's ``@parameterNodeWrapper`` class over :data:`FIELDS`, or None where
    Slicer has no ``slicer.parameterNodeWrapper`` (e.g. PyPI slicer-core)."""
    try:
        from slicer.parameterNodeWrapper import parameterNodeWrapper
    except ImportError:
        return None
    namespace = {"__annotations__": {name: kind for name, (kind, _default) in FIELDS.items()}}
    namespace.update({name: default for name, (_kind, default) in FIELDS.items()})
    namespace["__doc__"] = "The LongitudinalDiffusion panel's choices, saved with the scene."
    return parameterNodeWrapper(type("LongitudinalDiffusionParameterNode", (), namespace))


class SceneBinding:
    """Keeps a panel and a scene's parameter node in step (see the module doc).

    Args:
        panel: a :class:`~.panel.Panel`.
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer).
        subjectReader: ``subjectReader(scene)`` returns the subject whose volumes are in the
            scene, or None (default: :func:`sceneSubject`).
    """

    def __init__(self, panel: Any, scene: Any, subjectReader: Any = None) -> None:
        import vtk

        self.panel = panel
        self.scene = scene
        self._subjectReader = subjectReader or sceneSubject
        self._restoring = False
        self._tags: list[int] = []
        self.parameters = PanelParameters(findOrCreateParameterNode(scene))
        self._restore()
        panel.stateChanged.connect(self.onPanelChanged)
        for event, handler in (
            (scene.StartCloseEvent, self.onSceneStartClose),
            (scene.EndCloseEvent, self.onSceneEndClose),
            (scene.EndImportEvent, self.onSceneEndImport),
        ):
            self._tags.append(scene.AddObserver(event, lambda caller, name, h=handler: h()))
        self._vtk = vtk

    def observerCount(self) -> int:
        return len(self._tags)

    def onPanelChanged(self, *_args: Any) -> None:
        if not self._restoring:
            self.parameters.write(self.panel.state())

    def onSceneStartClose(self) -> None:
        self.panel.reset()

    def onSceneEndClose(self) -> None:
        # Close Scene removed the parameter node: a fresh one, with the panel's (reset) choices
        self.parameters = PanelParameters(findOrCreateParameterNode(self.scene))
        self.parameters.write(self.panel.state())

    def onSceneEndImport(self) -> None:
        """A scene was read: take its parameter node's choices and its subject."""
        self.parameters = PanelParameters(findOrCreateParameterNode(self.scene))
        self._restore(subject=True)

    def _restore(self, subject: bool = False) -> None:
        self._restoring = True
        try:
            if subject:
                found = self._subjectReader(self.scene)
                if found is not None:
                    self.panel.setSubject(found)
            self.panel.applyState(self.parameters.read())
        finally:
            self._restoring = False
        self.parameters.write(self.panel.state())

    def cleanup(self) -> None:
        """Remove the observers and the panel connection (the module widget's ``cleanup``)."""
        for tag in self._tags:
            self.scene.RemoveObserver(tag)
        self._tags = []
        self.panel.stateChanged.disconnect(self.onPanelChanged)


def sceneSubject(scene: Any) -> Any:
    """The subject whose scans are in ``scene`` (the first subject by age), or None."""
    from LongitudinalDiffusionLib.errors import InputError

    from . import mrml

    volumes = [n for n in mrml.subjectVolumes(scene) if n.GetAttribute(mrml.SUBJECT_ATTRIBUTE)]
    # real scans only: generated volumes carry the subject too, but belong to a run
    volumes = [n for n in volumes if n.GetAttribute("LongitudinalDiffusion.Run") is None]
    if not volumes:
        return None
    subjectId = volumes[0].GetAttribute(mrml.SUBJECT_ATTRIBUTE)
    mine = [n for n in volumes if n.GetAttribute(mrml.SUBJECT_ATTRIBUTE) == subjectId]
    try:
        return mrml.subjectFromVolumes(mine, subjectId, scene)
    except InputError as exc:
        logger.warning("the scene's subject %s could not be read back: %s", subjectId, exc)
        return None
