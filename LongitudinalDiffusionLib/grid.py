"""The model grid: the fixed geometry and intensity range a diffusion model works on.

A model is trained on volumes of one shape, one voxel size, one orientation and one
intensity range. Users bring scans of any geometry: oblique, anisotropic, LPS or RAS, any
field of view. :class:`ModelGrid` takes such a scan onto the model's grid
(:meth:`ModelGrid.forward`) and brings the model's output back onto the scan's own voxels
(:meth:`ModelGrid.inverse`), so every result lands exactly on the input's geometry.

Geometry, forward:

1. **Orientation.** The voxel axes are permuted and flipped to the grid's axis codes
   (``"RAS"`` by default) with MONAI's :class:`~monai.transforms.Orientation` semantics:
   a scan's obliquity is kept, nothing is rotated beyond a permutation or flip of axes.
2. **Spacing.** The (reoriented) voxel axes keep their directions and take the grid's
   voxel size.
3. **Placement.** The grid is centred on the centre of the input's field of view, or on
   the centre of the bounding box of its foreground (``center="foreground"``), then nudged
   by at most half an input voxel so that grid voxel (0, 0, 0) sits on an input voxel
   centre. With the grid's voxel size equal to the input's, every grid voxel then sits on
   an input voxel, and the round trip of a label map is exact.

These three steps only build the grid's voxel-to-RAS affine (:func:`grid_affine`); the
voxels are then interpolated once, from the original array straight onto the grid, by
MONAI's :class:`~monai.transforms.SpatialResample`. The inverse is the same single
resampling the other way, from the grid affine onto the stored original affine and
shape, and the returned :class:`~LongitudinalDiffusionLib.imaging.Image` carries the stored
affine itself, so it equals the input's bit for bit.

Everywhere, a point is "inside" an image when it lies inside the box covered by the
image's voxels (half a voxel beyond the outer voxel centres); between the outer voxel
centres and that box the edge values are repeated, and outside it the image's background
is used: the low-percentile intensity, or 0 for labels.

Intensities, forward: clip to the input's ``percentiles`` (computed on the original
voxels) and map that range linearly onto ``value_range``. Inverse: the exact linear map
back (clipped values stay clipped). Label maps skip the intensity step and are always
resampled with nearest neighbour.

Example:
    >>> grid = ModelGrid(shape=(96, 112, 96), spacing=(1.5, 1.5, 1.5))
    >>> sample = grid.forward(image)                   # sample.array: (96, 112, 96), float32
    >>> output = model(sample.array)                   # same shape, in grid.value_range
    >>> result = grid.inverse(output, sample.record)   # Image with image's shape and affine
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, SpatialResample

from .errors import InputError
from .imaging import Image, check_affine, check_array

__all__ = ["GridRecord", "GridSample", "ModelGrid", "grid_affine", "resample_to"]

#: Axis labels in RAS+ terms, given to MONAI's ``Orientation`` explicitly (our affines are
#: always voxel-to-RAS, whatever the image's own axis order).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_INTERPOLATIONS = ("linear", "nearest")
_CENTERS = ("fov", "foreground")
#: How far (in voxels) a point may sit beyond an image's voxel box and still count as inside;
#: absorbs floating-point error in the affine products only.
_INSIDE_TOL = 1e-6


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class ModelGrid:
    """The geometry and intensity range a model works on, with the exact way back.

    Args:
        shape: grid size in voxels (I, J, K).
        spacing: voxel size in mm along I, J, K.
        orientation: axis codes of the grid's voxel axes, e.g. ``"RAS"`` or ``"LPS"``.
        percentiles: low and high percentiles of the input's intensities that map onto
            the ends of ``value_range``; values beyond them are clipped.
        value_range: the model's intensity range, usually ``(0, 1)`` or ``(-1, 1)``.
        interpolation: ``"linear"`` or ``"nearest"`` for intensity images (label maps
            always use nearest neighbour).
        center: ``"fov"`` centres the grid on the input's field of view; ``"foreground"``
            on the bounding box of the voxels above the low percentile (heads that are
            not centred in their field of view).

    Raises:
        ValueError: an argument is invalid; the message starts with its name.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str = "RAS"
    percentiles: tuple[float, float] = (0.5, 99.5)
    value_range: tuple[float, float] = (0.0, 1.0)
    interpolation: str = "linear"
    center: str = "fov"

    def __post_init__(self) -> None:
        # Normalise (lists from JSON become tuples, numpy scalars become Python numbers)
        # on the frozen instance, then validate.
        set_ = object.__setattr__
        set_(self, "shape", _positive_ints("shape", self.shape, 3))
        set_(self, "spacing", _finite_floats("spacing", self.spacing, 3))
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three voxel sizes > 0 mm, got {self.spacing!r}")
        set_(self, "orientation", _axcodes("orientation", self.orientation))
        set_(self, "percentiles", _finite_floats("percentiles", self.percentiles, 2))
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}")
        set_(self, "value_range", _finite_floats("value_range", self.value_range, 2))
        if not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {self.value_range!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.center not in _CENTERS:
            raise ValueError(f"center must be one of {_CENTERS}, got {self.center!r}")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """The grid as plain JSON types (for a model card)."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "orientation": self.orientation,
            "percentiles": list(self.percentiles),
            "value_range": list(self.value_range),
            "interpolation": self.interpolation,
            "center": self.center,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelGrid:
        """Build a grid from :meth:`to_dict` output (e.g. read from a model card).

        Raises:
            ValueError: unknown or missing keys, or invalid values.
        """
        optional = {"orientation", "percentiles", "value_range", "interpolation", "center"}
        return cls(**_fields("a model grid", data, {"shape", "spacing"}, optional))

    # ------------------------------------------------------------------ geometry

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Field of view of the grid in mm along its axes (shape x spacing)."""
        return _float3("extent", [n * s for n, s in zip(self.shape, self.spacing)])

    def affine_for(self, image: Image, *, labels: bool = False) -> np.ndarray:
        """The grid's voxel-to-RAS affine when placed on ``image`` (see :func:`grid_affine`)."""
        source = image.meta.get("source", "image")
        array = check_array(image.array, source)
        check_affine(image.affine, source)
        threshold = 0.0 if labels else self._percentile_values(array)[0]
        return self._place(array, image.affine, threshold)

    def _place(self, array: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
        center = None
        if self.center == "foreground":
            center = _foreground_center(array, affine, threshold)
        return grid_affine(affine, array.shape, self.shape, self.spacing, orientation=self.orientation, center=center)

    def _percentile_values(self, array: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(array, self.percentiles)
        return float(lo), float(hi)

    # ------------------------------------------------------------------ forward / inverse

    def forward(self, image: Image, *, labels: bool = False, reference: GridRecord | None = None) -> GridSample:
        """Take ``image`` onto the model grid.

        One resampling of the original voxels onto the grid (orientation, spacing and
        crop/pad composed into one affine), then, unless ``labels``, percentile clipping
        and linear scaling to ``value_range``.

        Args:
            image: any 3D scan (oblique, anisotropic, LPS or RAS, any field of view).
            labels: ``image`` is a label map: nearest neighbour, background 0, no
                intensity scaling.
            reference: the record of an earlier forward whose grid placement to reuse
                (e.g. to put a label map on exactly the same grid as its image).

        Returns:
            A :class:`GridSample`: the grid array (float32, ``self.shape``), its
            voxel-to-RAS affine, and the :class:`GridRecord` that :meth:`inverse` needs.

        Raises:
            InputError: the image is not a finite 3D volume with a usable affine.
            ValueError: ``reference`` was made on a grid of another shape.
        """
        source = image.meta.get("source", "image")
        array = check_array(image.array, source)
        check_affine(image.affine, source)
        affine = np.array(image.affine, dtype=np.float64)

        if labels:
            lo = hi = None
            background = threshold = 0.0
        else:
            lo, hi = self._percentile_values(array)
            background = threshold = lo

        if reference is not None:
            if tuple(reference.grid_shape) != self.shape:
                raise ValueError(
                    f"reference was made on a grid of shape {tuple(reference.grid_shape)}, not {self.shape}"
                )
            target = np.array(reference.grid_affine, dtype=np.float64)
        else:
            target = self._place(array, affine, threshold)

        order = 0 if labels or self.interpolation == "nearest" else 1
        out = _resample(array, affine, target, self.shape, order=order, cval=background)
        if lo is not None and hi is not None:  # an image, not a label map
            out = _to_model_units(out, lo, hi, self.value_range)
        record = GridRecord(
            affine=affine,
            shape=array.shape,
            grid_affine=target,
            grid_shape=self.shape,
            lo=lo,
            hi=hi,
            value_range=self.value_range,
            labels=labels,
            dtype=array.dtype.name,
        )
        return GridSample(np.asarray(out, dtype=np.float32), target.copy(), record)

    def inverse(self, array: Any, record: GridRecord, *, labels: bool = False) -> Image:
        """Bring a grid array (e.g. a model's output) back onto the input's geometry.

        Undoes the intensity scaling (the exact linear map back to the input's units),
        then resamples once from the grid onto the input's shape and affine. Input voxels
        outside the grid's field of view get the input's background (the low-percentile
        intensity, or 0 for labels).

        Args:
            array: the grid array, numpy or torch (any device or float type), of shape
                ``self.shape`` optionally with leading singleton batch/channel axes.
            record: :attr:`GridSample.record` from :meth:`forward` (or its
                :meth:`GridRecord.from_dict` after a trip through JSON).
            labels: ``array`` is a label map: nearest neighbour, background 0, integer
                result (the input's integer type, else int32).

        Returns:
            An :class:`Image` whose ``affine`` equals ``record.affine`` exactly and whose
            shape is ``record.shape``; intensities are float32.

        Raises:
            ValueError: the array does not have the grid's shape, the record belongs to
                another grid, or intensities are asked of a record made for labels.
        """
        if not isinstance(record, GridRecord):
            raise ValueError(f"record must be a GridRecord, got {type(record).__name__}")
        if tuple(record.grid_shape) != self.shape:
            raise ValueError(f"record was made on a grid of shape {tuple(record.grid_shape)}, not {self.shape}")
        if not np.allclose(record.grid_spacing, self.spacing, rtol=1e-6, atol=1e-9):
            raise ValueError(f"record was made on a grid of spacing {record.grid_spacing}, not {self.spacing}")
        values = _grid_array(array, self.shape)
        if labels:
            out = _resample(values, record.grid_affine, record.affine, record.shape, order=0, cval=0.0)
            dtype = np.dtype(record.dtype)
            if not np.issubdtype(dtype, np.integer):
                dtype = np.dtype(np.int32)
            out = np.rint(out).astype(dtype)
        else:
            if record.lo is None or record.hi is None:
                raise ValueError("record was made for a label map (no intensity range): pass labels=True")
            values = _to_input_units(values, record.lo, record.hi, record.value_range)
            order = 0 if self.interpolation == "nearest" else 1
            out = _resample(values, record.grid_affine, record.affine, record.shape, order=order, cval=record.lo)
            out = np.asarray(out, dtype=np.float32)
        return Image(out, np.array(record.affine, dtype=np.float64, copy=True))


# --------------------------------------------------------------------------- what forward returns


@dataclass(eq=False)
class GridRecord:
    """Everything needed to take a grid array back onto the input (JSON-serialisable).

    Args:
        affine: the input's 4x4 voxel-to-RAS affine.
        shape: the input's shape (I, J, K).
        grid_affine: the grid's 4x4 voxel-to-RAS affine.
        grid_shape: the grid's shape.
        lo: input intensity mapped to ``value_range[0]`` (None for label maps).
        hi: input intensity mapped to ``value_range[1]`` (None for label maps).
        value_range: the model's intensity range used.
        labels: whether the forward treated the input as a label map.
        dtype: the input array's numpy type (label maps come back in it).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    grid_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    lo: float | None
    hi: float | None
    value_range: tuple[float, float]
    labels: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.affine = _affine_field("affine", self.affine)
        self.grid_affine = _affine_field("grid_affine", self.grid_affine)
        self.shape = _int3("shape", self.shape)
        self.grid_shape = _int3("grid_shape", self.grid_shape)
        self.value_range = _float2("value_range", self.value_range)
        if (self.lo is None) != (self.hi is None):
            raise ValueError("lo and hi must both be numbers or both be None")
        if self.lo is not None:
            self.lo, self.hi = _float2("lo/hi", (self.lo, self.hi))
            if self.hi < self.lo:
                raise ValueError(f"lo/hi must satisfy lo <= hi, got ({self.lo}, {self.hi})")
        self.labels = bool(self.labels)
        try:
            np.dtype(self.dtype)
        except TypeError:
            # numpy's "data type not understood" adds nothing to this message
            raise ValueError(f"dtype {self.dtype!r} is not a numpy type") from None
        self.dtype = np.dtype(self.dtype).name  # "int16", whatever the byte order

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        """Voxel size of the grid in mm (norms of the grid affine's columns)."""
        return _float3("grid spacing", np.linalg.norm(self.grid_affine[:3, :3], axis=0))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; ``json.dumps`` round-trips every float exactly."""
        return {
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "grid_affine": self.grid_affine.tolist(),
            "grid_shape": list(self.grid_shape),
            "lo": self.lo,
            "hi": self.hi,
            "value_range": list(self.value_range),
            "labels": self.labels,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridRecord:
        """Rebuild a record from :meth:`to_dict` output (e.g. sent by the remote worker).

        Raises:
            ValueError: unknown or missing keys, or invalid values.
        """
        required = {"affine", "shape", "grid_affine", "grid_shape", "lo", "hi", "value_range"}
        return cls(**_fields("a grid record", data, required, {"labels", "dtype"}))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GridRecord):
            return NotImplemented
        return self.to_dict() == other.to_dict()


@dataclass(eq=False)
class GridSample:
    """An input taken onto the model grid.

    Attributes:
        array: the grid array, float32, of the grid's shape.
        affine: the grid's voxel-to-RAS affine: the sample is itself a correctly placed
            image (see :attr:`image`).
        record: what :meth:`ModelGrid.inverse` needs to go back.
    """

    array: np.ndarray
    affine: np.ndarray
    record: GridRecord = field(repr=False)

    @property
    def image(self) -> Image:
        """The sample as an :class:`Image` (shares the array)."""
        return Image(self.array, self.affine.copy(), {"grid_record": self.record.to_dict()})


# --------------------------------------------------------------------------- geometry


def grid_affine(
    affine: Any,
    shape: Sequence[int],
    grid_shape: Sequence[int],
    spacing: Sequence[float],
    *,
    orientation: str = "RAS",
    center: Sequence[float] | np.ndarray | None = None,
    snap: bool = True,
) -> np.ndarray:
    """The voxel-to-RAS affine of a grid placed on an image.

    Args:
        affine: the image's 4x4 voxel-to-RAS affine.
        shape: the image's shape (I, J, K).
        grid_shape: the grid's shape.
        spacing: the grid's voxel size in mm.
        orientation: the grid's axis codes; the image's axes are permuted/flipped to them
            (MONAI ``Orientation`` semantics: the image's obliquity is kept).
        center: RAS point (mm) for the grid's centre; default the centre of the image's
            field of view.
        snap: move the grid by at most half an image voxel so that grid voxel (0, 0, 0)
            lies on an image voxel centre (then, at equal spacing, every grid voxel does).

    Returns:
        The 4x4 float64 affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = _int3("shape", shape)
    grid_shape = _int3("grid_shape", grid_shape)
    spacing_mm = np.asarray(_finite_floats("spacing", spacing, 3))
    oriented = _oriented_affine(affine, shape, _axcodes("orientation", orientation))
    directions = oriented[:3, :3] / np.linalg.norm(oriented[:3, :3], axis=0)
    linear = directions * spacing_mm  # column j: direction of grid axis j, scaled to its voxel size
    if center is None:
        centre = affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0) + affine[:3, 3]
    else:
        centre = np.asarray(center, dtype=np.float64).reshape(3)
    origin = centre - linear @ ((np.asarray(grid_shape, dtype=np.float64) - 1.0) / 2.0)
    if snap:
        index = np.linalg.solve(affine[:3, :3], origin - affine[:3, 3])
        origin = affine[:3, :3] @ np.round(index) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = origin
    return out


def resample_to(
    image: Image,
    reference_affine: Any,
    reference_shape: Sequence[int],
    *,
    order: int = 1,
    cval: float = 0.0,
) -> Image:
    """Resample ``image`` onto another geometry, matching positions in world (RAS) space.

    One interpolation of the original voxels (e.g. to compare timepoints acquired with
    different geometries). Points inside the image's voxel box are interpolated (edge
    values repeated up to the box), points outside get ``cval``.

    Args:
        image: the image to resample.
        reference_affine: the target 4x4 voxel-to-RAS affine.
        reference_shape: the target shape (I, J, K).
        order: 1 for trilinear (float32 result), 0 for nearest neighbour (result in the
            image's own type: use it for label maps).
        cval: value for points outside the image.

    Returns:
        An :class:`Image` with ``affine`` equal to ``reference_affine`` and the reference
        shape.

    Raises:
        InputError: ``image`` is not a finite 3D volume with a usable affine.
        ValueError: a bad ``order``, reference affine or shape.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    source = image.meta.get("source", "image")
    array = check_array(image.array, source)
    check_affine(image.affine, source)
    target = _affine_field("reference_affine", reference_affine)
    try:
        check_affine(target, "reference_affine")
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    target_shape = _int3("reference_shape", reference_shape)
    out = _resample(array, image.affine, target, target_shape, order=order, cval=cval)
    if order == 0:
        out = out.astype(array.dtype)
    return Image(out, target.copy(), dict(image.meta))


def _oriented_affine(affine: np.ndarray, shape: tuple[int, int, int], axcodes: str) -> np.ndarray:
    """The affine after MONAI's ``Orientation`` to ``axcodes``, computed lazily (no voxels move)."""
    # An expanded zero-size-in-memory tensor stands in for the voxels: in lazy mode MONAI
    # only composes the pending affine.
    stand_in = MetaTensor(torch.zeros(()).expand(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))
    oriented = cast(MetaTensor, Orientation(axcodes=axcodes, labels=_RAS_LABELS, lazy=True)(stand_in))
    return np.asarray(oriented.peek_pending_affine(), dtype=np.float64)


def _foreground_center(array: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray | None:
    """RAS centre of the bounding box of voxels above ``threshold`` (None if there are none)."""
    fg = array > threshold
    lo, hi = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(fg, axis=others))
        if hits.size == 0:
            return None
        lo.append(hits[0])
        hi.append(hits[-1])
    index = (np.asarray(lo, dtype=np.float64) + np.asarray(hi, dtype=np.float64)) / 2.0
    return affine[:3, :3] @ index + affine[:3, 3]


def _resample(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    *,
    order: int,
    cval: float,
) -> np.ndarray:
    """One interpolation of ``array`` (placed by ``src_affine``) onto ``dst_affine``/``dst_shape``.

    MONAI's ``SpatialResample`` (torch ``grid_sample`` in float64, voxel-centre convention)
    with edge repetition; then points outside the source's voxel box are set to ``cval``.
    Returns float32.
    """
    src_affine = np.asarray(src_affine, dtype=np.float64)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    # float64, native byte order, contiguous: what torch accepts and MONAI computes in.
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    img = MetaTensor(data[None], affine=torch.as_tensor(src_affine))
    resampler = SpatialResample(
        mode="nearest" if order == 0 else "bilinear",
        padding_mode="border",
        align_corners=False,
        dtype=np.float64,
    )
    resampled = cast(MetaTensor, resampler(img, dst_affine=torch.as_tensor(dst_affine), spatial_size=tuple(dst_shape)))
    out = np.asarray(resampled.as_tensor()[0].cpu().numpy(), dtype=np.float32)
    inside = _inside_mask(src_affine, array.shape, dst_affine, dst_shape)
    if not inside.all():
        out = np.where(inside, out, np.float32(cval))
    return out


def _inside_mask(
    src_affine: np.ndarray,
    src_shape: Sequence[int],
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
) -> np.ndarray:
    """Which destination voxel centres fall inside the source's voxel box (broadcastable bool)."""
    to_src = np.linalg.solve(src_affine, dst_affine)  # destination index -> source index
    axes = [np.arange(n, dtype=np.float64) for n in dst_shape]
    inside = np.ones((1, 1, 1), dtype=bool)
    for c in range(3):
        coord = np.full((1, 1, 1), to_src[c, 3])
        for d in range(3):
            # Terms that move the coordinate by less than ~1e-9 voxel over the whole axis are
            # round-off (e.g. a permutation computed through an oblique affine): skipping
            # them keeps the mask separable, so it costs 1D arrays instead of a 3D one.
            if abs(to_src[c, d]) * dst_shape[d] > 1e-9:
                view = [1, 1, 1]
                view[d] = dst_shape[d]
                coord = coord + to_src[c, d] * axes[d].reshape(view)
        inside = inside & (coord >= -0.5 - _INSIDE_TOL) & (coord <= src_shape[c] - 0.5 + _INSIDE_TOL)
    return np.broadcast_to(inside, tuple(dst_shape))


# --------------------------------------------------------------------------- intensities


def _to_model_units(x: np.ndarray, lo: float, hi: float, value_range: tuple[float, float]) -> np.ndarray:
    """Clip to [lo, hi] and map it linearly onto ``value_range`` (a constant image -> low end)."""
    b0, b1 = value_range
    if hi <= lo:
        return np.full(np.shape(x), b0, dtype=np.float64)
    return (np.clip(np.asarray(x, dtype=np.float64), lo, hi) - lo) * ((b1 - b0) / (hi - lo)) + b0


def _to_input_units(y: np.ndarray, lo: float, hi: float, value_range: tuple[float, float]) -> np.ndarray:
    """The exact inverse of :func:`_to_model_units` on [lo, hi] (no clipping: model outputs
    beyond ``value_range`` map beyond [lo, hi])."""
    b0, b1 = value_range
    return (np.asarray(y, dtype=np.float64) - b0) * ((hi - lo) / (b1 - b0)) + lo


# --------------------------------------------------------------------------- argument checks


def _grid_array(array: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A numpy (float) view of a grid array given as numpy or torch, leading 1-axes dropped."""
    if isinstance(array, torch.Tensor):
        array = array.detach()
        if isinstance(array, MetaTensor):
            array = array.as_tensor()
        if array.is_floating_point() and array.dtype not in (torch.float32, torch.float64):
            array = array.float()  # float16 / bfloat16 have no (or no exact) numpy twin
        array = array.cpu().numpy()
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)  # a binary mask is a label map of 0 and 1
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != tuple(shape):
        raise ValueError(f"array has shape {np.shape(array)}, the grid's is {tuple(shape)}")
    if not (np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)):
        raise ValueError(f"array has voxel type {arr.dtype}, expected real numbers")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError("array contains NaN or Inf")
    return arr


def _positive_ints(name: str, value: Any, n: int) -> tuple[int, ...]:
    seq = _sequence(name, value, n, "positive integers")
    out = []
    for v in seq:
        if isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name} must be {n} positive integers, got {value!r}")
        if isinstance(v, Integral):
            iv = int(v)
        elif isinstance(v, Real) and math.isfinite(float(v)) and float(v).is_integer():
            iv = int(float(v))
        else:
            raise ValueError(f"{name} must be {n} positive integers, got {value!r}")
        if iv <= 0:
            raise ValueError(f"{name} must be {n} positive integers, got {value!r}")
        out.append(iv)
    return tuple(out)


def _fields(what: str, data: Any, required: set[str], optional: set[str]) -> dict[str, Any]:
    """``data`` as keyword arguments, if it is a mapping with every ``required`` key and
    nothing but those and ``optional`` ones."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - required - optional)
    missing = sorted(required - set(data))
    if unknown or missing:
        raise ValueError(
            f"{what} has unknown keys {unknown} / is missing keys {missing} "
            f"(required {sorted(required)}, optional {sorted(optional)})"
        )
    return dict(data)


def _int3(name: str, value: Any) -> tuple[int, int, int]:
    """Three positive integers (a shape), typed as such."""
    i, j, k = _positive_ints(name, value, 3)
    return i, j, k


def _float2(name: str, value: Any) -> tuple[float, float]:
    a, b = _finite_floats(name, value, 2)
    return a, b


def _float3(name: str, value: Any) -> tuple[float, float, float]:
    a, b, c = _finite_floats(name, value, 3)
    return a, b, c


def _finite_floats(name: str, value: Any, n: int) -> tuple[float, ...]:
    seq = _sequence(name, value, n, "finite numbers")
    out = []
    for v in seq:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be {n} finite numbers, got {value!r}")
        out.append(float(v))
    return tuple(out)


def _sequence(name: str, value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be {n} {what}, got {value!r}")
    seq = list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
    if len(seq) != n:
        raise ValueError(f"{name} must be {n} {what}, got {len(seq)} values ({value!r})")
    return seq


def _axcodes(name: str, value: Any) -> str:
    """Validate axis codes such as ``"RAS"``: three letters, one from each of L/R, P/A, I/S."""
    if not isinstance(value, str) or len(value) != 3:
        raise ValueError(f"{name} must be three axis codes such as 'RAS' or 'LPS', got {value!r}")
    codes = value.upper()
    pairs = []
    for letter in codes:
        pair = next((i for i, p in enumerate(_RAS_LABELS) if letter in p), None)
        if pair is None:
            raise ValueError(f"{name} {value!r}: {letter!r} is not one of L, R, P, A, I, S")
        pairs.append(pair)
    if sorted(pairs) != [0, 1, 2]:
        raise ValueError(f"{name} {value!r} must name each of left-right, posterior-anterior, inferior-superior once")
    return codes


def _affine_field(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 4x4 matrix of numbers") from exc
    if arr.shape != (4, 4) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a finite 4x4 matrix, got shape {arr.shape}")
    return arr
