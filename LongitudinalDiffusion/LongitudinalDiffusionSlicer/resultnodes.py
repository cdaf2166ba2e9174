"""The MRML nodes a task's result is made of: the attributes that mark them (what a node is,
which run made it, that it is synthetic), the records of what was placed
(:class:`PlacedResult`, :class:`PlacedSeries`) and their removal, segmentations from label
maps, and the preprocessing's transform nodes."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image

from . import mrml

#: Node attributes: what a node is ("generated", "mean", "std", "labels", "frames", ...),
#: whether it was generated ("1") or is a real scan ("0"), and the run that made it.
KIND_ATTRIBUTE = "LongitudinalDiffusion.Kind"
GENERATED_ATTRIBUTE = "LongitudinalDiffusion.Generated"
RUN_ATTRIBUTE = "LongitudinalDiffusion.Run"
#: Every generated node says so: its name starts with :data:`SYNTHETIC_PREFIX` and it carries
#: these attributes ("1"; the model's name; "1" or "0"). Real scans in a timeline carry none.
SYNTHETIC_ATTRIBUTE = "LongitudinalDiffusion.Synthetic"
MODEL_ATTRIBUTE = "LongitudinalDiffusion.Model"
SIMULATED_TRAINING_ATTRIBUTE = "LongitudinalDiffusion.TrainedOnSimulatedData"
SYNTHETIC_PREFIX = "SYNTHETIC "
#: The colour table of uncertainty maps (present in Slicer and in ``slicer-core``).
UNCERTAINTY_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"


@dataclass
class PlacedSeries:
    """A frame series in the scene: its sequences, browser and proxy nodes."""

    name: str
    volumeSequence: Any
    browser: Any
    segmentationSequence: Any = None
    times: list[float] = field(default_factory=list)
    unit: str = ""
    generated: list[bool] | None = None

    def proxyVolume(self) -> Any:
        return self.browser.GetProxyNode(self.volumeSequence)

    def proxySegmentation(self) -> Any:
        return None if self.segmentationSequence is None else self.browser.GetProxyNode(self.segmentationSequence)

    def nodes(self) -> list[Any]:
        """Sequences, proxies and the browser (in the order :meth:`PlacedResult.remove` undoes them)."""
        found = [self.volumeSequence, self.segmentationSequence, self.proxyVolume(), self.proxySegmentation()]
        return [n for n in [*found, self.browser] if n is not None]


@dataclass
class PlacedResult:
    """What :func:`placeResult` made.

    Attributes:
        name: the run's name (the folder item's).
        folderItemId: the subject hierarchy folder holding everything below.
        volumeNodes: generated volumes (kinds ``generated``/``mean``), in the result's order.
        uncertaintyNodes: standard-deviation maps.
        segmentationNodes: volume node ID -> its segmentation.
        sequences: the frame series.
        tableNodes: ``"real"``/``"generated"`` -> tissue volume table.
        chartNode: the tissue volume plot chart (None without a segmenter or labels).
        plotSeriesNodes: the chart's series.
        transformNodes: the preprocessing's transforms (one linear transform node per input:
            set as an input volume's parent, it moves the input onto the model's atlas space).
        messages: notices for the user (what was resampled, skipped, ...).
    """

    name: str
    folderItemId: int
    volumeNodes: list[Any] = field(default_factory=list)
    uncertaintyNodes: list[Any] = field(default_factory=list)
    segmentationNodes: dict[str, Any] = field(default_factory=dict)
    sequences: list[PlacedSeries] = field(default_factory=list)
    tableNodes: dict[str, Any] = field(default_factory=dict)
    chartNode: Any = None
    plotSeriesNodes: list[Any] = field(default_factory=list)
    transformNodes: list[Any] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def nodes(self) -> list[Any]:
        """Every data node made (volumes, segmentations, sequences, browsers, proxies, tables,
        chart, transforms)."""
        found = [*self.volumeNodes, *self.uncertaintyNodes, *self.segmentationNodes.values(), *self.transformNodes]
        for series in self.sequences:
            found.extend(series.nodes())
        found.extend(self.tableNodes.values())
        found.extend(self.plotSeriesNodes)
        if self.chartNode is not None:
            found.append(self.chartNode)
        return found

    def remove(self, scene: Any = None) -> None:
        """Take everything this result made out of the scene (nodes and the folder item)."""
        scene = mrml._scene(scene)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        invalid = shNode.GetInvalidItemID()
        for node in reversed(self.nodes()):
            item = shNode.GetItemByDataNode(node)
            if item != invalid:  # bare MRML keeps the item of a removed node: remove it first
                shNode.RemoveItem(item, False, False)
            mrml._removeNodes(scene, [*_displayNodes(node), _storageNode(node), node])
        if shNode.GetItemName(self.folderItemId):
            shNode.RemoveItem(self.folderItemId, True, True)


def transformNode(transform: Any, scene: Any = None) -> Any:
    """A linear transform node of a preprocessing transform (``preprocess.SavedTransform``:
    a 4x4 LPS matrix from the model's space to the input, ITK's convention), as Slicer would
    load its ``.tfm`` file: the matrix, in RAS, is the node's transform from parent, so a
    volume placed under it moves from its own space onto the model's."""
    scene = mrml._scene(scene)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras = flip @ np.asarray(transform.matrix_lps, dtype=np.float64) @ flip
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ras[r, c]))
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{transform.name} (preprocessing)")
    node.SetMatrixTransformFromParent(matrix)
    return node


def _displayNodes(node: Any) -> list[Any]:
    if not hasattr(node, "GetNumberOfDisplayNodes"):
        return []
    return [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]


def _storageNode(node: Any) -> Any:
    return node.GetStorageNode() if hasattr(node, "GetStorageNode") else None


def resultNodeIds(scene: Any = None) -> list[str]:
    """IDs of the nodes in the scene that a run made (they carry :data:`RUN_ATTRIBUTE`)."""
    scene = mrml._scene(scene)
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [n.GetID() for n in nodes if n.GetAttribute(RUN_ATTRIBUTE) is not None]


def syntheticAttributes(result: Any) -> dict[str, str]:
    """The attributes that mark a node generated by ``result``'s model: synthetic, which
    model, and whether it was trained on simulated data."""
    prov = getattr(result, "provenance", None)
    trained = (prov.extra or {}).get("trained_on") if prov is not None else None
    simulated = isinstance(trained, dict) and bool(trained.get("simulated", False))
    return {
        SYNTHETIC_ATTRIBUTE: "1",
        MODEL_ATTRIBUTE: prov.model if prov is not None else "?",
        SIMULATED_TRAINING_ATTRIBUTE: "1" if simulated else "0",
    }


def runSteps(steps: Generator[None, None, Any]) -> Any:
    """Run a generator of steps (:func:`placeResultSteps`, ...) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _colourTable(scene: Any, name: str, classes: Mapping[int, str]) -> Any:
    colourNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
    colourNode.SetTypeToUser()
    colourNode.SetNumberOfColors(max([0, *classes]) + 1)
    for value in range(max([0, *classes]) + 1):
        labelName = classes.get(value, f"label {value}")
        r, g, b = mrml._colourFor(labelName, value)
        colourNode.SetColor(value, labelName, r, g, b, 0.0 if value == 0 else 1.0)
    return colourNode


def _nameSegmentIds(segmentation: Any) -> None:
    """Segment IDs = segment names, so every frame of a sequence has the same IDs (and the
    display properties of a segment carry over from frame to frame)."""
    segments = []
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        segments.append((segmentId, segmentation.GetSegment(segmentId)))
    if all(segmentId == segment.GetName() for segmentId, segment in segments):
        return
    for segmentId, _segment in segments:
        segmentation.RemoveSegment(segmentId)
    for _segmentId, segment in segments:
        segmentation.AddSegment(segment, segment.GetName())


def segmentationFromLabels(
    labels: Image,
    classes: Mapping[int, str] | None,
    name: str,
    referenceVolume: Any,
    scene: Any = None,
) -> Any:
    """A segmentation node from a label map, one segment per non-zero value present.

    Segments are named from ``classes`` (value -> name; values without a name become
    ``"label N"``) and coloured like the subject's own segmentations. The segmentation's
    reference geometry is ``referenceVolume``'s (its node reference is set too).

    Raises:
        InputError: fractional or negative labels.
        RuntimeError: Slicer could not import the label map.
    """
    scene = mrml._scene(scene)
    voxels = np.asarray(labels.array)
    if np.issubdtype(voxels.dtype, np.floating) and not np.array_equal(np.rint(voxels), voxels):
        raise InputError(name, "a label map must hold whole numbers; this one has fractional values")
    if voxels.size and voxels.min() < 0:
        raise InputError(name, f"negative label value {voxels.min():g}")
    present = sorted(int(v) for v in np.unique(voxels))
    classes = {int(k): str(v) for k, v in (classes or {}).items()}
    for value in present:
        classes.setdefault(value, f"label {value}")
    temporary: list[Any] = []
    segmentation = None
    try:
        colourNode = _colourTable(scene, name, classes)
        temporary.append(colourNode)
        labelNode = mrml.volumeNodeFromImage(Image(np.rint(voxels), labels.affine), f"{name} labels", scene, True)
        temporary.extend([labelNode, labelNode.GetDisplayNode()])
        labelNode.GetDisplayNode().SetAndObserveColorNodeID(colourNode.GetID())
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        if referenceVolume is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
            if scene.IsNodePresent(referenceVolume):
                role = segmentation.GetReferenceImageGeometryReferenceRole()
                segmentation.SetNodeReferenceID(role, referenceVolume.GetID())
        if not mrml.moduleLogic("segmentations", scene).ImportLabelmapToSegmentationNode(labelNode, segmentation):
            raise RuntimeError(f"{name}: Slicer could not import the label map into a segmentation")
        _nameSegmentIds(segmentation.GetSegmentation())
    except BaseException:
        if segmentation is not None:
            temporary.extend([segmentation.GetDisplayNode(), segmentation])
        raise
    finally:
        mrml._removeNodes(scene, reversed(temporary))
    return segmentation
