"""What every section of the module panel shares: translation, plain-Python signals and the
Qt spellings PythonQt and PySide6 both understand.

Imports no ``slicer``, ``qt`` or ``ctk``: the sections get the ``qt`` module from the panel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from LongitudinalDiffusionLib.subject import Timepoint

# -------------------------------------------------------------------------- translation

#: Translation context of the panel's messages (what ``slicer.i18n.getContext`` gives for
#: ``panel.py``; every section of the panel keeps it, so one translation file covers them).
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


# ------------------------------------------------------------------------------ signals


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


# --------------------------------------------------------------------------- Qt helpers


def _enum(owner: Any, scope: str, name: str) -> Any:
    """``owner.name`` (PythonQt; PySide6's forgiving mode) or ``owner.scope.name`` (strict PySide6)."""
    value = getattr(owner, name, None)
    return value if value is not None else getattr(getattr(owner, scope), name)


def fillCombo(combo: Any, texts: Sequence[str]) -> None:
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


def selectText(combo: Any, text: Any) -> None:
    """Select the item ``text`` of ``combo``; nothing happens when it has no such item."""
    if not text:
        return
    texts = [combo.itemText(i) for i in range(combo.property("count"))]
    if text in texts:
        combo.setCurrentIndex(texts.index(text))


# ------------------------------------------------------------------------------- texts


def _volumeName(tp: Timepoint) -> str:
    if tp.source is not None:
        return tp.source.name
    if tp.image is not None and tp.image.meta.get("name"):
        return str(tp.image.meta["name"])
    return _("(in-memory image)")


def _months(ages: Iterable[float]) -> str:
    return ", ".join(f"{a:.1f}" for a in ages)
