"""A task's :class:`~LongitudinalDiffusionLib.tasks.Result` in the Slicer scene.

:func:`placeResult` turns one result into MRML nodes, all under the subject in the subject
hierarchy (one folder item per run):

* every generated volume (``generated``/``mean``) as a scalar volume on the input's exact
  geometry (the library already brought it back onto the input grid), with its
  segmentation when a tissue segmenter is given;
* the uncertainty map (``std``, drawn when several samples were averaged) as a volume with
  a colour table, ready to be shown as a colour overlay;
* every frame series (DDM frames, the completed timeline, the denoising intermediates) as a
  volume sequence with a sequence browser; its labels (the series' own, e.g. propagated
  along the deformation, or the segmenter's) as a segmentation sequence in the same browser,
  so the overlay follows the frames;
* the subject's tissue volumes against age (real scans and generated ones) as two tables
  and a plot chart, real and generated drawn differently.

The call is all or nothing: if anything fails, every node and item it made is removed. A
:class:`PlacedResult` lists what was made; :meth:`PlacedResult.remove` takes it out again.

:func:`exportScene` writes subjects and results as a ``.mrb`` scene bundle; outside the
Slicer application it bootstraps a scene on PyPI ``slicer-core`` (:mod:`.headless`).

Example (Slicer Python console)::

    from LongitudinalDiffusionLib.tasks import complete_ages
    from LongitudinalDiffusionSlicer import mrml, results
    subject = mrml.subjectFromVolumes(mrml.subjectVolumes(), "sub-001")
    result = complete_ages(subject, [7.5], "cas-diffcom-demo", steps=10)
    placed = results.placeResult(result, subject=subject, segmenter=results.TissueSegmenter())
    results.selectFrame(placed.sequences[0].browser, 3)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image, load_image

from . import mrml

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATED_ATTRIBUTE",
    "KIND_ATTRIBUTE",
    "MODEL_ATTRIBUTE",
    "RUN_ATTRIBUTE",
    "SIMULATED_TRAINING_ATTRIBUTE",
    "SYNTHETIC_ATTRIBUTE",
    "SYNTHETIC_PREFIX",
    "UNCERTAINTY_COLOR_NODE_ID",
    "PlacedResult",
    "PlacedSeries",
    "PreparedSegmentations",
    "SceneResults",
    "TissueSegmenter",
    "addFrameSequence",
    "addFrameSequenceSteps",
    "addTissueVolumePlot",
    "exportScene",
    "labelNamesFor",
    "placeResult",
    "placeResultSteps",
    "prepareSegmentations",
    "resultNodeIds",
    "runSteps",
    "segmentationFromLabels",
    "selectFrame",
    "setSegmentationDisplay",
    "syntheticAttributes",
    "tissueVolumeRows",
]

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
#: Index names of the frame sequences, by the series' unit.
_INDEX_NAMES = {"months": "age", "gamma": "gamma", "step": "step"}
_AGE_COLUMN = "Age (months)"
#: Matplotlib's tab10 colours, one per tissue in the plot.
_PLOT_COLOURS = (
    (0.12, 0.47, 0.71),
    (1.00, 0.50, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29),
)


# ------------------------------------------------------------------------------ segmenter


class TissueSegmenter:
    """Tissue labels of any scan with a catalog segmentation model (loaded on first use).

    Args:
        model: a model name of the catalog (default the bundled ``tissue-seg-brain-demo``),
            a card path or a ``LoadedModel``.
        device: where to run it (``"cpu"``, ``"cuda"``, ``"auto"``).

    Calling it with an :class:`Image` returns an int16 label :class:`Image` on the image's
    own geometry; :attr:`classes` names the values.
    """

    def __init__(self, model: Any = "tissue-seg-brain-demo", device: str = "cpu") -> None:
        self.model = model
        self.device = device
        self._loaded: Any = None

    def _load(self) -> Any:
        if self._loaded is None:
            from LongitudinalDiffusionLib.catalog import LoadedModel, load_model
            from LongitudinalDiffusionLib.diffusion import resolve_device

            model = self.model
            self._loaded = model if isinstance(model, LoadedModel) else load_model(model, resolve_device(self.device))
        return self._loaded

    @property
    def name(self) -> str:
        return self._load().card.name

    @property
    def classes(self) -> dict[int, str]:
        return dict(enumerate(self._load().config["classes"]))

    def __call__(self, image: Image) -> Image:
        import torch

        from LongitudinalDiffusionLib.segmentation import segment

        loaded = self._load()
        with torch.inference_mode():
            return segment(loaded.network, image, config=loaded.config, grid=loaded.card.card.get("grid"))


Segmenter = Callable[[Image], Image]


def labelNamesFor(labelsPath: str | os.PathLike | None) -> dict[int, str]:
    """Names of a label file's values: its BIDS ``dseg.tsv`` (see :func:`.mrml.findLabelTable`)
    or, without one, the demo brain labels."""
    if labelsPath is None:
        return {}
    table, _source = mrml._labelTableFor(Path(labelsPath))
    return {value: name for value, (name, _colour) in table.items()}


# ------------------------------------------------------------------------------ placed


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


# ------------------------------------------------------------------------------ pieces


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


def _uniqueIndexValues(times: Sequence[float]) -> list[str]:
    values: list[str] = []
    for t in times:
        text = f"{float(t):.6g}"
        while text in values:
            text += "'"
        values.append(text)
    return values


class _LazyLabels:
    """``segmenter(frames[i])`` when item ``i`` is asked for."""

    def __init__(self, segmenter: Segmenter, frames: Sequence[Image]) -> None:
        self.segmenter, self.frames = segmenter, frames

    def __getitem__(self, index: int) -> Image:
        return self.segmenter(self.frames[index])


def addFrameSequence(
    series: Any,
    name: str,
    scene: Any = None,
    *,
    segmenter: Segmenter | None = None,
    labelNames: Mapping[int, str] | None = None,
    attributes: Mapping[str, str] | None = None,
    synthetic: Mapping[str, str] | None = None,
) -> PlacedSeries:
    """A :class:`~LongitudinalDiffusionLib.tasks.FrameSeries` as a volume sequence with a browser.

    The index is the series' time (``age`` in months, ``gamma``, or the sampler ``step``).
    Its labels - the series' own (``series.labels``) or, without them, ``segmenter``'s of
    each frame - become a segmentation sequence synchronised in the same browser, so the
    overlay follows the frames. The browser shows the first frame.

    Not transactional by itself; :func:`placeResult` removes what it made on failure.
    """
    return runSteps(
        addFrameSequenceSteps(
            series, name, scene, segmenter=segmenter, labelNames=labelNames, attributes=attributes, synthetic=synthetic
        )
    )


def addFrameSequenceSteps(
    series: Any,
    name: str,
    scene: Any = None,
    *,
    segmenter: Segmenter | None = None,
    labelNames: Mapping[int, str] | None = None,
    attributes: Mapping[str, str] | None = None,
    synthetic: Mapping[str, str] | None = None,
) -> Generator[None, None, PlacedSeries]:
    """:func:`addFrameSequence` in steps: a generator that yields after each frame (and
    between a frame and its segmentation) and returns the :class:`PlacedSeries` (see
    :func:`placeResultSteps`). ``synthetic`` (:func:`syntheticAttributes`) marks the
    generated frames: their names start with ``SYNTHETIC`` and they carry its attributes."""
    scene = mrml._scene(scene)
    attributes = dict(attributes or {})
    synthetic = dict(synthetic or {})
    values = _uniqueIndexValues(series.times)
    volumeSequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} frames")
    placed = PlacedSeries(name, volumeSequence, None, None, [float(t) for t in series.times], series.unit)
    placed.generated = None if series.generated is None else [bool(g) for g in series.generated]
    volumeSequence.SetIndexName(_INDEX_NAMES.get(series.unit, "time"))
    volumeSequence.SetIndexUnit(series.unit)
    volumeSequence.SetIndexType(volumeSequence.NumericIndex)
    mrml._setAttributes(volumeSequence, {**attributes, KIND_ATTRIBUTE: "frames"})

    labels = series.labels
    classes = dict(labelNames or {})
    if labels is None and segmenter is not None:
        labels = _LazyLabels(segmenter, series.frames)  # one frame per step
        classes = {**getattr(segmenter, "classes", {}), **classes}
    segmentationSequence = None
    if labels is not None:
        segmentationSequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} segmentations")
        segmentationSequence.SetIndexName(volumeSequence.GetIndexName())
        segmentationSequence.SetIndexUnit(series.unit)
        segmentationSequence.SetIndexType(segmentationSequence.NumericIndex)
        mrml._setAttributes(segmentationSequence, {**attributes, KIND_ATTRIBUTE: "frame segmentations"})
        placed.segmentationSequence = segmentationSequence

    frameNode = None
    try:
        for i, (frame, value) in enumerate(zip(series.frames, values)):
            generated = placed.generated[i] if placed.generated is not None else True
            label = f"{name} {volumeSequence.GetIndexName()} {value}" + ("" if generated else " (real)")
            if generated and synthetic:
                label = SYNTHETIC_PREFIX + label
            if frameNode is None:
                frameNode = mrml.volumeNodeFromImage(frame, label, scene)
            else:
                frameNode.SetName(label)
                mrml._setIJKToRAS(frameNode, frame.affine)
                slicer.util.updateVolumeFromArray(frameNode, np.ascontiguousarray(frame.array.transpose(2, 1, 0)))
            frameNode.SetAttribute(GENERATED_ATTRIBUTE, "1" if generated else "0")
            for key, text in synthetic.items():  # a real frame after a generated one loses the marks
                if generated:
                    frameNode.SetAttribute(key, text)
                else:
                    frameNode.RemoveAttribute(key)
            volumeSequence.SetDataNodeAtValue(frameNode, value)
            if segmentationSequence is not None:
                yield  # the frame's segmentation in a step of its own
                segmentation = segmentationFromLabels(labels[i], classes, f"{label} segmentation", frameNode, scene)
                try:
                    segmentationSequence.SetDataNodeAtValue(segmentation, value)
                finally:
                    mrml._removeNodes(scene, [segmentation.GetDisplayNode(), segmentation])
            yield
    finally:
        if frameNode is not None:
            mrml._removeNodes(scene, [frameNode.GetDisplayNode(), frameNode])

    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    placed.browser = browser
    mrml._setAttributes(browser, {**attributes, KIND_ATTRIBUTE: "browser"})
    browser.SetAndObserveMasterSequenceNodeID(volumeSequence.GetID())
    if segmentationSequence is not None:
        browser.AddSynchronizedSequenceNodeID(segmentationSequence.GetID())
    browser.SetPlaybackActive(False)
    browser.SetSelectedItemNumber(0)
    proxyVolume = placed.proxyVolume()
    if proxyVolume is None:
        mrml.moduleLogic("sequences", scene).UpdateProxyNodesFromSequences(browser)
        proxyVolume = placed.proxyVolume()
    if proxyVolume is not None:
        allSynthetic = bool(synthetic) and (placed.generated is None or all(placed.generated))
        _nameProxy(proxyVolume, (SYNTHETIC_PREFIX if allSynthetic else "") + name, "frame",
                   {**attributes, **(synthetic if allSynthetic else {})})  # fmt: skip
    proxySegmentation = placed.proxySegmentation()
    if proxySegmentation is not None:
        _nameProxy(proxySegmentation, name, "frame segmentation", attributes)
        if proxyVolume is not None:
            role = proxySegmentation.GetReferenceImageGeometryReferenceRole()
            proxySegmentation.SetNodeReferenceID(role, proxyVolume.GetID())
    return placed


def _nameProxy(proxy: Any, name: str, kind: str, attributes: dict[str, Any]) -> None:
    """Name a sequence browser's proxy node ``"{name} {kind}"``, tag it with ``attributes`` and
    ``kind``, and give it display nodes if it has none."""
    proxy.SetName(f"{name} {kind}")
    mrml._setAttributes(proxy, {**attributes, KIND_ATTRIBUTE: kind})
    if proxy.GetDisplayNode() is None:
        proxy.CreateDefaultDisplayNodes()


def selectFrame(browser: Any, index: int) -> Any:
    """Show frame ``index`` (clamped to the sequence) in ``browser``; returns its proxy volume.

    Playback stops first, as the sequence module does before a seek.
    """
    browser.SetPlaybackActive(False)
    count = browser.GetNumberOfItems()
    if count:
        browser.SetSelectedItemNumber(max(0, min(int(index), count - 1)))
    master = browser.GetMasterSequenceNode()
    return browser.GetProxyNode(master) if master is not None else None


def setSegmentationDisplay(
    placed: PlacedResult, visible: bool | None = None, opacity: float | None = None, scene: Any = None
) -> int:
    """Show or hide the result's segmentations (frame overlays included) and set their opacity.

    Returns:
        how many segmentation display nodes were changed.
    """
    segmentations = list(placed.segmentationNodes.values())
    segmentations += [s.proxySegmentation() for s in placed.sequences if s.proxySegmentation() is not None]
    changed = 0
    for segmentation in segmentations:
        display = segmentation.GetDisplayNode()
        if display is None:
            continue
        if visible is not None:
            display.SetVisibility(bool(visible))
        if opacity is not None:
            value = float(min(max(opacity, 0.0), 1.0))
            display.SetOpacity2DFill(value * 0.5)
            display.SetOpacity2DOutline(value)
            display.SetOpacity3D(value)
        changed += 1
    return changed


# --------------------------------------------------------------------------- the view


def _showInSliceViews(background: Any = None, foreground: Any = None, foregroundOpacity: float | None = None) -> None:
    """Slicer's slice views show these volumes (nothing happens without the application)."""
    if getattr(slicer, "app", None) is None:
        return
    kwargs: dict[str, Any] = {}
    if background is not None:
        kwargs["background"] = background
    if foreground is not None or foregroundOpacity is not None:
        kwargs["foreground"] = foreground
        kwargs["foregroundOpacity"] = 0.0 if foreground is None else foregroundOpacity
    if kwargs:
        slicer.util.setSliceViewerLayers(**kwargs)


def _showChartInLayout(chart: Any) -> None:
    if getattr(slicer, "app", None) is not None and chart is not None:
        mrml.moduleLogic("plots").ShowChartInLayout(chart)


class SceneResults:
    """What the panel's Results section works on: the placed results of one run.

    Frame series are numbered across the results (``seriesNames()``); selecting a frame
    moves its sequence browser (the proxy volume and segmentation follow). In the Slicer
    application the slice views show the selected frame, and the uncertainty map as a
    colour overlay; elsewhere the same state is kept in :attr:`background` and
    :attr:`foreground` (for tests and screenshots).
    """

    def __init__(self, placed: Sequence[PlacedResult], scene: Any = None) -> None:
        self.placed = list(placed)
        self.scene = mrml._scene(scene)
        self.background: Any = None
        self.foreground: Any = None
        self.messages = [m for p in self.placed for m in p.messages]
        self._series = [(p, s) for p in self.placed for s in p.sequences]
        if self.placed and self.placed[0].volumeNodes:
            self.background = self.placed[0].volumeNodes[0]
            _showInSliceViews(background=self.background)

    # frames
    def seriesNames(self) -> list[str]:
        return [f"{s.name} ({len(s.times)} frames)" for _p, s in self._series]

    def series(self, index: int) -> PlacedSeries:
        return self._series[index][1]

    def frameCount(self, index: int) -> int:
        return self.series(index).browser.GetNumberOfItems()

    def selectedFrame(self, index: int) -> int:
        return max(0, self.series(index).browser.GetSelectedItemNumber())

    def selectFrame(self, index: int, frame: int) -> Any:
        series = self.series(index)
        proxy = selectFrame(series.browser, frame)
        if proxy is not None and proxy is not self.background:
            self.background = proxy
            _showInSliceViews(background=proxy)
        return proxy

    def frameDescription(self, index: int, frame: int) -> str:
        series = self.series(index)
        if not series.times:
            return "-"
        frame = max(0, min(int(frame), len(series.times) - 1))
        time = series.times[frame]
        unit = {"months": "mo", "gamma": "", "step": ""}.get(series.unit, series.unit)
        what = {"gamma": "\u03b3 ", "step": "step "}.get(series.unit, "")
        text = f"{frame + 1}/{len(series.times)}: {what}{time:g}{(' ' + unit) if unit else ''}"
        if series.generated is not None:
            text += " (generated)" if series.generated[frame] else " (real)"
        return text

    # overlays
    def hasSegmentations(self) -> bool:
        return any(p.segmentationNodes or any(s.segmentationSequence for s in p.sequences) for p in self.placed)

    def setSegmentationDisplay(self, visible: bool, opacity: float) -> None:
        for placed in self.placed:
            setSegmentationDisplay(placed, visible, opacity, self.scene)

    def hasUncertainty(self) -> bool:
        return any(p.uncertaintyNodes for p in self.placed)

    def setUncertaintyVisible(self, visible: bool) -> None:
        maps = [n for p in self.placed for n in p.uncertaintyNodes]
        self.foreground = maps[0] if visible and maps else None
        _showInSliceViews(foreground=self.foreground, foregroundOpacity=0.5)

    # chart
    def hasChart(self) -> bool:
        return any(p.chartNode is not None for p in self.placed)

    def showChart(self) -> Any:
        chart = next((p.chartNode for p in self.placed if p.chartNode is not None), None)
        _showChartInLayout(chart)
        return chart

    def summary(self) -> str:
        volumes = sum(len(p.volumeNodes) for p in self.placed)
        maps = sum(len(p.uncertaintyNodes) for p in self.placed)
        frames = sum(len(s.times) for _p, s in self._series)
        parts = [f"{volumes} generated volume(s)"]
        if maps:
            parts.append(f"{maps} uncertainty map(s)")
        if self._series:
            parts.append(f"{len(self._series)} frame sequence(s), {frames} frames")
        if self.hasSegmentations():
            parts.append("segmentations")
        if self.hasChart():
            parts.append("a tissue volume chart")
        where = ", ".join(dict.fromkeys(p.name for p in self.placed))
        return f"{', '.join(parts)} ({where})"

    def remove(self) -> None:
        """Take every result of the run out of the scene."""
        for placed in reversed(self.placed):
            placed.remove(self.scene)
        self.placed, self._series = [], []


# ---------------------------------------------------------------------- tissue volumes


def tissueVolumeRows(
    subject: Any,
    result: Any,
    segmenter: Segmenter | None,
    modality: str | None = None,
    segmentations: Mapping[int, Image] | None = None,
) -> list[dict[str, Any]]:
    """Tissue volume rows (``trajectory.volume_rows`` format) of the subject's real scans and
    the result's generated volumes.

    Real scans are of ``modality`` (default the result's): segmented by ``segmenter`` when
    given, else from their own label files mapped to the brain classes. Generated volumes
    need ``segmenter`` (or their label maps in ``segmentations``, keyed by ``id`` of the
    :class:`ResultImage`).
    """
    from LongitudinalDiffusionLib.trajectory import volume_rows

    segmentations = dict(segmentations or {})
    generated = [r for r in result.images if r.kind in ("generated", "mean")]
    modality = modality or next((r.modality for r in generated if r.modality), None)
    classes = getattr(segmenter, "classes", None)
    rows: list[dict[str, Any]] = []
    subjectId = getattr(subject, "subject_id", "subject")
    if subject is not None:
        for tp in subject.timepoints:
            if modality is not None and tp.modality.value != modality:
                continue
            if segmenter is not None:
                image = tp.image if tp.image is not None else load_image(tp.source)
                labels = segmenter(image)
            elif tp.labels is not None:
                from LongitudinalDiffusionLib.segmentation import BRAIN_CLASSES, map_labels

                raw = load_image(tp.labels, dtype=np.int16)
                labels = Image(map_labels(raw.array).astype(np.int16), raw.affine)
                classes = classes or BRAIN_CLASSES
            else:
                continue
            rows += volume_rows(subjectId, tp.age, labels, classes or {}, generated=False)
    for r in generated:
        if r.age is None:
            continue
        labels = segmentations.get(id(r))
        if labels is None and segmenter is not None:
            labels = segmenter(r.image)
        if labels is not None:
            rows += volume_rows(subjectId, r.age, labels, classes or {}, generated=True)
    return rows


def addTissueVolumePlot(rows: Iterable[Mapping[str, Any]], name: str, scene: Any = None) -> tuple[dict, Any, list]:
    """Tables of tissue volumes by age (one for real scans, one for generated) and a chart.

    Each tissue is one colour; real scans are circles joined by a line, generated ones
    squares without a line.

    Returns:
        ``({"real": table, "generated": table}, chart, [plot series])``; tables only for the
        kinds present. Not transactional by itself.
    """
    scene = mrml._scene(scene)
    rows = list(rows)
    tissues = list(dict.fromkeys(r["tissue"] for r in rows))
    tables: dict[str, Any] = {}
    for kind, flag in (("real", False), ("generated", True)):
        chosen = [r for r in rows if bool(r["generated"]) is flag]
        if not chosen:
            continue
        ages = sorted({float(r["age_months"]) for r in chosen})
        array = np.full((len(ages), 1 + len(tissues)), np.nan)
        array[:, 0] = ages
        for r in chosen:
            array[ages.index(float(r["age_months"])), 1 + tissues.index(r["tissue"])] = float(r["volume_ml"])
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} tissue volumes ({kind})")
        slicer.util.updateTableFromArray(table, array, [_AGE_COLUMN, *[f"{t} (ml)" for t in tissues]])
        table.SetAttribute(KIND_ATTRIBUTE, f"tissue volumes {kind}")
        tables[kind] = table
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} tissue volumes")
    chart.SetTitle("Tissue volumes by age")
    chart.SetXAxisTitle(_AGE_COLUMN)
    chart.SetYAxisTitle("Volume (ml)")
    chart.SetAttribute(KIND_ATTRIBUTE, "tissue volume chart")
    seriesNodes = []
    for t, tissue in enumerate(tissues):
        colour = _PLOT_COLOURS[t % len(_PLOT_COLOURS)]
        for kind, table in tables.items():
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{tissue} ({kind})")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName(_AGE_COLUMN)
            series.SetYColumnName(f"{tissue} (ml)")
            series.SetPlotType(series.PlotTypeScatter)
            series.SetColor(*colour)
            if kind == "real":
                series.SetMarkerStyle(series.MarkerStyleCircle)
                series.SetLineStyle(series.LineStyleSolid)
                series.SetMarkerSize(7)
            else:
                series.SetMarkerStyle(series.MarkerStyleSquare)
                series.SetLineStyle(series.LineStyleNone)
                series.SetMarkerSize(11)
            series.SetAttribute(GENERATED_ATTRIBUTE, "1" if kind == "generated" else "0")
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
            seriesNodes.append(series)
    return tables, chart, seriesNodes


# ------------------------------------------------------------------------- placement


def _subjectItem(shNode: Any, subjectId: str) -> int:
    """The subject item of ``subjectId`` (made by :func:`.mrml.loadSubjectIntoScene`), or a new one."""
    children = vtk.vtkIdList()
    shNode.GetItemChildren(shNode.GetSceneItemID(), children, False)
    for i in range(children.GetNumberOfIds()):
        item = children.GetId(i)
        if shNode.GetItemAttribute(item, mrml.SUBJECT_ATTRIBUTE) == subjectId:
            return item
    item = shNode.CreateSubjectItem(shNode.GetSceneItemID(), subjectId)
    shNode.SetItemAttribute(item, mrml.SUBJECT_ATTRIBUTE, subjectId)
    return item


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


def _runName(result: Any) -> str:
    model = result.provenance.model if result.provenance is not None else "?"
    return f"{result.task} ({model})"


def placeResult(
    result: Any,
    scene: Any = None,
    *,
    subject: Any = None,
    subjectId: str | None = None,
    segmenter: Segmenter | None = None,
    labelNames: Mapping[int, str] | None = None,
    name: str | None = None,
    tissuePlot: bool = True,
    checkCancel: Callable[[], None] | None = None,
) -> PlacedResult:
    """Put a task's result into the scene under its subject (see the module doc).

    Args:
        result: a ``tasks.Result``.
        scene: target scene (default ``slicer.mrmlScene``).
        subject: the library ``Subject`` the result was made for (its real scans go into the
            tissue volume plot; ``subject.meta["scene_nodes"]`` names its input volumes).
        subjectId: the subject hierarchy subject to place it under (default the subject's ID,
            else the provenance's first input); made when it does not exist.
        segmenter: labels any image (e.g. :class:`TissueSegmenter`, or the
            :class:`PreparedSegmentations` of :func:`prepareSegmentations`): segmentations of the
            generated volumes and of frames without their own labels, and the tissue plot.
        labelNames: names of the values of the series' own labels.
        name: the folder's name (default ``"<task> (<model>)"``).
        tissuePlot: add the tissue volume tables and chart (when there are labels to measure).
        checkCancel: called between steps; raising from it stops and undoes the placement.

    Returns:
        the :class:`PlacedResult`.

    Raises:
        whatever fails; every node and item made so far is removed first.
    """
    return runSteps(
        placeResultSteps(
            result,
            scene,
            subject=subject,
            subjectId=subjectId,
            segmenter=segmenter,
            labelNames=labelNames,
            name=name,
            tissuePlot=tissuePlot,
            checkCancel=checkCancel,
        )
    )


def runSteps(steps: Generator[None, None, Any]) -> Any:
    """Run a generator of steps (:func:`placeResultSteps`, ...) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def placeResultSteps(
    result: Any,
    scene: Any = None,
    *,
    subject: Any = None,
    subjectId: str | None = None,
    segmenter: Segmenter | None = None,
    labelNames: Mapping[int, str] | None = None,
    name: str | None = None,
    tissuePlot: bool = True,
    checkCancel: Callable[[], None] | None = None,
) -> Generator[None, None, PlacedResult]:
    """:func:`placeResult` in steps, for a GUI: a generator that yields after each unit of
    work (a volume with its segmentation, a frame, the chart) so that the caller can let its
    event loop run in between, and returns the :class:`PlacedResult`.

    Each step takes tens of milliseconds for the demo models' volumes when the labels were
    prepared ahead (:func:`prepareSegmentations`, off the GUI thread); with a plain segmenter
    a step also runs it once. Closing the generator before its end (``close()``) undoes the
    placement, as a failure does: every node and item made so far is removed.
    """
    scene = mrml._scene(scene)
    name = name or _runName(result)
    subjectId = subjectId or getattr(subject, "subject_id", None) or "results"
    inputIds = list((getattr(subject, "meta", None) or {}).get("scene_nodes", []))
    check = checkCancel or (lambda: None)
    beforeIds = mrml._nodeIds(scene)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    subjectExisted = False
    children = vtk.vtkIdList()
    shNode.GetItemChildren(shNode.GetSceneItemID(), children, False)
    for i in range(children.GetNumberOfIds()):
        if shNode.GetItemAttribute(children.GetId(i), mrml.SUBJECT_ATTRIBUTE) == subjectId:
            subjectExisted = True
    subjectItem = _subjectItem(shNode, subjectId)
    folderItem = shNode.CreateFolderItem(subjectItem, name)
    shNode.SetItemAttribute(folderItem, RUN_ATTRIBUTE, name)
    placed = PlacedResult(name, folderItem)
    attributes = {RUN_ATTRIBUTE: name, mrml.SUBJECT_ATTRIBUTE: subjectId}
    synthetic = syntheticAttributes(result)
    others: set[str] = set()  # nodes added to the scene by others between two steps: not ours to undo

    def pause() -> Generator[None, None, None]:
        ids = mrml._nodeIds(scene)
        try:
            yield
        finally:  # also when closed here
            others.update(mrml._nodeIds(scene) - ids)

    try:
        labelsOf: dict[int, Image] = {}
        for r in result.images:
            check()
            kind = r.kind
            if kind == "labels":
                continue
            node = mrml.volumeNodeFromImage(r.image, SYNTHETIC_PREFIX + r.name, scene)
            mrml._setAttributes(
                node,
                {
                    **attributes,
                    **synthetic,
                    KIND_ATTRIBUTE: kind,
                    GENERATED_ATTRIBUTE: "1",
                    mrml.AGE_ATTRIBUTE: None if r.age is None else repr(float(r.age)),
                    mrml.MODALITY_ATTRIBUTE: r.modality,
                },
            )
            mrml._placeInHierarchy(shNode, node, folderItem)
            if kind == "std":
                display = node.GetDisplayNode()
                display.SetAndObserveColorNodeID(UNCERTAINTY_COLOR_NODE_ID)
                display.AutoWindowLevelOn()
                placed.uncertaintyNodes.append(node)
                yield from pause()
                continue
            placed.volumeNodes.append(node)
            yield from pause()
            check()
            labels, classes = _generatedLabels(result, r, segmenter, labelNames)
            if labels is not None:
                labelsOf[id(r)] = labels
                segmentation = segmentationFromLabels(
                    labels, classes, f"{SYNTHETIC_PREFIX}{r.name} segmentation", node, scene
                )
                mrml._setAttributes(segmentation, {**attributes, **synthetic, KIND_ATTRIBUTE: "segmentation"})
                mrml._placeInHierarchy(shNode, segmentation, folderItem)
                placed.segmentationNodes[node.GetID()] = segmentation
            yield from pause()
        for series in result.series:
            check()
            seriesName = f"{subjectId} {series.name}"
            steps = addFrameSequenceSteps(
                series,
                seriesName,
                scene,
                segmenter=segmenter if series.unit != "step" else None,
                labelNames=labelNames,
                attributes=attributes,
                synthetic=synthetic,
            )
            while True:
                try:
                    next(steps)
                except StopIteration as end:
                    seriesPlaced = end.value
                    break
                yield from pause()
                check()
            placed.sequences.append(seriesPlaced)
            for node in seriesPlaced.nodes():
                mrml._placeInHierarchy(shNode, node, folderItem)
            yield from pause()
        check()
        if tissuePlot and (segmenter is not None or labelsOf):
            rows = segmenter.tissueRows(result) if isinstance(segmenter, PreparedSegmentations) else None
            if rows is None:
                rows = tissueVolumeRows(subject, result, segmenter, segmentations=labelsOf)
            if rows:
                tables, chart, seriesNodes = addTissueVolumePlot(rows, subjectId, scene)
                placed.tableNodes, placed.chartNode, placed.plotSeriesNodes = tables, chart, seriesNodes
                for node in [*tables.values(), chart]:
                    mrml._setAttributes(node, attributes)
                    mrml._placeInHierarchy(shNode, node, folderItem)
                for node in seriesNodes:
                    mrml._setAttributes(node, attributes)
        for transform in getattr(result, "transforms", None) or []:
            check()
            node = transformNode(transform, scene)
            mrml._setAttributes(node, attributes)
            mrml._placeInHierarchy(shNode, node, folderItem)
            placed.transformNodes.append(node)
        missing = [i for i in inputIds if scene.GetNodeByID(i) is None]
        if missing:
            placed.messages.append(
                f"{len(missing)} input volume(s) were removed from the scene during the run; "
                "the results are placed under the subject without them"
            )
    except BaseException:  # a failure, or the generator closed before its end: undo
        mrml._removeNewNodes(scene, beforeIds | others)
        if shNode.GetItemName(folderItem):
            shNode.RemoveItem(folderItem, False, True)
        if not subjectExisted and shNode.GetItemName(subjectItem):
            shNode.RemoveItem(subjectItem, False, True)
        raise
    logger.info(
        "%s: %d volumes, %d uncertainty maps, %d segmentations, %d frame sequences%s",
        name,
        len(placed.volumeNodes),
        len(placed.uncertaintyNodes),
        len(placed.segmentationNodes),
        len(placed.sequences),
        ", tissue volume chart" if placed.chartNode is not None else "",
    )
    return placed


def _generatedLabels(
    result: Any, r: Any, segmenter: Segmenter | None, labelNames: Mapping[int, str] | None
) -> tuple[Image | None, dict[int, str]]:
    """The labels of a generated image ``r`` of ``result`` and their names: those the task
    made for its age (e.g. carried along a deformation), else ``segmenter``'s, else None."""
    labels = None
    for other in result.images:
        if other.kind == "labels" and other.age == r.age:
            labels = other.image
    classes = dict(labelNames or {})
    if labels is None and segmenter is not None:
        labels = segmenter(r.image)
        classes = {**getattr(segmenter, "classes", {}), **classes}
    return labels, classes


# ------------------------------------------------------------------- prepared labels


class PreparedSegmentations:
    """A segmenter whose answers for the images of some results were computed ahead.

    :func:`prepareSegmentations` fills it away from the GUI thread (it touches no MRML);
    :func:`placeResult` / :func:`placeResultSteps` then use it as their ``segmenter``: the
    prepared images' labels and each prepared result's tissue volume rows are looked up,
    any other image is segmented on the spot by the wrapped segmenter.
    """

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self._labels: dict[int, tuple[Image, Image]] = {}  # id(image) -> (image, labels)
        self._rows: dict[int, tuple[Any, list[dict[str, Any]]]] = {}  # id(result) -> (result, rows)

    @property
    def classes(self) -> dict[int, str]:
        return dict(getattr(self.segmenter, "classes", {}) or {})

    def __call__(self, image: Image) -> Image:
        entry = self._labels.get(id(image))
        if entry is not None and entry[0] is image:
            return entry[1]
        return self.segmenter(image)

    def prepare(self, image: Image) -> Image:
        """Segment ``image`` now and keep its labels (the image is kept too, so its id stays its own)."""
        labels = self(image)
        self._labels[id(image)] = (image, labels)
        return labels

    def keepTissueRows(self, result: Any, rows: list[dict[str, Any]]) -> None:
        """Keep the tissue volume rows of ``result`` (see :func:`tissueVolumeRows`)."""
        self._rows[id(result)] = (result, rows)

    def tissueRows(self, result: Any) -> list[dict[str, Any]] | None:
        """The tissue volume rows prepared for ``result`` (None if it was not prepared)."""
        entry = self._rows.get(id(result))
        return entry[1] if entry is not None and entry[0] is result else None


def prepareSegmentations(
    results: Sequence[Any],
    subject: Any,
    segmenter: Segmenter,
    *,
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
) -> PreparedSegmentations:
    """Everything :func:`placeResult` would ask ``segmenter`` for, computed now: the labels of
    the generated volumes and of the frames without labels of their own, and the tissue
    volume rows (the real scans of ``subject`` included, each segmented once). Touches no
    MRML, so it can run on a background thread while the GUI stays responsive.

    Args:
        results: ``tasks.Result`` objects, as they will be placed.
        subject: the library ``Subject`` they were made for (as given to :func:`placeResult`).
        segmenter: e.g. :class:`TissueSegmenter`.
        progress: receives a ``ProgressEvent`` per image (stage "segmenting the results").
        cancel: a ``CancelToken``, checked between images.

    Raises:
        Cancelled: ``cancel`` was set.
    """
    from LongitudinalDiffusionLib.progress import Stage

    prepared = PreparedSegmentations(segmenter)
    images, scans = [], set()
    for result in results:
        generated = _generatedImages(result)
        images += [r.image for r in generated if _generatedLabels(result, r, None, None)[0] is None]
        images += [f for s in result.series if s.unit != "step" and s.labels is None for f in s.frames]
        modality = next((r.modality for r in generated if r.modality), None)
        scans |= {id(tp) for tp in getattr(subject, "timepoints", None) or [] if modality in (None, tp.modality.value)}
    images = list({id(image): image for image in images}.values())  # a generated volume is a frame too
    stage = Stage("segmenting the results", len(images) + len(scans), progress, cancel).start()
    for image in images:
        prepared.prepare(image)
        stage.advance()
    realScans = _ScanLabels(segmenter, stage)
    for result in results:
        labelsOf = {id(r): _generatedLabels(result, r, prepared, None)[0] for r in _generatedImages(result)}
        rows = tissueVolumeRows(subject, result, realScans, segmentations=labelsOf)
        prepared.keepTissueRows(result, rows)
    return prepared


def _generatedImages(result: Any) -> list[Any]:
    """The result's images that :func:`placeResult` segments (not labels, not spread maps)."""
    return [r for r in result.images if r.kind not in ("labels", "std")]


class _ScanLabels:
    """The segmenter for the subject's real scans: each file once (every result's tissue
    rows read the same scans), one step of ``stage`` each."""

    def __init__(self, segmenter: Segmenter, stage: Any) -> None:
        self.segmenter, self.stage = segmenter, stage
        self._done: dict[Any, tuple[Image, Image]] = {}  # file (or image id) -> (image, labels)

    @property
    def classes(self) -> dict[int, str]:
        return dict(getattr(self.segmenter, "classes", {}) or {})

    def __call__(self, image: Image) -> Image:
        source = (image.meta or {}).get("source")  # a scan read from its file for each result
        key = source if source is not None else id(image)  # else the scan's own image, kept
        done = self._done.get(key)
        if done is not None and (source is not None or done[0] is image):
            return done[1]
        self.stage.check()
        labels = self.segmenter(image)
        self.stage.advance()
        self._done[key] = (image, labels)
        return labels


# ----------------------------------------------------------------------------- export


def exportScene(
    path: str | os.PathLike,
    results: Sequence[Any],
    *,
    subjects: Sequence[Any] = (),
    segmenter: Segmenter | None = None,
    labelNames: Mapping[int, str] | None = None,
) -> Path:
    """Write subjects and task results as a Slicer scene bundle (``.mrb``), atomically.

    Inside the Slicer application this uses a scene of its own, never the user's; elsewhere
    it needs PyPI ``slicer-core``. Each subject is loaded with its subject hierarchy and
    segmentations (:func:`.mrml.loadSubjectIntoScene`), then each result is placed under
    its subject (:func:`placeResult`: volumes, frame sequences and browsers, segmentations,
    tissue volume chart).

    Args:
        path: the ``.mrb`` to write.
        results: ``tasks.Result`` objects, or ``(result, subject_or_None)`` pairs.
        subjects: subjects to load (results name their subject by pairing).
        segmenter: tissue segmenter for the generated images (see :class:`TissueSegmenter`).
        labelNames: names of the values of the results' own labels.

    Returns:
        ``path``.
    """
    from . import headless

    if Path(path).suffix.lower() != ".mrb":
        raise InputError(path, "a scene bundle's name must end in .mrb")
    previousScene = getattr(slicer, "mrmlScene", None)
    # A scene of its own, also inside Slicer (the user's scene is left alone).
    app = headless.bootstrapScene(makeCurrent=not headless.inSlicerApplication())
    scene = app.scene
    try:
        for subject in subjects:
            mrml.loadSubjectIntoScene(subject, scene)
        for entry in results:
            result, subject = entry if isinstance(entry, tuple) else (entry, None)
            placeResult(result, scene, subject=subject, segmenter=segmenter, labelNames=labelNames)
        return mrml.sceneToMrb(scene, path)
    finally:
        app.close()
        if previousScene is not None:
            slicer.mrmlScene = previousScene
