"""Tab-separated tables as the manifest and BIDS ``sessions.tsv`` write them: the reader,
the age column and the cell helpers both loaders share."""

from __future__ import annotations

from pathlib import Path

from .ages import canonical_unit
from .errors import InputError

__all__ = ["age_column", "read_tsv", "strip_prefix"]


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Read a tab-separated file: the header and ``(line_number, cells)`` for each row.

    Blank lines and lines whose first non-blank character is ``#`` are skipped; line
    numbers count every line of the file from 1 (the header's), as an editor shows them.
    Cells are stripped; a cell wholly wrapped in double quotes loses the quotes.
    """
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [_unquote(c.strip()) for c in line.split("\t")]
        if header is None:
            if len(cells) == 1 and "," in cells[0]:
                raise InputError(path, f"line {number}: the header has no tabs; the file must be tab-separated")
            header = cells
            continue
        if len(cells) > len(header):
            if any(cells[len(header) :]):
                raise InputError(
                    f"{path}, row {number}", f"{len(cells)} cells but the header has {len(header)} columns"
                )
            cells = cells[: len(header)]
        cells += [""] * (len(header) - len(cells))
        rows.append((number, cells))
    if header is None:
        raise InputError(path, "the file is empty (no header line)")
    lowered = [h.lower() for h in header]
    for h in set(lowered):
        if lowered.count(h) > 1:
            raise InputError(path, f"column '{h}' appears more than once in the header")
    return lowered, rows


def _unquote(cell: str) -> str:
    if len(cell) >= 2 and cell[0] == cell[-1] == '"':
        return cell[1:-1]
    return cell


def age_column(header: list[str], path: Path) -> tuple[str, str | None] | None:
    """Find the age column: ``("age", None)`` or ``("age_days", "days")``; None if absent."""
    candidates: list[tuple[str, str | None]] = []
    for name in header:
        if name == "age":
            candidates.append((name, None))
        elif name.startswith("age_") and name != "age_unit":
            unit = canonical_unit(name[4:])
            if unit is not None:
                candidates.append((name, unit))
    if len(candidates) > 1:
        names = ", ".join(c[0] for c in candidates)
        raise InputError(path, f"several age columns ({names}); keep one")
    return candidates[0] if candidates else None


def strip_prefix(text: str, prefix: str) -> str:
    """``text`` stripped of blanks and of ``prefix`` (``"sub-01"`` -> ``"01"``)."""
    text = str(text).strip()
    return text[len(prefix) :] if text.startswith(prefix) else text
