"""Where models are found: bundled, per-user and site folders of model cards.

A model is a card (``<name>.json``: method, grid, modalities, training data, ...) next to
its weights. This module only discovers cards and reports where it looked; loading and
checking weights belongs with the models themselves.

Search order (first match of a name wins):

1. folders in the ``LONGDIFF_MODELS`` environment variable (``os.pathsep``-separated),
2. the user's folder, ``~/.longdiff/models``,
3. the models bundled with the extension, ``Resources/Models`` beside the library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

ENV_VAR = "LONGDIFF_MODELS"
USER_DIR = Path("~/.longdiff/models")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"


@dataclass(frozen=True)
class ModelCard:
    """A model's card as found on disk."""

    name: str
    path: Path
    card: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.card.get("method", "?"))

    @property
    def simulated(self) -> bool:
        return bool(self.card.get("trained_on", {}).get("simulated", False))


def search_paths() -> list[Path]:
    """The folders searched for model cards, in priority order."""
    paths = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    return paths + [USER_DIR.expanduser(), BUNDLED_DIR]


def list_models() -> list[ModelCard]:
    """Every card found, first occurrence of each name only. Unreadable cards raise."""
    found: dict[str, ModelCard] = {}
    for folder in search_paths():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                card = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise InputError(path, f"model card is not valid JSON ({exc})") from None
            if not isinstance(card, dict) or "method" not in card:
                raise InputError(path, "model card has no 'method' field")
            found.setdefault(path.stem, ModelCard(path.stem, path, card))
    return list(found.values())


def find_model(name: str) -> ModelCard:
    """The card called ``name``; a clear error listing what exists when there is none."""
    models = list_models()
    for m in models:
        if m.name == name:
            return m
    have = ", ".join(m.name for m in models) or "none"
    where = ", ".join(str(p) for p in search_paths())
    raise InputError(None, f"no model named '{name}' (installed models: {have}; searched {where})")
