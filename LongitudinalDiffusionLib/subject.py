"""Subjects and their timepoints: who was scanned, at what age, with which contrast.

A :class:`Subject` is one person's imaging history: a list of :class:`Timepoint` objects,
each an image of one :class:`Modality` at one age. Ages are always stored in **months**
(float) whatever unit the source used; :func:`parse_age` converts and refuses impossible
values.

Two loaders build a subject from files:

* :func:`load_manifest` reads a tab-separated manifest (one row per image) next to the
  images;
* :func:`load_bids_subject` reads a BIDS subject (``sub-XX/ses-YY/anat``), taking ages from
  ``sub-XX_sessions.tsv`` and their unit from the ``sessions.json`` sidecar.

Both check every image with :func:`~LongitudinalDiffusionLib.imaging.load_image`, never
write anything, and raise :class:`~LongitudinalDiffusionLib.errors.InputError` naming the
file (and the manifest row) and the problem.

Results go back to disk with :func:`save_result`, which writes the NIfTI and a JSON sidecar
holding its :class:`Provenance` (model, sampler, seed, inputs, ...); :func:`load_provenance`
reads the sidecar back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import InputError
from .imaging import Image, check_array, load_image, save_image, sidecar_path

logger = logging.getLogger(__name__)

__all__ = [
    "AGE_UNITS",
    "MAX_AGE_MONTHS",
    "Modality",
    "Provenance",
    "Subject",
    "Timepoint",
    "bids_modality",
    "bids_suffix",
    "load_bids_subject",
    "load_manifest",
    "load_subject",
    "load_provenance",
    "parse_age",
    "parse_age_unit",
    "parse_bids_name",
    "parse_modality",
    "save_result",
]


# --------------------------------------------------------------------------- modalities


class Modality(str, Enum):
    """The MRI contrasts the models know. The value is the display / BIDS-like name."""

    T1W = "T1w"
    T2W = "T2w"
    FLAIR = "FLAIR"
    T1CE = "T1ce"  # contrast-enhanced (e.g. gadolinium) T1-weighted

    def __str__(self) -> str:
        return self.value


_MODALITY_ORDER = {m: i for i, m in enumerate(Modality)}
_EXPECTED_MODALITIES = ", ".join(m.value for m in Modality)

# Aliases after lower-casing and removing spaces, "_", "-", "." and "+".
_MODALITY_ALIASES: dict[str, Modality] = {
    **dict.fromkeys(("t1", "t1w", "t1wi", "t1weighted"), Modality.T1W),
    **dict.fromkeys(("t2", "t2w", "t2wi", "t2weighted"), Modality.T2W),
    **dict.fromkeys(("flair", "t2flair", "t2wflair", "flairt2", "flairw"), Modality.FLAIR),
    **dict.fromkeys(
        (
            "t1ce",
            "t1c",
            "t1gd",
            "t1gad",
            "t1wce",
            "t1wgd",
            "t1post",
            "t1wpost",
            "t1contrast",
            "t1enhanced",
            "cet1",
            "cet1w",
            "gdt1",
            "gdt1w",
        ),
        Modality.T1CE,
    ),
}
# "ce-gadolinium_t1w", "T1w_ce-Gd", ...: a BIDS ``ce`` entity on a T1 name.
_T1CE_PATTERNS = (re.compile(r"^ce[a-z0-9]*t1w?$"), re.compile(r"^t1w?ce[a-z0-9]*$"))


def parse_modality(text: str | Modality, source: str | os.PathLike | None = None) -> Modality:
    """Read a modality name, case-insensitively and with common aliases.

    Accepted (among others): ``t1``, ``T1w``; ``t2``, ``T2w``; ``FLAIR``, ``t2flair``,
    ``T2-FLAIR``; ``t1ce``, ``t1c``, ``T1Gd``, ``ceT1w``, ``T1+C``, ``ce-gadolinium_T1w``.

    Args:
        text: the name to read (a :class:`Modality` is returned as is).
        source: the file or item the name comes from, for the error message.

    Raises:
        InputError: empty or unknown name.
    """
    if isinstance(text, Modality):
        return text
    raw = "" if text is None else str(text).strip()
    if not raw:
        raise InputError(source, f"missing modality; expected one of {_EXPECTED_MODALITIES}")
    compact = re.sub(r"[\s_\-.+]", "", raw.lower())
    found = _MODALITY_ALIASES.get(compact)
    if found is None and any(p.match(compact) for p in _T1CE_PATTERNS):
        found = Modality.T1CE
    if found is None:
        raise InputError(source, f"unknown modality '{raw}'; expected one of {_EXPECTED_MODALITIES}")
    return found


_BIDS_SUFFIX = {
    Modality.T1W: ({}, "T1w"),
    Modality.T2W: ({}, "T2w"),
    Modality.FLAIR: ({}, "FLAIR"),
    Modality.T1CE: ({"ce": "gadolinium"}, "T1w"),
}
_SUFFIX_MODALITY = {"t1w": Modality.T1W, "t2w": Modality.T2W, "flair": Modality.FLAIR}
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def bids_suffix(modality: str | Modality) -> tuple[dict[str, str], str]:
    """The BIDS entities and suffix that name a modality's file.

    ``T1ce`` has no suffix of its own in BIDS: it is a ``T1w`` file with a ``ce-<agent>``
    entity, here ``({"ce": "gadolinium"}, "T1w")``.

    Returns:
        ``(extra_entities, suffix)``; the dict is a fresh copy the caller may change.
    """
    entities, suffix = _BIDS_SUFFIX[parse_modality(modality)]
    return dict(entities), suffix


def parse_bids_name(name: str | os.PathLike) -> tuple[dict[str, str], str, str] | None:
    """Split a BIDS file name into ``(entities, suffix, extension)``.

    ``sub-01_ses-02_run-1_T1w.nii.gz`` -> ``({"sub": "01", "ses": "02", "run": "1"},
    "T1w", ".nii.gz")``. Returns None when the name is not of the BIDS form.
    """
    name = Path(name).name
    extension = ""
    for ext in (".nii.gz", ".nii", ".json", ".tsv"):
        if name.endswith(ext):
            name, extension = name[: -len(ext)], ext
            break
    else:
        if "." in name:
            name, dot, rest = name.partition(".")
            extension = dot + rest
    parts = name.split("_")
    if len(parts) < 2:
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, dash, value = part.partition("-")
        if not dash or not key or not value or key in entities:
            return None
        entities[key] = value
    suffix = parts[-1]
    if not suffix or "-" in suffix:
        return None
    return entities, suffix, extension


def bids_modality(name: str | os.PathLike) -> Modality | None:
    """The modality of a BIDS anatomical file from its name, or None if it has none here.

    ``..._T1w.nii.gz`` is T1w, but with any ``ce-<agent>`` entity it is T1ce;
    ``_T2w`` and ``_FLAIR`` map to T2w and FLAIR. Other suffixes (``dseg``, ``PDw``, ...)
    and contrast-enhanced T2w/FLAIR (no model uses them) give None.
    """
    parsed = parse_bids_name(name)
    if parsed is None:
        return None
    entities, suffix, _ = parsed
    modality = _SUFFIX_MODALITY.get(suffix.lower())
    if modality is None:
        return None
    if "ce" in entities:
        return Modality.T1CE if modality is Modality.T1W else None
    return modality


# --------------------------------------------------------------------------------- ages

_DAYS_PER_MONTH = 30.4375  # 365.25 / 12

#: Months per unit. Keys are matched case-insensitively; see :func:`parse_age_unit`.
AGE_UNITS: dict[str, float] = {
    "days": 1 / _DAYS_PER_MONTH,
    "weeks": 7 / _DAYS_PER_MONTH,
    "months": 1.0,
    "years": 12.0,
}
_UNIT_SPELLINGS = {
    "days": ("day", "d"),
    "weeks": ("week", "w", "wk", "wks"),
    "months": ("month", "m", "mo", "mos"),
    "years": ("year", "y", "yr", "yrs"),
}
_CANONICAL_UNIT: dict[str, str] = {}
for _canonical, _spellings in _UNIT_SPELLINGS.items():
    _CANONICAL_UNIT[_canonical] = _canonical
    for _spelling in _spellings:
        AGE_UNITS[_spelling] = AGE_UNITS[_canonical]
        _CANONICAL_UNIT[_spelling] = _canonical
del _canonical, _spellings, _spelling

#: Oldest age accepted (130 years), in months.
MAX_AGE_MONTHS = 130 * 12.0


def parse_age_unit(unit: str, source: str | os.PathLike | None = None) -> str:
    """The canonical name (``days``, ``weeks``, ``months``, ``years``) of an age unit.

    Raises:
        InputError: unknown unit.
    """
    key = "" if unit is None else str(unit).strip().lower()
    if key not in _CANONICAL_UNIT:
        raise InputError(source, f"unknown age unit '{unit}'; expected days, weeks, months or years")
    return _CANONICAL_UNIT[key]


def parse_age(value: Any, unit: str = "months", source: str | os.PathLike | None = None) -> float:
    """Read an age and return it in months.

    Args:
        value: a number, or text holding one (``"18"``, ``"1.5"``); a unit inside the text
            (``"18 mo"``) is refused: units come from ``unit``.
        unit: ``days``, ``weeks``, ``months`` or ``years`` (or ``d``, ``w``, ``m``/``mo``,
            ``y``, singular forms; any case).
        source: the file, row or item the age comes from, for the error message.

    Raises:
        InputError: missing, non-numeric, NaN, negative or older than 130 years; unknown unit.
    """
    unit = parse_age_unit(unit, source)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "n/a", "na")):
        raise InputError(source, "missing age")
    if isinstance(value, (bool, np.bool_)):
        raise InputError(source, f"age {value!r} is not a number")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        text = f"{number:g}"
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            hint = ""
            if re.fullmatch(r"[-+]?\d+,\d+", text):
                hint = " (use a point as the decimal separator)"
            elif re.fullmatch(r"[-+]?[\d.]+\s*[A-Za-z]+", text):
                hint = " (give the unit in the unit column or the column name, not in the cell)"
            # float()'s own message only repeats the text: the cause is noise
            raise InputError(source, f"age '{text}' is not a number{hint}") from None
    if math.isnan(number):
        raise InputError(source, "age is NaN (not a number)")
    if number < 0:
        raise InputError(source, f"impossible age {text} {unit}: ages count from birth")
    months = number * AGE_UNITS[unit]
    if not math.isfinite(months) or months > MAX_AGE_MONTHS:
        raise InputError(source, f"impossible age {text} {unit}: more than 130 years")
    return months + 0.0  # turns -0.0 into 0.0


def _format_age(months: float) -> str:
    return f"{months:.1f} mo"


# ----------------------------------------------------------------------- subject model


@dataclass(eq=False)
class Timepoint:
    """One image of a subject: a modality at an age.

    Args:
        age: age at the scan in months (converted to float and checked).
        modality: a :class:`Modality` or a name :func:`parse_modality` reads.
        image: the volume, or None when not (yet) loaded.
        source: the file the image came from (None for in-memory images).
        session: the session label (e.g. ``"ses-01"``), when known.
        labels: a tissue label map (``_dseg``) of the same session, when one exists.
    """

    age: float
    modality: Modality
    image: Image | None
    source: Path | None
    session: str | None = None
    labels: Path | None = None

    def __post_init__(self) -> None:
        if self.source is not None:
            self.source = Path(self.source)
        if self.labels is not None:
            self.labels = Path(self.labels)
        where = self.source if self.source is not None else "timepoint"
        self.modality = parse_modality(self.modality, where)
        self.age = parse_age(self.age, "months", where)

    @property
    def age_label(self) -> str:
        """The age for display, e.g. ``"6.0 mo"``."""
        return _format_age(self.age)

    def describe(self) -> str:
        """Short human-readable name: ``"T1w at 6.0 mo (ses-02)"``."""
        session = f" ({self.session})" if self.session else ""
        return f"{self.modality.value} at {self.age_label}{session}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the image itself is referred to by its file)."""
        return {
            "session": self.session,
            "age_months": self.age,
            "modality": self.modality.value,
            "shape": None if self.image is None else list(self.image.shape),
            "spacing": None if self.image is None else list(self.image.spacing),
            "file": None if self.source is None else str(self.source),
            "labels": None if self.labels is None else str(self.labels),
        }


@dataclass(eq=False)
class Subject:
    """One subject's imaging history.

    Timepoints are kept sorted by age, then modality (T1w, T2w, FLAIR, T1ce).

    Args:
        subject_id: the subject's identifier (``"sub-01"`` for BIDS subjects).
        timepoints: the images; no two may share an (age, modality) pair.
        source: the manifest file or BIDS subject folder the subject was read from.
        meta: free-form information, e.g. ``age_unit`` and ``age_unit_source``.

    Raises:
        InputError: no timepoints; two images with the same age and modality.
    """

    subject_id: str
    timepoints: list[Timepoint]
    source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    #: Ages closer than this (months) are the same age.
    AGE_TOL = 1e-6

    def __post_init__(self) -> None:
        if self.source is not None:
            self.source = Path(self.source)
        where = self.source if self.source is not None else f"subject {self.subject_id}"
        self.timepoints = list(self.timepoints)
        for tp in self.timepoints:
            if not isinstance(tp, Timepoint):
                raise TypeError(f"timepoints must be Timepoint objects, got {type(tp).__name__}")
        if not self.timepoints:
            raise InputError(where, "no timepoints")
        self.timepoints.sort(key=lambda tp: (tp.age, _MODALITY_ORDER[tp.modality]))
        for a, b in zip(self.timepoints, self.timepoints[1:]):
            if a.modality is b.modality and abs(a.age - b.age) <= self.AGE_TOL:
                raise InputError(
                    where,
                    f"two {a.modality.value} images at age {a.age_label}: {_name(a)} and {_name(b)}; keep one of them",
                )

    def ages(self) -> list[float]:
        """The distinct ages (months), ascending."""
        out: list[float] = []
        for tp in self.timepoints:
            if not out or tp.age - out[-1] > self.AGE_TOL:
                out.append(tp.age)
        return out

    def modalities(self) -> list[Modality]:
        """The modalities present, in the order T1w, T2w, FLAIR, T1ce."""
        present = {tp.modality for tp in self.timepoints}
        return [m for m in Modality if m in present]

    def sessions(self) -> list[str]:
        """The session labels, in order of age (timepoints without one are left out)."""
        out: list[str] = []
        for tp in self.timepoints:
            if tp.session is not None and tp.session not in out:
                out.append(tp.session)
        return out

    def get(self, age: float, modality: str | Modality, tol: float = 1e-6) -> Timepoint:
        """The timepoint of ``modality`` at ``age`` months (within ``tol`` months).

        Raises:
            KeyError: no such timepoint; the message lists what there is.
        """
        modality = parse_modality(modality)
        for tp in self.timepoints:
            if tp.modality is modality and abs(tp.age - float(age)) <= tol:
                return tp
        raise KeyError(
            f"subject {self.subject_id} has no {modality.value} image at {_format_age(float(age))}; "
            f"it has: {self.summary()}"
        )

    def summary(self) -> str:
        """One line listing ages and modalities: ``"6.0 mo (T1w, T2w); 12.0 mo (T1w)"``."""
        parts = []
        for age in self.ages():
            mods = [tp.modality.value for tp in self.timepoints if abs(tp.age - age) <= self.AGE_TOL]
            parts.append(f"{_format_age(age)} ({', '.join(mods)})")
        return "; ".join(parts)

    def table(self) -> list[dict[str, Any]]:
        """One row per timepoint, sorted by age then modality.

        Keys: ``session``, ``age_months``, ``modality`` (its name), ``shape`` and
        ``spacing`` (tuples, None when the image is not loaded) and ``file``.
        """
        rows = []
        for tp in self.timepoints:
            rows.append(
                {
                    "session": tp.session,
                    "age_months": tp.age,
                    "modality": tp.modality.value,
                    "shape": None if tp.image is None else tp.image.shape,
                    "spacing": None if tp.image is None else tp.image.spacing,
                    "file": None if tp.source is None else str(tp.source),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description; images are referred to by their files."""
        return {
            "subject_id": self.subject_id,
            "source": None if self.source is None else str(self.source),
            "meta": dict(self.meta),
            "timepoints": [tp.to_dict() for tp in self.timepoints],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, load_images: bool = True) -> Subject:
        """Rebuild a subject from :meth:`to_dict` output.

        Args:
            data: the dict.
            load_images: read each timepoint's file with ``load_image`` (otherwise
                ``image`` stays None).
        """
        timepoints = []
        for entry in data.get("timepoints", []):
            file = entry.get("file")
            image = load_image(file) if (load_images and file) else None
            timepoints.append(
                Timepoint(
                    age=entry["age_months"],
                    modality=entry["modality"],
                    image=image,
                    source=file,
                    session=entry.get("session"),
                    labels=entry.get("labels"),
                )
            )
        return cls(str(data["subject_id"]), timepoints, data.get("source"), dict(data.get("meta") or {}))


def _name(tp: Timepoint) -> str:
    return str(tp.source) if tp.source is not None else f"an in-memory image ({tp.describe()})"


# ------------------------------------------------------------------------- TSV reading


def _read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
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


def _age_column(header: list[str], path: Path) -> tuple[str, str | None] | None:
    """Find the age column: ``("age", None)`` or ``("age_days", "days")``; None if absent."""
    candidates: list[tuple[str, str | None]] = []
    for name in header:
        if name == "age":
            candidates.append((name, None))
        elif name.startswith("age_") and name != "age_unit":
            unit = name[4:]
            if unit in _CANONICAL_UNIT:
                candidates.append((name, _CANONICAL_UNIT[unit]))
    if len(candidates) > 1:
        names = ", ".join(c[0] for c in candidates)
        raise InputError(path, f"several age columns ({names}); keep one")
    return candidates[0] if candidates else None


# ---------------------------------------------------------------------------- manifest

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
    header, rows = _read_tsv(path)
    found = ", ".join(header) if header else "none"
    age_col = _age_column(header, path)
    missing = [c for c in ("file", "modality") if c not in header]
    if age_col is None:
        missing.insert(1, "age")
    if missing or age_col is None:
        raise InputError(
            path,
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(columns found: {found}); required: file, age (or age_<unit>), modality",
        )
    age_name, name_unit = age_col
    col = {name: i for i, name in enumerate(header)}
    subject_col = next((c for c in _SUBJECT_COLUMNS if c in col), None)

    if subject_col is not None:
        ids = [cells[col[subject_col]] for _, cells in rows]
        wanted = None if subject_id is None else _strip_prefix(subject_id, "sub-")
        if wanted is None:
            distinct = sorted(set(ids))
            if len(distinct) > 1:
                raise InputError(
                    path, f"the manifest lists several subjects ({', '.join(distinct)}); pass subject_id to pick one"
                )
            subject_id = distinct[0] if distinct and distinct[0] else None
        else:
            rows = [row for row, sid in zip(rows, ids) if _strip_prefix(sid, "sub-") == wanted]
            if not rows:
                raise InputError(
                    path, f"no rows for subject '{subject_id}' (subjects listed: {', '.join(sorted(set(ids)))})"
                )
    if subject_id is None:
        subject_id = path.parent.resolve().name

    units_seen: set[str] = set()
    unit_sources: set[str] = set()
    timepoints: list[Timepoint] = []
    seen_rows: list[int] = []
    base = path.parent
    for number, cells in rows:
        where = f"{path}, row {number}"

        def cell(name: str, cells: list[str] = cells) -> str:
            return cells[col[name]] if name in col else ""

        unit_cell = cell("age_unit")
        if unit_cell:
            unit = parse_age_unit(unit_cell, where)
            if name_unit is not None and unit != name_unit:
                raise InputError(where, f"age_unit '{unit_cell}' contradicts the column name '{age_name}'")
            unit_sources.add("age_unit column")
        elif name_unit is not None:
            unit = name_unit
            unit_sources.add(f"column name '{age_name}'")
        else:
            unit = "months"
            unit_sources.add("default (months; the manifest states no unit)")
        units_seen.add(unit)
        age = parse_age(cell(age_name), unit, where)
        modality = parse_modality(cell("modality"), where)
        file_text = cell("file")
        if not file_text:
            raise InputError(where, "missing file name")
        file = _resolve(base, file_text)
        for seen_number, seen in zip(seen_rows, timepoints):
            if seen.modality is modality and abs(seen.age - age) <= Subject.AGE_TOL:
                raise InputError(
                    where,
                    f"two {modality.value} images at age {_format_age(age)}: {seen.source} (row {seen_number}) "
                    f"and {file}; keep one of them",
                )
        try:
            image = load_image(file)
        except InputError as exc:
            raise InputError(where, str(exc)) from exc
        labels = None
        if cell("labels"):
            labels = _resolve(base, cell("labels"))
            if not labels.is_file():
                raise InputError(where, f"{labels}: label file not found")
        timepoints.append(Timepoint(age, modality, image, file, session=cell("session") or None, labels=labels))
        seen_rows.append(number)

    if not timepoints:
        raise InputError(path, "no timepoints: the manifest has a header but no rows")
    if "default (months; the manifest states no unit)" in unit_sources:
        logger.info("%s: no age unit stated; ages are read as months", path)
    meta = {
        "manifest": str(path),
        "age_unit": units_seen.pop() if len(units_seen) == 1 else "mixed",
        "age_unit_source": "; ".join(sorted(unit_sources)),
    }
    return Subject(str(subject_id), timepoints, path, meta)


def _resolve(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _strip_prefix(text: str, prefix: str) -> str:
    text = str(text).strip()
    return text[len(prefix) :] if text.startswith(prefix) else text


# -------------------------------------------------------------------------------- BIDS


def load_bids_subject(path: str | os.PathLike, *, subject: str | None = None) -> Subject:
    """Read a BIDS subject: ``ses-*/anat`` images with ages from ``sessions.tsv``.

    Layout::

        <root>/sessions.json                      optional, inherited unit sidecar
        <root>/sub-XX/sub-XX_sessions.tsv         session_id, age (one row per session)
        <root>/sub-XX/sub-XX_sessions.json        {"age": {"Units": "months"}}
        <root>/sub-XX/ses-YY/anat/sub-XX_ses-YY[_<entities>]_{T1w,T2w,FLAIR}.nii[.gz]
        <root>/derivatives/<pipeline>/sub-XX/ses-YY/anat/*_dseg.nii[.gz]   optional labels

    A ``T1w`` file with a ``ce-<agent>`` entity is T1ce. Files with other suffixes are
    ignored. The age unit comes from the subject's ``sessions.json`` sidecar, else the
    dataset-level ``sessions.json``; when neither states it, ages are taken as **years**
    (the BIDS default) and a warning is logged. ``Subject.meta`` records ``age_unit`` and
    ``age_unit_source``. Sessions listed in ``sessions.tsv`` without a folder are skipped
    (with a warning); sessions without T1w/T2w/FLAIR images are skipped.

    Args:
        path: the ``sub-XX`` folder, or the dataset root (then give ``subject``, unless the
            dataset has a single subject).
        subject: the subject label, ``"XX"`` or ``"sub-XX"``.

    Raises:
        InputError: missing folder or ``sessions.tsv``; ``sessions.tsv`` without ``age``;
            a session folder not listed there; an empty or impossible age; an unknown unit;
            two files of one modality in one session; any unusable image.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "folder not found" if not path.exists() else "not a folder")
    if subject is not None:
        root, label = path, _strip_prefix(subject, "sub-")
        subdir = root / f"sub-{label}"
        if not subdir.is_dir():
            raise InputError(subdir, f"no such subject folder (subjects found: {_list_subjects(root)})")
    elif path.name.startswith("sub-"):
        subdir, root, label = path, path.parent, path.name[4:]
    else:
        subjects = sorted(p.name for p in path.glob("sub-*") if p.is_dir())
        if len(subjects) != 1:
            problem = (
                "no sub-* folders: not a BIDS dataset or subject folder"
                if not subjects
                else (f"the dataset has several subjects ({', '.join(subjects)}); pass subject= to pick one")
            )
            raise InputError(path, problem)
        subdir, root, label = path / subjects[0], path, subjects[0][4:]
    sub = f"sub-{label}"

    tsv = subdir / f"{sub}_sessions.tsv"
    if not tsv.is_file():
        raise InputError(
            tsv, "sessions.tsv not found; it must list each session_id with the subject's age at that session"
        )
    header, rows = _read_tsv(tsv)
    if "session_id" not in header:
        raise InputError(tsv, f"sessions.tsv has no 'session_id' column (columns found: {', '.join(header)})")
    age_col = _age_column(header, tsv)
    if age_col is None:
        raise InputError(
            tsv,
            "sessions.tsv has no 'age' column; ages are needed to place each session in time "
            f"(columns found: {', '.join(header)})",
        )
    age_name, name_unit = age_col
    unit, unit_source = _bids_age_unit(subdir, root, sub, name_unit, age_name)
    col = {name: i for i, name in enumerate(header)}

    ages: dict[str, float] = {}
    for number, cells in rows:
        where = f"{tsv}, row {number}"
        session = cells[col["session_id"]]
        if not session:
            raise InputError(where, "missing session_id")
        session = "ses-" + _strip_prefix(session, "ses-")
        if session in ages:
            raise InputError(where, f"session {session} is listed twice")
        try:
            ages[session] = parse_age(cells[col[age_name]], unit, where)
        except InputError as exc:
            raise InputError(where, f"session {session}: {exc.problem}") from exc

    folders = sorted(p for p in subdir.glob("ses-*") if p.is_dir())
    if not folders:
        raise InputError(subdir, "no ses-* session folders; a longitudinal subject needs sessions")
    for folder in folders:
        if folder.name not in ages:
            raise InputError(tsv, f"session folder {folder.name} is not listed in sessions.tsv, so its age is unknown")
    for session in ages:
        if not (subdir / session).is_dir():
            logger.warning("%s: session %s is listed but has no folder; skipped", tsv, session)

    timepoints = []
    for folder in folders:
        session = folder.name
        found = _session_images(folder / "anat", sub, session)
        labels = _find_labels(root, sub, session)
        for modality, file in found.items():
            timepoints.append(Timepoint(ages[session], modality, load_image(file), file, session, labels))
    if not timepoints:
        raise InputError(subdir, "no T1w, T2w or FLAIR images found in any ses-*/anat folder")
    meta = {"age_unit": unit, "age_unit_source": unit_source, "sessions_tsv": str(tsv), "bids_root": str(root)}
    return Subject(sub, timepoints, subdir, meta)


def _list_subjects(root: Path) -> str:
    names = sorted(p.name for p in root.glob("sub-*") if p.is_dir())
    return ", ".join(names) if names else "none"


def _bids_age_unit(subdir: Path, root: Path, sub: str, name_unit: str | None, age_name: str) -> tuple[str, str]:
    """The unit of sessions.tsv ages and where it was stated (nearest sidecar wins)."""
    if name_unit is not None:
        return name_unit, f"column name '{age_name}'"
    for sidecar in (subdir / f"{sub}_sessions.json", root / "sessions.json"):
        if not sidecar.is_file():
            continue
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(sidecar, f"not valid JSON ({exc})") from exc
        entry = data.get(age_name) if isinstance(data, dict) else None
        if isinstance(entry, dict):
            units = entry.get("Units", entry.get("units"))
            if units:
                return parse_age_unit(units, f"{sidecar} (age Units)"), str(sidecar)
    logger.warning(
        "%s: no age unit stated (no age 'Units' in %s_sessions.json or the dataset's sessions.json); "
        "assuming years, the BIDS default",
        subdir,
        sub,
    )
    return "years", "assumed years (BIDS default; no Units stated in sessions.json)"


def _session_images(anat: Path, sub: str, session: str) -> dict[Modality, Path]:
    """The T1w/T2w/FLAIR/T1ce images of one session folder, one per modality."""
    found: dict[Modality, Path] = {}
    if not anat.is_dir():
        logger.info("%s: no anat folder; session skipped", anat.parent)
        return found
    for file in sorted(anat.iterdir()):
        if file.name.startswith(".") or not file.name.endswith(_NIFTI_EXTENSIONS) or not file.is_file():
            continue
        parsed = parse_bids_name(file.name)
        if parsed is None:
            logger.warning("%s: not a BIDS file name; ignored", file)
            continue
        entities, suffix, _ = parsed
        modality = bids_modality(file.name)
        if modality is None:
            if "ce" in entities and suffix.lower() in _SUFFIX_MODALITY:
                logger.warning("%s: contrast-enhanced %s is not a supported modality; ignored", file, suffix)
            continue
        if entities.get("sub") != sub[4:] or entities.get("ses", session[4:]) != session[4:]:
            raise InputError(file, f"the file name does not match its folder ({sub}/{session})")
        if modality in found:
            raise InputError(
                anat,
                f"two {modality.value} images in session {session}: {found[modality].name} and {file.name}; "
                "keep one (e.g. move the other run out of the folder)",
            )
        found[modality] = file
    return found


def _find_labels(root: Path, sub: str, session: str) -> Path | None:
    """A ``_dseg`` label map of the session in any derivatives pipeline, if there is one."""
    derivatives = root / "derivatives"
    if not derivatives.is_dir():
        return None
    matches = sorted(
        p
        for pattern in ("*_dseg.nii.gz", "*_dseg.nii")
        for p in derivatives.glob(f"*/{sub}/{session}/anat/{pattern}")
        if p.is_file()
    )
    if len(matches) > 1:
        logger.warning("several label maps for %s %s; using %s", sub, session, matches[0])
    return matches[0] if matches else None


# -------------------------------------------------------------------------- provenance


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Provenance:
    """How a result was made; saved as the JSON sidecar of the result's NIfTI.

    Pass the fields by keyword (plain ``@dataclass``: ``kw_only`` needs Python 3.10, and the
    library runs on Slicer 5.8's Python 3.9). ``library_version`` and ``created`` (UTC,
    ISO-8601) are filled automatically.

    Args:
        model: model card name (e.g. ``"cas-diffcom-demo"``).
        model_version: version of the model card / weights.
        method: the published method (e.g. ``"Cas-DiffCom"``).
        seed: random seed of the sampler (None if not seeded).
        steps: number of sampling steps.
        sampler: sampler name (e.g. ``"ddim"``).
        inputs: one dict per input image: ``file``, ``age_months``, ``modality``
            (see :meth:`inputs_from`).
        task: what was asked, e.g. ``"complete_age"``, ``"synthesise_modality"``.
        simulated_inputs: True when the inputs were simulated (demo) data.
        extra: anything else (target age, guidance scale, timings, ...).
    """

    model: str
    model_version: str = ""
    method: str = ""
    seed: int | None = None
    steps: int | None = None
    sampler: str | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    task: str = ""
    simulated_inputs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    library_version: str = __version__
    created: str = field(default_factory=_utc_now)

    @staticmethod
    def inputs_from(timepoints: Iterable[Timepoint]) -> list[dict[str, Any]]:
        """The ``inputs`` entries describing some timepoints."""
        return [
            {
                "file": None if tp.source is None else str(tp.source),
                "age_months": tp.age,
                "modality": tp.modality.value,
            }
            for tp in timepoints
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (field order kept)."""
        return asdict(self)

    @property
    def untrained(self) -> bool:
        """True when the model had random weights (its card's ``trained_on`` is null)."""
        return (self.extra or {}).get("trained_on") is None

    @property
    def trained_on_simulated_data(self) -> bool:
        """True when the model learnt from simulated data (its card's ``trained_on.simulated``)."""
        trained = (self.extra or {}).get("trained_on")
        return bool(isinstance(trained, dict) and trained.get("simulated", False))

    def synthetic_marks(self) -> dict[str, Any]:
        """What every generated image's sidecar starts with: it is synthetic, which model
        made it and whether that model was trained on simulated data."""
        marks = {"synthetic": True, "model": self.model, "trained_on_simulated_data": self.trained_on_simulated_data}
        if self.untrained:
            marks["untrained_model"] = True
        return marks

    def synthetic_description(self) -> str:
        """The NIfTI header ``descrip`` (80 bytes at most) of a generated image, e.g.
        ``SYNTHETIC longdiff interval-demo (sim-trained)``: it travels with the file when
        the sidecar does not."""
        tag = " (untrained)" if self.untrained else " (sim-trained)" if self.trained_on_simulated_data else ""
        head = "SYNTHETIC longdiff "
        name = self.model[: 80 - len(head) - len(tag)]
        return f"{head}{name}{tag}"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike | None = None) -> Provenance:
        """Build from a dict; unknown keys are kept in ``extra``.

        Raises:
            InputError: not a dict, or no ``model``.
        """
        if not isinstance(data, dict):
            raise InputError(source, "provenance must be a JSON object")
        if not data.get("model"):
            raise InputError(source, "provenance has no 'model'")
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        # the synthetic marks of a sidecar (synthetic_marks) follow from model and trained_on
        unknown = {k: v for k, v in data.items() if k not in names and k not in _SYNTHETIC_MARKS}
        if unknown:
            known["extra"] = {**(known.get("extra") or {}), **unknown}
        return cls(**known)


_SYNTHETIC_MARKS = ("synthetic", "trained_on_simulated_data", "untrained_model")


def save_result(
    image: Image,
    path: str | os.PathLike,
    provenance: Provenance,
    *,
    dtype: Any = np.float32,
) -> Path:
    """Write a result as NIfTI plus its provenance as a JSON sidecar (``x.nii.gz`` -> ``x.json``).

    The image is marked synthetic: the header's ``descrip`` names the model
    (:meth:`Provenance.synthetic_description`) and the sidecar starts with
    :meth:`Provenance.synthetic_marks`.

    Both files are written atomically; if the sidecar fails the image is removed too.

    Args:
        image: the result, on the geometry it should have on disk.
        path: ``.nii`` or ``.nii.gz`` target.
        provenance: how it was made.
        dtype: on-disk voxel type.

    Returns:
        The NIfTI path.

    Raises:
        InputError: the path is not NIfTI, or the image has NaN/Inf voxels (nothing written).
    """
    path = Path(path)
    if not path.name.endswith(_NIFTI_EXTENSIONS):
        raise InputError(path, "results are written as NIfTI: the name must end in .nii or .nii.gz")
    check_array(image.array, path, ndim=np.ndim(image.array))
    sidecar = {**provenance.synthetic_marks(), **provenance.to_dict()}
    return save_image(image, path, dtype=dtype, sidecar=sidecar, description=provenance.synthetic_description())


def load_provenance(path: str | os.PathLike) -> Provenance:
    """Read the provenance of a result: give the NIfTI (or its ``.json`` sidecar).

    Raises:
        InputError: no sidecar, invalid JSON, or no ``model`` in it.
    """
    path = Path(path)
    sidecar = path if path.suffix == ".json" else sidecar_path(path)
    if not sidecar.is_file():
        raise InputError(sidecar, "no provenance sidecar next to the image")
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(sidecar, f"not valid JSON ({exc})") from exc
    return Provenance.from_dict(data, sidecar)


# ----------------------------------------------------------------------------- dispatch


def load_subject(path: str | os.PathLike, *, subject: str | None = None) -> Subject:
    """Read a subject from whatever layout ``path`` points at.

    * a ``.tsv`` file, or a folder holding ``manifest.tsv``: :func:`load_manifest`;
    * a ``sub-*`` folder, or a BIDS dataset root (with ``subject`` when it has several):
      :func:`load_bids_subject`.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".tsv":
        return load_manifest(path, subject_id=subject)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return load_manifest(path, subject_id=subject)
    if path.is_dir():
        return load_bids_subject(path, subject=subject)
    if not path.exists():
        raise InputError(path, "not found (expected a BIDS subject or dataset folder, or a manifest .tsv)")
    raise InputError(path, "not a subject: expected a BIDS subject or dataset folder, or a manifest .tsv")
