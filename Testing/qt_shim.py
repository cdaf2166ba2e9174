"""Test-only stand-ins for Slicer's ``qt`` module and for the CTK / qMRML widgets of our .ui.

Slicer's Python exposes Qt through PythonQt as one flat module, ``qt`` (``qt.QLabel``,
``qt.Qt.AlignLeft``, ``qt.QTimer``, ...). Outside Slicer, :func:`makeQtModule` builds the
same flat namespace from PySide6's QtCore, QtGui and QtWidgets; :func:`installQtModule`
registers it as ``sys.modules["qt"]`` for one test only (through pytest's ``monkeypatch``).

The .ui uses four classes that only exist inside Slicer. :func:`loadUi` registers small
stand-ins with QUiLoader, so every property the .ui sets is really applied (an unregistered
class falls back to an empty ``QWidget``). The stand-ins mimic the part of the real API the
module uses, no more:

* ``ctkCollapsibleButton``: a collapsible group box, Qt properties ``text`` and ``collapsed``,
  signal ``contentsCollapsed(bool)``; clicking the title toggles it.
* ``ctkPathLineEdit``: a ``QLineEdit`` with the ``currentPath``, ``filters`` (a flag set, as
  in CTK), ``nameFilters`` and ``settingKey`` properties and ``currentPathChanged(QString)``.
* ``qMRMLWidget``: a ``QWidget`` with ``setMRMLScene`` / ``mrmlScene`` and the
  ``mrmlSceneChanged(vtkMRMLScene*)`` signal the .ui connects to its node selectors.
* ``qMRMLNodeComboBox``: a ``QComboBox`` with ``nodeTypes``, ``noneEnabled`` and the other
  flags, ``setMRMLScene`` (lists the nodes of a scene, e.g. a slicer-core scene) and
  ``currentNode()``.

Never put a folder called ``qt`` on ``sys.path``: it would shadow this module object.
"""

from __future__ import annotations

import enum
import sys
import types
import warnings
from pathlib import Path

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets
from PySide6.QtCore import Property, QFlag, Signal, Slot

__all__ = [
    "ctkCollapsibleButton",
    "UI_FILE",
    "ctkPathLineEdit",
    "installQtModule",
    "loadUi",
    "makeQtModule",
    "qMRMLNodeComboBox",
    "qMRMLWidget",
]

# ------------------------------------------------------------------------------ qt module


def makeQtModule() -> types.ModuleType:
    """A module named ``qt`` holding every public name of QtCore, QtGui and QtWidgets.

    Where two of them define a name, the later wins (QtWidgets over QtGui over QtCore), as
    in PythonQt, whose ``qt`` also merges the Qt modules.
    """
    module = types.ModuleType("qt", "PySide6 QtCore + QtGui + QtWidgets, flat (test stand-in for Slicer's qt)")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(module, name, getattr(source, name))
    return module


def installQtModule(monkeypatch) -> types.ModuleType:
    """Register :func:`makeQtModule` as ``sys.modules["qt"]`` until the test ends."""
    module = makeQtModule()
    monkeypatch.setitem(sys.modules, "qt", module)
    return module


# ---------------------------------------------------------------------------- stand-ins


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """A group box whose contents collapse; the title shows an arrow and toggles it.

    Like the real widget, collapsing hides the child widgets and expanding shows again only
    those that were visible before (a child the panel hid stays hidden).
    """

    contentsCollapsed = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""
        self._collapsed = False
        self._hiddenByCollapse: list[QtWidgets.QWidget] = []
        self._updateTitle()

    def getText(self) -> str:
        return self._text

    @Slot(str)
    def setText(self, text: str) -> None:
        self._text = str(text)
        self._updateTitle()

    def isCollapsed(self) -> bool:
        return self._collapsed

    @Slot(bool)
    def setCollapsed(self, collapsed: bool) -> None:
        collapsed = bool(collapsed)
        changed = collapsed != self._collapsed
        self._collapsed = collapsed
        self._applyCollapsed()
        self._updateTitle()
        if changed:
            self.contentsCollapsed.emit(collapsed)

    text = Property(str, getText, setText)
    collapsed = Property(bool, isCollapsed, setCollapsed)

    def _children(self) -> list[QtWidgets.QWidget]:
        return [c for c in self.children() if isinstance(c, QtWidgets.QWidget) and not c.isWindow()]

    def _applyCollapsed(self) -> None:
        """Hide the contents (remembering what was visible), or show those again."""
        if self._collapsed:
            for child in self._children():
                if not child.isHidden():
                    child.hide()
                    self._hiddenByCollapse.append(child)
            self.setMaximumHeight(self.fontMetrics().height() + 8)  # only the title line
        else:
            for child in self._hiddenByCollapse:
                child.show()
            self._hiddenByCollapse = []
            self.setMaximumHeight(16777215)  # QWIDGETSIZE_MAX

    def _updateTitle(self) -> None:
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + self._text)

    def mousePressEvent(self, event):  # the title line acts as the button
        if event.position().y() <= self.fontMetrics().height() + 6:
            self.setCollapsed(not self._collapsed)
            event.accept()
            return
        super().mousePressEvent(event)


with warnings.catch_warnings():
    # PySide6 warns while it builds the meta-object of a class whose property type is a
    # @QFlag declared in the same class body, then registers it correctly (checked by
    # test_panel: the .ui's <set> value reaches the property).
    warnings.simplefilter("ignore", RuntimeWarning)

    class ctkPathLineEdit(QtWidgets.QLineEdit):
        """A line edit standing in for CTK's path editor (no browse button, no history)."""

        @QFlag
        class Filters(enum.Flag):
            """CTK's ``ctkPathLineEdit::Filter`` values (the same as ``QDir::Filter``)."""

            Dirs = 0x001
            Files = 0x002
            Drives = 0x004
            NoSymLinks = 0x008
            Readable = 0x010
            Writable = 0x020
            Executable = 0x040
            Hidden = 0x100
            NoDotAndDotDot = 0x1000

        currentPathChanged = Signal(str)

        def __init__(self, parent=None):
            super().__init__(parent)
            self._filters = self.Filters.Dirs | self.Filters.Files | self.Filters.Drives | self.Filters.Readable
            self._nameFilters: list[str] = []
            self._settingKey = ""
            self.textChanged.connect(self.currentPathChanged)

        def getCurrentPath(self) -> str:
            return QtWidgets.QLineEdit.text(self)

        @Slot(str)
        def setCurrentPath(self, path: str) -> None:
            self.setText(str(path))

        def getFilters(self):
            return self._filters

        def setFilters(self, filters) -> None:
            self._filters = self.Filters(int(getattr(filters, "value", filters)))

        def getNameFilters(self) -> list[str]:
            return list(self._nameFilters)

        def setNameFilters(self, filters) -> None:
            self._nameFilters = [str(f) for f in filters]

        def getSettingKey(self) -> str:
            return self._settingKey

        def setSettingKey(self, key: str) -> None:
            self._settingKey = str(key)

        @Slot()
        def addCurrentPathToHistory(self) -> None:
            """CTK keeps a history under ``settingKey``; the stand-in has none."""

        currentPath = Property(str, getCurrentPath, setCurrentPath)
        filters = Property("ctkPathLineEdit::Filters", getFilters, setFilters)
        nameFilters = Property("QStringList", getNameFilters, setNameFilters)
        settingKey = Property(str, getSettingKey, setSettingKey)


class qMRMLWidget(QtWidgets.QWidget):
    """The root of a Slicer module panel: holds the scene and hands it to its selectors.

    The .ui connects ``mrmlSceneChanged(vtkMRMLScene*)`` to the selectors' ``setMRMLScene``.
    A Python object cannot travel through a signal of that C++ type here, so
    :meth:`setMRMLScene` hands the scene to the node selectors inside it directly.
    """

    mrmlSceneChanged = Signal("vtkMRMLScene*")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def mrmlScene(self):
        return self._scene

    @Slot("vtkMRMLScene*")
    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        for selector in self.findChildren(qMRMLNodeComboBox):
            selector.setMRMLScene(scene)


def _boolProperty(name: str, default: bool):
    attribute = f"_{name}"

    def getter(self):
        return getattr(self, attribute, default)

    def setter(self, value):
        setattr(self, attribute, bool(value))
        self._refresh()

    return Property(bool, getter, setter)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """A node selector: lists the scene's nodes of ``nodeTypes`` (by name).

    Works with any scene object that has ``GetNumberOfNodes``/``GetNthNode`` (e.g. a
    slicer-core ``vtkMRMLScene``); with no scene it lists nothing (or only "None").
    """

    currentNodeChanged = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._nodeTypes: list[str] = []
        self._scene = None
        self._nodes: list = []

    def getNodeTypes(self) -> list[str]:
        return list(self._nodeTypes)

    def setNodeTypes(self, types_) -> None:
        self._nodeTypes = [str(t) for t in types_]
        self._refresh()

    nodeTypes = Property("QStringList", getNodeTypes, setNodeTypes)
    noneEnabled = _boolProperty("noneEnabled", False)
    addEnabled = _boolProperty("addEnabled", True)
    removeEnabled = _boolProperty("removeEnabled", True)
    renameEnabled = _boolProperty("renameEnabled", False)
    editEnabled = _boolProperty("editEnabled", False)
    showHidden = _boolProperty("showHidden", False)

    def mrmlScene(self):
        return self._scene

    @Slot("vtkMRMLScene*")
    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self._refresh()

    def currentNode(self):
        index = self.currentIndex() - (1 if self.noneEnabled else 0)
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def _refresh(self) -> None:
        if not hasattr(self, "_nodeTypes"):  # a property set during construction
            return
        self._nodes = []
        scene = self._scene
        if scene is not None:
            for i in range(scene.GetNumberOfNodes()):
                node = scene.GetNthNode(i)
                if any(node.IsA(t) for t in self._nodeTypes) and (self.showHidden or not node.GetHideFromEditors()):
                    self._nodes.append(node)
        self.blockSignals(True)
        self.clear()
        if self.noneEnabled:
            self.addItem("None")
        for node in self._nodes:
            self.addItem(node.GetName())
        self.blockSignals(False)
        self.currentNodeChanged.emit(self.currentNode() is not None)


STAND_INS = (ctkCollapsibleButton, ctkPathLineEdit, qMRMLWidget, qMRMLNodeComboBox)
#: The module panel's Designer file (what the panel tests load).
UI_FILE = Path(__file__).resolve().parents[1] / "LongitudinalDiffusion/Resources/UI/LongitudinalDiffusion.ui"


# --------------------------------------------------------------------------------- load


def loadUi(path: str | Path) -> tuple[QtWidgets.QWidget, types.SimpleNamespace]:
    """Load a Designer file with the stand-ins registered.

    Returns:
        ``(root, ui)``: the root widget, and a namespace with every named child object as
        an attribute, like Slicer's ``slicer.util.childWidgetVariables``.

    Raises:
        RuntimeError: QUiLoader could not load the file.
    """
    if QtWidgets.QApplication.instance() is None:
        raise RuntimeError("loadUi needs a QApplication (use pytest-qt's qtbot fixture)")
    loader = QtUiTools.QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    file = QtCore.QFile(str(path))
    if not file.open(QtCore.QIODevice.OpenModeFlag.ReadOnly):
        raise RuntimeError(f"{path}: cannot open ({file.errorString()})")
    try:
        root = loader.load(file)
    finally:
        file.close()
    if root is None:
        raise RuntimeError(f"{path}: {loader.errorString()}")
    # A section collapsed in the .ui gets its property before its children exist; hide
    # them now, as CTK does when the children are added.
    for button in root.findChildren(ctkCollapsibleButton):
        button._applyCollapsed()
    ui = types.SimpleNamespace()
    for child in root.findChildren(QtCore.QObject):
        name = child.objectName()
        if name and not name.startswith(("qt_", "_q_")):  # Qt-internal helpers
            setattr(ui, name, child)
    return root, ui
