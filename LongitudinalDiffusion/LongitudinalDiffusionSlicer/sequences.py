"""Frame series in the scene: a series' frames as a volume sequence, its labels as a
segmentation sequence synchronised in the same sequence browser (so the overlay follows
the frames), and moving the browser to a frame."""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer

from LongitudinalDiffusionLib.imaging import Image

from . import mrml
from .resultnodes import (
    GENERATED_ATTRIBUTE,
    KIND_ATTRIBUTE,
    SYNTHETIC_PREFIX,
    PlacedSeries,
    runSteps,
    segmentationFromLabels,
)

if TYPE_CHECKING:
    from .segmenters import Segmenter

#: Index names of the frame sequences, by the series' unit.
_INDEX_NAMES = {"months": "age", "gamma": "gamma", "step": "step"}


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
    :func:`~.results.placeResultSteps`). ``synthetic`` (:func:`~.resultnodes.syntheticAttributes`)
    marks the generated frames: their names start with ``SYNTHETIC`` and they carry its
    attributes."""
    scene = mrml._scene(scene)
    attributes = dict(attributes or {})
    synthetic = dict(synthetic or {})
    placed = _newSequences(
        series, name, scene, attributes, hasLabels=series.labels is not None or segmenter is not None
    )
    labels = series.labels
    classes = dict(labelNames or {})
    if labels is None and segmenter is not None:
        labels = _LazyLabels(segmenter, series.frames)  # one frame per step
        classes = {**getattr(segmenter, "classes", {}), **classes}
    yield from _frameSteps(series, name, scene, placed, labels, classes, synthetic)
    _addBrowser(placed, name, scene, attributes, synthetic)
    return placed


def _newSequences(series: Any, name: str, scene: Any, attributes: dict[str, str], hasLabels: bool) -> PlacedSeries:
    """The series' volume sequence, and its segmentation sequence when it has labels (both empty)."""
    volumeSequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} frames")
    placed = PlacedSeries(name, volumeSequence, None, None, [float(t) for t in series.times], series.unit)
    placed.generated = None if series.generated is None else [bool(g) for g in series.generated]
    volumeSequence.SetIndexName(_INDEX_NAMES.get(series.unit, "time"))
    volumeSequence.SetIndexUnit(series.unit)
    volumeSequence.SetIndexType(volumeSequence.NumericIndex)
    mrml._setAttributes(volumeSequence, {**attributes, KIND_ATTRIBUTE: "frames"})
    if hasLabels:
        segmentationSequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} segmentations")
        segmentationSequence.SetIndexName(volumeSequence.GetIndexName())
        segmentationSequence.SetIndexUnit(series.unit)
        segmentationSequence.SetIndexType(segmentationSequence.NumericIndex)
        mrml._setAttributes(segmentationSequence, {**attributes, KIND_ATTRIBUTE: "frame segmentations"})
        placed.segmentationSequence = segmentationSequence
    return placed


def _frameSteps(
    series: Any,
    name: str,
    scene: Any,
    placed: PlacedSeries,
    labels: Any,
    classes: dict[int, str],
    synthetic: dict[str, str],
) -> Generator[None, None, None]:
    """Copy every frame (and its segmentation) into the sequences through one scratch volume
    node, which is removed at the end; yields after each frame and before its segmentation."""
    volumeSequence, segmentationSequence = placed.volumeSequence, placed.segmentationSequence
    frameNode = None
    try:
        for i, (frame, value) in enumerate(zip(series.frames, _uniqueIndexValues(series.times))):
            generated = placed.generated[i] if placed.generated is not None else True
            label = f"{name} {volumeSequence.GetIndexName()} {value}" + ("" if generated else " (real)")
            if generated and synthetic:
                label = SYNTHETIC_PREFIX + label
            frameNode = _frameNode(frameNode, frame, label, scene)
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


def _frameNode(frameNode: Any, frame: Image, label: str, scene: Any) -> Any:
    """The scratch volume node holding ``frame``: made for the first frame, then refilled."""
    if frameNode is None:
        return mrml.volumeNodeFromImage(frame, label, scene)
    frameNode.SetName(label)
    mrml._setIJKToRAS(frameNode, frame.affine)
    slicer.util.updateVolumeFromArray(frameNode, np.ascontiguousarray(frame.array.transpose(2, 1, 0)))
    return frameNode


def _addBrowser(
    placed: PlacedSeries, name: str, scene: Any, attributes: dict[str, str], synthetic: dict[str, str]
) -> None:
    """The sequence browser of the series (at its first frame) and its named proxy nodes."""
    volumeSequence, segmentationSequence = placed.volumeSequence, placed.segmentationSequence
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
