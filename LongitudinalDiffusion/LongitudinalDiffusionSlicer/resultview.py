"""What the panel's Results section works on: :class:`SceneResults`, the placed results of
one run (frame series, segmentation display, uncertainty overlay, chart), shown in Slicer's
slice views when the application runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import slicer

from . import mrml
from .resultnodes import PlacedResult, PlacedSeries
from .sequences import selectFrame


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
