"""Label tables: the names and colours of a label map's values, from the dataset's BIDS
``dseg.tsv`` or else the demo's brain labels, and the colour of a segment by its name."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from LongitudinalDiffusionLib.errors import InputError

logger = logging.getLogger(__name__)

# Segment colours by (lower-case) label name; other labels take the palette in turn.
_NAMED_COLOURS = {
    "csf": (0.40, 0.65, 1.00),
    "grey matter": (0.85, 0.55, 0.45),
    "gray matter": (0.85, 0.55, 0.45),
    "white matter": (0.95, 0.93, 0.80),
    "lesion: necrotic core": (0.45, 0.20, 0.55),
    "lesion: enhancing rim": (1.00, 0.25, 0.20),
    "lesion: oedema": (1.00, 0.80, 0.20),
}
_PALETTE = (
    (0.50, 0.68, 0.50),
    (0.94, 0.71, 0.63),
    (0.69, 0.48, 0.40),
    (0.44, 0.72, 0.88),
    (0.86, 0.96, 0.08),
    (0.56, 0.24, 0.63),
    (0.98, 0.50, 0.45),
    (0.30, 0.45, 0.80),
)


def findLabelTable(labelsPath: str | os.PathLike) -> Path | None:
    """The BIDS ``dseg.tsv`` naming the values of a ``_dseg`` label map, if there is one.

    Looks for ``<name>.tsv`` beside the label file (``sub-01_ses-01_dseg.tsv``), then walks
    up from its folder to the first folder holding ``dseg.tsv``, stopping at the dataset
    root (the first folder with a ``dataset_description.json``).
    """
    labelsPath = Path(labelsPath)
    name = labelsPath.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            sibling = labelsPath.with_name(name[: -len(ext)] + ".tsv")
            if sibling.is_file():
                return sibling
    for folder in labelsPath.parents:
        if (folder / "dseg.tsv").is_file():
            return folder / "dseg.tsv"
        if (folder / "dataset_description.json").is_file():
            break
    return None


def _parseColour(text: str, where: str) -> tuple[float, float, float] | None:
    text = (text or "").strip()
    if not text or text.lower() == "n/a":
        return None
    hexDigits = text.lstrip("#")
    if len(hexDigits) != 6:
        raise InputError(where, f"colour '{text}' is not of the form #RRGGBB")
    try:
        return tuple(int(hexDigits[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
    except ValueError:
        raise InputError(where, f"colour '{text}' is not of the form #RRGGBB") from None


def readLabelTable(path: str | os.PathLike) -> dict[int, tuple[str, tuple[float, float, float] | None]]:
    """Read a BIDS ``dseg.tsv``: label value -> (name, colour or None).

    Columns ``index`` and ``name`` are required; an optional ``color`` column holds
    ``#RRGGBB`` colours.

    Raises:
        InputError: unreadable file, missing columns, a non-integer or repeated index, or an
            empty name; the message names the file and row.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the label table ({exc})") from None
    if not rows:
        raise InputError(path, "the label table is empty")
    header = [cell.strip() for cell in rows[0]]
    missing = [column for column in ("index", "name") if column not in header]
    if missing:
        raise InputError(path, f"no {' or '.join(missing)} column (columns found: {', '.join(header)})")
    col = {name: i for i, name in enumerate(header)}
    table: dict[int, tuple[str, tuple[float, float, float] | None]] = {}
    for number, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        where = f"{path}, row {number}"
        cells = cells + [""] * (len(header) - len(cells))
        try:
            value = int(cells[col["index"]].strip())
        except ValueError:
            raise InputError(where, f"index '{cells[col['index']]}' is not a whole number") from None
        name = cells[col["name"]].strip()
        if not name:
            raise InputError(where, f"label {value} has no name")
        if value in table:
            raise InputError(where, f"label {value} is listed twice")
        colour = _parseColour(cells[col["color"]], where) if "color" in col else None
        table[value] = (name, colour)
    return table


def _labelTableFor(labelsPath: Path) -> tuple[dict[int, tuple[str, Any]], str]:
    """Names (and colours) of a label file's values, and where they came from."""
    tablePath = findLabelTable(labelsPath)
    if tablePath is not None:
        return readLabelTable(tablePath), str(tablePath)
    from LongitudinalDiffusionLib.demo.brain import BRAIN_LABELS  # scipy: import only when needed

    logger.info("%s: no dseg.tsv found; naming labels with the demo brain labels", labelsPath)
    return {value: (name, None) for value, name in BRAIN_LABELS.items()}, "LongitudinalDiffusionLib.demo.brain"


def _colourFor(name: str, value: int) -> tuple[float, float, float]:
    return _NAMED_COLOURS.get(name.lower(), _PALETTE[value % len(_PALETTE)])
