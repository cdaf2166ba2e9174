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

This module places a result; the pieces are in modules of their own, and every name listed
in ``__all__`` stays importable from here:

* :mod:`.resultnodes`: node attributes, :class:`PlacedResult`/:class:`PlacedSeries`,
  segmentations from label maps, transform nodes, :func:`runSteps`;
* :mod:`.sequences`: frame series as sequences with a browser, :func:`selectFrame`;
* :mod:`.segmenters`: :class:`TissueSegmenter` and the labels prepared ahead
  (:func:`prepareSegmentations`, no MRML);
* :mod:`.tissueplot`: tissue volume rows, tables and chart;
* :mod:`.resultview`: :class:`SceneResults`, the panel's view of a run's results.

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
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import slicer
import vtk

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image

from . import mrml
from .resultnodes import (
    GENERATED_ATTRIBUTE,
    KIND_ATTRIBUTE,
    MODEL_ATTRIBUTE,
    RUN_ATTRIBUTE,
    SIMULATED_TRAINING_ATTRIBUTE,
    SYNTHETIC_ATTRIBUTE,
    SYNTHETIC_PREFIX,
    UNCERTAINTY_COLOR_NODE_ID,
    PlacedResult,
    PlacedSeries,
    resultNodeIds,
    runSteps,
    segmentationFromLabels,
    syntheticAttributes,
    transformNode,
)
from .resultview import SceneResults, setSegmentationDisplay
from .segmenters import (
    PreparedSegmentations,
    Segmenter,
    TissueSegmenter,
    _generatedLabels,
    labelNamesFor,
    prepareSegmentations,
)
from .sequences import addFrameSequence, addFrameSequenceSteps, selectFrame
from .tissueplot import addTissueVolumePlot, tissueVolumeRows

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
    subjectId = subjectId or getattr(subject, "subject_id", None) or "results"
    inputIds = list((getattr(subject, "meta", None) or {}).get("scene_nodes", []))
    placement = _Placement(result, mrml._scene(scene), subjectId, name or _runName(result), checkCancel)
    try:
        labelsOf = yield from placement.images(segmenter, labelNames)
        yield from placement.series(segmenter, labelNames)
        placement.check()
        if tissuePlot and (segmenter is not None or labelsOf):
            placement.tissuePlot(subject, segmenter, labelsOf)
        placement.transforms()
        placement.noteRemovedInputs(inputIds)
    except BaseException:  # a failure, or the generator closed before its end: undo
        placement.undo()
        raise
    placement.logSummary()
    return placement.placed


class _Placement:
    """One result being placed under its subject: the folder item made for it, what was
    placed so far, and how to undo it all (:func:`placeResultSteps` runs the steps)."""

    def __init__(
        self, result: Any, scene: Any, subjectId: str, name: str, checkCancel: Callable[[], None] | None
    ) -> None:
        self.result, self.scene, self.subjectId = result, scene, subjectId
        self.check = checkCancel or (lambda: None)
        self.beforeIds = mrml._nodeIds(scene)
        self.shNode = shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        self.subjectExisted = False
        children = vtk.vtkIdList()
        shNode.GetItemChildren(shNode.GetSceneItemID(), children, False)
        for i in range(children.GetNumberOfIds()):
            if shNode.GetItemAttribute(children.GetId(i), mrml.SUBJECT_ATTRIBUTE) == subjectId:
                self.subjectExisted = True
        self.subjectItem = _subjectItem(shNode, subjectId)
        self.folderItem = shNode.CreateFolderItem(self.subjectItem, name)
        shNode.SetItemAttribute(self.folderItem, RUN_ATTRIBUTE, name)
        self.placed = PlacedResult(name, self.folderItem)
        self.attributes = {RUN_ATTRIBUTE: name, mrml.SUBJECT_ATTRIBUTE: subjectId}
        self.synthetic = syntheticAttributes(result)
        self.others: set[str] = set()  # nodes added to the scene by others between two steps: not ours to undo

    def pause(self) -> Generator[None, None, None]:
        """One step's end: the caller's event loop runs; nodes others add meanwhile are noted."""
        ids = mrml._nodeIds(self.scene)
        try:
            yield
        finally:  # also when closed here
            self.others.update(mrml._nodeIds(self.scene) - ids)

    def _file(self, node: Any) -> None:
        mrml._placeInHierarchy(self.shNode, node, self.folderItem)

    def images(
        self, segmenter: Segmenter | None, labelNames: Mapping[int, str] | None
    ) -> Generator[None, None, dict[int, Image]]:
        """The generated volumes (with their segmentations) and the uncertainty maps; returns
        the labels of the generated volumes by ``id`` of their ``ResultImage``."""
        labelsOf: dict[int, Image] = {}
        for r in self.result.images:
            self.check()
            if r.kind == "labels":
                continue
            node = self._volume(r)
            if r.kind == "std":
                display = node.GetDisplayNode()
                display.SetAndObserveColorNodeID(UNCERTAINTY_COLOR_NODE_ID)
                display.AutoWindowLevelOn()
                self.placed.uncertaintyNodes.append(node)
                yield from self.pause()
                continue
            self.placed.volumeNodes.append(node)
            yield from self.pause()
            self.check()
            labels, classes = _generatedLabels(self.result, r, segmenter, labelNames)
            if labels is not None:
                labelsOf[id(r)] = labels
                segmentation = segmentationFromLabels(
                    labels, classes, f"{SYNTHETIC_PREFIX}{r.name} segmentation", node, self.scene
                )
                mrml._setAttributes(segmentation, {**self.attributes, **self.synthetic, KIND_ATTRIBUTE: "segmentation"})
                self._file(segmentation)
                self.placed.segmentationNodes[node.GetID()] = segmentation
            yield from self.pause()
        return labelsOf

    def _volume(self, r: Any) -> Any:
        """The volume node of a result image ``r``, marked synthetic, in the run's folder."""
        node = mrml.volumeNodeFromImage(r.image, SYNTHETIC_PREFIX + r.name, self.scene)
        mrml._setAttributes(
            node,
            {
                **self.attributes,
                **self.synthetic,
                KIND_ATTRIBUTE: r.kind,
                GENERATED_ATTRIBUTE: "1",
                mrml.AGE_ATTRIBUTE: None if r.age is None else repr(float(r.age)),
                mrml.MODALITY_ATTRIBUTE: r.modality,
            },
        )
        self._file(node)
        return node

    def series(self, segmenter: Segmenter | None, labelNames: Mapping[int, str] | None) -> Generator[None, None, None]:
        """Every frame series as a sequence with its browser, a step per frame."""
        for series in self.result.series:
            self.check()
            steps = addFrameSequenceSteps(
                series,
                f"{self.subjectId} {series.name}",
                self.scene,
                segmenter=segmenter if series.unit != "step" else None,
                labelNames=labelNames,
                attributes=self.attributes,
                synthetic=self.synthetic,
            )
            while True:
                try:
                    next(steps)
                except StopIteration as end:
                    seriesPlaced = end.value
                    break
                yield from self.pause()
                self.check()
            self.placed.sequences.append(seriesPlaced)
            for node in seriesPlaced.nodes():
                self._file(node)
            yield from self.pause()

    def tissuePlot(self, subject: Any, segmenter: Segmenter | None, labelsOf: dict[int, Image]) -> None:
        """The tissue volume tables and chart (nothing when there are no rows)."""
        prepared = segmenter.tissueRows(self.result) if isinstance(segmenter, PreparedSegmentations) else None
        rows = (
            prepared
            if prepared is not None
            else tissueVolumeRows(subject, self.result, segmenter, segmentations=labelsOf)
        )
        if not rows:
            return
        tables, chart, seriesNodes = addTissueVolumePlot(rows, self.subjectId, self.scene)
        self.placed.tableNodes, self.placed.chartNode, self.placed.plotSeriesNodes = tables, chart, seriesNodes
        for node in [*tables.values(), chart]:
            mrml._setAttributes(node, self.attributes)
            self._file(node)
        for node in seriesNodes:
            mrml._setAttributes(node, self.attributes)

    def transforms(self) -> None:
        """The preprocessing's transforms, one linear transform node each."""
        for transform in getattr(self.result, "transforms", None) or []:
            self.check()
            node = transformNode(transform, self.scene)
            mrml._setAttributes(node, self.attributes)
            self._file(node)
            self.placed.transformNodes.append(node)

    def noteRemovedInputs(self, inputIds: Sequence[str]) -> None:
        """Tell the user when input volumes (``inputIds``) left the scene during the run."""
        missing = [i for i in inputIds if self.scene.GetNodeByID(i) is None]
        if missing:
            self.placed.messages.append(
                f"{len(missing)} input volume(s) were removed from the scene during the run; "
                "the results are placed under the subject without them"
            )

    def undo(self) -> None:
        """Remove every node and item this placement made (not what others added meanwhile)."""
        shNode = self.shNode
        mrml._removeNewNodes(self.scene, self.beforeIds | self.others)
        if shNode.GetItemName(self.folderItem):
            shNode.RemoveItem(self.folderItem, False, True)
        if not self.subjectExisted and shNode.GetItemName(self.subjectItem):
            shNode.RemoveItem(self.subjectItem, False, True)

    def logSummary(self) -> None:
        placed = self.placed
        logger.info(
            "%s: %d volumes, %d uncertainty maps, %d segmentations, %d frame sequences%s",
            placed.name,
            len(placed.volumeNodes),
            len(placed.uncertaintyNodes),
            len(placed.segmentationNodes),
            len(placed.sequences),
            ", tissue volume chart" if placed.chartNode is not None else "",
        )


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
