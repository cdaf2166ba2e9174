"""The panel's Results section: the frame series and their scrubbing slider, the
segmentation overlay, the uncertainty map and the tissue volume chart of the last run."""

from __future__ import annotations

from typing import Any

from .panelkit import _


class ResultsSection:
    """The view of the last run's results (a part of :class:`~.panel.Panel`).

    Works on a result view such as :class:`~.resultview.SceneResults`; uses the panel's ``ui``.
    """

    ui: Any
    _results: Any

    def results(self) -> Any:
        """The view of the last run's results (None before the first finished run)."""
        return self._results

    def _showResults(self, view: Any) -> None:
        ui = self.ui
        self._results = view
        names = list(view.seriesNames()) if view is not None else []
        ui.seriesComboBox.blockSignals(True)
        ui.seriesComboBox.clear()
        for name in names:
            ui.seriesComboBox.addItem(name)
        ui.seriesComboBox.blockSignals(False)
        hasSeries = bool(names)
        for widget in (ui.seriesLabel, ui.seriesComboBox, ui.frameSlider, ui.frameLabel):
            widget.setEnabled(hasSeries)
        hasSegmentation = view is not None and view.hasSegmentations()
        ui.segmentationVisibleCheckBox.setEnabled(hasSegmentation)
        ui.segmentationOpacitySlider.setEnabled(hasSegmentation)
        ui.uncertaintyCheckBox.setEnabled(view is not None and view.hasUncertainty())
        ui.uncertaintyCheckBox.setChecked(False)
        ui.showChartButton.setEnabled(view is not None and view.hasChart())
        if view is None:
            ui.resultsPlaceholderLabel.setText(
                _("No results yet. Generated images appear here after a run, with the scans they were made from.")
            )
            ui.frameLabel.setText("-")
            return
        ui.resultsPlaceholderLabel.setText(view.summary())
        ui.resultsCollapsibleButton.setProperty("collapsed", False)
        if hasSeries:
            ui.seriesComboBox.setCurrentIndex(0)
            self.onSeriesChanged()
        if hasSegmentation:
            self.onSegmentationDisplayChanged()

    def currentSeries(self) -> int:
        index = self.ui.seriesComboBox.property("currentIndex")
        return index if isinstance(index, int) else -1

    def onSeriesChanged(self, *_args: Any) -> None:
        view, index = self._results, self.currentSeries()
        if view is None or index < 0:
            return
        count = view.frameCount(index)
        slider = self.ui.frameSlider
        slider.blockSignals(True)
        slider.setRange(0, max(count - 1, 0))
        slider.setValue(view.selectedFrame(index))
        slider.blockSignals(False)
        self.onFrameChanged()

    def onFrameChanged(self, *_args: Any) -> None:
        """The slider moved: select that frame in the sequence browser (the proxy follows)."""
        view, index = self._results, self.currentSeries()
        if view is None or index < 0:
            return
        frame = int(self.ui.frameSlider.property("value"))
        view.selectFrame(index, frame)
        self.ui.frameLabel.setText(view.frameDescription(index, frame))

    def setFrame(self, frame: int) -> None:
        """Move the frame slider (and so the browser) to ``frame``."""
        self.ui.frameSlider.setValue(int(frame))

    def onSegmentationDisplayChanged(self, *_args: Any) -> None:
        if self._results is None:
            return
        visible = bool(self.ui.segmentationVisibleCheckBox.property("checked"))
        opacity = int(self.ui.segmentationOpacitySlider.property("value")) / 100.0
        self._results.setSegmentationDisplay(visible, opacity)

    def onUncertaintyToggled(self, *_args: Any) -> None:
        if self._results is not None:
            self._results.setUncertaintyVisible(bool(self.ui.uncertaintyCheckBox.property("checked")))

    def onShowChart(self, *_args: Any) -> None:
        if self._results is not None:
            self._results.showChart()
