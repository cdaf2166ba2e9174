"""The classical baselines every model is measured against (see ``training/evaluate.py``).

A model earns its place only if it beats what a user could do without it, on the same
cases. Each baseline sees exactly what the model sees - never the ground-truth image or
labels of the case it predicts:

* **missing age** - :func:`nearest_timepoint` (a copy of the subject's real scan nearest
  in age), :func:`linear_interpolation` (the age-weighted average of the real scans just
  before and just after the missing age) and :func:`registered_interpolation` (the two
  registered to each other with SimpleITK demons, each warped toward the missing age by its
  fraction of the field, then blended by age);
* **missing modality** - :func:`nearest_contrast` (a fixed map to the most similar
  available contrast, :data:`NEAREST_CONTRAST`) passed through :func:`match_histogram`
  (quantile mapping onto a reference intensity distribution of the target contrast built by
  :func:`reference_quantiles` from *other* images, e.g. the training subjects), and the
  nearest contrast unchanged;
* **missing modality**, fitted - :class:`ContrastRegression` (a quadratic per-voxel
  regression of the target from the session's other contrasts, least squares on training
  sessions only);
* **frames** - :func:`linear_blend` ((1 - gamma) source + gamma target, voxel by voxel),
  :func:`identity_warp` (the source itself with its labels: "nothing moves") and
  :func:`registered_frame` (demons from source to target, the field scaled by gamma, the
  labels warped with nearest neighbour).

Images are :class:`~LongitudinalDiffusionLib.imaging.Image` objects; a baseline output is
resampled (trilinear) onto the geometry it is evaluated on when its inputs lie elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError
from LongitudinalDiffusionLib.grid import resample_to
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.subject import Modality, Timepoint, parse_modality

#: quantile levels of a reference intensity distribution (0, 0.001, ..., 1)
LEVELS = np.linspace(0.0, 1.0, 1001)

#: the contrast a missing one is copied from, in order of preference. T1w and its
#: contrast-enhanced version share T1 weighting; T2w and FLAIR share T2 weighting.
NEAREST_CONTRAST: dict[Modality, tuple[Modality, ...]] = {
    Modality.T1W: (Modality.T1CE, Modality.T2W, Modality.FLAIR),
    Modality.T1CE: (Modality.T1W, Modality.FLAIR, Modality.T2W),
    Modality.T2W: (Modality.FLAIR, Modality.T1W, Modality.T1CE),
    Modality.FLAIR: (Modality.T2W, Modality.T1W, Modality.T1CE),
}


def image_of(tp: Timepoint) -> Image:
    """A timepoint's image (read from its file when not loaded)."""
    if tp.image is not None:
        return tp.image
    if tp.source is None:
        raise LongitudinalDiffusionError(f"{tp.describe()} has neither an image nor a file")
    return load_image(tp.source)


def on_geometry(image: Image, affine: np.ndarray, shape: Sequence[int], *, labels: bool = False) -> Image:
    """``image`` on the geometry (affine, shape): itself when it already lies there."""
    probe = Image(np.empty(tuple(int(s) for s in shape[:3]), np.float32), affine)
    if image.same_geometry(probe):
        return image
    return resample_to(image, affine, shape, order=0 if labels else 1)


# ----------------------------------------------------------------------------- missing age


def _check_timeline(real: Iterable[Timepoint]) -> list[Timepoint]:
    real = sorted(real, key=lambda tp: tp.age)
    if not real:
        raise LongitudinalDiffusionError("no real timepoints to build a baseline from")
    return real


def nearest_timepoint(real: Iterable[Timepoint], age: float, affine: np.ndarray, shape: Sequence[int]) -> Image:
    """A copy of the real scan nearest in age to ``age`` (the earlier one on a tie), on the
    geometry (affine, shape)."""
    real = _check_timeline(real)
    nearest = min(real, key=lambda tp: (abs(tp.age - age), tp.age))
    image = on_geometry(image_of(nearest), affine, shape)
    return Image(np.asarray(image.array, np.float32).copy(), image.affine)


def neighbours(real: Iterable[Timepoint], age: float) -> tuple[Timepoint, Timepoint]:
    """The real scans just before and just after ``age``.

    Raises:
        LongitudinalDiffusionError: ``age`` is not strictly inside the timeline.
    """
    real = _check_timeline(real)
    before = [tp for tp in real if tp.age < age]
    after = [tp for tp in real if tp.age > age]
    if not before or not after:
        ages = ", ".join(f"{tp.age:g}" for tp in real)
        raise LongitudinalDiffusionError(
            f"linear interpolation needs real scans before and after {age:g} months (ages: {ages})"
        )
    return before[-1], after[0]


def linear_interpolation(real: Iterable[Timepoint], age: float, affine: np.ndarray, shape: Sequence[int]) -> Image:
    """The age-weighted average of the neighbouring real scans, on the geometry (affine, shape):
    ``(1 - w) * before + w * after`` with ``w = (age - age_before) / (age_after - age_before)``."""
    before, after = neighbours(real, age)
    w = (age - before.age) / (after.age - before.age)
    a = np.asarray(on_geometry(image_of(before), affine, shape).array, np.float64)
    b = np.asarray(on_geometry(image_of(after), affine, shape).array, np.float64)
    return Image(((1.0 - w) * a + w * b).astype(np.float32), np.asarray(affine, np.float64))


# ----------------------------------------------------------------------------- missing modality


def nearest_contrast(visit: Iterable[Timepoint], target: str | Modality) -> Timepoint:
    """The session's scan a missing ``target`` contrast is copied from (:data:`NEAREST_CONTRAST`).

    Raises:
        LongitudinalDiffusionError: the session has none of the candidate contrasts.
    """
    target = parse_modality(target)
    have = {tp.modality: tp for tp in visit if tp.modality != target}
    for modality in NEAREST_CONTRAST[target]:
        if modality in have:
            return have[modality]
    raise LongitudinalDiffusionError(f"no contrast to stand in for {target.value} (the session has none)")


def quantiles(array: np.ndarray, levels: np.ndarray = LEVELS) -> np.ndarray:
    """The intensity quantiles of ``array`` at ``levels`` (a distribution's quantile function)."""
    return np.quantile(np.asarray(array, np.float64).ravel(), levels)


def reference_quantiles(images: Iterable[Image | np.ndarray], levels: np.ndarray = LEVELS) -> np.ndarray:
    """One reference distribution from several images: the mean of their quantile functions
    (the 1D Wasserstein barycentre of their intensity histograms).

    Raises:
        LongitudinalDiffusionError: no images.
    """
    funcs = [quantiles(img.array if isinstance(img, Image) else img, levels) for img in images]
    if not funcs:
        raise LongitudinalDiffusionError("no images to build a reference intensity distribution from")
    return np.mean(funcs, axis=0)


def match_histogram(array: np.ndarray, reference: np.ndarray, levels: np.ndarray = LEVELS) -> np.ndarray:
    """Map ``array``'s intensities onto the ``reference`` quantile function (monotone quantile
    mapping): a voxel at the p-th quantile of ``array`` gets the reference's p-th quantile.

    Equal values stay equal (each distinct value takes its mid-rank), so the order of
    intensities is kept and only their distribution changes.
    """
    arr = np.asarray(array, np.float64)
    reference = np.asarray(reference, np.float64)
    if reference.shape != levels.shape:
        raise LongitudinalDiffusionError(f"reference has {reference.size} quantiles, expected {levels.size}")
    values, inverse, counts = np.unique(arr.ravel(), return_inverse=True, return_counts=True)
    cdf = (np.cumsum(counts) - 0.5 * counts) / arr.size
    mapped = np.interp(cdf, levels, reference)
    return mapped[inverse].reshape(arr.shape).astype(np.float32)


def histogram_matched_contrast(visit: Iterable[Timepoint], target: str | Modality, reference: np.ndarray) -> Image:
    """The missing-modality baseline: the session's nearest available contrast, its
    histogram matched to ``reference`` (quantiles of the target contrast at :data:`LEVELS`,
    taken from other images). Reads only the session's other contrasts."""
    source = nearest_contrast(visit, target)
    image = image_of(source)
    return Image(match_histogram(image.array, reference), image.affine)


# ----------------------------------------------------------------------------- frames


def linear_blend(source: Image, target: Image, gamma: float) -> Image:
    """``(1 - gamma) * source + gamma * target`` voxel by voxel, on the source's geometry."""
    if not 0.0 <= gamma <= 1.0:
        raise LongitudinalDiffusionError(f"gamma must lie in [0, 1], not {gamma}")
    t = on_geometry(target, source.affine, source.shape)
    out = (1.0 - gamma) * np.asarray(source.array, np.float64) + gamma * np.asarray(t.array, np.float64)
    return Image(out.astype(np.float32), source.affine)


def identity_warp(source: Image, source_labels: Image | None = None) -> tuple[Image, Image | None]:
    """The identity deformation: the source frame and its labels, unchanged, at every gamma."""
    image = Image(np.asarray(source.array, np.float32).copy(), source.affine)
    if source_labels is None:
        return image, None
    labels = on_geometry(source_labels, source.affine, source.shape, labels=True)
    return image, Image(np.asarray(labels.array).copy(), source.affine)


# ----------------------------------------------------------------------------- registration (SimpleITK demons)

#: demons settings: iterations per level, the Gaussian smoothing of the field (in voxels) and the
#: shrink factors of the levels (coarse to fine). Chosen on the validation subjects/heart.
DEMONS_ITERATIONS = 60
DEMONS_SIGMA = 1.5
DEMONS_LEVELS = (2, 1)
DEMONS_MIN_SPACING_MM = 2.0


def _unit(array: np.ndarray) -> np.ndarray:
    """Intensities onto [0, 1] by the 0.5th/99.5th percentiles (clipped): what demons compares."""
    a = np.asarray(array, np.float64)
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(np.float32)


def _sitk(array: np.ndarray, spacing: Sequence[float]):
    """A SimpleITK image of a voxel array (numpy axis 0 is SimpleITK's z, hence the reversed spacing)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(list(spacing))))
    return image


def _spacing(image: Image) -> np.ndarray:
    return np.sqrt((np.asarray(image.affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def demons_field(fixed: Image, moving: Image, *, match_histograms: bool = False):
    """The displacement field (SimpleITK image, mm) that warps ``moving`` onto ``fixed`` -
    ``moving(x + u(x))`` looks like ``fixed(x)`` - by symmetric-forces demons on a two-level
    pyramid. Both images on one grid (``moving`` is resampled onto ``fixed``'s otherwise);
    intensities compared after mapping each onto [0, 1], ``moving``'s histogram matched to
    ``fixed``'s first when ``match_histograms`` (contrast that changes between the two)."""
    import SimpleITK as sitk

    moving = on_geometry(moving, fixed.affine, fixed.shape)
    spacing = _spacing(fixed)
    f = _sitk(_unit(fixed.array), spacing)
    m = _sitk(_unit(moving.array), spacing)
    if match_histograms:
        m = sitk.HistogramMatching(
            m, f, numberOfHistogramLevels=128, numberOfMatchPoints=15, thresholdAtMeanIntensity=False
        )
    # The finest level is no finer than DEMONS_MIN_SPACING_MM per axis (thin slices stay thin: a
    # 1 x 1 x 4 mm scan registers on 2 x 2 x 4 mm); warp() brings the field to the image's grid.
    finest = [max(1, int(round(DEMONS_MIN_SPACING_MM / s))) for s in f.GetSpacing()]
    field = None
    for level in DEMONS_LEVELS:
        shrink = [max(1, level * k) for k in finest]
        fs, ms = (sitk.Shrink(f, shrink), sitk.Shrink(m, shrink)) if max(shrink) > 1 else (f, m)
        if field is not None:
            field = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(DEMONS_ITERATIONS)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(DEMONS_SIGMA)
        demons.SetUseImageSpacing(False)  # the smoothing is in voxels
        field = demons.Execute(fs, ms) if field is None else demons.Execute(fs, ms, field)
    return field


def warp(image: Image, field, scale: float, *, labels: bool = False) -> Image:
    """``image(x + scale * u(x))`` on its own grid: the displacement field scaled (0: identity,
    1: the full warp), trilinear for intensities, nearest neighbour for labels."""
    import SimpleITK as sitk

    spacing = _spacing(image)
    src = _sitk(np.asarray(image.array, np.int32 if labels else np.float32), spacing)
    if field.GetSize() != src.GetSize():
        field = sitk.Resample(field, src, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    scaled = sitk.Compose([sitk.VectorIndexSelectionCast(field, i) * float(scale) for i in range(3)])
    scaled.CopyInformation(field)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(scaled, sitk.sitkVectorFloat64))
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    out = sitk.Resample(src, src, transform, interpolator, 0.0)
    array = sitk.GetArrayFromImage(out)
    return Image(array.astype(np.asarray(image.array).dtype if labels else np.float32), image.affine)


def registered_frame(
    source: Image, target: Image, gamma: float, source_labels: Image | None = None, *, field=None
) -> tuple[Image, Image | None]:
    """The frames baseline with registration: demons from the source (end-diastole) to the
    target (end-systole), the field scaled by ``gamma`` and applied to the source and its
    labels (nearest neighbour). ``field`` reuses :func:`demons_field` (target, source)."""
    if not 0.0 <= gamma <= 1.0:
        raise LongitudinalDiffusionError(f"gamma must lie in [0, 1], not {gamma}")
    if field is None:
        field = demons_field(target, source)
    image = warp(source, field, gamma)
    if source_labels is None:
        return image, None
    labels = on_geometry(source_labels, source.affine, source.shape, labels=True)
    return image, warp(labels, field, gamma, labels=True)


def registered_interpolation(real: Iterable[Timepoint], age: float, affine: np.ndarray, shape: Sequence[int]) -> Image:
    """Registration-based interpolation of a missing age: the scans just before (age a0) and
    after (a1) are registered to each other (demons, histograms matched, since contrast
    changes with age), each is warped toward the missing age - the earlier by the fraction
    ``w = (age - a0) / (a1 - a0)`` of its field, the later by ``1 - w`` of its own - and the
    two are blended ``(1 - w) * earlier + w * later``, on the geometry (affine, shape)."""
    before, after = neighbours(real, age)
    w = (age - before.age) / (after.age - before.age)
    a = on_geometry(image_of(before), affine, shape)
    b = on_geometry(image_of(after), affine, shape)
    a_to_b = demons_field(b, a, match_histograms=True)  # a(x + u) ~ b(x)
    b_to_a = demons_field(a, b, match_histograms=True)
    wa = np.asarray(warp(a, a_to_b, w).array, np.float64)
    wb = np.asarray(warp(b, b_to_a, 1.0 - w).array, np.float64)
    return Image(((1.0 - w) * wa + w * wb).astype(np.float32), np.asarray(affine, np.float64))


# ----------------------------------------------------------------------------- contrast regression

#: voxels drawn from each training scan to fit the regression (fixed seed)
REGRESSION_VOXELS = 20_000
REGRESSION_PERCENTILE = 99.0


def scan_scale(array: np.ndarray) -> float:
    """A scan's intensity unit for the regression: its 99th percentile (gain-free units)."""
    value = float(np.percentile(np.asarray(array, np.float64), REGRESSION_PERCENTILE))
    return value if value > 0 else 1.0


def quadratic_features(channels: Sequence[np.ndarray]) -> np.ndarray:
    """[1, x_i, x_i * x_j (i <= j)] of the flattened channels: one row per voxel."""
    flat = [np.asarray(c, np.float64).ravel() for c in channels]
    cols = [np.ones_like(flat[0])] + flat
    cols += [flat[i] * flat[j] for i in range(len(flat)) for j in range(i, len(flat))]
    return np.stack(cols, axis=1)


class ContrastRegression:
    """A per-voxel quadratic regression of a target contrast from the other contrasts of the
    same session, fitted by least squares on training sessions only.

    Each scan is divided by its 99th percentile (:func:`scan_scale`) so the scanner gain
    drops out; the prediction is brought back to intensities with the mean unit of the
    training targets it was fitted on.
    """

    def __init__(self, conditions: Sequence[Modality], target: Modality) -> None:
        self.conditions = [parse_modality(c) for c in conditions]
        self.target = parse_modality(target)
        self.coef: np.ndarray | None = None
        self.unit = 1.0
        self.sessions = 0

    def fit(self, sessions: Iterable[dict[Modality, np.ndarray]], *, seed: int = 0) -> ContrastRegression:
        """Least squares on :data:`REGRESSION_VOXELS` random voxels of each session (a dict
        contrast -> array holding the target and every condition)."""
        rng = np.random.default_rng(seed)
        xs, ys, units = [], [], []
        for session in sessions:
            missing = [m.value for m in (*self.conditions, self.target) if m not in session]
            if missing:
                raise LongitudinalDiffusionError(f"a training session lacks {', '.join(missing)}")
            target = np.asarray(session[self.target], np.float64).ravel()
            pick = rng.choice(target.size, size=min(REGRESSION_VOXELS, target.size), replace=False)
            chans = [np.asarray(session[c], np.float64).ravel()[pick] / scan_scale(session[c]) for c in self.conditions]
            units.append(scan_scale(target))
            xs.append(quadratic_features(chans))
            ys.append(target[pick] / units[-1])
        if not xs:
            raise LongitudinalDiffusionError(f"no training session to fit the {self.target.value} regression on")
        self.coef = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)[0]
        self.unit = float(np.mean(units))
        self.sessions = len(xs)
        return self

    def predict(self, visit: Iterable[Timepoint]) -> Image:
        """The target contrast of a session from its other contrasts (never the target)."""
        if self.coef is None:
            raise LongitudinalDiffusionError("the regression is not fitted")
        have = {tp.modality: tp for tp in visit if tp.modality != self.target}
        missing = [c.value for c in self.conditions if c not in have]
        if missing:
            raise LongitudinalDiffusionError(f"the session lacks {', '.join(missing)} for the regression")
        first = image_of(have[self.conditions[0]])
        arrays = [on_geometry(image_of(have[c]), first.affine, first.shape).array for c in self.conditions]
        feats = quadratic_features([np.asarray(a, np.float64) / scan_scale(a) for a in arrays])
        out = (feats @ self.coef).reshape(first.shape) * self.unit
        return Image(out.astype(np.float32), first.affine)
