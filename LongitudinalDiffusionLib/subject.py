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

This module gathers the public names of the modules that hold each concern, so that
``from LongitudinalDiffusionLib.subject import ...`` keeps working:

* :mod:`.modality` - :class:`Modality` and :func:`parse_modality`;
* :mod:`.ages` - :func:`parse_age`, :func:`parse_age_unit`, ``AGE_UNITS``;
* :mod:`.timepoints` - the data model, :class:`Timepoint` and :class:`Subject`;
* :mod:`.tsv` - the tab-separated reader both loaders share;
* :mod:`.manifest` - :func:`load_manifest`;
* :mod:`.bids` - BIDS file names and :func:`load_bids_subject`;
* :mod:`.provenance` - :class:`Provenance`, :func:`save_result`, :func:`load_provenance`;

and holds :func:`load_subject`, which picks the loader for a path.
"""

from __future__ import annotations

import os
from pathlib import Path

from .ages import AGE_UNITS, MAX_AGE_MONTHS, parse_age, parse_age_unit
from .bids import bids_modality, bids_suffix, load_bids_subject, parse_bids_name
from .errors import InputError
from .manifest import MANIFEST_NAME, load_manifest
from .modality import Modality, parse_modality
from .provenance import Provenance, load_provenance, save_result
from .timepoints import Subject, Timepoint

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
