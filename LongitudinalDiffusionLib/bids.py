"""BIDS: file names (entities, suffix, the modality they hold) and the subject reader
(``sub-XX/ses-YY/anat`` images with ages from ``sessions.tsv``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .ages import parse_age, parse_age_unit
from .errors import InputError
from .imaging import load_image
from .modality import Modality, parse_modality
from .timepoints import Subject, Timepoint
from .tsv import age_column, read_tsv, strip_prefix

logger = logging.getLogger(__name__)

__all__ = ["bids_modality", "bids_suffix", "load_bids_subject", "parse_bids_name"]


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


# ---------------------------------------------------------------------- subject reader


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
    subdir, root = _subject_folder(Path(path), subject)
    sub = subdir.name
    tsv = subdir / f"{sub}_sessions.tsv"
    ages, unit, unit_source = _session_ages(tsv, subdir, root)
    folders = _session_folders(subdir, tsv, ages)
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


def _subject_folder(path: Path, subject: str | None) -> tuple[Path, Path]:
    """The ``sub-XX`` folder and the dataset root of the subject ``path`` and ``subject`` name.

    Raises:
        InputError: no such folder; no subject, or several and none asked for.
    """
    if not path.is_dir():
        raise InputError(path, "folder not found" if not path.exists() else "not a folder")
    if subject is not None:
        subdir = path / f"sub-{strip_prefix(subject, 'sub-')}"
        if not subdir.is_dir():
            raise InputError(subdir, f"no such subject folder (subjects found: {_list_subjects(path)})")
        return subdir, path
    if path.name.startswith("sub-"):
        return path, path.parent
    subjects = sorted(p.name for p in path.glob("sub-*") if p.is_dir())
    if len(subjects) != 1:
        problem = (
            "no sub-* folders: not a BIDS dataset or subject folder"
            if not subjects
            else (f"the dataset has several subjects ({', '.join(subjects)}); pass subject= to pick one")
        )
        raise InputError(path, problem)
    return path / subjects[0], path


def _session_ages(tsv: Path, subdir: Path, root: Path) -> tuple[dict[str, float], str, str]:
    """The age (months) of each session listed in ``sessions.tsv``, the unit they were given
    in and where that unit was stated.

    Raises:
        InputError: no file, no ``session_id`` or age column, a session without id or listed
            twice, an empty or impossible age.
    """
    if not tsv.is_file():
        raise InputError(
            tsv, "sessions.tsv not found; it must list each session_id with the subject's age at that session"
        )
    header, rows = read_tsv(tsv)
    if "session_id" not in header:
        raise InputError(tsv, f"sessions.tsv has no 'session_id' column (columns found: {', '.join(header)})")
    age_col = age_column(header, tsv)
    if age_col is None:
        raise InputError(
            tsv,
            "sessions.tsv has no 'age' column; ages are needed to place each session in time "
            f"(columns found: {', '.join(header)})",
        )
    age_name, name_unit = age_col
    unit, unit_source = _bids_age_unit(subdir, root, subdir.name, name_unit, age_name)
    col = {name: i for i, name in enumerate(header)}
    ages: dict[str, float] = {}
    for number, cells in rows:
        where = f"{tsv}, row {number}"
        session = cells[col["session_id"]]
        if not session:
            raise InputError(where, "missing session_id")
        session = "ses-" + strip_prefix(session, "ses-")
        if session in ages:
            raise InputError(where, f"session {session} is listed twice")
        try:
            ages[session] = parse_age(cells[col[age_name]], unit, where)
        except InputError as exc:
            raise InputError(where, f"session {session}: {exc.problem}") from exc
    return ages, unit, unit_source


def _session_folders(subdir: Path, tsv: Path, ages: dict[str, float]) -> list[Path]:
    """The subject's ``ses-*`` folders, each listed in ``sessions.tsv`` (sessions listed
    without a folder are logged and skipped).

    Raises:
        InputError: no session folder, or one whose age is unknown.
    """
    folders = sorted(p for p in subdir.glob("ses-*") if p.is_dir())
    if not folders:
        raise InputError(subdir, "no ses-* session folders; a longitudinal subject needs sessions")
    for folder in folders:
        if folder.name not in ages:
            raise InputError(tsv, f"session folder {folder.name} is not listed in sessions.tsv, so its age is unknown")
    for session in ages:
        if not (subdir / session).is_dir():
            logger.warning("%s: session %s is listed but has no folder; skipped", tsv, session)
    return folders


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
