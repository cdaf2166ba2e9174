"""Images on disk and in memory: an array plus the affine that places it in the world.

An :class:`Image` is a 3D array in voxel (i, j, k) order and a 4x4 affine mapping voxel
indices to RAS world coordinates in millimetres (the NIfTI / nibabel convention; Slicer's
IJK-to-RAS matrix is the same matrix once the axis order is reversed from its (k, j, i)
numpy view).

:func:`load_image` reads NIfTI (and anything nibabel reads) and refuses what a model cannot
use with an :class:`~LongitudinalDiffusionLib.errors.InputError` that names the file and the
problem. :func:`save_image` writes atomically, with an optional JSON sidecar, so a failed
write never leaves half a file behind.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import InputError

#: Voxel sizes outside this range (mm) are taken as a broken header, not as anatomy.
SANE_SPACING_MM = (1e-3, 100.0)


@dataclass
class Image:
    """A 3D image: ``array`` (I, J, K) and the 4x4 voxel-to-RAS ``affine`` (mm).

    Args:
        array: voxel values, indexed (i, j, k).
        affine: 4x4 matrix taking homogeneous voxel indices to RAS millimetres.
        meta: free-form metadata carried along (e.g. the source file, units).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (norms of the affine's columns)."""
        sx, sy, sz = (float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))
        return sx, sy, sz

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (closest anatomical directions)."""
        return "".join(nib.aff2axcodes(self.affine))

    def same_geometry(self, other: Image, atol: float = 1e-4) -> bool:
        """True when both images share shape and affine (within ``atol`` mm)."""
        return self.shape[:3] == other.shape[:3] and np.allclose(self.affine, other.affine, atol=atol)


def check_affine(affine: np.ndarray, source: str | os.PathLike) -> None:
    """Refuse affines that cannot describe a scan: non-finite, singular, absurd spacing."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(source, "the image's affine (voxel-to-world matrix) contains NaN or Inf")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12 or np.any(spacing == 0):
        raise InputError(source, "the image's affine is singular (a voxel size is zero)")
    lo, hi = SANE_SPACING_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        sp = ", ".join(f"{s:g}" for s in spacing)
        raise InputError(source, f"voxel size ({sp}) mm is outside {lo:g}..{hi:g} mm: the header looks broken")


def check_array(array: np.ndarray, source: str | os.PathLike, *, ndim: int = 3) -> np.ndarray:
    """Validate voxel data: dimensionality, non-empty, finite. Returns the (squeezed) array."""
    arr = np.asarray(array)
    # Trailing singleton axes (e.g. a 4D file with one volume) are harmless.
    while arr.ndim > ndim and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != ndim:
        if arr.ndim == 4 and ndim == 3:
            raise InputError(source, f"4D image with {arr.shape[3]} volumes where a single 3D volume is needed")
        raise InputError(source, f"{arr.ndim}D image where a {ndim}D one is needed (shape {arr.shape})")
    if 0 in arr.shape:
        raise InputError(source, f"image has a zero-size dimension (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(source, f"voxel type {arr.dtype} is not a real number type")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(np.isnan(arr).sum())
            raise InputError(
                source, f"{n_bad} voxels are not finite ({n_nan} NaN, {n_bad - n_nan} Inf); fix or mask them first"
            )
    return arr


def _short_by(img: Any, path: Path) -> tuple[int, int] | None:
    """(bytes the header needs, bytes the file holds) when the file holds fewer, else None.

    The bytes held are counted after decompression, so a .nii.gz cut short is measured the same
    way as a plain .nii. None when the format has no single data file to measure.
    """
    header = img.header
    try:
        # the loaded image's header says 0; its array proxy knows where the voxels start
        offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
        voxels = int(np.prod(header.get_data_shape(), dtype=np.int64))
        need = offset + voxels * header.get_data_dtype().itemsize
        filename = img.file_map["image"].filename or str(path)
        have = 0
        with nib.openers.ImageOpener(filename) as stream:
            chunk = stream.read(1 << 20)
            while chunk:
                have += len(chunk)
                chunk = stream.read(1 << 20)
    except (AttributeError, KeyError, TypeError, ValueError, OSError, EOFError, zlib.error):
        return None
    return (need, have) if have < need else None


def load_image(path: str | os.PathLike, *, ndim: int = 3, dtype: Any = np.float32) -> Image:
    """Read an image file and check that a model can use it.

    Args:
        path: a NIfTI file (``.nii`` / ``.nii.gz``) or any format nibabel reads.
        ndim: 3 for a volume; 4 for a time series (e.g. a cine).
        dtype: the array type returned (scaling slopes are applied).

    Raises:
        InputError: missing, unreadable, corrupt or truncated file; wrong dimensionality;
            zero-size dimension; NaN/Inf voxels; a broken affine.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        img: Any = nib.load(str(path))  # a spatial image: it has dataobj and affine
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(path, f"not a readable image (nibabel: {exc})") from exc
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(path, f"corrupt gzip stream ({exc})") from exc
    except Exception as exc:  # nibabel raises bare ValueErrors/HeaderDataErrors for bad headers
        raise InputError(path, f"invalid image header ({type(exc).__name__}: {exc})") from exc
    try:
        data = np.asarray(img.dataobj)
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(path, f"corrupt gzip stream ({exc})") from exc
    except EOFError as exc:
        raise InputError(path, "file is truncated: the compressed stream ends before the voxel data does") from exc
    except (OSError, ValueError) as exc:
        short = _short_by(img, path)
        if short is not None:
            need, have = short
            raise InputError(path, f"file is truncated (its header makes it {need} bytes, it holds {have})") from exc
        raise InputError(path, f"voxel data cannot be read ({type(exc).__name__}: {exc})") from exc
    data = check_array(data, path, ndim=ndim)
    check_affine(img.affine, path)
    meta: dict[str, Any] = {"source": str(path)}
    descrip = header_description(img)
    if descrip:
        meta["description"] = descrip  # e.g. "SIMULATED data ...", "SYNTHETIC ...": what the file says it is
    return Image(np.asarray(data, dtype=dtype), np.asarray(img.affine, dtype=np.float64), meta)


def header_description(img: Any) -> str:
    """The NIfTI header's ``descrip`` text ('' for other formats or an unreadable field)."""
    header = getattr(img, "header", None)
    try:
        raw = header["descrip"] if header is not None and "descrip" in header else b""
    except (KeyError, TypeError, ValueError):
        return ""
    raw = raw.item() if hasattr(raw, "item") else raw
    return raw.decode("ascii", "replace").strip("\x00 ") if isinstance(raw, bytes) else str(raw).strip()


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path``.

    The temporary file sits in the same folder (so the rename is atomic) and keeps the
    target's suffixes (so writers that look at the extension still work). On any error
    the temporary file is removed and nothing is left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (sorted keys off: field order is meaningful to readers)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, default=_json_default)
            fh.write("\n")

    return atomic_write(path, _write)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``x.nii.gz`` -> ``x.json`` (the BIDS sidecar convention)."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".mgz", ".gz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return path.with_name(name + ".json")


def save_image(
    image: Image,
    path: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    sidecar: dict[str, Any] | None = None,
    description: str | None = None,
) -> Path:
    """Write ``image`` as NIfTI (atomically), plus a JSON sidecar when given.

    Args:
        image: what to write; its affine becomes both the qform and the sform.
        path: target file, ``.nii`` or ``.nii.gz``.
        dtype: on-disk voxel type (labels: ``np.uint8`` / ``np.int16``).
        sidecar: metadata written next to the image as ``<name>.json``.
        description: stored in the NIfTI header's ``descrip`` field (80 characters), which
            travels with the file even without its sidecar (Slicer and other viewers show it).
    """
    path = Path(path)
    arr = np.asarray(image.array)
    if np.issubdtype(np.dtype(dtype), np.integer):
        arr = np.rint(arr)
    nii = nib.Nifti1Image(arr.astype(dtype), image.affine)
    nii.header.set_xyzt_units("mm", "sec")
    nii.set_qform(image.affine, code=1)
    nii.set_sform(image.affine, code=1)
    if description is not None:
        nii.header["descrip"] = description.encode("ascii", "replace")[:80]
    atomic_write(path, lambda tmp: nib.save(nii, tmp))
    if sidecar is not None:
        try:
            write_json(sidecar_path(path), sidecar)
        except BaseException:
            path.unlink(missing_ok=True)  # an image without its provenance is half-made
            raise
    return path
