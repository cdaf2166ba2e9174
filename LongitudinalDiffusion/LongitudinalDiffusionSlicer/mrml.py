"""MRML glue: library images and subjects in and out of a Slicer scene.

The library works on :class:`~LongitudinalDiffusionLib.imaging.Image` (an (i, j, k) array
and a voxel-to-RAS affine) and :class:`~LongitudinalDiffusionLib.subject.Subject`; Slicer
works on volume, segmentation and subject hierarchy nodes. This module converts between
the two, exactly:

* :func:`volumeNodeFromImage` / :func:`imageFromVolumeNode`: voxels round-trip exactly and
  geometry to the last bit of the matrix (Slicer's numpy view of a volume is (k, j, i); its
  IJK-to-RAS matrix is the Image affine);
* :func:`loadSubjectIntoScene`: a subject as a subject-hierarchy tree (subject > one study
  per age > a volume per timepoint and a segmentation per labelled age), all or nothing;
* :func:`subjectVolumes` / :func:`subjectFromVolumes`: the way back, from nodes (and the
  ages and modalities the module panel's table gives) to a library ``Subject``;
* :func:`sceneToMrb` / :func:`mrbToScene`: the scene as a Medical Reality Bundle.

Every function takes the scene explicitly (default ``slicer.mrmlScene``) and uses only
MRML API that exists both in the Slicer application and in PyPI ``slicer-core`` (no
``slicer.app``, ``loadVolume``, ``saveNode`` or ``getModuleLogic``). Module logics are
found by :func:`moduleLogic`: ``slicer.modules.<name>.logic()`` inside Slicer, or a resolver
installed with :func:`setModuleLogicResolver` (tests, batch scripts).

Example (Slicer Python console)::

    from LongitudinalDiffusionLib.subject import load_subject
    from LongitudinalDiffusionSlicer import mrml
    loaded = mrml.loadSubjectIntoScene(load_subject("/data/cohort/sub-001"))
    subject = mrml.subjectFromVolumes(mrml.subjectVolumes(), "sub-001")
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image, check_affine, check_array, load_image
from LongitudinalDiffusionLib.subject import Modality, Subject, Timepoint, parse_age, parse_modality

logger = logging.getLogger(__name__)

__all__ = [
    "AGE_ATTRIBUTE",
    "LABELS_ATTRIBUTE",
    "LABEL_NAMES_ATTRIBUTE",
    "MODALITY_ATTRIBUTE",
    "SESSION_ATTRIBUTE",
    "SOURCE_ATTRIBUTE",
    "SUBJECT_ATTRIBUTE",
    "SceneSubject",
    "findLabelTable",
    "imageFromVolumeNode",
    "loadSubjectIntoScene",
    "mrbToScene",
    "moduleLogic",
    "readLabelTable",
    "sceneToMrb",
    "setModuleLogicResolver",
    "subjectFromVolumes",
    "subjectVolumes",
    "volumeNodeFromImage",
]

#: Node (and subject hierarchy item) attributes this module writes and reads.
AGE_ATTRIBUTE = "LongitudinalDiffusion.AgeMonths"
MODALITY_ATTRIBUTE = "LongitudinalDiffusion.Modality"
SESSION_ATTRIBUTE = "LongitudinalDiffusion.Session"
SOURCE_ATTRIBUTE = "LongitudinalDiffusion.Source"
SUBJECT_ATTRIBUTE = "LongitudinalDiffusion.SubjectID"
LABELS_ATTRIBUTE = "LongitudinalDiffusion.Labels"
#: On segmentations: where the segment names came from (a ``dseg.tsv``, or the demo's labels).
LABEL_NAMES_ATTRIBUTE = "LongitudinalDiffusion.LabelNames"

_MODALITY_ORDER = {m: i for i, m in enumerate(Modality)}

# Segment colours by (lower-case) label name; other labels take the palette in turn.
_NAMED_COLOURS = {
    "csf": (0.40, 0.65, 1.00),
    "grey matter": (0.85, 0.55, 0.45),
    "gray matter": (0.85, 0.55, 0.45),
    "white matter": (0.95, 0.93, 0.80),
    "lesion: necrotic core": (0.45, 0.20, 0.55),
    "lesion: enhancing rim": (1.00, 0.25, 0.20),
    "lesion: oedema": (1.00, 0.80, 0.20),
}
_PALETTE = (
    (0.50, 0.68, 0.50),
    (0.94, 0.71, 0.63),
    (0.69, 0.48, 0.40),
    (0.44, 0.72, 0.88),
    (0.86, 0.96, 0.08),
    (0.56, 0.24, 0.63),
    (0.98, 0.50, 0.45),
    (0.30, 0.45, 0.80),
)


# ------------------------------------------------------------------------ scene, logics

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


# ------------------------------------------------------------------------------ geometry


def _vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def _arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)], dtype=np.float64)


def _setIJKToRAS(node: Any, affine: np.ndarray) -> None:
    """Give ``node`` the IJK-to-RAS matrix ``affine``.

    The node keeps spacing and unit directions and multiplies them back, so an oblique
    matrix can come back one unit in the last place off (about 1e-16 mm): far below any
    geometric meaning, and the reason geometry is compared with a tolerance of 1e-12.
    """
    node.SetIJKToRASMatrix(_vtkMatrixFromArray(np.asarray(affine, dtype=np.float64)))


def _ijkToRAS(node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _arrayFromVtkMatrix(matrix)


# ------------------------------------------------------------------------------- volumes


def _voxelsForVolume(image: Image, name: str, labelmap: bool) -> np.ndarray:
    """Validated voxels in a type VTK stores, (i, j, k)."""
    array = check_array(np.asarray(image.array), name, ndim=3)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    if labelmap and np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise InputError(name, "a label map must hold whole numbers; this one has fractional values")
        low, high = float(rounded.min()), float(rounded.max())
        for candidate in (np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= low and high <= info.max:
                return rounded.astype(candidate)
        raise InputError(name, f"label values {low:g}..{high:g} do not fit a 32-bit label map")
    return array


def volumeNodeFromImage(image: Image, name: str, scene: Any = None, labelmap: bool = False) -> Any:
    """Add ``image`` to the scene as a scalar (or label map) volume node with a display node.

    Voxels are deep-copied; the node's IJK-to-RAS matrix is the Image affine exactly
    (oblique, anisotropic and LPS affines included), so :func:`imageFromVolumeNode` gives
    the same array and affine back.

    Args:
        image: the volume, array (i, j, k).
        name: node name.
        scene: target scene (default ``slicer.mrmlScene``).
        labelmap: create a ``vtkMRMLLabelMapVolumeNode`` (whole-number voxels required).

    Returns:
        the new ``vtkMRMLScalarVolumeNode`` or ``vtkMRMLLabelMapVolumeNode``.

    Raises:
        InputError: not a 3D array, empty, NaN/Inf voxels, a broken affine, or (label map)
            fractional values. Nothing is added to the scene then.
    """
    scene = _scene(scene)
    voxels = _voxelsForVolume(image, name, labelmap)
    check_affine(image.affine, name)
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    before = _nodeIds(scene)
    try:
        node = scene.AddNewNodeByClass(className, name)
        wasModifying = node.StartModify()
        _setIJKToRAS(node, image.affine)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(voxels.transpose(2, 1, 0)))
        node.EndModify(wasModifying)
        node.CreateDefaultDisplayNodes()
    except BaseException:
        _removeNewNodes(scene, before)
        raise
    return node


def imageFromVolumeNode(node: Any) -> Image:
    """The library Image of a scalar volume node: the exact inverse of :func:`volumeNodeFromImage`.

    The array is a copy in (i, j, k) order with the node's voxel type; the affine is the
    node's IJK-to-RAS matrix (composed with its parent transform when the node sits under
    a linear one). ``meta`` holds ``node_name``, ``node_id`` and, when the node carries
    them, ``age_months``, ``modality``, ``session``, ``source`` and ``subject_id``.

    Raises:
        InputError: not a scalar volume, no voxels, several components per voxel, or a
            non-linear parent transform (harden it first).
    """
    where = _describeNode(node)
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if node is None else node.GetClassName()
        raise InputError(where, f"a scalar volume node is needed, got {kind}")
    imageData = node.GetImageData()
    if imageData is None or 0 in imageData.GetDimensions() or imageData.GetPointData().GetScalars() is None:
        raise InputError(where, "the volume has no voxels")
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(where, f"{components} values per voxel; a scalar (single-component) volume is needed")
    array = np.ascontiguousarray(slicer.util.arrayFromVolume(node).transpose(2, 1, 0))
    affine = _ijkToRAS(node)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(
                where, f"the volume is under a non-linear transform ('{parent.GetName()}'); harden it first"
            )
        toWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(toWorld)
        affine = _arrayFromVtkMatrix(toWorld) @ affine
    meta: dict[str, Any] = {"node_name": node.GetName(), "node_id": node.GetID()}
    for key, attribute in (
        ("age_months", AGE_ATTRIBUTE),
        ("modality", MODALITY_ATTRIBUTE),
        ("session", SESSION_ATTRIBUTE),
        ("source", SOURCE_ATTRIBUTE),
        ("subject_id", SUBJECT_ATTRIBUTE),
    ):
        value = node.GetAttribute(attribute)
        if value is not None:
            meta[key] = value
    return Image(array, affine, meta)


# ------------------------------------------------------------------------------- labels


def findLabelTable(labelsPath: str | os.PathLike) -> Path | None:
    """The BIDS ``dseg.tsv`` naming the values of a ``_dseg`` label map, if there is one.

    Looks for ``<name>.tsv`` beside the label file (``sub-01_ses-01_dseg.tsv``), then walks
    up from its folder to the first folder holding ``dseg.tsv``, stopping at the dataset
    root (the first folder with a ``dataset_description.json``).
    """
    labelsPath = Path(labelsPath)
    name = labelsPath.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            sibling = labelsPath.with_name(name[: -len(ext)] + ".tsv")
            if sibling.is_file():
                return sibling
    for folder in labelsPath.parents:
        if (folder / "dseg.tsv").is_file():
            return folder / "dseg.tsv"
        if (folder / "dataset_description.json").is_file():
            break
    return None


def _parseColour(text: str, where: str) -> tuple[float, float, float] | None:
    text = (text or "").strip()
    if not text or text.lower() == "n/a":
        return None
    hexDigits = text.lstrip("#")
    if len(hexDigits) != 6:
        raise InputError(where, f"colour '{text}' is not of the form #RRGGBB")
    try:
        return tuple(int(hexDigits[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
    except ValueError:
        raise InputError(where, f"colour '{text}' is not of the form #RRGGBB") from None


def readLabelTable(path: str | os.PathLike) -> dict[int, tuple[str, tuple[float, float, float] | None]]:
    """Read a BIDS ``dseg.tsv``: label value -> (name, colour or None).

    Columns ``index`` and ``name`` are required; an optional ``color`` column holds
    ``#RRGGBB`` colours.

    Raises:
        InputError: unreadable file, missing columns, a non-integer or repeated index, or an
            empty name; the message names the file and row.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the label table ({exc})") from None
    if not rows:
        raise InputError(path, "the label table is empty")
    header = [cell.strip() for cell in rows[0]]
    missing = [column for column in ("index", "name") if column not in header]
    if missing:
        raise InputError(path, f"no {' or '.join(missing)} column (columns found: {', '.join(header)})")
    col = {name: i for i, name in enumerate(header)}
    table: dict[int, tuple[str, tuple[float, float, float] | None]] = {}
    for number, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        where = f"{path}, row {number}"
        cells = cells + [""] * (len(header) - len(cells))
        try:
            value = int(cells[col["index"]].strip())
        except ValueError:
            raise InputError(where, f"index '{cells[col['index']]}' is not a whole number") from None
        name = cells[col["name"]].strip()
        if not name:
            raise InputError(where, f"label {value} has no name")
        if value in table:
            raise InputError(where, f"label {value} is listed twice")
        colour = _parseColour(cells[col["color"]], where) if "color" in col else None
        table[value] = (name, colour)
    return table


def _labelTableFor(labelsPath: Path) -> tuple[dict[int, tuple[str, Any]], str]:
    """Names (and colours) of a label file's values, and where they came from."""
    tablePath = findLabelTable(labelsPath)
    if tablePath is not None:
        return readLabelTable(tablePath), str(tablePath)
    from LongitudinalDiffusionLib.demo.brain import BRAIN_LABELS  # scipy: import only when needed

    logger.info("%s: no dseg.tsv found; naming labels with the demo brain labels", labelsPath)
    return {value: (name, None) for value, name in BRAIN_LABELS.items()}, "LongitudinalDiffusionLib.demo.brain"


def _colourFor(name: str, value: int) -> tuple[float, float, float]:
    return _NAMED_COLOURS.get(name.lower(), _PALETTE[value % len(_PALETTE)])


# ------------------------------------------------------------------------- subject in


@dataclass
class SceneSubject:
    """What :func:`loadSubjectIntoScene` made: the subject's items and nodes.

    Attributes:
        subjectId: the subject's identifier.
        subjectItemId: its subject hierarchy item.
        studyItemIds: age (months) -> study item, one per age, ascending.
        volumeNodes: one volume per timepoint, in the subject's order (age, modality).
        segmentationNodes: age (months) -> segmentation node, for the ages with labels.
    """

    subjectId: str
    subjectItemId: int
    studyItemIds: dict[float, int] = field(default_factory=dict)
    volumeNodes: list[Any] = field(default_factory=list)
    segmentationNodes: dict[float, Any] = field(default_factory=dict)

    def volumeNode(self, age: float, modality: str | Modality, tol: float = 1e-6) -> Any:
        """The volume of ``modality`` at ``age`` months.

        Raises:
            KeyError: no such volume.
        """
        modality = parse_modality(modality)
        for node in self.volumeNodes:
            if (
                node.GetAttribute(MODALITY_ATTRIBUTE) == modality.value
                and abs(float(node.GetAttribute(AGE_ATTRIBUTE)) - float(age)) <= tol
            ):
                return node
        raise KeyError(f"{self.subjectId} has no {modality.value} volume at {float(age):.1f} mo in the scene")

    def nodes(self) -> list[Any]:
        """All data nodes made (volumes, then segmentations)."""
        return [*self.volumeNodes, *self.segmentationNodes.values()]


def _studyName(timepoints: list[Timepoint]) -> str:
    sessions = list(dict.fromkeys(tp.session for tp in timepoints if tp.session))
    ageLabel = timepoints[0].age_label
    return f"{', '.join(sessions)} · {ageLabel}" if sessions else ageLabel


def _placeInHierarchy(shNode: Any, node: Any, parentItemId: int) -> int:
    """Put ``node``'s subject hierarchy item under ``parentItemId`` (creating the item if needed)."""
    itemId = shNode.GetItemByDataNode(node)
    if itemId == shNode.GetInvalidItemID():
        # Slicer's subject hierarchy plugins add items for new nodes; bare MRML does not.
        return shNode.CreateItem(parentItemId, node)
    shNode.SetItemParent(itemId, parentItemId)
    return itemId


def _setAttributes(node: Any, values: dict[str, Any]) -> None:
    for attribute, value in values.items():
        if value is not None:
            node.SetAttribute(attribute, str(value))


def _timepointImage(tp: Timepoint) -> Image:
    if tp.image is not None:
        return tp.image
    if tp.source is None:
        raise InputError(tp.describe(), "the timepoint has neither an image nor a file to read it from")
    return load_image(tp.source)


def _addSegmentation(
    scene: Any,
    subject: Subject,
    timepoints: list[Timepoint],
    referenceVolume: Any,
    closedSurfaces: bool,
) -> Any:
    """One segmentation node from the label map of an age's timepoints."""
    labelled = [tp for tp in timepoints if tp.labels is not None]
    labelsPath = labelled[0].labels
    others = sorted({str(tp.labels) for tp in labelled} - {str(labelsPath)})
    if others:
        logger.warning(
            "%s at %s: several label maps; using %s", subject.subject_id, timepoints[0].age_label, labelsPath
        )
    labels = load_image(labelsPath, dtype=np.float64)
    voxels = labels.array
    if not np.array_equal(np.rint(voxels), voxels):
        raise InputError(labelsPath, "a label map must hold whole numbers; this one has fractional values")
    if voxels.min() < 0:
        raise InputError(labelsPath, f"negative label value {voxels.min():g}")
    values = [int(v) for v in np.unique(voxels)]
    table, tableSource = _labelTableFor(labelsPath)
    unnamed = [v for v in values if v != 0 and v not in table]
    if unnamed:
        logger.warning("%s: label values %s are not named in %s", labelsPath, unnamed, tableSource)

    ageLabel = timepoints[0].age_label
    name = f"{subject.subject_id} segmentation {ageLabel}"
    temporary: list[Any] = []
    try:
        # The import names and colours segments from the label map's colour table.
        colourNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
        temporary.append(colourNode)
        colourNode.SetTypeToUser()
        colourNode.SetNumberOfColors(max(max(values), max(table, default=0)) + 1)
        for value in sorted(set(table) | set(values)):
            labelName, colour = table.get(value, (f"label {value}", None))
            r, g, b = colour if colour is not None else _colourFor(labelName, value)
            colourNode.SetColor(value, labelName, r, g, b, 1.0)
        labelNode = volumeNodeFromImage(Image(voxels, labels.affine), f"{name} labels", scene, labelmap=True)
        temporary.extend([labelNode, labelNode.GetDisplayNode()])
        labelNode.GetDisplayNode().SetAndObserveColorNodeID(colourNode.GetID())

        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), referenceVolume.GetID())
        if not moduleLogic("segmentations", scene).ImportLabelmapToSegmentationNode(labelNode, segmentation):
            raise RuntimeError(f"{labelsPath}: Slicer could not import the label map into a segmentation")
        if closedSurfaces:
            segmentation.CreateClosedSurfaceRepresentation()
    finally:
        _removeNodes(scene, reversed(temporary))
    _setAttributes(
        segmentation,
        {
            SUBJECT_ATTRIBUTE: subject.subject_id,
            AGE_ATTRIBUTE: repr(float(timepoints[0].age)),
            SESSION_ATTRIBUTE: timepoints[0].session,
            SOURCE_ATTRIBUTE: labelsPath,
            LABEL_NAMES_ATTRIBUTE: tableSource,
        },
    )
    return segmentation


def loadSubjectIntoScene(subject: Subject, scene: Any = None, closedSurfaces: bool = False) -> SceneSubject:
    """Show a subject in the scene: subject > one study per age > volumes and segmentation.

    * a subject item named ``subject.subject_id``;
    * under it one study item per age, named ``"ses-02 · 6.0 mo"`` (``"6.0 mo"`` without a
      session), carrying the :data:`AGE_ATTRIBUTE`;
    * in each study one volume per timepoint, named ``"<subject_id> <modality> <age>"``,
      carrying :data:`AGE_ATTRIBUTE` (months, exact ``repr``), :data:`MODALITY_ATTRIBUTE`,
      :data:`SESSION_ATTRIBUTE`, :data:`SOURCE_ATTRIBUTE` (the file), :data:`SUBJECT_ATTRIBUTE`
      and, when labelled, :data:`LABELS_ATTRIBUTE` (the label file);
    * when the age has a label map (``Timepoint.labels``), one segmentation node (per age,
      not per modality) imported with the Segmentations logic, its reference geometry the
      age's first volume, its segments named from the dataset's ``dseg.tsv`` (see
      :func:`findLabelTable`) or else the demo's ``BRAIN_LABELS``; it carries the subject,
      age and session attributes, :data:`SOURCE_ATTRIBUTE` (the label file) and
      :data:`LABEL_NAMES_ATTRIBUTE`.

    Images not yet loaded (``Timepoint.image`` None) are read from ``Timepoint.source``.

    Args:
        subject: what to load.
        scene: target scene (default ``slicer.mrmlScene``).
        closedSurfaces: also build the segmentations' closed-surface (3D) representation.

    Returns:
        the items and nodes made.

    Raises:
        InputError: an unreadable image or label file, a bad label table. If anything fails
            midway every node and item this call made is removed before the error is raised.
    """
    scene = _scene(scene)
    beforeIds = _nodeIds(scene)
    createdItems: list[int] = []
    try:
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        subjectItem = shNode.CreateSubjectItem(shNode.GetSceneItemID(), subject.subject_id)
        createdItems.append(subjectItem)
        shNode.SetItemAttribute(subjectItem, SUBJECT_ATTRIBUTE, subject.subject_id)
        loaded = SceneSubject(subject.subject_id, subjectItem)
        for age in subject.ages():
            _loadAge(scene, shNode, subject, age, loaded, createdItems, closedSurfaces)
    except BaseException:
        removed = _undoLoad(scene, beforeIds, createdItems)
        logger.info("loading %s failed; removed the %d nodes it had made", subject.subject_id, removed)
        raise
    logger.info(
        "%s: %d volumes and %d segmentations in %d studies",
        subject.subject_id,
        len(loaded.volumeNodes),
        len(loaded.segmentationNodes),
        len(loaded.studyItemIds),
    )
    return loaded


def _loadAge(
    scene: Any,
    shNode: Any,
    subject: Subject,
    age: float,
    loaded: SceneSubject,
    createdItems: list[int],
    closedSurfaces: bool,
) -> None:
    """One age of :func:`loadSubjectIntoScene`: its study item, a volume per timepoint and the
    segmentation of its label map, recorded in ``loaded`` (items also in ``createdItems``)."""
    timepoints = [tp for tp in subject.timepoints if abs(tp.age - age) <= Subject.AGE_TOL]
    studyItem = shNode.CreateStudyItem(loaded.subjectItemId, _studyName(timepoints))
    createdItems.append(studyItem)
    shNode.SetItemAttribute(studyItem, AGE_ATTRIBUTE, repr(float(age)))
    if timepoints[0].session:
        shNode.SetItemAttribute(studyItem, SESSION_ATTRIBUTE, timepoints[0].session)
    loaded.studyItemIds[age] = studyItem
    ageVolumes = []
    for tp in timepoints:
        name = f"{subject.subject_id} {tp.modality.value} {tp.age_label}"
        node = volumeNodeFromImage(_timepointImage(tp), name, scene)
        _setAttributes(
            node,
            {
                SUBJECT_ATTRIBUTE: subject.subject_id,
                AGE_ATTRIBUTE: repr(float(tp.age)),
                MODALITY_ATTRIBUTE: tp.modality.value,
                SESSION_ATTRIBUTE: tp.session,
                SOURCE_ATTRIBUTE: tp.source,
                LABELS_ATTRIBUTE: tp.labels,
            },
        )
        _placeInHierarchy(shNode, node, studyItem)
        ageVolumes.append(node)
    loaded.volumeNodes.extend(ageVolumes)
    if any(tp.labels is not None for tp in timepoints):
        segmentation = _addSegmentation(scene, subject, timepoints, ageVolumes[0], closedSurfaces)
        _placeInHierarchy(shNode, segmentation, studyItem)
        loaded.segmentationNodes[age] = segmentation


def _undoLoad(scene: Any, beforeIds: set[str], createdItems: list[int]) -> int:
    """Remove the nodes and subject hierarchy items a failed load made; the number of nodes removed."""
    removed = _removeNewNodes(scene, beforeIds)
    shNode = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
    if shNode is not None:
        remaining = vtk.vtkIdList()
        shNode.GetItemChildren(shNode.GetSceneItemID(), remaining, True)
        present = {remaining.GetId(i) for i in range(remaining.GetNumberOfIds())}
        for itemId in reversed(createdItems):
            if itemId in present:
                shNode.RemoveItem(itemId, False, True)
    return removed


# ------------------------------------------------------------------------ subject out


def _ageOrNone(node: Any) -> float | None:
    text = node.GetAttribute(AGE_ATTRIBUTE)
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def subjectVolumes(scene: Any = None, subjectId: str | None = None) -> list[Any]:
    """The volume nodes carrying :data:`AGE_ATTRIBUTE`, sorted by age, then modality.

    Args:
        scene: the scene (default ``slicer.mrmlScene``).
        subjectId: keep only the volumes of this subject (:data:`SUBJECT_ATTRIBUTE`).
    """
    scene = _scene(scene)
    nodes = [
        node
        for node in _nodesByClass(scene, "vtkMRMLVolumeNode")
        if node.GetAttribute(AGE_ATTRIBUTE) is not None
        and (subjectId is None or node.GetAttribute(SUBJECT_ATTRIBUTE) == subjectId)
    ]

    def order(node: Any) -> tuple[float, int, str]:
        age = _ageOrNone(node)
        try:
            modality = _MODALITY_ORDER[parse_modality(node.GetAttribute(MODALITY_ATTRIBUTE) or "")]
        except InputError:
            modality = len(_MODALITY_ORDER)
        return (math.inf if age is None else age, modality, node.GetName() or "")

    return sorted(nodes, key=order)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def subjectFromVolumes(nodesOrRows: Iterable[Any], subjectId: str, scene: Any = None) -> Subject:
    """A library Subject from volume nodes, e.g. the rows of the module panel's table.

    Args:
        nodesOrRows: volume nodes (or node IDs), or ``(node, age, modality)`` rows; an age
            or modality that is None or blank is taken from the node's attributes
            (:data:`AGE_ATTRIBUTE` in months, :data:`MODALITY_ATTRIBUTE`). Given ages are
            months (numbers or text).
        subjectId: the subject's identifier.
        scene: where node IDs are looked up (default ``slicer.mrmlScene``).

    Returns:
        the subject; each timepoint's image is a copy of the node's voxels and geometry,
        with session, source file and label file from the node's attributes.

    Raises:
        InputError: naming the node: no age or modality (neither given nor in its
            attributes), an impossible age, an unknown modality, not a scalar volume;
            no volumes at all; two volumes with the same age and modality.
    """
    timepoints = []
    nodeIds = []
    for entry in nodesOrRows:
        if isinstance(entry, (tuple, list)):
            if not 1 <= len(entry) <= 3:
                raise InputError(f"subject {subjectId}", f"a row must be (node, age, modality), got {entry!r}")
            node, age, modality = (*entry, None, None)[:3]
        else:
            node, age, modality = entry, None, None
        if isinstance(node, str):
            found = _scene(scene).GetNodeByID(node)
            if found is None:
                raise InputError(node, "no node with this ID in the scene")
            node = found
        where = _describeNode(node)
        if node is None:
            raise InputError(where, "a row has no volume")
        if _blank(age):
            age = node.GetAttribute(AGE_ATTRIBUTE)
        if _blank(age):
            raise InputError(where, f"no age: give it in the table or set the node attribute {AGE_ATTRIBUTE} (months)")
        if _blank(modality):
            modality = node.GetAttribute(MODALITY_ATTRIBUTE)
        if _blank(modality):
            raise InputError(where, f"no modality: give it in the table or set the node attribute {MODALITY_ATTRIBUTE}")
        months = parse_age(age, "months", where)
        image = imageFromVolumeNode(node)
        timepoints.append(
            Timepoint(
                months,
                parse_modality(modality, where),
                image,
                node.GetAttribute(SOURCE_ATTRIBUTE) or None,
                node.GetAttribute(SESSION_ATTRIBUTE) or None,
                node.GetAttribute(LABELS_ATTRIBUTE) or None,
            )
        )
        nodeIds.append(node.GetID())
    if not timepoints:
        raise InputError(f"subject {subjectId}", "no volumes given")
    return Subject(str(subjectId), timepoints, None, {"scene_nodes": nodeIds})


# ---------------------------------------------------------------------------- bundles


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
