"""The simple baselines every model is measured against (see ``training/evaluate.py``).

A model earns its place only if it beats what a user could do without it, on the same
cases. Each baseline sees exactly what the model sees - never the ground-truth image or
labels of the case it predicts:

* **missing age** - :func:`nearest_timepoint` (a copy of the subject's real scan nearest
  in age) and :func:`linear_interpolation` (the age-weighted average of the real scans just
  before and just after the missing age);
* **missing modality** - :func:`nearest_contrast` (a fixed map to the most similar
  available contrast, :data:`NEAREST_CONTRAST`) passed through :func:`match_histogram`
  (quantile mapping onto a reference intensity distribution of the target contrast built by
  :func:`reference_quantiles` from *other* images, e.g. the training subjects), and the
  nearest contrast unchanged;
* **frames** - :func:`linear_blend` ((1 - gamma) source + gamma target, voxel by voxel) and
  :func:`identity_warp` (the source itself with its labels: "nothing moves").

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
