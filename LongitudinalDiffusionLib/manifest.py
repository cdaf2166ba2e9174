"""The manifest reader: a subject from a tab-separated file, one row per image."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .ages import format_age, parse_age, parse_age_unit
from .errors import InputError
from .imaging import load_image
from .modality import parse_modality
from .timepoints import Subject, Timepoint
from .tsv import age_column, read_tsv, strip_prefix

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "load_manifest"]


_SUBJECT_COLUMNS = ("subject_id", "subject", "participant_id")
MANIFEST_NAME = "manifest.tsv"


def load_manifest(path: str | os.PathLike, *, subject_id: str | None = None) -> Subject:
    """Read a subject from a tab-separated manifest, one row per image.

    Columns (header required, names case-insensitive, in any order):

    * ``file`` - the image; relative paths are resolved against the manifest's folder;
    * ``age`` - the age at the scan; its unit is, in order of precedence, the row's
      ``age_unit`` cell (optional column), or the unit in the column name (``age_days``,
      ``age_weeks``, ``age_months``, ``age_years`` instead of ``age``), or else **months**;
    * ``modality`` - T1w, T2w, FLAIR or T1ce (aliases as in :func:`parse_modality`);
    * optional ``session`` and ``labels`` (a label map file, resolved like ``file``);
    * optional ``subject_id`` (or ``subject`` / ``participant_id``) when the manifest
      lists several subjects; ``subject_id`` then picks one.

    Blank lines and lines starting with ``#`` are ignored. Row numbers in error messages
    are the file's line numbers (the header is row 1).

    Args:
        path: the manifest file, or a folder holding ``manifest.tsv``.
        subject_id: the subject to read (required when several are listed); also names
            a subject whose manifest has no subject column (default: the folder's name).

    Raises:
        InputError: naming the manifest, the row and the problem (missing column, missing
            or impossible age, unknown modality, unknown unit, duplicate age and modality),
            or the image file and its problem (missing, corrupt, truncated, 4D, NaN, ...).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    header, rows = read_tsv(path)
    age_name, name_unit = _manifest_columns(header, path)
    col = {name: i for i, name in enumerate(header)}
    rows, subject_id = _subject_rows(rows, col, path, subject_id)
    if subject_id is None:
        subject_id = path.parent.resolve().name

    units_seen: set[str] = set()
    unit_sources: set[str] = set()
    timepoints: list[Timepoint] = []
    seen_rows: list[int] = []
    for number, cells in rows:
        where = f"{path}, row {number}"
        row = {name: cells[i] for name, i in col.items()}
        unit, unit_source = _row_unit(row.get("age_unit", ""), name_unit, age_name, where)
        units_seen.add(unit)
        unit_sources.add(unit_source)
        timepoints.append(_row_timepoint(row, age_name, unit, path.parent, where, list(zip(seen_rows, timepoints))))
        seen_rows.append(number)

    if not timepoints:
        raise InputError(path, "no timepoints: the manifest has a header but no rows")
    if _DEFAULT_UNIT_SOURCE in unit_sources:
        logger.info("%s: no age unit stated; ages are read as months", path)
    meta = {
        "manifest": str(path),
        "age_unit": units_seen.pop() if len(units_seen) == 1 else "mixed",
        "age_unit_source": "; ".join(sorted(unit_sources)),
    }
    return Subject(str(subject_id), timepoints, path, meta)


_DEFAULT_UNIT_SOURCE = "default (months; the manifest states no unit)"


def _manifest_columns(header: list[str], path: Path) -> tuple[str, str | None]:
    """The age column and the unit its name states, once the required columns are there.

    Raises:
        InputError: a required column is missing (all missing ones are named).
    """
    found = ", ".join(header) if header else "none"
    age_col = age_column(header, path)
    missing = [c for c in ("file", "modality") if c not in header]
    if age_col is None:
        missing.insert(1, "age")
    if missing or age_col is None:
        raise InputError(
            path,
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(columns found: {found}); required: file, age (or age_<unit>), modality",
        )
    return age_col


def _subject_rows(
    rows: list[tuple[int, list[str]]], col: dict[str, int], path: Path, subject_id: str | None
) -> tuple[list[tuple[int, list[str]]], str | None]:
    """The rows of the subject asked for and its id (None: name it after the folder).

    Without a subject column every row is the subject's and ``subject_id`` names it.

    Raises:
        InputError: several subjects listed and none asked for; no row of the one asked for.
    """
    subject_col = next((c for c in _SUBJECT_COLUMNS if c in col), None)
    if subject_col is None:
        return rows, subject_id
    ids = [cells[col[subject_col]] for _, cells in rows]
    if subject_id is None:
        distinct = sorted(set(ids))
        if len(distinct) > 1:
            raise InputError(
                path, f"the manifest lists several subjects ({', '.join(distinct)}); pass subject_id to pick one"
            )
        return rows, (distinct[0] if distinct and distinct[0] else None)
    wanted = strip_prefix(subject_id, "sub-")
    picked = [row for row, sid in zip(rows, ids) if strip_prefix(sid, "sub-") == wanted]
    if not picked:
        raise InputError(path, f"no rows for subject '{subject_id}' (subjects listed: {', '.join(sorted(set(ids)))})")
    return picked, subject_id


def _row_unit(unit_cell: str, name_unit: str | None, age_name: str, where: str) -> tuple[str, str]:
    """The age unit of a row and where it was stated: the row's ``age_unit`` cell, else the
    age column's name, else months.

    Raises:
        InputError: an unknown unit, or one that contradicts the column name.
    """
    if unit_cell:
        unit = parse_age_unit(unit_cell, where)
        if name_unit is not None and unit != name_unit:
            raise InputError(where, f"age_unit '{unit_cell}' contradicts the column name '{age_name}'")
        return unit, "age_unit column"
    if name_unit is not None:
        return name_unit, f"column name '{age_name}'"
    return "months", _DEFAULT_UNIT_SOURCE


def _row_timepoint(
    row: dict[str, str], age_name: str, unit: str, base: Path, where: str, seen: list[tuple[int, Timepoint]]
) -> Timepoint:
    """The timepoint of one manifest row, its image read and checked.

    Args:
        row: the row's cells by column name.
        seen: ``(row number, timepoint)`` of the rows read before, to name a duplicate.

    Raises:
        InputError: naming the row: a bad age or modality, no file name, a second image of one
            modality at one age, an unusable image or a missing label file.
    """
    age = parse_age(row.get(age_name, ""), unit, where)
    modality = parse_modality(row.get("modality", ""), where)
    file_text = row.get("file", "")
    if not file_text:
        raise InputError(where, "missing file name")
    file = _resolve(base, file_text)
    for seen_number, earlier in seen:
        if earlier.modality is modality and abs(earlier.age - age) <= Subject.AGE_TOL:
            raise InputError(
                where,
                f"two {modality.value} images at age {format_age(age)}: {earlier.source} (row {seen_number}) "
                f"and {file}; keep one of them",
            )
    try:
        image = load_image(file)
    except InputError as exc:
        problem = exc.problem if exc.source is None else f"{exc.source}: {exc.problem}"
        raise InputError(where, problem) from exc
    labels = None
    if row.get("labels"):
        labels = _resolve(base, row["labels"])
        if not labels.is_file():
            raise InputError(where, f"{labels}: label file not found")
    return Timepoint(age, modality, image, file, session=row.get("session") or None, labels=labels)


def _resolve(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p
