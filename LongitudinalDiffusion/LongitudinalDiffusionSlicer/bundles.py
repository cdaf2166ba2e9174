"""The scene as a Medical Reality Bundle (``.mrb``): written atomically, marked as longdiff's
(an existing file is replaced only when longdiff wrote it), and read back."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import slicer

from LongitudinalDiffusionLib.errors import InputError

from .scenetools import _nodeIds, _removeNewNodes, _scene

logger = logging.getLogger(__name__)


def _messages(collection: Any) -> str:
    text = collection.GetAllMessagesAsString() if collection is not None else ""
    return text.strip() or "no details reported"


def sceneToMrb(scene: Any, path: str | os.PathLike) -> Path:
    """Save the scene and its data as a Medical Reality Bundle (``.mrb``), atomically.

    Storable nodes without a storage node get their default one (volumes ``.nrrd``,
    segmentations ``.seg.nrrd``). The bundle is written in a temporary folder beside
    ``path`` and renamed onto it: a failed save leaves any earlier file untouched. The
    bundle holds longdiff's marker (``.longdiff-result.json``); an existing file is replaced
    only when it holds one (a bundle longdiff wrote), any other file is left alone.

    Args:
        scene: the scene (None for ``slicer.mrmlScene``).
        path: target ``.mrb`` file.

    Returns:
        ``path``.

    Raises:
        InputError: the name does not end in ``.mrb``; the file exists and longdiff did not
            write it; the folder cannot be written.
        RuntimeError: MRML could not write the bundle (its messages are included).
    """
    from LongitudinalDiffusionLib import outputs

    scene = _scene(scene)
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise InputError(path, "a Medical Reality Bundle file name must end in .mrb")
    if (path.exists() or path.is_symlink()) and not _mrbWrittenByLongdiff(path):
        raise InputError(path, "exists and was not written by longdiff; it is left alone (choose another file name)")
    outputs.check_writable(path.parent, "scene file")
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.partial-", dir=path.parent))
    try:
        # The bundle's inner folder and .mrml file take the file's stem: write under the final name.
        temporary = work / path.name
        messages = slicer.vtkMRMLMessageCollection()
        if not scene.WriteToMRB(str(temporary), None, messages) or not temporary.is_file():
            raise RuntimeError(f"{path}: the scene could not be saved as a bundle ({_messages(messages)})")
        with zipfile.ZipFile(temporary, "a") as bundle:
            bundle.writestr(outputs.MARKER, _mrbMarker())
        os.replace(temporary, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("saved the scene to %s", path)
    return path


def _mrbMarker() -> str:
    import json

    from LongitudinalDiffusionLib import __version__

    return json.dumps({"tool": "longdiff", "version": __version__, "kind": "scene", "files": []})


def _mrbWrittenByLongdiff(path: Path) -> bool:
    """True when ``path`` is a bundle holding longdiff's marker (see :func:`sceneToMrb`)."""
    from LongitudinalDiffusionLib.outputs import archive_written_by_tool

    return archive_written_by_tool(path)


def mrbToScene(path: str | os.PathLike, scene: Any = None, clear: bool = False) -> Any:
    """Read a Medical Reality Bundle into a scene and return the scene.

    The scene needs a data I/O manager: the Slicer application's scene has one; on
    ``slicer-core`` add it with ``vtkMRMLRemoteIOLogic`` (a cache folder, then
    ``AddDataIOToScene()``). If the read fails, the nodes it had added are removed.

    Args:
        path: the ``.mrb`` file.
        scene: where to read it (default ``slicer.mrmlScene``).
        clear: empty the scene first (like opening a scene); otherwise the bundle's nodes
            are added to what is there.

    Raises:
        InputError: no such file, not a zip archive, or MRML could not read it.
    """
    scene = _scene(scene)
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file")
    if not zipfile.is_zipfile(path):
        raise InputError(path, "not a Medical Reality Bundle (.mrb files are zip archives)")
    if scene.GetDataIOManager() is None:
        logger.warning("%s: the scene has no data I/O manager; data files may not load", path)
    if clear:
        scene.Clear(False)
    beforeIds = _nodeIds(scene)
    messages = slicer.vtkMRMLMessageCollection()
    if not scene.ReadFromMRB(str(path), False, messages):
        _removeNewNodes(scene, beforeIds)
        raise InputError(path, f"the bundle could not be read ({_messages(messages)})")
    logger.info("read %s into the scene", path)
    return scene
