"""The module panel's state and behaviour, without Slicer.

:class:`Panel` drives the widgets of ``Resources/UI/LongitudinalDiffusion.ui``: the subject
table, the task inputs, the model list and card, the backend choice and the Apply button
with a status line that says what Apply is waiting for. It takes the widgets (any object
with them as attributes, e.g. ``slicer.util.childWidgetVariables(uiWidget)``) and the
``qt`` module, and never imports ``slicer``, ``qt`` or ``ctk`` itself, so the same code runs
in Slicer (PythonQt) and in the headless tests (PySide6 through ``Testing/qt_shim.py``).

It keeps to what PythonQt and PySide6 share:

* Qt property values are read with ``widget.property("text")``: PythonQt exposes properties
  as attributes (``lineEdit.text``), PySide6 as getter methods (``lineEdit.text()``), and
  each spelling fails in the other. Setters (``setText``, ``setEnabled``) work in both.
* Signals are connected with ``signal.connect(fn)`` to handlers that accept and ignore any
  arguments (overloaded Qt5 signals may call them with either signature).
* The panel's own events (Apply, load sample, ...) are plain-Python :class:`Signal` objects:
  Qt signals declared in Python crash under PythonQt.
* Enums are ``qt.Qt.X``; class enums go through :func:`~.panelkit._enum` (``qt.QLineEdit.Password``
  in PythonQt, ``qt.QLineEdit.EchoMode.Password`` in strict PySide6).

The panel is made of one part per section, each in a module of its own, put together here
by :class:`Panel`: :mod:`.subjectsection`, :mod:`.tasksection`, :mod:`.modelsection`,
:mod:`.backendsection`, :mod:`.runsection` and :mod:`.resultssection`; what they share is in
:mod:`.panelkit` (translation, :class:`Signal`) and :mod:`.runrequest` (the task ids and
:class:`RunRequest`). The names other code uses stay importable from here.

Example (Slicer's Python console)::

    ui = slicer.util.childWidgetVariables(uiWidget)
    panel = Panel(ui, qt)
    panel.loadSubjectFrom("/data/study/sub-01")
    panel.refreshBackendInfo()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.catalog import ModelCard, list_models
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.subject import Modality, Subject, load_subject

from .backendsection import BackendSection, TorchInfo, probeTorch
from .modelsection import ModelSection, cardHtml, cardTasks
from .panelkit import CONTEXT, Signal, _, _enum, _months, fillCombo, installTranslator, selectText
from .resultssection import ResultsSection
from .runrequest import (
    COMPLETE_AGES,
    INTERPOLATE,
    PREPROCESS_CHOICES,
    SYNTHESIZE_MODALITY,
    TASKS,
    RunRequest,
    normalizeTask,
    taskLabel,
)
from .runsection import PLACE_STEP_DELAY_MS, RunSection
from .subjectsection import SubjectSection
from .tasksection import TaskSection

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_AGES",
    "CONTEXT",
    "INTERPOLATE",
    "PLACE_STEP_DELAY_MS",
    "PREPROCESS_CHOICES",
    "SYNTHESIZE_MODALITY",
    "TASKS",
    "Panel",
    "RunRequest",
    "Signal",
    "TorchInfo",
    "cardHtml",
    "cardTasks",
    "installTranslator",
    "normalizeTask",
    "probeTorch",
    "taskLabel",
]


class Panel(SubjectSection, TaskSection, ModelSection, BackendSection, RunSection, ResultsSection):
    """The panel's state and behaviour.

    Args:
        ui: the widgets as attributes (``slicer.util.childWidgetVariables`` in Slicer,
            ``qt_shim.loadUi`` in the tests).
        qt: Slicer's ``qt`` module (or the test stand-in).
        subjectLoader: reads a subject from a path (default ``load_subject``).
        modelLister: lists the installed model cards (default ``catalog.list_models``).
        torchProbe: reports the installed PyTorch (default :func:`probeTorch`).
        runFactory: starts a run for a :class:`RunRequest` and returns a :class:`~.run.Run`
            (the module's logic: a backend job per task); without it Apply emits
            ``applyRequested`` instead.
        resultPlacer: puts a finished run's results into the scene and returns a view of
            them (see :class:`~.results.SceneResults`: frame series, segmentation display,
            uncertainty overlay, chart); it removes whatever it made if it fails. It may
            instead return a generator that places them in steps and returns the view
            (``RunLogic.placeRunSteps``): the panel then runs one step per turn of Qt's event
            loop, so the application stays responsive, and Cancel closes it (which takes
            out what it placed).
        uploadConsent: asks the user before a remote run uploads the subject's images;
            returns True to go on (default: a Qt question box).
        connectionTester: ``connectionTester(url, token, modelName)`` asks the server for its
            health and description (and whether it has the chosen model) and returns a
            one-line summary, or raises
            ``LongitudinalDiffusionError`` with the reason ("Test connection"; the module's
            logic: ``RunLogic.testConnection``); without it the button emits
            ``testConnectionRequested`` instead.
        dependencyInstaller: called before a local run starts, it makes sure the Python
            packages local runs need are installed, asking the user first (the module's
            logic: ``dependencies.ensureDependencies``), and returns a report with ``ok``,
            ``message`` and ``declined``. Nothing is installed when the panel opens. A
            decline or a failure (any exception) stops the run, shows the message in the
            status line and the log, and shows the "Install packages and run" button,
            which asks again. Remote runs need none of it.
        pollIntervalMs: how often the run's events are drained (milliseconds).

    Events the module connects to (plain-Python :class:`Signal` objects):
        applyRequested(request): Apply was clicked with valid inputs (a :class:`RunRequest`).
        sampleRequested(): "Load sample subject" was clicked.
        addFromSceneRequested(node): "Add from scene" was clicked with a volume selected.
        testConnectionRequested(url, token): "Test connection" was clicked with a valid URL.
    """

    def __init__(
        self,
        ui: Any,
        qt: Any,
        *,
        subjectLoader: Callable[[Path], Subject] = load_subject,
        modelLister: Callable[[], Sequence[ModelCard]] = list_models,
        torchProbe: Callable[[], TorchInfo | None] = probeTorch,
        runFactory: Callable[[RunRequest], Any] | None = None,
        resultPlacer: Callable[[Any], Any] | None = None,
        uploadConsent: Callable[[RunRequest], bool] | None = None,
        connectionTester: Callable[[str, str, str | None], str] | None = None,
        dependencyInstaller: Callable[[], Any] | None = None,
        pollIntervalMs: int = 100,
    ) -> None:
        self.ui = ui
        self.qt = qt
        self._subjectLoader = subjectLoader
        self._modelLister = modelLister
        self._torchProbe = torchProbe
        self._subject: Subject | None = None
        self._allCards: list[ModelCard] = []
        self._cards: list[ModelCard] = []
        self._modelError: str | None = None
        self._torchInfo: TorchInfo | None = None
        self._torchChecked = False
        self._reason = ""
        self._runFactory = runFactory
        self._resultPlacer = resultPlacer
        self._uploadConsent = uploadConsent or self._askUploadConsent
        self._connectionTester = connectionTester
        self._dependencyInstaller = dependencyInstaller
        self._run: Any = None
        self._placing: Any = None  # the result placer's steps while they run
        self._results: Any = None
        # Parented to the progress bar it drives: when the panel's widgets go, the timer goes
        # with them (a timer of its own would go on calling pollRun on deleted widgets).
        self._timer = qt.QTimer(ui.progressBar)
        self._timer.setInterval(int(pollIntervalMs))
        self._timer.timeout.connect(self.pollRun)

        self.applyRequested = Signal()
        #: A run ended: ``runFinished(state, error)`` with state done, failed or cancelled.
        self.runFinished = Signal()
        self.sampleRequested = Signal()
        self.addFromSceneRequested = Signal()
        self.testConnectionRequested = Signal()
        #: The user changed a choice that is saved with the scene (:meth:`state`).
        self.stateChanged = Signal()

        self._setupWidgets()
        self._connectWidgets()
        self.setSubject(None)
        self.onBackendChanged()
        self.refreshModels()
        self.onTaskChanged()

    # ------------------------------------------------------------------------ set-up

    def _setupWidgets(self) -> None:
        qt, ui = self.qt, self.ui
        fillCombo(ui.taskComboBox, [taskLabel(t) for t in TASKS])
        fillCombo(ui.targetModalityComboBox, [m.value for m in Modality])
        fillCombo(ui.deviceComboBox, ["auto", "cuda", "cpu"])
        ui.tokenLineEdit.setEchoMode(_enum(qt.QLineEdit, "EchoMode", "Password"))
        header = ui.timepointsTable.horizontalHeader()
        header.setSectionResizeMode(0, _enum(qt.QHeaderView, "ResizeMode", "Stretch"))
        for column in (1, 2):
            header.setSectionResizeMode(column, _enum(qt.QHeaderView, "ResizeMode", "ResizeToContents"))
        ui.progressBar.setRange(0, 100)
        ui.progressBar.setValue(0)
        ui.progressBar.setTextVisible(True)
        self._setRetryVisible(False)
        self._showResults(None)

    def _connectWidgets(self) -> None:
        ui = self.ui
        ui.loadPathButton.clicked.connect(self.onLoadPath)
        ui.loadSampleButton.clicked.connect(self.onLoadSample)
        ui.addFromSceneButton.clicked.connect(self.onAddFromScene)
        ui.timepointsTable.itemSelectionChanged.connect(self.updateApplyState)
        ui.taskComboBox.currentIndexChanged.connect(self.onTaskChanged)
        ui.agesLineEdit.textChanged.connect(self.updateApplyState)
        ui.targetModalityComboBox.currentIndexChanged.connect(self.updateApplyState)
        ui.framesSpinBox.valueChanged.connect(self.updateApplyState)
        ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        ui.localRadioButton.toggled.connect(self.onBackendChanged)
        ui.remoteRadioButton.toggled.connect(self.onBackendChanged)
        ui.deviceComboBox.currentIndexChanged.connect(self.updateApplyState)
        ui.preprocessComboBox.currentIndexChanged.connect(self.updateApplyState)
        ui.serverUrlLineEdit.textChanged.connect(self.updateApplyState)
        ui.testConnectionButton.clicked.connect(self.onTestConnection)
        ui.applyButton.clicked.connect(self.onApply)
        retry = getattr(ui, "installRetryButton", None)
        if retry is not None:
            retry.clicked.connect(self.onRetryInstall)
        ui.seriesComboBox.currentIndexChanged.connect(self.onSeriesChanged)
        ui.frameSlider.valueChanged.connect(self.onFrameChanged)
        ui.segmentationVisibleCheckBox.toggled.connect(self.onSegmentationDisplayChanged)
        ui.segmentationOpacitySlider.valueChanged.connect(self.onSegmentationDisplayChanged)
        ui.uncertaintyCheckBox.toggled.connect(self.onUncertaintyToggled)
        ui.showChartButton.clicked.connect(self.onShowChart)

    # ------------------------------------------------------------------- Apply's state

    def updateApplyState(self, *_args: Any) -> bool:
        """Enable Apply when a subject is loaded, the task's inputs are valid, a model is
        selected and the backend is usable; otherwise say in the status line what is missing.

        Returns:
            whether Apply is enabled.
        """
        reason = self._blockingReason()
        ready = not reason
        self.ui.applyButton.setEnabled(ready)
        self._reason = reason
        self.setStatus(reason if reason else self._readyMessage())
        if hasattr(self, "stateChanged"):
            self.stateChanged.emit()
        return ready

    def statusReason(self) -> str:
        """Why Apply is disabled ("" when it is enabled)."""
        return self._reason

    def _blockingReason(self) -> str:
        if self._subject is None:
            return _(
                "Load a subject first: a BIDS subject folder or a manifest .tsv (Subject section), "
                "or the sample subject."
            )
        problem, _fields = self._taskInputs()
        if problem:
            return problem
        if self.currentModel() is None:
            return self._noModelMessage()
        problem = self._modelProblem()
        if problem:
            return problem
        return self._backendProblem()

    def _readyMessage(self) -> str:
        request = self.request()
        message = self._readyText(request)
        return " ".join([message, *request.notices])

    def _readyText(self, request: RunRequest) -> str:
        model, where = request.model.name, self._where()
        if request.task == COMPLETE_AGES:
            return _("Ready: the subject at {ages} months, with {model} {where}.").format(
                ages=_months(request.ages), model=model, where=where
            )
        if request.task == SYNTHESIZE_MODALITY:
            return _("Ready: {modality} at {ages} months, with {model} {where}.").format(
                modality=request.modality.value, ages=_months(request.ages), model=model, where=where
            )
        first, second = request.scans
        return _("Ready: {frames} frames between {first} and {second}, with {model} {where}.").format(
            frames=request.frames, first=first.describe(), second=second.describe(), model=model, where=where
        )

    def request(self) -> RunRequest:
        """The run Apply would start.

        Raises:
            InputError: Apply is not possible; the message is the status line's.
        """
        reason = self._blockingReason()
        if reason:
            raise InputError(None, reason)
        _problem, inputs = self._taskInputs()
        remote = self.isRemote()
        return RunRequest(
            task=self.currentTask(),
            subject=self._subject,
            model=self.currentModel(),
            backend="remote" if remote else "local",
            device=self.device(),
            serverUrl=self.serverUrl() if remote else "",
            token=(self.ui.tokenLineEdit.property("text") or "") if remote else "",
            samples=int(self.ui.samplesSpinBox.property("value")),
            steps=int(self.ui.stepsSpinBox.property("value")),
            capture=int(self.ui.captureSpinBox.property("value")),
            preprocess=self.preprocessChoice(),
            notices=self._notices(inputs),
            **inputs,
        )

    def preprocessChoice(self) -> bool | None:
        """The Preprocess choice: None as the model card asks, True always, False never."""
        return PREPROCESS_CHOICES[int(self.ui.preprocessComboBox.property("currentIndex") or 0)][1]

    # ------------------------------------------------------------------ scene state

    def state(self) -> dict[str, Any]:
        """The choices saved with the scene (``state.PanelParameters``); never the token."""
        ui, model = self.ui, self.currentModel()
        return {
            "task": self.currentTask(),
            "ages": ui.agesLineEdit.property("text") or "",
            "modality": str(ui.targetModalityComboBox.property("currentText") or ""),
            "model": model.name if model is not None else "",
            "backend": "remote" if self.isRemote() else "local",
            "device": self.device(),
            "serverUrl": self.serverUrl(),
            "samples": int(ui.samplesSpinBox.property("value")),
            "steps": int(ui.stepsSpinBox.property("value")),
            "frames": int(ui.framesSpinBox.property("value")),
            "preprocess": PREPROCESS_CHOICES[int(ui.preprocessComboBox.property("currentIndex") or 0)][0],
        }

    def applyState(self, values: dict[str, Any]) -> None:
        """Show saved choices (a scene was opened); unknown or missing values keep the widget's."""
        ui = self.ui
        task = normalizeTask(values.get("task") or "")
        if task is not None:
            self.setTask(task)
        if values.get("ages") is not None:
            ui.agesLineEdit.setText(str(values["ages"]))
        selectText(ui.targetModalityComboBox, values.get("modality"))
        selectText(ui.deviceComboBox, values.get("device"))
        if values.get("backend") in ("local", "remote"):
            (ui.remoteRadioButton if values["backend"] == "remote" else ui.localRadioButton).setChecked(True)
        if values.get("serverUrl") is not None:
            ui.serverUrlLineEdit.setText(str(values["serverUrl"]))
        for name, box in (("samples", ui.samplesSpinBox), ("steps", ui.stepsSpinBox), ("frames", ui.framesSpinBox)):
            if values.get(name):
                box.setValue(int(values[name]))
        keys = [key for key, _value in PREPROCESS_CHOICES]
        if values.get("preprocess") in keys:
            ui.preprocessComboBox.setCurrentIndex(keys.index(values["preprocess"]))
        names = [c.name for c in self._cards]
        if values.get("model") in names:
            ui.modelComboBox.setCurrentIndex(names.index(values["model"]))
        self.onBackendChanged()
        self.onModelChanged()

    def reset(self) -> None:
        """The scene is closing: stop a run, forget the subject and the results (Apply then
        says to load a subject). The choices (task, model, ...) stay."""
        if self._run is not None:
            self.cancelRun()
            if self._run is not None:  # the backend confirms later; the scene is going now
                self._timer.stop()
                self._run = None
                self._placing = None
                self._setRunning(False)
        self._setRetryVisible(False)
        self._showResults(None)
        self.setSubject(None)
        self.setProgress(0, 100)
        self.ui.progressBar.setFormat("")

    # ------------------------------------------------------------------ status, log

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.setText(text)

    def setProgress(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` steps in the progress bar."""
        self.ui.progressBar.setRange(0, max(int(total), 1))
        self.ui.progressBar.setValue(max(0, min(int(done), int(total))))

    def appendLog(self, text: str) -> None:
        """Add a line to the log box (the .ui caps it at 5000 lines) and to Python's log."""
        logger.info("%s", text)
        self.ui.logTextEdit.appendPlainText(str(text))
