"""What a task returns: a :class:`Result` holds the output volumes (:class:`ResultImage`),
the frame series to scrub through (:class:`FrameSeries`) and the :class:`~.provenance.Provenance`;
:meth:`Result.save` writes it all as one folder (atomically: a finished folder or nothing) and
:meth:`Result.load` reads such a folder back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .imaging import Image, check_array, load_image, save_image, write_json
from .provenance import Provenance

__all__ = ["SAME_AGE", "FrameSeries", "Result", "ResultImage"]

#: two ages closer than this (months, ~1.5 days) are the same visit
SAME_AGE = 0.05


# ----------------------------------------------------------------------------- results


@dataclass
class ResultImage:
    """One output volume on the input's geometry."""

    name: str
    image: Image
    kind: str = "generated"  # generated | mean | std | labels
    age: float | None = None
    modality: str | None = None


@dataclass
class FrameSeries:
    """Frames to scrub through: DDM frames (gamma), a completed timeline (months) or the
    denoising intermediates (sampler step). ``fields`` holds each frame's displacement in
    mm along R, A, S (shape (I, J, K, 3)) when the method has one."""

    name: str
    frames: list[Image]
    times: list[float]
    unit: str
    labels: list[Image] | None = None
    generated: list[bool] | None = None
    fields: list[Image] | None = None


@dataclass
class Result:
    task: str
    images: list[ResultImage]
    series: list[FrameSeries] = field(default_factory=list)
    provenance: Provenance | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: input -> model space transforms (preprocess.SavedTransform), saved as transforms/<name>.tfm
    transforms: list[Any] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """The domain checks' warnings (:mod:`.domain`), as the provenance records them."""
        extra = self.provenance.extra if self.provenance is not None else None
        return list((extra or {}).get("warnings") or [])

    def image(self, kind: str = "generated", age: float | None = None) -> Image:
        """The first output of ``kind`` (and at ``age`` months, if given)."""
        for r in self.images:
            if r.kind == kind and (age is None or (r.age is not None and abs(r.age - age) < SAME_AGE)):
                return r.image
        raise KeyError(f"no {kind} image" + (f" at {age} months" if age is not None else ""))

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
        """Write every output as NIfTI with a provenance sidecar, frames under
        ``frames/<series>/``, and ``result.json`` listing it all.

        The files are written into a temporary folder next to ``folder`` and moved into
        place at the end: a failure or a cancel leaves no partial result. The folder gets
        the tool's marker (:mod:`.outputs`); ``overwrite`` replaces only a folder holding
        nothing but an earlier result of the tool, and a folder that holds (or is) one of
        the result's input files is refused (:func:`.outputs.check_output`).
        """
        from . import outputs

        folder = Path(folder)
        inputs = [e.get("file") for e in (self.provenance.inputs if self.provenance else []) if isinstance(e, dict)]
        outputs.check_output(folder, inputs=inputs, overwrite=overwrite)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            listing = self._write(tmp)
            outputs.write_marker(
                tmp, "result", task=self.task, model=self.provenance.model if self.provenance else None
            )
            outputs.install(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return [folder / p for p in listing]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Result:
        """Read back a folder written by :meth:`save` (e.g. a result downloaded from a worker)."""
        import json

        import nibabel as nib

        folder = Path(folder)
        listing = folder / "result.json"
        try:
            summary = json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(listing, f"cannot read the result listing ({exc})") from exc
        if not isinstance(summary, dict) or "task" not in summary:
            raise InputError(listing, "not a result listing (no 'task')")

        def path(rel: str) -> Path:
            p = (folder / rel).resolve()
            if folder.resolve() not in p.parents:
                raise InputError(listing, f"file '{rel}' lies outside the result folder")
            return p

        def read(rel: str, labels: bool = False) -> Image:
            return load_image(path(rel), dtype=np.int16 if labels else np.float32)

        def vector(rel: str) -> Image:  # (I, J, K, 1, 3) on disk, see _save_vector
            img = nib.Nifti1Image.from_filename(str(path(rel)))  # written by _save_vector
            return Image(np.asarray(img.dataobj, dtype=np.float32)[:, :, :, 0, :], img.affine)

        images = []
        for e in summary.get("images", []):
            name = e["file"][: -len(".nii.gz")]
            images.append(ResultImage(name, read(e["file"], e["kind"] == "labels"), e["kind"], e.get("age_months"),
                                      e.get("modality")))  # fmt: skip
        series = []
        for s in summary.get("series", []):
            entries = s.get("frames", [])
            has = set(entries[0]) if entries else set()
            series.append(
                FrameSeries(
                    s["name"],
                    [read(e["file"]) for e in entries],
                    [float(e["time"]) for e in entries],
                    s.get("unit", ""),
                    [read(e["labels"], True) for e in entries] if "labels" in has else None,
                    [bool(e["generated"]) for e in entries] if "generated" in has else None,
                    [vector(e["displacement"]) for e in entries] if "displacement" in has else None,
                )
            )
        prov = Provenance.from_dict(summary["provenance"], listing) if summary.get("provenance") else None
        transforms = []
        for rel in summary.get("transforms", []):  # the preprocessing's way back, as ITK files
            from .preprocess import SavedTransform, read_transform

            transforms.append(SavedTransform(Path(rel).name[: -len(".tfm")], read_transform(path(rel))))
        return cls(summary["task"], images, series, prov, transforms=transforms)

    def _write(self, root: Path) -> list[str]:
        prov = self.provenance.to_dict() if self.provenance else {}
        # Every generated image says so, in its sidecar and in its header's descrip (which
        # travels with the file); real scans in a timeline stay unmarked.
        marks = self.provenance.synthetic_marks() if self.provenance else {"synthetic": True}
        descrip = self.provenance.synthetic_description() if self.provenance else "SYNTHETIC longdiff"
        files: list[str] = []
        summary: dict[str, Any] = {"task": self.task, **marks, "images": [], "series": [], "provenance": prov}
        for r in self.images:
            rel = f"{r.name}.nii.gz"
            if r.name.startswith(".") or any(c in r.name for c in "/\\\0"):  # the name comes from a subject id
                raise InputError(rel, "an output name may not start with '.' nor hold '/', '\\' or NUL")
            check_array(r.image.array, rel)
            dtype = np.int16 if r.kind == "labels" else np.float32
            sidecar = {**marks, **prov, "kind": r.kind, "age_months": r.age}
            save_image(r.image, root / rel, dtype=dtype, sidecar=sidecar, description=descrip)
            files.append(rel)
            summary["images"].append({"file": rel, "kind": r.kind, "age_months": r.age, "modality": r.modality})
        for s in self.series:
            entries = []
            for i, frame in enumerate(s.frames):
                entry: dict[str, Any] = {"index": i, "time": s.times[i], "unit": s.unit}
                rel = f"frames/{s.name}/frame-{i:03d}.nii.gz"
                check_array(frame.array, rel)
                synthetic = s.generated is None or bool(s.generated[i])
                save_image(frame, root / rel, dtype=np.float32, description=descrip if synthetic else None)
                entry["file"] = rel
                entry["synthetic"] = synthetic
                if s.generated is not None:
                    entry["generated"] = bool(s.generated[i])
                if s.labels is not None:
                    entry["labels"] = f"frames/{s.name}/labels-{i:03d}.nii.gz"
                    save_image(
                        s.labels[i], root / entry["labels"], dtype=np.int16, description=descrip if synthetic else None
                    )
                if s.fields is not None:
                    entry["displacement"] = f"frames/{s.name}/displacement-{i:03d}.nii.gz"
                    _save_vector(s.fields[i], root / entry["displacement"], descrip)
                entries.append(entry)
                files.extend(v for k, v in entry.items() if k in ("file", "labels", "displacement"))
            summary["series"].append({"name": s.name, "unit": s.unit, "frames": entries})
        for t in self.transforms:  # ITK files Slicer loads as transform nodes (preprocess.py)
            rel = f"transforms/{t.name}.tfm"
            t.write(root / rel)
            files.append(rel)
            summary.setdefault("transforms", []).append(rel)
        write_json(root / "result.json", summary)
        files.append("result.json")
        return files


def _save_vector(image: Image, path: Path, description: str | None = None) -> None:
    """A displacement field (I, J, K, 3) as a NIfTI vector image (intent VECTOR, mm)."""
    import nibabel as nib

    data = np.asarray(image.array, dtype=np.float32)[:, :, :, None, :]
    img = nib.Nifti1Image(data, image.affine)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:80]
    nib.save(img, path)
