"""The panel's model choice: which installed model cards suit the chosen task, the card
shown under the model combo box, and what is wrong with the chosen model's files."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.catalog import ENV_VAR, USER_DIR, ModelCard
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError

from .panelkit import _, _months
from .runrequest import COMPLETE_AGES, TASKS, normalizeTask, taskLabel


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


class ModelSection:
    """The Task section's model combo box and card (a part of :class:`~.panel.Panel`).

    Uses the panel's ``ui``, ``qt``, ``_modelLister``, ``currentTask``, ``parsedAges``,
    ``updateApplyState`` and ``appendLog``.
    """

    ui: Any
    qt: Any
    _allCards: list[ModelCard]
    _cards: list[ModelCard]
    _modelError: str | None

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
