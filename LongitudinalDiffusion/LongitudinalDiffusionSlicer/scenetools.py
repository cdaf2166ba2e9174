"""The scene a call works on and the module logics it uses, and the bookkeeping that makes
a call all or nothing (the nodes it added, their removal). Only MRML API that exists both in
the Slicer application and in PyPI ``slicer-core``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import slicer

_moduleLogicResolver: Callable[[str, Any], Any] | None = None


def setModuleLogicResolver(resolver: Callable[[str, Any], Any] | None) -> Callable[[str, Any], Any] | None:
    """Install how :func:`moduleLogic` finds module logics; returns the previous resolver.

    ``resolver(moduleName, scene)`` returns the logic of module ``moduleName`` (Slicer's
    lower-case module name: ``"segmentations"``, ``"volumes"``, ...) working on ``scene``,
    or None when it has none. Pass None to go back to ``slicer.modules`` (the default, and
    what the Slicer application provides). Tests running on ``slicer-core`` install one
    (see ``Testing/mrml_harness.py``).
    """
    global _moduleLogicResolver
    previous = _moduleLogicResolver
    _moduleLogicResolver = resolver
    return previous


def moduleLogic(moduleName: str, scene: Any = None) -> Any:
    """The logic of a Slicer module, e.g. ``moduleLogic("segmentations")``.

    Taken from the resolver installed by :func:`setModuleLogicResolver` when there is one,
    else from ``slicer.modules.<moduleName>.logic()`` (inside the Slicer application, where
    the logics work on ``slicer.mrmlScene``).

    Raises:
        RuntimeError: the logic is not available.
    """
    name = moduleName.lower()
    if _moduleLogicResolver is not None:
        logic = _moduleLogicResolver(name, _scene(scene))
        if logic is None:
            raise RuntimeError(f"no '{name}' module logic is registered for this scene")
        return logic
    modules = getattr(slicer, "modules", None)
    module = getattr(modules, name, None) if modules is not None else None
    if module is None:
        raise RuntimeError(
            f"module logic '{name}' is not available: there is no slicer.modules.{name} "
            "(outside the Slicer application, install a resolver with setModuleLogicResolver)"
        )
    return module.logic()


def _scene(scene: Any = None) -> Any:
    """``scene``, or ``slicer.mrmlScene`` when None."""
    if scene is not None:
        return scene
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: pass scene= or set slicer.mrmlScene")
    return scene


def _nodeIds(scene: Any) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _nodesByClass(scene: Any, className: str) -> list[Any]:
    collection = scene.GetNodesByClass(className)
    collection.UnRegister(scene)  # the C++ method returns a new reference; Python keeps its own
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def _removeNewNodes(scene: Any, beforeIds: set[str]) -> int:
    """Remove every node whose ID is not in ``beforeIds`` (newest first); returns how many."""
    new = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    new = [node for node in new if node.GetID() not in beforeIds]
    # Newest first; a new subject hierarchy node last (removing it drops all its items).
    new.sort(key=lambda node: not node.IsA("vtkMRMLSubjectHierarchyNode"))
    for node in reversed(new):
        if scene.IsNodePresent(node):
            scene.RemoveNode(node)
    return len(new)


def _removeNodes(scene: Any, nodes: Iterable[Any]) -> None:
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)


def _describeNode(node: Any) -> str:
    """How an error message names a node: ``volume 'name' (vtkMRMLScalarVolumeNode1)``."""
    if node is None:
        return "volume (none given)"
    return f"volume '{node.GetName()}' ({node.GetID()})"
