"""How a result was made (:class:`Provenance`), written as the JSON sidecar of the result's
NIfTI by :func:`save_result` and read back by :func:`load_provenance`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import InputError
from .imaging import Image, check_array, save_image, sidecar_path
from .timepoints import Timepoint

__all__ = ["Provenance", "load_provenance", "save_result"]

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


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
