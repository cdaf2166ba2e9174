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
* Enums are ``qt.Qt.X``; class enums go through :func:`_enum` (``qt.QLineEdit.Password`` in
  PythonQt, ``qt.QLineEdit.EchoMode.Password`` in strict PySide6).

Example (Slicer's Python console)::

    ui = slicer.util.childWidgetVariables(uiWidget)
    panel = Panel(ui, qt)
    panel.loadSubjectFrom("/data/study/sub-01")
    panel.refreshBackendInfo()
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from LongitudinalDiffusionLib.catalog import ENV_VAR, USER_DIR, ModelCard, list_models
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.subject import Modality, Subject, Timepoint, load_subject, parse_age

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_AGES",
    "INTERPOLATE",
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

# -------------------------------------------------------------------------- translation

#: Translation context of this file (what ``slicer.i18n.getContext`` gives for it).
CONTEXT = "LongitudinalDiffusionSlicer.panel"
_translate: Callable[[str, str], str] | None = None


def installTranslator(translate: Callable[[str, str], str] | None) -> None:
    """Translate the panel's messages with ``translate(context, text)``.

    In Slicer: ``installTranslator(slicer.i18n.translate)``. Without it, texts stay English.
    """
    global _translate
    _translate = translate


def _(text: str) -> str:
    return text if _translate is None else _translate(CONTEXT, text)


# ------------------------------------------------------------------------------- pieces


class Signal:
    """A plain-Python signal: ``connect(fn)``, ``disconnect(fn)``, ``emit(*args)``.

    Used for the panel's own events; Qt signals declared in Python crash under PythonQt.
    """

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> None:
        self._slots.append(slot)

    def disconnect(self, slot: Callable[..., Any] | None = None) -> None:
        """Remove ``slot``, or every slot when none is given."""
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def isConnected(self) -> bool:
        return bool(self._slots)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)


COMPLETE_AGES = "complete-ages"
SYNTHESIZE_MODALITY = "synthesize-modality"
INTERPOLATE = "interpolate"
#: The tasks, in the order of the task combo box (ids are the `longdiff` command names).
TASKS = (COMPLETE_AGES, SYNTHESIZE_MODALITY, INTERPOLATE)

_TASK_ALIASES = {
    COMPLETE_AGES: ("complete-ages", "complete-age", "completeages", "complete"),
    SYNTHESIZE_MODALITY: (
        "synthesize-modality",
        "synthesise-modality",
        "synthesize",
        "synthesise",
        "modality-synthesis",
    ),
    INTERPOLATE: ("interpolate", "interpolation", "interpolate-frames", "frames"),
}
_TASK_BY_ALIAS = {alias: task for task, aliases in _TASK_ALIASES.items() for alias in aliases}


def taskLabel(task: str) -> str:
    """The task's name as the task combo box shows it."""
    labels = {
        COMPLETE_AGES: _("Complete missing ages"),
        SYNTHESIZE_MODALITY: _("Synthesize a missing modality"),
        INTERPOLATE: _("Interpolate frames between two scans"),
    }
    return labels[task]


def normalizeTask(text: Any) -> str | None:
    """A task id from a card's spelling (``complete_ages``, ``Synthesise-Modality``, ...)."""
    key = re.sub(r"[\s_]+", "-", str(text).strip().lower())
    return _TASK_BY_ALIAS.get(key)


def cardTasks(card: ModelCard) -> set[str] | None:
    """The tasks a card declares (``"task"`` or ``"tasks"``); None when it declares none.

    Unknown task names are kept as they are (they match no task of the panel).
    """
    declared = card.card.get("tasks", card.card.get("task"))
    if declared is None or declared == [] or declared == "":
        return None
    if isinstance(declared, str):
        declared = [declared]
    return {normalizeTask(t) or str(t) for t in declared}


def _sizes(values: Any, unit: str = "") -> str:
    try:
        text = " \u00d7 ".join(f"{float(v):g}" for v in values)
    except (TypeError, ValueError):
        return str(values)
    return f"{text} {unit}".strip()


def cardHtml(card: ModelCard) -> str:
    """The rich-text card shown under the model combo box.

    Lists the method, the tasks, what the model was trained on, its grid and modalities, and
    a red "simulated data" badge for models trained on simulated data.
    """
    data = card.card
    esc = html.escape
    title = f"<b>{esc(card.name)}</b>"
    if card.simulated:
        title += (
            ' &nbsp;<span style="background-color:#b71c1c; color:#ffffff; font-weight:bold;">'
            f"&nbsp;{esc(_('simulated data'))}&nbsp;</span>"
        )
    rows = [(_("Method"), esc(card.method))]
    tasks = cardTasks(card)
    if tasks:
        rows.append((_("Tasks"), esc(", ".join(taskLabel(t) if t in TASKS else t for t in sorted(tasks)))))
    trained = data.get("trained_on")
    if isinstance(trained, dict):
        what = trained.get("description") or trained.get("dataset") or trained.get("name")
        text = esc(str(what)) if what else ""
        if trained.get("subjects") is not None:
            text += (", " if text else "") + esc(f"{trained['subjects']} subjects")
        if trained.get("simulated"):
            text += (" \u2014 " if text else "") + esc(_("simulated data, not real anatomy"))
        rows.append((_("Trained on"), text or esc(_("not stated"))))
    elif trained:
        rows.append((_("Trained on"), esc(str(trained))))
    else:
        rows.append((_("Trained on"), esc(_("not stated"))))
    grid = data.get("grid")
    if isinstance(grid, dict):
        parts = []
        if "shape" in grid:
            parts.append(_sizes(grid["shape"], _("voxels")))
        spacing = grid.get("spacing", grid.get("spacing_mm"))
        if spacing is not None:
            parts.append(_sizes(spacing, "mm"))
        if grid.get("orientation"):
            parts.append(str(grid["orientation"]))
        rows.append((_("Grid"), esc(", ".join(parts)) or esc(_("not stated"))))
    modalities = data.get("modalities")
    if modalities:
        rows.append((_("Modalities"), esc(", ".join(map(str, modalities)))))
    for key in ("reference", "citation", "paper"):
        if data.get(key):
            rows.append((_("Reference"), esc(str(data[key]))))
            break
    lines = "".join(f"<br>{label}: {value}" for label, value in rows)
    return f"{title}{lines}"


@dataclass(frozen=True)
class TorchInfo:
    """What the PyTorch in this Python can use."""

    version: str
    cudaVersion: str | None
    cudaAvailable: bool
    devices: tuple[str, ...] = ()
    mpsAvailable: bool = False


def probeTorch() -> TorchInfo | None:
    """The installed PyTorch and its GPUs; None when PyTorch is not installed.

    Imports torch (about a second the first time). Raises whatever a broken install raises.
    """
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    cuda = bool(torch.cuda.is_available())
    devices = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ()
    mps = getattr(torch.backends, "mps", None)
    return TorchInfo(
        version=str(torch.__version__),
        cudaVersion=torch.version.cuda,
        cudaAvailable=cuda,
        devices=devices,
        mpsAvailable=bool(mps is not None and mps.is_available()),
    )


@dataclass(frozen=True)
class RunRequest:
    """Everything a run needs, as checked by the panel (see :meth:`Panel.request`).

    Args:
        task: one of :data:`TASKS`.
        subject: the subject.
        model: the model card.
        ages: months; the ages to generate (complete-ages), or the ages where the
            modality is missing (synthesize-modality).
        modality: the modality to synthesize (synthesize-modality).
        scans: the two scans to interpolate between, younger first (interpolate).
        frames: number of frames between them (interpolate).
        backend: ``"local"`` or ``"remote"``.
        device: ``"auto"``, ``"cuda"`` or ``"cpu"`` (local).
        serverUrl: the server (remote).
        token: the access token (remote); left out of ``repr`` so it never reaches a log.
        samples: number of samples (2 or more: mean + standard-deviation map).
        steps: sampler steps per sample (0: the model card's).
        capture: denoising intermediates kept as frames (0: none).
        preprocess: bring the scans into the model's space first (``tasks.RunOptions.preprocess``):
            None as the model card asks, True always, False never.
        notices: what the user should know about the inputs (e.g. a scan is resampled).
    """

    task: str
    subject: Subject
    model: ModelCard
    ages: tuple[float, ...] = ()
    modality: Modality | None = None
    scans: tuple[Timepoint, ...] = ()
    frames: int | None = None
    backend: str = "local"
    device: str = "auto"
    serverUrl: str = ""
    token: str = field(default="", repr=False)
    samples: int = 1
    steps: int = 0
    capture: int = 0
    preprocess: bool | None = None
    notices: tuple[str, ...] = ()


#: The Preprocess combo box's entries, in order: (saved value, ``RunOptions.preprocess``).
PREPROCESS_CHOICES = (("auto", None), ("always", True), ("never", False))


def _enum(owner: Any, scope: str, name: str) -> Any:
    """``owner.name`` (PythonQt; PySide6's forgiving mode) or ``owner.scope.name`` (strict PySide6)."""
    value = getattr(owner, name, None)
    return value if value is not None else getattr(getattr(owner, scope), name)


def _volumeName(tp: Timepoint) -> str:
    if tp.source is not None:
        return tp.source.name
    if tp.image is not None and tp.image.meta.get("name"):
        return str(tp.image.meta["name"])
    return _("(in-memory image)")


def _months(ages: Iterable[float]) -> str:
    return ", ".join(f"{a:.1f}" for a in ages)


# -------------------------------------------------------------------------------- panel


#: Pause between two steps of placing results (ms): the event loop runs in between.
PLACE_STEP_DELAY_MS = 1


class Panel:
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

    #: Ages typed closer than this (months) to a scan's age are that scan's age: half the
    #: table's 0.1-month resolution, so "6" matches a scan shown as "6.0".
    AGE_MATCH_MONTHS = 0.05

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
        self._fillCombo(ui.taskComboBox, [taskLabel(t) for t in TASKS])
        self._fillCombo(ui.targetModalityComboBox, [m.value for m in Modality])
        self._fillCombo(ui.deviceComboBox, ["auto", "cuda", "cpu"])
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

    @staticmethod
    def _fillCombo(combo: Any, texts: Sequence[str]) -> None:
        """Replace the items only when they differ (keeps the .ui's selection otherwise)."""
        current = [combo.itemText(i) for i in range(combo.property("count"))]
        if current == list(texts):
            return
        combo.blockSignals(True)
        combo.clear()
        for text in texts:
            combo.addItem(text)
        combo.setCurrentIndex(0)
        combo.blockSignals(False)

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

    # ----------------------------------------------------------------------- subject

    def subject(self) -> Subject | None:
        """The loaded subject, or None."""
        return self._subject

    def setSubject(self, subject: Subject | None) -> None:
        """Show ``subject`` in the table (one row per scan, youngest first); None clears it."""
        qt, table = self.qt, self.ui.timepointsTable
        self._subject = subject
        table.blockSignals(True)
        table.clearSelection()
        table.setRowCount(0)
        timepoints = subject.timepoints if subject is not None else []
        table.setRowCount(len(timepoints))
        right = qt.Qt.AlignRight | qt.Qt.AlignVCenter
        for row, tp in enumerate(timepoints):
            name = qt.QTableWidgetItem(_volumeName(tp))
            name.setToolTip(tp.describe() + ("" if tp.source is None else f"\n{tp.source}"))
            age = qt.QTableWidgetItem(f"{tp.age:.1f}")
            age.setTextAlignment(right)
            age.setToolTip(_("{age:g} months").format(age=round(tp.age, 3)))
            modality = qt.QTableWidgetItem(tp.modality.value)
            for column, item in enumerate((name, age, modality)):
                table.setItem(row, column, item)
        table.blockSignals(False)
        self.updateApplyState()

    def loadSubjectFrom(self, path: str | Path) -> Subject | None:
        """Read a subject (BIDS subject or dataset folder, manifest .tsv) and show it.

        On failure the previous subject stays, and the status line and the log say why.
        """
        try:
            subject = self._subjectLoader(Path(path))
        except (LongitudinalDiffusionError, OSError) as exc:
            message = _("Could not load the subject: {error}").format(error=exc)
            self.appendLog(message)
            self.setStatus(message)
            return None
        self.setSubject(subject)
        self.appendLog(
            _("Loaded {subject} from {path}: {scans} scans at {ages} ages ({modalities}).").format(
                subject=subject.subject_id,
                path=path,
                scans=len(subject.timepoints),
                ages=len(subject.ages()),
                modalities=", ".join(m.value for m in subject.modalities()),
            )
        )
        return subject

    def addTimepoint(self, timepoint: Timepoint, subjectId: str = "scene") -> bool:
        """Add one scan (e.g. a scene volume the module converted) to the subject.

        Returns False, with the reason in the status line, when the subject refuses it
        (another scan of that modality at that age).
        """
        current = self._subject
        try:
            if current is None:
                subject = Subject(subjectId, [timepoint])
            else:
                subject = Subject(current.subject_id, [*current.timepoints, timepoint], current.source, current.meta)
        except InputError as exc:
            self.setStatus(_("Could not add the scan: {error}").format(error=exc))
            return False
        self.setSubject(subject)
        self.appendLog(_("Added {scan}.").format(scan=timepoint.describe()))
        return True

    def selectedTimepoints(self) -> list[Timepoint]:
        """The scans whose rows are selected in the table, youngest first."""
        if self._subject is None:
            return []
        rows = sorted({index.row() for index in self.ui.timepointsTable.selectionModel().selectedRows()})
        return [self._subject.timepoints[r] for r in rows if 0 <= r < len(self._subject.timepoints)]

    def onLoadPath(self, *_args: Any) -> None:
        path = (self.ui.subjectPathLineEdit.property("currentPath") or "").strip()
        if not path:
            self.setStatus(_("Choose a BIDS subject folder or a manifest .tsv first."))
            return
        if self.loadSubjectFrom(path) is not None:
            addToHistory = getattr(self.ui.subjectPathLineEdit, "addCurrentPathToHistory", None)
            if addToHistory is not None:
                addToHistory()

    def onLoadSample(self, *_args: Any) -> None:
        if not self.sampleRequested.isConnected():
            self.setStatus(_("The sample subject is offered by Slicer's Sample Data module, not available here."))
            return
        self.sampleRequested.emit()

    def onAddFromScene(self, *_args: Any) -> None:
        selector = getattr(self.ui, "sceneVolumeSelector", None)
        node = selector.currentNode() if selector is not None else None
        if node is None:
            self.setStatus(_("Choose a volume of the scene (left of 'Add from scene') first."))
            return
        if not self.addFromSceneRequested.isConnected():
            self.setStatus(_("Adding scene volumes needs Slicer."))
            return
        self.addFromSceneRequested.emit(node)

    # -------------------------------------------------------------------------- task

    def currentTask(self) -> str:
        """The chosen task's id (one of :data:`TASKS`)."""
        index = self.ui.taskComboBox.property("currentIndex")
        return TASKS[index] if isinstance(index, int) and 0 <= index < len(TASKS) else TASKS[0]

    def setTask(self, task: str) -> None:
        """Choose a task by id (also accepts the spellings :func:`normalizeTask` knows)."""
        task = normalizeTask(task) or task
        self.ui.taskComboBox.setCurrentIndex(TASKS.index(task))

    def onTaskChanged(self, *_args: Any) -> None:
        """Show only the inputs of the chosen task, list its models, re-check Apply."""
        ui, task = self.ui, self.currentTask()
        inputs = {
            COMPLETE_AGES: (ui.agesLabel, ui.agesLineEdit),
            SYNTHESIZE_MODALITY: (ui.targetModalityLabel, ui.targetModalityComboBox),
            INTERPOLATE: (ui.framesLabel, ui.framesSpinBox),
        }
        for owner, widgets in inputs.items():
            for widget in widgets:
                widget.setVisible(owner == task)
        self._fillModelCombo()
        self.updateApplyState()

    def parsedAges(self) -> list[float]:
        """The ages typed in the ages field, in months, ascending.

        Ages are separated by commas, semicolons or spaces (``"6, 9.5 12"`` gives
        ``[6.0, 9.5, 12.0]``); decimals take a point.

        Raises:
            InputError: empty field; a token that is not an age (the message quotes it);
                negative or impossible ages; an age given twice; an age the subject
                already has.
        """
        where = _("Ages")
        text = self.ui.agesLineEdit.property("text") or ""
        tokens = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
        if not tokens:
            raise InputError(where, _("enter the ages to generate, in months (e.g. 6, 9, 12)"))
        ages: list[float] = []
        for token in tokens:
            try:
                age = parse_age(token, "months")
            except InputError as exc:
                raise InputError(where, exc.problem) from None
            for earlier in ages:
                if abs(age - earlier) <= self.AGE_MATCH_MONTHS + 1e-9:
                    raise InputError(where, _("{age} is given twice").format(age=token))
            if self._subject is not None:
                for tp in self._subject.timepoints:
                    if abs(age - tp.age) <= self.AGE_MATCH_MONTHS + 1e-9:
                        session = f", {tp.session}" if tp.session else ""
                        raise InputError(
                            where,
                            _(
                                "the subject already has scans at {age} months ({scanAge:.1f} mo{session}); "
                                "remove it from the list"
                            ).format(age=token, scanAge=tp.age, session=session),
                        )
            ages.append(age)
        return sorted(ages)

    def targetModality(self) -> Modality:
        return Modality(self.ui.targetModalityComboBox.property("currentText"))

    def missingAges(self, modality: Modality | str) -> list[float]:
        """The subject's ages that have scans, but none of ``modality``."""
        if self._subject is None:
            return []
        modality = Modality(modality)
        have = {tp.age for tp in self._subject.timepoints if tp.modality is modality}
        return [a for a in self._subject.ages() if all(abs(a - h) > Subject.AGE_TOL for h in have)]

    def frames(self) -> int:
        return int(self.ui.framesSpinBox.property("value"))

    def _taskInputs(self) -> tuple[str, dict[str, Any]]:
        """Check the chosen task's inputs: ``("", fields of the request)`` or ``(reason, {})``."""
        task, subject = self.currentTask(), self._subject
        if task == COMPLETE_AGES:
            try:
                ages = self.parsedAges()
            except InputError as exc:
                return str(exc), {}
            return "", {"ages": tuple(ages)}
        if task == SYNTHESIZE_MODALITY:
            modality = self.targetModality()
            missing = self.missingAges(modality)
            if not missing:
                return (
                    _("{subject} already has {modality} at every age: nothing to synthesize.").format(
                        subject=subject.subject_id, modality=modality.value
                    ),
                    {},
                )
            return "", {"modality": modality, "ages": tuple(missing)}
        scans = self.selectedTimepoints()
        if len(scans) < 2:
            return _("Select the two scans to interpolate between in the table (Ctrl+click the second)."), {}
        if len(scans) > 2:
            return _("Select only two scans in the table ({count} are selected).").format(count=len(scans)), {}
        if scans[0].modality is not scans[1].modality:
            return (
                _("The two scans must have the same modality ({first} and {second} are selected).").format(
                    first=scans[0].describe(), second=scans[1].describe()
                ),
                {},
            )
        return "", {"scans": tuple(scans), "frames": self.frames()}

    # ------------------------------------------------------------------------ models

    def refreshModels(self, cards: Iterable[ModelCard] | None = None) -> None:
        """List the models for the chosen task; ``cards`` defaults to the installed ones.

        A card whose ``task``/``tasks`` does not name the chosen task is left out; a card
        that names no task is offered for every task.
        """
        if cards is None:
            try:
                cards = self._modelLister()
                self._modelError = None
            except LongitudinalDiffusionError as exc:
                cards = []
                self._modelError = str(exc)
                self.appendLog(_("Model cards could not be read: {error}").format(error=exc))
        else:
            self._modelError = None
        self._allCards = list(cards)
        self._fillModelCombo()
        self.updateApplyState()

    def models(self) -> list[ModelCard]:
        """The models offered for the chosen task (the combo box's items, in order)."""
        return list(self._cards)

    def currentModel(self) -> ModelCard | None:
        index = self.ui.modelComboBox.property("currentIndex")
        return self._cards[index] if isinstance(index, int) and 0 <= index < len(self._cards) else None

    def _fillModelCombo(self) -> None:
        task, combo = self.currentTask(), self.ui.modelComboBox
        previous = self.currentModel()
        self._cards = [c for c in self._allCards if (cardTasks(c) is None or task in cardTasks(c))]
        combo.blockSignals(True)
        combo.clear()
        for card in self._cards:
            combo.addItem(f"{card.name} ({card.method})")
            combo.setItemData(combo.property("count") - 1, str(card.path), self.qt.Qt.ToolTipRole)
        names = [c.name for c in self._cards]
        combo.setCurrentIndex(names.index(previous.name) if previous is not None and previous.name in names else 0)
        combo.setEnabled(bool(self._cards))
        combo.blockSignals(False)
        self._showCard()

    def onModelChanged(self, *_args: Any) -> None:
        self._showCard()
        self.updateApplyState()

    def _showCard(self) -> None:
        card = self.currentModel()
        self.ui.modelCardLabel.setText(cardHtml(card) if card is not None else _("No model selected."))

    def _noModelMessage(self) -> str:
        if self._modelError:
            return _("The model cards could not be read: {error}").format(error=self._modelError)
        others = len(self._allCards)
        message = _(
            "No model installed for this task ({task}): put a model card (<name>.json) and its weights in "
            "{folder} or in a folder named by {variable} (`longdiff models` lists them)."
        ).format(task=taskLabel(self.currentTask()), folder=USER_DIR.expanduser(), variable=ENV_VAR)
        if others:
            message += " " + _("{count} installed model(s) are for other tasks.").format(count=others)
        return message

    # ----------------------------------------------------------------------- backend

    def isRemote(self) -> bool:
        return bool(self.ui.remoteRadioButton.property("checked"))

    def device(self) -> str:
        return str(self.ui.deviceComboBox.property("currentText"))

    def serverUrl(self) -> str:
        return (self.ui.serverUrlLineEdit.property("text") or "").strip()

    def onBackendChanged(self, *_args: Any) -> None:
        """Remote fields only with the remote choice, the device only with the local one."""
        ui, remote = self.ui, self.isRemote()
        for widget in (ui.serverUrlLabel, ui.serverUrlLineEdit, ui.tokenLabel, ui.tokenLineEdit):
            widget.setEnabled(remote)
        ui.testConnectionButton.setEnabled(remote)
        for widget in (ui.deviceLabel, ui.deviceComboBox, ui.torchInfoLabel):
            widget.setEnabled(not remote)
        self.updateApplyState()

    def refreshBackendInfo(self) -> None:
        """Show the PyTorch version, whether CUDA works and the GPU names (imports torch)."""
        try:
            info = self._torchProbe()
        except Exception as exc:  # a broken install raises anything (ImportError, OSError, ...)
            info = None
            text = _("PyTorch is installed but cannot be loaded: {error}").format(error=exc)
        else:
            if info is None:
                text = _("PyTorch is not installed yet (it is installed on first use, after you agree).")
            elif info.cudaAvailable:
                names = "; ".join(f"cuda:{i} {name}" for i, name in enumerate(info.devices))
                text = _("PyTorch {version} with CUDA {cuda}: {names}").format(
                    version=info.version, cuda=info.cudaVersion, names=names or _("a GPU")
                )
            elif info.cudaVersion is None:
                text = _("PyTorch {version}, a CPU-only build: no CUDA GPU will be used.").format(version=info.version)
            else:
                text = _(
                    "PyTorch {version} (built for CUDA {cuda}) finds no usable GPU: check the NVIDIA driver. "
                    "Runs use the CPU."
                ).format(version=info.version, cuda=info.cudaVersion)
            if info is not None and info.mpsAvailable:
                text += " " + _("Apple GPU (MPS) available.")
        self._torchInfo = info
        self._torchChecked = True
        self.ui.torchInfoLabel.setText(text)
        self.updateApplyState()

    def torchInfo(self) -> TorchInfo | None:
        """What :meth:`refreshBackendInfo` found (None before, or when torch is missing)."""
        return self._torchInfo

    def _urlProblem(self) -> str:
        url = self.serverUrl()
        if not url:
            return _("Enter the server URL (Backend section), e.g. https://server:8000.")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return _(
                "The server URL must start with https:// (or http://) and name a server: '{url}' does not."
            ).format(url=url)
        return ""

    def _backendProblem(self) -> str:
        if self.isRemote():
            return self._urlProblem()
        info = self._torchInfo
        if self.device() == "cuda" and self._torchChecked and info is not None and not info.cudaAvailable:
            return _(
                "The device is cuda, but PyTorch {version} sees no CUDA GPU: choose auto or cpu "
                "(or install a CUDA build of PyTorch)."
            ).format(version=info.version)
        return ""

    def onTestConnection(self, *_args: Any) -> None:
        problem = self._urlProblem()
        if problem:
            self.setStatus(problem)
            return
        url, token = self.serverUrl(), self.ui.tokenLineEdit.property("text") or ""
        if self._connectionTester is None:
            if not self.testConnectionRequested.isConnected():
                self.setStatus(_("Remote servers are not supported in this version yet."))
                return
            self.testConnectionRequested.emit(url, token)
            return
        self.setStatus(_("Connecting to {url}...").format(url=url))
        try:
            card = self.currentModel()
            summary = self._connectionTester(url, token, card.name if card is not None else None)
        except (LongitudinalDiffusionError, OSError) as exc:
            message = _("Connection failed: {error}").format(error=exc)
        else:
            message = _("Connection OK: {summary}").format(summary=summary)
        self.appendLog(message)
        self.setStatus(message)

    # --------------------------------------------------------------------------- run

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
        self._selectText(ui.targetModalityComboBox, values.get("modality"))
        self._selectText(ui.deviceComboBox, values.get("device"))
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

    @staticmethod
    def _selectText(combo: Any, text: Any) -> None:
        if not text:
            return
        texts = [combo.itemText(i) for i in range(combo.property("count"))]
        if text in texts:
            combo.setCurrentIndex(texts.index(text))

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

    def _modelProblem(self) -> str:
        """The chosen model's files are gone, or an age lies outside the ages it was trained on."""
        card = self.currentModel()
        if not Path(card.path).is_file():
            return _("The model card {path} is missing (deleted or moved): choose another model.").format(
                path=card.path
            )
        entry = card.card.get("weights") or {}
        weights = entry.get("file")
        downloadable = bool(card.card.get("weights_url") or entry.get("url"))  # fetched on first use (weights.py)
        if weights and not downloadable and not (Path(card.path).parent / weights).is_file():
            return _("The weights of model {model} are missing ({path}): reinstall the model.").format(
                model=card.name, path=Path(card.path).parent / weights
            )
        if self.currentTask() == COMPLETE_AGES:
            ageRange = card.card.get("age_range_months")
            if ageRange:
                low, high = float(ageRange[0]), float(ageRange[1])
                try:
                    ages = self.parsedAges()
                except InputError:
                    return ""
                outside = [a for a in ages if not low - 1e-6 <= a <= high + 1e-6]
                if outside:
                    return _(
                        "Warning: {ages} months lie outside the ages model {model} was trained on "
                        "({low:g} to {high:g} months); it cannot generate them. Choose ages in that range."
                    ).format(ages=_months(outside), model=card.name, low=low, high=high)
        return ""

    def _notices(self, inputs: dict[str, Any]) -> tuple[str, ...]:
        """What the user should know before running (e.g. which scan is resampled onto which)."""
        notices = []
        scans = inputs.get("scans") or ()
        if len(scans) == 2:
            first, second = scans
            if first.image is not None and second.image is not None and not first.image.same_geometry(second.image):
                notices.append(
                    _(
                        "The two scans have different geometries: {second} is resampled onto the grid of {first}, "
                        "and the frames land on {first}'s geometry."
                    ).format(first=first.describe(), second=second.describe())
                )
        return tuple(notices)

    def _where(self) -> str:
        if self.isRemote():
            return _("on {host}").format(host=urlparse(self.serverUrl()).hostname)
        return _("on this computer ({device})").format(device=self.device())

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
            except Exception:
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
        except Exception as exc:
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
        except Exception as exc:
            self._placing = None
            self._placingFailed(exc)
            return
        # 1 ms rather than 0: a zero timer may run again before Qt handles paint and input events
        self.qt.QTimer.singleShot(PLACE_STEP_DELAY_MS, lambda: self._placeStep(placing))

    def _placingFailed(self, exc: Exception) -> None:
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

    # ------------------------------------------------------------------- results

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
