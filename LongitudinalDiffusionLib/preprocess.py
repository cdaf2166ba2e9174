"""From a scan as acquired to what a model was trained on, and back.

The papers preprocess before they generate: Cas-DiffCom skull-strips and rigidly aligns
every scan to a brain atlas, cWDM clips percentiles and normalises, SADM registers to
templates. A model card says which of these its model expects (its ``"preprocessing"``
entry, read by :class:`PreprocessSpec`); :func:`preprocess_for` applies exactly that to a
subject's scans and returns a :class:`PreprocessResult` that holds the images in the model's
space and the transforms that take any image of that space back onto each input's own grid.

Steps, each made of field-made parts:

* **Bias field**: SimpleITK's N4 on a shrunk copy of the scan (speed), the estimated field
  then evaluated and divided out at full resolution.
* **Brain extraction**: deepbet (MIT; its network weights come inside its wheel, so it runs
  offline), imported lazily: it is needed only when a card asks for skull stripping, and a
  clear error says how to install it when it is missing. A scan that is already stripped
  (most voxels exactly background and the brain mask covering the foreground) is left as
  it is. The brain mask also restricts the registration metric of a scan with skull.
* **Alignment**: every visit of a subject rigidly to one reference visit (the first; scans
  on the reference's very grid, such as the contrasts of one session, start from the
  identity instead of their centres of mass), and the reference affinely or rigidly (as the card says) to the model's
  atlas, its metric restricted to the brain mask: SimpleITK, Mattes mutual information,
  three resolution levels, moments initialisation.
* **Intensities**: the card's grid (:class:`~.grid.ModelGrid`) already clips percentiles and
  scales to the model's range on the way in and undoes it on the way out; preprocessing adds
  nothing there (``"intensity": "percentile"`` records that the grid does it).

The model's space ("atlas space") is the frame the simulated training cohort lives in: the
ICBM 2009a template's MNI millimetres shifted so that the template brain's centroid is the
world origin (the cohort scans its subjects about that point), on a box of the card grid's
extent centred there. The atlas image used for registration is a T1-like picture made from
the template's tissue maps (CSF dark, grey matter mid, white matter bright; brain only).

Transforms follow ITK's convention, which Slicer reads: physical points in LPS millimetres,
each transform mapping a point of the model's space to the point of the input it came
from (the "fixed to moving" transform a registration returns, used for resampling). Saved
with :func:`write_transform` as ``<input>-to-atlas.tfm``, a file Slicer loads as a linear
transform node; set as the parent of the input volume, it moves the input onto the atlas.
RAS (nibabel, Slicer's world) and LPS differ by a flip of the first two axes:
``M_lps = F @ M_ras @ F`` with ``F = diag(-1, -1, 1, 1)``.

The way back (:meth:`PreprocessResult.back_to_input`) resamples an image of the model's
space onto an input's own grid through the inverse transform (linear; nearest neighbour for
labels): the output has the input's shape and affine, nothing is cropped, and input voxels
outside the model's box (where a model made nothing) are 0; the fraction of such voxels is
recorded in :meth:`PreprocessResult.describe` for the provenance.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, LongitudinalDiffusionError
from .imaging import Image, check_affine, check_array

log = logging.getLogger(__name__)

__all__ = [
    "ALIGNMENTS",
    "ATLASES",
    "PreprocessResult",
    "PreprocessSpec",
    "SavedTransform",
    "atlas_image",
    "correct_bias",
    "extract_brain",
    "from_sitk",
    "in_model_space",
    "is_skull_stripped",
    "preprocess_for",
    "register",
    "to_sitk",
    "write_transform",
]

ALIGNMENTS = ("none", "rigid", "affine")
ATLASES = ("icbm2009a",)
INTENSITIES = ("percentile", "minmax", "none")
#: RAS <-> LPS: flip x and y (the same matrix both ways).
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Fraction of voxels at the background value above which a scan may be skull-stripped.
_STRIPPED_BACKGROUND = 0.5
#: Brain mask / foreground volume above which a scan counts as already stripped.
_STRIPPED_COVER = 0.85
DEEPBET_PIN = "deepbet==1.0.2"


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise LongitudinalDiffusionError(
            "preprocessing needs SimpleITK: pip install SimpleITK==2.5.7 (3D Slicer ships it)"
        ) from None
    return sitk


# ----------------------------------------------------------------------------- the card's entry


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects of its input, from the ``"preprocessing"`` entry of its card.

    Args:
        bias_field: remove the bias field (N4).
        skull_strip: the model was trained on brain-only images: extract the brain.
        align: ``"none"``, ``"rigid"`` or ``"affine"`` alignment to ``atlas``.
        atlas: the model's atlas (``"icbm2009a"``), None when ``align`` is ``"none"``.
        intensity: the normalisation the model was trained with; done by the card's grid.
    """

    bias_field: bool = False
    skull_strip: bool = False
    align: str = "none"
    atlas: str | None = None
    intensity: str = "percentile"

    def __post_init__(self) -> None:
        for name in ("bias_field", "skull_strip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"preprocessing {name} must be true or false, got {getattr(self, name)!r}")
        if self.align not in ALIGNMENTS:
            raise ValueError(f"preprocessing align must be one of {ALIGNMENTS}, got {self.align!r}")
        if self.align != "none" and self.atlas not in ATLASES:
            raise ValueError(f"preprocessing atlas must be one of {ATLASES} when aligning, got {self.atlas!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"preprocessing intensity must be one of {INTENSITIES}, got {self.intensity!r}")

    @property
    def active(self) -> bool:
        """True when there is anything to do to a scan."""
        return self.bias_field or self.skull_strip or self.align != "none"

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> PreprocessSpec:
        """The spec of a model card (its ``"preprocessing"`` entry; none: nothing to do).

        Raises:
            ValueError: the entry is not a mapping, has unknown keys or invalid values.
        """
        entry = card.get("preprocessing") if isinstance(card, Mapping) else None
        if entry is None:
            return cls()
        if not isinstance(entry, Mapping):
            raise ValueError(f"the card's preprocessing must be a mapping, got {type(entry).__name__}")
        known = {"bias_field", "skull_strip", "align", "atlas", "intensity"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; expected some of {sorted(known)}")
        return cls(**dict(entry))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bias_field": self.bias_field,
            "skull_strip": self.skull_strip,
            "align": self.align,
            "atlas": self.atlas,
            "intensity": self.intensity,
        }


# ----------------------------------------------------------------------------- SimpleITK images


def to_sitk(image: Image) -> Any:
    """An :class:`Image` (RAS affine, (i, j, k) array) as a SimpleITK image (LPS geometry).

    Only rotations and scalings are representable (no shear): SimpleITK's geometry is
    origin, spacing and an orthonormal direction matrix.
    """
    sitk = _sitk()
    source = image.meta.get("source", "image")
    array = check_array(image.array, source)
    check_affine(image.affine, source)
    lps = _FLIP @ np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(source, "the image's affine has shear, which SimpleITK cannot represent")
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    out.SetSpacing([float(s) for s in spacing])
    out.SetOrigin([float(o) for o in lps[:3, 3]])
    out.SetDirection([float(d) for d in direction.ravel()])
    return out


def from_sitk(image: Any, meta: dict[str, Any] | None = None) -> Image:
    """A SimpleITK image as an :class:`Image` (RAS affine, (i, j, k) array)."""
    sitk = _sitk()
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    return Image(np.ascontiguousarray(array), _sitk_affine(image), dict(meta or {}))


def _sitk_affine(image: Any) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return _FLIP @ lps


def ras_to_lps(matrix: Any) -> np.ndarray:
    """A 4x4 point transform in RAS mm as the same transform in LPS mm (and back)."""
    return _FLIP @ np.asarray(matrix, dtype=np.float64) @ _FLIP


lps_to_ras = ras_to_lps


def _affine_transform(matrix_lps: np.ndarray) -> Any:
    sitk = _sitk()
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in matrix_lps[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in matrix_lps[:3, 3]])
    return t


def transform_matrix(transform: Any) -> np.ndarray:
    """The 4x4 LPS matrix of a SimpleITK linear transform (centre folded in), or a composite of them."""
    sitk = _sitk()
    if isinstance(transform, sitk.CompositeTransform):
        out = np.eye(4)
        for i in range(transform.GetNumberOfTransforms()):
            out = out @ transform_matrix(transform.GetNthTransform(i))  # the last added applies first
        return out
    if transform.GetDimension() != 3:
        raise ValueError("only 3D transforms are supported")
    t = transform.Downcast() if type(transform) is sitk.Transform else transform
    if not all(hasattr(t, k) for k in ("GetMatrix", "GetTranslation", "GetCenter")):
        raise ValueError(f"{t.GetName()} is not a linear transform")
    a = np.asarray(t.GetMatrix()).reshape(3, 3)
    c = np.asarray(t.GetCenter())
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = np.asarray(t.GetTranslation()) + c - a @ c
    return out


@dataclass
class SavedTransform:
    """A linear transform to save with a result: ``name`` (file stem) and its 4x4 LPS matrix,
    mapping points of the model's space to points of the input (ITK's resampling convention)."""

    name: str
    matrix_lps: np.ndarray

    def write(self, path: str | Path) -> Path:
        return write_transform(self.matrix_lps, path)


def write_transform(matrix_lps: Any, path: str | Path) -> Path:
    """Write a 4x4 LPS matrix as an ITK transform file (``.tfm``, ``.txt`` or ``.h5``).

    Slicer loads it as a linear transform node (``AffineTransform_double_3_3``).
    """
    from .imaging import atomic_write

    sitk = _sitk()
    transform = _affine_transform(np.asarray(matrix_lps, dtype=np.float64))
    return atomic_write(path, lambda tmp: sitk.WriteTransform(transform, tmp))


def read_transform(path: str | Path) -> np.ndarray:
    """The 4x4 LPS matrix of a linear ITK transform file."""
    sitk = _sitk()
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable ITK transform file ({str(exc).strip().splitlines()[-1]})") from None
    return transform_matrix(transform)


# ----------------------------------------------------------------------------- bias field


def correct_bias(
    image: Image,
    mask: np.ndarray | None = None,
    *,
    shrink: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
) -> tuple[Image, np.ndarray]:
    """Remove a smooth multiplicative bias field with N4 (SimpleITK).

    N4 runs on a copy shrunk by ``shrink`` along each axis (voxels no larger than 8 mm); its
    B-spline field is evaluated on the full-resolution grid and divided out.

    Args:
        image: a scan; intensities must be mostly positive where the head is.
        mask: where to estimate the field (bool, the image's shape); default: Otsu's
            foreground of the positive voxels.
        shrink: the shrink factor for the estimate (1 uses full resolution).
        iterations: N4 iterations per fitting level.

    Returns:
        The corrected image (float32, same geometry) and the field (float32, same shape;
        ``corrected * field == image`` inside the mask and where the image is positive).
    """
    sitk = _sitk()
    img = sitk.Cast(to_sitk(image), sitk.sitkFloat32)
    array = np.asarray(image.array, dtype=np.float32)
    if mask is None:
        positive = sitk.Cast(to_sitk(Image((array > 0).astype(np.uint8), image.affine)), sitk.sitkUInt8)
        otsu = sitk.OtsuThreshold(img, 0, 1, 200)
        mask_img = sitk.And(otsu, positive)
    else:
        mask = np.asarray(mask, dtype=bool) & (array > 0)
        mask_img = to_sitk(Image(mask.astype(np.uint8), image.affine))
    if not np.any(sitk.GetArrayViewFromImage(mask_img)):
        raise InputError(image.meta.get("source", "image"), "no foreground to estimate a bias field from")
    factors = [max(1, min(int(shrink), int(8.0 // s) or 1)) for s in img.GetSpacing()]
    small = sitk.Shrink(img, factors)
    small_mask = sitk.Shrink(mask_img, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    bias = np.exp(np.transpose(sitk.GetArrayFromImage(log_field), (2, 1, 0))).astype(np.float32)
    corrected = (array / bias).astype(np.float32)
    return Image(corrected, image.affine.copy(), dict(image.meta)), bias


# ----------------------------------------------------------------------------- brain extraction


def _deepbet():
    try:
        from deepbet import BrainExtraction
    except ImportError as exc:
        raise LongitudinalDiffusionError(
            f"brain extraction needs deepbet ({exc}): pip install --no-deps {DEEPBET_PIN} "
            "connected-components-3d==4.1.1 fill_voids==2.1.2 (its network weights come with it)"
        ) from None
    return BrainExtraction


@functools.lru_cache(maxsize=1)
def _deepbet_model() -> Any:
    return _deepbet()(no_gpu=True)


def extract_brain(image: Image, *, size: int = 192) -> np.ndarray:
    """A brain mask of a T1-weighted scan with deepbet (bool, the image's shape).

    deepbet finds the head's box on a 128^3 copy, then segments the box resampled to
    ``size``^3 (its native 256 gives the same mask on Colin27, Dice 0.94 against ch2bet
    either way, at two to three times the time: docs/real-scans.md). It works on the scan's closest
    RAS-aligned voxel order; the mask comes back in the scan's own.

    Raises:
        LongitudinalDiffusionError: deepbet is not installed (the message says how).
    """
    import nibabel as nib
    import torch

    model = _deepbet_model()
    array = check_array(image.array, image.meta.get("source", "image")).astype(np.float32)
    ornt = nib.io_orientation(image.affine)
    canonical = nib.apply_orientation(array, ornt)
    with torch.no_grad():
        prob = model.run_model(np.ascontiguousarray(canonical), shape=(size, size, size))
    mask = model.postprocess(prob > 0.5)
    back = nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], ornt)
    return np.ascontiguousarray(nib.apply_orientation(mask, back) > 0)


def is_skull_stripped(image: Image, brain_mask: np.ndarray | None = None) -> bool:
    """Whether ``image`` already shows the brain only.

    A stripped scan has most voxels exactly at its minimum (the background the stripping
    set) and a foreground that a brain mask covers almost entirely (at least 85 %). Without
    a mask the foreground's volume decides (below 2 l, which a head with skull exceeds from
    about a year of age; pass a mask for infants).
    """
    array = np.asarray(image.array)
    background = array <= array.min()
    if background.mean() < _STRIPPED_BACKGROUND:
        return False
    foreground = ~background
    if brain_mask is not None:
        cover = float((np.asarray(brain_mask, dtype=bool) & foreground).sum()) / max(int(foreground.sum()), 1)
        return cover >= _STRIPPED_COVER
    voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    return float(foreground.sum()) * voxel_ml < 2000.0


# ----------------------------------------------------------------------------- the atlas


@functools.lru_cache(maxsize=4)
def _atlas(name: str, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """(array, RAS affine) of the T1-like atlas at ``spacing`` mm, in model space."""
    if name not in ATLASES:
        raise ValueError(f"unknown atlas {name!r}; known: {ATLASES}")
    from scipy import ndimage

    from .demo.template import load_template

    tpl = load_template()
    t1 = 0.25 * tpl.csf + 0.6 * tpl.gm + 1.0 * tpl.wm
    affine = tpl.affine.copy()
    affine[:3, 3] -= tpl.centre_mm  # the cohort's world: the template brain's centroid at the origin
    factor = spacing / float(np.linalg.norm(affine[:3, 0]))
    if factor > 1.0:
        t1 = ndimage.gaussian_filter(t1, 0.5 * factor)
        step = max(1, int(round(factor)))
        t1 = t1[::step, ::step, ::step]
        affine[:3, :3] = affine[:3, :3] * step
    return np.ascontiguousarray(t1, dtype=np.float32), affine


def atlas_image(name: str = "icbm2009a", spacing: float = 2.0) -> Image:
    """The registration target of atlas ``name`` in the model's space (T1-like, brain only)."""
    array, affine = _atlas(name, float(spacing))
    return Image(array.copy(), affine.copy(), {"source": f"atlas {name}"})


def model_space_affine(
    extent_mm: Sequence[float] | np.ndarray, spacing: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and shape of a box of ``extent_mm`` centred on the model space's origin."""
    i, j, k = (max(1, int(round(float(e) / spacing))) for e in extent_mm)
    shape = (i, j, k)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * spacing
    return affine, shape


# ----------------------------------------------------------------------------- registration


def register(
    fixed: Image,
    moving: Image,
    *,
    kind: str = "rigid",
    moving_mask: np.ndarray | None = None,
    fixed_mask: np.ndarray | None = None,
    shrink: Sequence[int] | None = None,
    smoothing_mm: Sequence[float] = (4.0, 2.0, 0.0),
    iterations: int = 200,
    sampling: float = 0.05,
    seed: int = 1,
    initial: str = "moments",
) -> np.ndarray:
    """Align ``moving`` to ``fixed``: Mattes mutual information, multi-resolution, SimpleITK.

    A rigid (Euler) registration initialised at the images' centres of mass (moments);
    ``kind="affine"`` continues from it with a 12-parameter affine. Three levels, with voxels
    of about 8, 4 and 2 mm by default (shrink factors from the fixed image's voxel size: 4,
    2, 1 at 2 mm, 2, 1, 1 at 5 mm); ``sampling`` is the fraction of voxels the metric draws
    at each level, raised so that it draws at least 20000 (small images use them all).
    ``initial="geometry"`` starts from the identity (images already roughly aligned, such as
    two contrasts on one grid) instead of matching the centres of mass.

    Returns:
        The 4x4 matrix, in LPS mm, taking a point of ``fixed`` to the point of ``moving``
        that lies there (ITK's resampling convention).
    """
    if kind not in ("rigid", "affine"):
        raise ValueError(f"kind must be 'rigid' or 'affine', got {kind!r}")
    if initial not in ("moments", "geometry"):
        raise ValueError(f"initial must be 'moments' or 'geometry', got {initial!r}")
    sitk = _sitk()
    f = sitk.Cast(to_sitk(fixed), sitk.sitkFloat32)
    m = sitk.Cast(to_sitk(moving), sitk.sitkFloat32)
    if shrink is None:
        coarsest = max(fixed.spacing)
        shrink = [max(1, int(round(target / coarsest))) for target in (8.0, 4.0, 2.0)][: len(smoothing_mm)]
    region = int(np.count_nonzero(fixed_mask)) if fixed_mask is not None else int(np.prod(fixed.shape))
    sampling = float(min(1.0, max(sampling, 20000.0 / max(region, 1))))
    fm = None if fixed_mask is None else to_sitk(Image(np.asarray(fixed_mask, np.uint8), fixed.affine))
    mm = None if moving_mask is None else to_sitk(Image(np.asarray(moving_mask, np.uint8), moving.affine))
    if initial == "geometry":
        init = sitk.Euler3DTransform()
        centre = np.asarray(fixed.affine[:3, :3]) @ ((np.asarray(fixed.shape[:3]) - 1.0) / 2.0) + fixed.affine[:3, 3]
        init.SetCenter([float(-centre[0]), float(-centre[1]), float(centre[2])])  # RAS -> LPS
    else:
        init = sitk.CenteredTransformInitializer(
            f if fm is None else sitk.Mask(f, fm),
            m if mm is None else sitk.Mask(m, mm),
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
    rigid = _run_registration(f, m, init, fm, mm, shrink, smoothing_mm, iterations, sampling, seed)
    if kind == "rigid":
        return transform_matrix(rigid)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    return transform_matrix(
        _run_registration(f, m, affine, fm, mm, shrink[1:], smoothing_mm[1:], iterations, sampling, seed)
    )


def _run_registration(f, m, initial, fm, mm, shrink, smoothing_mm, iterations, sampling, seed):
    sitk = _sitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    if fm is not None:
        reg.SetMetricFixedMask(fm)
    if mm is not None:
        reg.SetMetricMovingMask(mm)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-4,
        numberOfIterations=int(iterations),
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(f, m)
    log.debug(
        "registration: %s after %d iterations, metric %.4f",
        reg.GetOptimizerStopConditionDescription(),
        reg.GetOptimizerIteration(),
        reg.GetMetricValue(),
    )
    if isinstance(out, sitk.CompositeTransform) and out.GetNumberOfTransforms() == 1:
        out = out.GetNthTransform(0)
    return out.Downcast() if hasattr(out, "Downcast") else out


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """The angle (degrees) of the rotation closest to a 3x3 (or 4x4) matrix's linear part."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64)[:3, :3])
    r = u @ vt
    return math.degrees(math.acos(float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


# ----------------------------------------------------------------------------- resampling


def _resample(image: Image, matrix_lps: np.ndarray, affine: np.ndarray, shape: Sequence[int], *, labels: bool) -> Image:
    """``image`` seen through ``matrix_lps`` (target point -> image point) on a target grid."""
    sitk = _sitk()
    ref = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    lps = _FLIP @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(o) for o in lps[:3, 3]])
    ref.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    src = to_sitk(image) if labels else sitk.Cast(to_sitk(image), sitk.sitkFloat32)
    out = sitk.Resample(
        src,
        ref,
        _affine_transform(np.asarray(matrix_lps, dtype=np.float64)),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        0.0,
        src.GetPixelID(),
    )
    array = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    return Image(np.ascontiguousarray(array), np.asarray(affine, dtype=np.float64).copy(), dict(image.meta))


def _support(matrix_lps: np.ndarray, affine: np.ndarray, shape: Sequence[int], box_affine, box_shape) -> np.ndarray:
    """Which voxels of a grid map (through ``matrix_lps``, grid point -> box point) inside a box."""
    to_box = np.linalg.solve(box_affine, _FLIP @ matrix_lps @ _FLIP @ affine)  # grid index -> box index
    idx = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1)
    pos = to_box[:3, :3].astype(np.float32) @ idx + to_box[:3, 3:4].astype(np.float32)
    lim = np.asarray(box_shape, dtype=np.float32)[:, None]
    inside = np.all((pos >= -0.5) & (pos <= lim - 0.5), axis=0)
    return inside.reshape(tuple(shape))


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class PreprocessedScan:
    """One input after preprocessing, with what it takes to go back.

    Attributes:
        name: a short name for files (e.g. the input's file stem).
        input_affine, input_shape: the input's own grid.
        image: the preprocessed image, in the model's space.
        to_input_lps: 4x4 LPS matrix, model-space point -> input point.
        bias: the bias field on the input's grid (None when not corrected).
        brain_mask: the brain mask on the input's grid (None when not extracted).
        steps: what was done, in order, with the seconds each took.
    """

    name: str
    input_affine: np.ndarray
    input_shape: tuple[int, int, int]
    image: Image
    to_input_lps: np.ndarray
    bias: np.ndarray | None = None
    brain_mask: np.ndarray | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def to_input_ras(self) -> np.ndarray:
        return lps_to_ras(self.to_input_lps)


@dataclass
class PreprocessResult:
    """The preprocessed images and the exact way back to each input's grid.

    Attributes:
        spec: what the card asked for.
        scans: one :class:`PreprocessedScan` per input, in input order.
        reference: index of the visit the others were aligned to.
        originals: the inputs as given.

    The preprocessed images share one model-space grid (each keeps its input's own grid
    when nothing was aligned).
    """

    spec: PreprocessSpec
    scans: list[PreprocessedScan]
    reference: int = 0
    originals: list[Image] = field(default_factory=list, repr=False)

    @property
    def images(self) -> list[Image]:
        return [s.image for s in self.scans]

    def back_to_input(self, image: Image, index: int = 0, *, labels: bool = False, bias: bool = False) -> Image:
        """Bring an image of the model's space back onto input ``index``'s own grid.

        Args:
            image: any image placed in the model's space (e.g. a model's output after the
                grid's inverse), on any grid there.
            index: which input's grid.
            labels: nearest neighbour, integer result; else linear, float32.
            bias: multiply by that input's bias field (intensity images), so that the
                preprocessed image itself comes back as the input (up to interpolation).

        Returns:
            An :class:`Image` with the input's shape and exactly its affine. Input voxels
            whose model-space position lies outside ``image`` are 0.
        """
        scan = self.scans[index]
        inverse = np.linalg.inv(scan.to_input_lps)  # input point -> model-space point
        if _is_identity(inverse) and image.shape == scan.input_shape and np.allclose(image.affine, scan.input_affine):
            out = Image(np.array(image.array, copy=True), scan.input_affine.copy(), dict(image.meta))
        else:
            out = _resample(image, inverse, scan.input_affine, scan.input_shape, labels=labels)
            out.affine = scan.input_affine.copy()
        if labels:
            out.array = (
                np.rint(out.array).astype(np.int32) if not np.issubdtype(out.array.dtype, np.integer) else out.array
            )
        else:
            out.array = np.asarray(out.array, dtype=np.float32)
            if bias and scan.bias is not None:
                out.array = out.array * scan.bias
        return out

    def vectors_back_to_input(self, vectors: Image, index: int = 0) -> Image:
        """A displacement field (I, J, K, 3) in RAS mm of the model's space, back on input
        ``index``'s grid with its vectors turned into that input's frame."""
        array = np.asarray(vectors.array, dtype=np.float32)
        comps = [self.back_to_input(Image(array[..., c], vectors.affine), index).array for c in range(3)]
        linear = self.scans[index].to_input_ras[:3, :3]  # model-space vector -> input vector
        out = np.einsum("ab,ijkb->ijka", linear.astype(np.float32), np.stack(comps, axis=-1))
        return Image(
            np.ascontiguousarray(out, dtype=np.float32), self.scans[index].input_affine.copy(), dict(vectors.meta)
        )

    def to_model(self, image: Image, index: int = 0, *, labels: bool = False) -> Image:
        """Take another image on input ``index``'s grid (e.g. its label map) into the model's
        space, through the same transform as that input (no bias correction, no stripping)."""
        scan = self.scans[index]
        if not np.allclose(image.affine, scan.input_affine, atol=1e-4) or image.shape[:3] != scan.input_shape:
            raise InputError(image.meta.get("source", "image"), f"does not lie on the grid of input {scan.name}")
        if _is_identity(scan.to_input_lps) and scan.image.same_geometry(image):
            return Image(np.array(image.array, copy=True), image.affine.copy(), dict(image.meta))
        return _resample(image, scan.to_input_lps, scan.image.affine, scan.image.shape, labels=labels)

    def input_on(self, image: Image, index: int, onto: int) -> Image:
        """Input ``index``'s original ``image`` on input ``onto``'s grid, aligned through the
        model's space in one interpolation (e.g. every real visit of a timeline on one grid)."""
        src, dst = self.scans[index], self.scans[onto]
        if index == onto:
            return Image(np.array(image.array, copy=True), dst.input_affine.copy(), dict(image.meta))
        matrix = src.to_input_lps @ np.linalg.inv(dst.to_input_lps)  # onto point -> model point -> index point
        out = _resample(image, matrix, dst.input_affine, dst.input_shape, labels=False)
        out.affine = dst.input_affine.copy()
        return out

    def outside_fraction(self, index: int = 0) -> float:
        """Fraction of input ``index``'s voxels outside the model-space box (0 on the way back)."""
        scan = self.scans[index]
        inverse = np.linalg.inv(scan.to_input_lps)
        inside = _support(inverse, scan.input_affine, scan.input_shape, scan.image.affine, scan.image.shape)
        return float(1.0 - inside.mean())

    def transforms(self) -> list[SavedTransform]:
        """The transforms to save with a result: ``<input>-to-atlas`` for each aligned input."""
        if self.spec.align == "none":
            return []
        return [SavedTransform(f"{s.name}-to-atlas", s.to_input_lps.copy()) for s in self.scans]

    def describe(self) -> dict[str, Any]:
        """For the provenance: the spec, each input's steps and timings, and what lies outside."""
        return {
            "spec": self.spec.to_dict(),
            "reference": self.reference,
            "model_space": "icbm2009a MNI mm, brain centroid at the origin" if self.spec.align != "none" else "input",
            "outside_model_box": "0 (the model made nothing there)",
            "inputs": [
                {
                    "name": s.name,
                    "steps": s.steps,
                    "to_atlas_tfm": f"transforms/{s.name}-to-atlas.tfm" if self.spec.align != "none" else None,
                    "outside_fraction": round(self.outside_fraction(i), 4),
                }
                for i, s in enumerate(self.scans)
            ],
        }


def _is_identity(m: np.ndarray) -> bool:
    return bool(np.allclose(m, np.eye(4), atol=1e-9))


def in_model_space(image: Image, source: str | Path | None = None) -> bool:
    """Whether a scan already lives in the models' training space: it is marked as the
    simulated cohort (NIfTI ``descrip`` or metadata), or it has the cohort's geometry (voxel
    axes along R, A, S and the field of view centred on the world origin)."""
    if "SIMULATED" in str(image.meta.get("description", "")) or image.meta.get("simulated") is True:
        return True
    path = source if source is not None else image.meta.get("source")
    if path is not None and Path(str(path)).is_file():  # an image not read by load_image: its file's mark
        import nibabel as nib

        from .imaging import header_description

        try:
            descrip = header_description(nib.load(str(path)))
        except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:  # no mark
            log.debug("no header description in %s: %s", path, exc)
            descrip = ""
        if "SIMULATED" in descrip:
            return True
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis_aligned = np.allclose(affine[:3, :3], np.diag(spacing), atol=1e-6)
    centre = affine[:3, :3] @ ((np.asarray(image.shape[:3], dtype=np.float64) - 1.0) / 2.0) + affine[:3, 3]
    return bool(axis_aligned and np.all(np.abs(centre) <= 0.5 * spacing + 1e-6))


def preprocess_for(
    card: Mapping[str, Any],
    images: Sequence[Image],
    *,
    names: Sequence[str] | None = None,
    spec: PreprocessSpec | None = None,
    spacing_mm: float | None = None,
    reference: int = 0,
    register_spacing_mm: float = 2.0,
    brain_masks: bool = True,
) -> PreprocessResult:
    """Apply what ``card`` says its model expects to a subject's ``images``.

    Args:
        card: the model card (its ``"preprocessing"`` entry and its grids).
        images: the subject's scans, each on its own grid (visits or modalities).
        names: file stems for the transforms (default ``input-<n>``).
        spec: override the card's entry.
        spacing_mm: voxel size of the model-space grid (default: the finest of the card's
            grids, so the grid's own resampling is a plain copy).
        reference: the visit the others are aligned to.
        register_spacing_mm: images are registered at this voxel size (at most).
        brain_masks: restrict the registration metric to deepbet's brain mask (when
            deepbet is installed); skull stripping uses deepbet whatever this says.

    Returns:
        A :class:`PreprocessResult` whose images share one model-space grid (or keep their
        own grids when the card aligns nothing).
    """
    spec = spec or PreprocessSpec.from_card(card)
    images = list(images)
    if not images:
        raise ValueError("no images to preprocess")
    if not 0 <= reference < len(images):
        raise ValueError(f"reference {reference} is not an index of the {len(images)} images")
    names = list(names) if names is not None else [f"input-{i}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    extent, spacing = _model_extent(card, spacing_mm)

    work: list[Image] = []
    scans: list[PreprocessedScan] = []
    for index, (name, image) in enumerate(zip(names, images)):
        # the mask serves stripping, and the reference's alignment to the brain-only atlas
        want_mask = spec.skull_strip or (spec.align != "none" and brain_masks and index == reference)
        img, scan = _prepare_scan(name, image, spec, want_mask)
        work.append(img)
        scans.append(scan)

    if spec.align == "none":
        for scan, img in zip(scans, work):
            scan.image = img
        return PreprocessResult(spec, scans, reference, images)
    _to_model_space(spec, scans, work, names, reference, register_spacing_mm, extent, spacing)
    return PreprocessResult(spec, scans, reference, images)


def _model_extent(card: Mapping[str, Any], spacing_mm: float | None) -> tuple[np.ndarray | None, float]:
    """The model space's extent (mm; the largest of the card's grids, None without grids) and
    voxel size (``spacing_mm``, else the finest of the card's grids, else 2 mm)."""
    grids = [g for g in (card.get("grid"), card.get("sr_grid")) if isinstance(g, Mapping)]
    extent = (
        np.max([np.asarray(g["shape"], float) * np.asarray(g["spacing"], float) for g in grids], axis=0)
        if grids
        else None
    )
    if spacing_mm is None:
        spacing_mm = min(min(g["spacing"]) for g in grids) if grids else 2.0
    return extent, float(spacing_mm)


def _prepare_scan(name: str, image: Image, spec: PreprocessSpec, want_mask: bool) -> tuple[Image, PreprocessedScan]:
    """One scan checked, brain-masked (when ``want_mask``), bias-corrected and stripped as
    ``spec`` says, on its own grid; and its :class:`PreprocessedScan` record so far."""
    source = image.meta.get("source", name)
    check_affine(image.affine, source)
    array = check_array(image.array, source).astype(np.float32)
    img = Image(array, image.affine.copy(), dict(image.meta))
    i, j, k = img.shape[:3]
    scan = PreprocessedScan(name, img.affine.copy(), (i, j, k), img, np.eye(4))
    mask = None
    if want_mask:
        t = time.perf_counter()
        try:
            mask = extract_brain(img)
        except LongitudinalDiffusionError:
            if spec.skull_strip:
                raise
            log.warning("deepbet is not installed: registering %s without a brain mask", name)
        if mask is not None:
            stripped = is_skull_stripped(img, mask)
            scan.steps.append(
                {
                    "step": "brain mask (deepbet)",
                    "already_stripped": stripped,
                    "seconds": round(time.perf_counter() - t, 2),
                }
            )
            if stripped:
                mask = array > array.min()
            scan.brain_mask = mask
    if spec.bias_field:
        t = time.perf_counter()
        img, scan.bias = correct_bias(img)
        scan.steps.append({"step": "bias field (N4)", "seconds": round(time.perf_counter() - t, 2)})
    if spec.skull_strip and mask is not None:
        img = Image(np.where(mask, img.array, 0).astype(np.float32), img.affine, img.meta)
        scan.steps.append({"step": "skull strip", "brain_ml": round(float(mask.sum()) * _voxel_ml(img), 1)})
    return img, scan


def _to_model_space(
    spec: PreprocessSpec,
    scans: list[PreprocessedScan],
    work: list[Image],
    names: list[str],
    ref: int,
    register_spacing_mm: float,
    extent: np.ndarray | None,
    spacing_mm: float,
) -> None:
    """Visits to the reference (rigid), the reference to the atlas (as the card says), and
    every scan resampled once into model space; fills each scan's image and transform."""
    if spec.atlas is None:  # PreprocessSpec refuses this when aligning
        raise ValueError("aligning needs an atlas")
    small = [_downsampled(img, register_spacing_mm) for img in work]
    to_ref = [np.eye(4) for _ in work]
    for i in range(len(work)):
        if i == ref:
            continue
        t = time.perf_counter()
        # head to head: one subject's visits need no brain mask (and a mask per contrast would
        # differ); scans on one grid (e.g. the contrasts of a session) start from where they are
        init = "geometry" if work[i].same_geometry(work[ref]) else "moments"
        to_ref[i] = register(small[ref], small[i], kind="rigid", initial=init)
        scans[i].steps.append({"step": f"rigid to {names[ref]}", "seconds": round(time.perf_counter() - t, 2)})
    t = time.perf_counter()
    atlas = atlas_image(spec.atlas, register_spacing_mm)
    moving = small[ref]
    ref_mask = scans[ref].brain_mask
    if ref_mask is not None:  # brain to brain: the atlas shows the brain only
        small_mask = _downsampled_mask(ref_mask, work[ref], moving)
        moving = Image(np.where(small_mask, moving.array, 0).astype(np.float32), moving.affine, moving.meta)
    ref_to_atlas = register(atlas, moving, kind=spec.align)
    scans[ref].steps.append(
        {"step": f"{spec.align} to atlas {spec.atlas}", "seconds": round(time.perf_counter() - t, 2)}
    )

    if extent is None:
        extent = np.asarray(atlas.shape, float) * np.asarray(atlas.spacing)
    model_affine, model_shape = model_space_affine(extent, spacing_mm)
    for i, (scan, img) in enumerate(zip(scans, work)):
        # model-space point -> reference point -> this visit's point
        scan.to_input_lps = to_ref[i] @ ref_to_atlas
        t = time.perf_counter()
        scan.image = _resample(
            _antialiased(img, spacing_mm), scan.to_input_lps, model_affine, model_shape, labels=False
        )
        scan.image.meta["preprocessed"] = True
        scan.steps.append({"step": "resample to model space", "seconds": round(time.perf_counter() - t, 2)})


def _voxel_ml(image: Image) -> float:
    return abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0


def _antialiased(image: Image, spacing_mm: float) -> Image:
    """Smooth ``image`` before it is sampled at ``spacing_mm`` (Gaussian, sigma = 0.4 of the
    coarsening per axis), so a coarse model grid sees an average, not aliasing."""
    from scipy import ndimage

    factors = np.asarray([spacing_mm / s for s in image.spacing])
    if np.all(factors <= 1.0):
        return image
    sigma = 0.4 * np.maximum(factors, 1.0) * (factors > 1.0)
    return Image(ndimage.gaussian_filter(np.asarray(image.array, np.float32), sigma), image.affine, image.meta)


def _downsampled(image: Image, spacing_mm: float) -> Image:
    """``image`` at voxels no smaller than ``spacing_mm`` (block steps after smoothing)."""
    steps = [max(1, int(round(spacing_mm / s))) for s in image.spacing]
    if all(s == 1 for s in steps):
        return image
    from scipy import ndimage

    sigma = [0.4 * s if s > 1 else 0.0 for s in steps]
    array = ndimage.gaussian_filter(np.asarray(image.array, np.float32), sigma)[:: steps[0], :: steps[1], :: steps[2]]
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] * np.asarray(steps, dtype=np.float64)
    return Image(np.ascontiguousarray(array), affine, dict(image.meta))


def _downsampled_mask(mask: np.ndarray, image: Image, small: Image) -> np.ndarray:
    steps = [max(1, int(round(a / b))) for a, b in zip(small.spacing, image.spacing)]
    return np.ascontiguousarray(np.asarray(mask, bool)[:: steps[0], :: steps[1], :: steps[2]])
