"""Tissue volumes against age: the rows of the subject's real scans and of a result's
generated volumes (no MRML), and their tables and plot chart in the scene."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer

from LongitudinalDiffusionLib.imaging import Image, load_image

from . import mrml
from .resultnodes import GENERATED_ATTRIBUTE, KIND_ATTRIBUTE

if TYPE_CHECKING:
    from .segmenters import Segmenter

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
