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
* :func:`sceneToMrb` / :func:`mrbToScene`: the scene as a Medical Reality Bundle
  (:mod:`.bundles`).

The scene helpers and module logics are in :mod:`.scenetools`, the label tables
(``dseg.tsv``, segment colours) in :mod:`.labeltables`, the bundles in :mod:`.bundles`; their
public names are importable from here too.

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

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image, check_affine, check_array, load_image
from LongitudinalDiffusionLib.subject import Modality, Subject, Timepoint, parse_age, parse_modality

# The scene helpers, label tables and bundles live in modules of their own; their names stay
# importable from here (other modules and scripts use ``mrml.<name>``).
from .bundles import _messages, _mrbMarker, _mrbWrittenByLongdiff, mrbToScene, sceneToMrb  # noqa: F401
from .labeltables import (  # noqa: F401
    _NAMED_COLOURS,
    _PALETTE,
    _colourFor,
    _labelTableFor,
    _parseColour,
    findLabelTable,
    readLabelTable,
)
from .scenetools import (
    _describeNode,
    _nodeIds,
    _nodesByClass,
    _removeNewNodes,
    _removeNodes,
    _scene,
    moduleLogic,
    setModuleLogicResolver,
)

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
