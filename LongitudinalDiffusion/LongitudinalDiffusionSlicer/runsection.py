"""The panel's Run section: Apply and Cancel, the packages a local run needs, the consent to
upload for a remote run, polling the run into the progress bar and the log, and placing its
results in the scene one step per turn of Qt's event loop."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError

from .panelkit import _, _enum
from .runrequest import RunRequest

logger = logging.getLogger(__name__)

#: Pause between two steps of placing results (ms): the event loop runs in between.
PLACE_STEP_DELAY_MS = 1


class RunSection:
    """A run's life in the panel (a part of :class:`~.panel.Panel`).

    Uses the panel's ``ui``, ``qt``, ``_timer``, ``_runFactory``, ``_resultPlacer``,
    ``_uploadConsent``, ``_dependencyInstaller``, the ``applyRequested`` and ``runFinished``
    signals, ``request``, ``updateApplyState``, ``_readyMessage``, ``_readyText``,
    ``_showResults``, ``setStatus``, ``setProgress`` and ``appendLog``.
    """

    ui: Any
    qt: Any
    _run: Any
    _placing: Any
    _results: Any

    def isRunning(self) -> bool:
        """A run is under way (Apply shows "Cancel")."""
        return self._run is not None

    def onApply(self, *_args: Any) -> None:
        """Apply starts a run; while one runs the same button cancels it."""
        if self._run is not None:
            self.cancelRun()
            return
        if not self.updateApplyState():
            return
        request = self.request()
        if self._runFactory is None:
            if not self.applyRequested.isConnected():
                message = _(
                    "Running from the panel is not connected in this version: nothing was generated. "
                    "Use longdiff or LongitudinalDiffusionLib.tasks from the Python console."
                )
                self.appendLog(message)
                self.setStatus(message)
                return
            self.appendLog(_("Starting: {status}").format(status=self._readyMessage()))
            self.applyRequested.emit(request)
            return
        self.startRun(request)

    def startRun(self, request: RunRequest) -> Any:
        """Start ``request`` with the run factory; returns the run (None if it did not start)."""
        if request.backend == "remote" and not self._uploadConsent(request):
            self.setStatus(_("Not started: the images were not uploaded (you declined)."))
            self.appendLog(_("Remote run declined: nothing was uploaded."))
            return None
        if request.backend != "remote" and not self._installDependencies():
            return None
        for notice in request.notices:
            self.appendLog(notice)
        self.appendLog(_("Starting: {status}").format(status=self._readyText(request)))
        try:
            run = self._runFactory(request)
        except (LongitudinalDiffusionError, OSError) as exc:
            message = _("Could not start: {error}").format(error=exc)
            self.appendLog(message)
            self.setStatus(message)
            return None
        self._run = run
        self._setRunning(True)
        self.setProgress(0, 100)
        self.ui.progressBar.setFormat(_("starting..."))
        self.setStatus(_("Running: {status}").format(status=self._readyText(request)))
        self._timer.start()
        return run

    def _installDependencies(self) -> bool:
        """Make sure the packages a local run needs are there (asking first); False stops the run."""
        if self._dependencyInstaller is None:
            return True
        self.setStatus(_("Checking the Python packages local runs need..."))
        try:
            report = self._dependencyInstaller()
        except Exception as exc:  # whatever pip or the PyTorch extension raise: say it here
            logger.exception("installing the Python packages failed")
            message = _("The installation of the Python packages failed: {error}").format(error=exc)
        else:
            if report.ok:
                self._setRetryVisible(False)
                return True
            message = report.message or _("Python packages that local runs need are missing.")
        message = _("Not started: {reason}").format(reason=message)
        self.appendLog(message)
        self.setStatus(message)
        self._setRetryVisible(True)
        return False

    def _setRetryVisible(self, visible: bool) -> None:
        retry = getattr(self.ui, "installRetryButton", None)
        if retry is not None:
            retry.setVisible(visible)
            retry.setEnabled(visible)

    def isRetryOffered(self) -> bool:
        """The "Install packages and run" button is shown (after a decline or a failure)."""
        retry = getattr(self.ui, "installRetryButton", None)
        return retry is not None and not retry.isHidden()

    def onRetryInstall(self, *_args: Any) -> None:
        """Ask again to install the packages, then start the run Apply would start."""
        self._setRetryVisible(False)
        if self._run is None:
            self.onApply()

    def cancelRun(self) -> None:
        """Ask the run to stop; the panel shows "cancelled" once the backend confirms (at
        once while the results are being placed: what was placed is taken out)."""
        if self._run is None:
            return
        if self._placing is not None:
            placing, self._placing = self._placing, None
            try:
                placing.close()
            except Exception:  # a Qt callback (Cancel) must not raise: log the traceback, still end the run
                logger.exception("taking out the partly placed results failed")
            self._endRun("cancelled", "")
            return
        self._run.cancel()
        self.ui.applyButton.setEnabled(False)
        self.ui.applyButton.setText(_("Cancelling..."))
        self.setStatus(_("Cancelling: the model stops after its current step."))

    def _setRunning(self, running: bool) -> None:
        ui = self.ui
        for section in (ui.subjectCollapsibleButton, ui.taskCollapsibleButton, ui.backendCollapsibleButton):
            section.setEnabled(not running)
        ui.applyButton.setText(_("Cancel") if running else _("Apply"))
        ui.applyButton.setToolTip(
            _("Stop the run; nothing it made is kept.")
            if running
            else _(
                "Generate the images. Enabled once a subject is loaded, the task's inputs are valid and a model "
                "is selected; the line below says what is missing."
            )
        )
        if running:
            ui.applyButton.setEnabled(True)
        else:
            self.updateApplyState()

    def pollRun(self, *_args: Any) -> Any:
        """Drain the run's events into the progress bar and the log (the timer calls it)."""
        run = self._run
        if run is None or self._placing is not None:
            self._timer.stop()
            return None
        try:
            update = run.poll()
        except Exception as exc:  # a backend that broke: end the run, say why
            logger.exception("polling the run failed")
            run.cancel()
            self._endRun("failed", _("the backend stopped answering: {error}").format(error=exc))
            return None
        for line in update.log:
            self.appendLog(line)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(update.percent)
        if update.text:
            self.ui.progressBar.setFormat(f"{update.text} ({update.percent} %)")
        if not update.finished:
            return update
        if update.state == "done":
            self._placeResults(run)
        else:
            self._endRun(update.state, update.error)
        return update

    def _placeResults(self, run: Any) -> None:
        if self._resultPlacer is None:
            self._endRun("done", "")
            return
        try:
            view = self._resultPlacer(run)
        except Exception as exc:  # called from the poll timer, which must not raise: logged with its traceback
            self._placingFailed(exc)
            return
        if inspect.isgenerator(view):
            self._timer.stop()
            self._placing = view
            self.ui.progressBar.setFormat(_("placing the results in the scene..."))
            self.setStatus(_("Placing the results in the scene..."))
            self._placeStep(view)
            return
        self._placed(view)

    def _placeStep(self, placing: Any) -> None:
        """One step of the result placer's steps, then the next one on the next turn of the
        event loop (a step left over from a cancelled run does nothing)."""
        if placing is not self._placing:
            return
        try:
            next(placing)
        except StopIteration as end:
            self._placing = None
            self._placed(end.value)
            return
        except Exception as exc:  # called from a Qt timer, which must not raise: logged with its traceback
            self._placing = None
            self._placingFailed(exc)
            return
        # 1 ms rather than 0: a zero timer may run again before Qt handles paint and input events
        self.qt.QTimer.singleShot(PLACE_STEP_DELAY_MS, lambda: self._placeStep(placing))

    def _placingFailed(self, exc: Exception) -> None:
        """End the run as failed; called inside the ``except`` block, so the log has the traceback."""
        logger.exception("placing the results failed")
        self._endRun("failed", _("the results could not be put into the scene: {error}").format(error=exc))

    def _placed(self, view: Any) -> None:
        self._showResults(view)
        for message in getattr(view, "messages", []) or []:
            self.appendLog(message)
        self._endRun("done", "")

    def _endRun(self, state: str, error: str) -> None:
        self._timer.stop()
        self._run = None
        self._placing = None
        self._setRunning(False)
        if state == "done":
            self.ui.progressBar.setValue(100)
            summary = getattr(self._results, "summary", None)
            text = summary() if callable(summary) else _("Done.")
            self.ui.progressBar.setFormat(_("done (100 %)"))
            self.setStatus(_("Done: {summary}").format(summary=text))
            self.appendLog(_("Done: {summary}").format(summary=text))
        elif state == "cancelled":
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setFormat(_("cancelled"))
            reason = "" if error in ("", "cancelled") else f" ({error})"
            message = _("Cancelled{reason}: nothing was added to the scene.").format(reason=reason)
            self.setStatus(message)
            self.appendLog(message)
        else:
            self.ui.progressBar.setFormat(_("failed"))
            message = _("The run failed: {error}. Nothing was added to the scene.").format(error=error)
            self.setStatus(message)
            self.appendLog(message)
        self.runFinished.emit(state, error)

    @staticmethod
    def _askUploadConsentQt(qt: Any, request: RunRequest) -> bool:
        box = qt.QMessageBox
        answer = box.question(
            None,
            _("Upload to a remote server?"),
            _(
                "This run sends the subject's images ({count} scans of {subject}) to {url}. "
                "Only continue if you are allowed to share them with that server."
            ).format(count=len(request.subject.timepoints), subject=request.subject.subject_id, url=request.serverUrl),
            _enum(box, "StandardButton", "Ok") | _enum(box, "StandardButton", "Cancel"),
        )
        return answer == _enum(box, "StandardButton", "Ok")

    def _askUploadConsent(self, request: RunRequest) -> bool:
        return self._askUploadConsentQt(self.qt, request)
