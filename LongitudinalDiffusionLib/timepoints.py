"""The data model: a :class:`Subject` is one person's imaging history, a list of
:class:`Timepoint` objects, each an image of one modality at one age (in months)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ages import format_age, parse_age
from .errors import InputError
from .imaging import Image, load_image
from .modality import MODALITY_ORDER, Modality, parse_modality

__all__ = ["Subject", "Timepoint"]


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
        return format_age(self.age)

    def describe(self) -> str:
        """Short human-readable name: ``"T1w at 6.0 mo (ses-02)"``."""
        session = f" ({self.session})" if self.session else ""
        return f"{self.modality.value} at {self.age_label}{session}"

    def volume(self) -> Image:
        """The image: the one held, else read from :attr:`source` (not kept)."""
        if self.image is not None:
            return self.image
        if self.source is None:
            raise InputError(None, f"{self.describe()}: no image, and no file to read it from")
        return load_image(self.source)

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
        self.timepoints.sort(key=lambda tp: (tp.age, MODALITY_ORDER[tp.modality]))
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
            f"subject {self.subject_id} has no {modality.value} image at {format_age(float(age))}; "
            f"it has: {self.summary()}"
        )

    def summary(self) -> str:
        """One line listing ages and modalities: ``"6.0 mo (T1w, T2w); 12.0 mo (T1w)"``."""
        parts = []
        for age in self.ages():
            mods = [tp.modality.value for tp in self.timepoints if abs(tp.age - age) <= self.AGE_TOL]
            parts.append(f"{format_age(age)} ({', '.join(mods)})")
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
