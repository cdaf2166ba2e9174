"""Tests of the model grid: forward onto the grid and the exact way back.

Real data (nibabel's ``anatomical.nii``) and synthetic volumes whose intensities are an
analytic function of the world position (a sum of Gaussian blobs), so that what lands on
the grid can be checked against the truth at every grid voxel's world coordinate.

Tolerances for the smooth volumes are derived, not tuned: trilinear interpolation of a
function with second derivatives bounded by M2 errs by at most ``M2 * sum(h_a**2) / 8``
(h_a: the voxel size along each axis), and interpolating already-interpolated values can
only add its own error (linear interpolation is a convex combination, so it never
amplifies an existing error). For a Gaussian of amplitude A and width sigma every second
directional derivative is bounded by ``A / sigma**2``; blobs add up.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.grid import GridRecord, ModelGrid, grid_affine, resample_to
from LongitudinalDiffusionLib.imaging import Image, load_image

ANATOMICAL = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")

# Blobs relative to the centre of the field of view: (offset in mm, sigma in mm, amplitude).
# The first is the brightest and stands apart: the others' peaks stay below 60% of its own.
BLOBS = (
    ((6.0, -4.0, 3.0), 8.0, 1000.0),
    ((-14.0, 10.0, -6.0), 10.0, 400.0),
    ((8.0, 14.0, -12.0), 7.0, 300.0),
)
BASELINE = 50.0
#: Bound on every second directional derivative of the blob field.
M2 = sum(amp / sigma**2 for _, sigma, amp in BLOBS)
#: Grid used for the geometry tests: no percentile clipping, so that the only error left is
#: interpolation (clipping is tested on its own).
NO_CLIP = {"percentiles": (0.0, 100.0)}


# --------------------------------------------------------------------------- helpers


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation about a world axis."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(linear: np.ndarray, shape, fov_center) -> np.ndarray:
    """A 4x4 affine with the given linear part whose field-of-view centre is ``fov_center``."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(fov_center) - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def world(affine: np.ndarray, shape) -> np.ndarray:
    """World (RAS) coordinates of every voxel centre, shape (*shape, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def to_index(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Voxel coordinates of world points (..., 3)."""
    inv = np.linalg.inv(affine)
    return points @ inv[:3, :3].T + inv[:3, 3]


def blob_field(points: np.ndarray, center) -> np.ndarray:
    """The analytic volume at world points (..., 3), blobs placed around ``center``."""
    out = np.full(points.shape[:-1], BASELINE)
    for offset, sigma, amp in BLOBS:
        d2 = np.sum((points - (np.asarray(center) + offset)) ** 2, axis=-1)
        out += amp * np.exp(-d2 / (2 * sigma**2))
    return out


def blob_image(affine: np.ndarray, shape, center) -> Image:
    return Image(blob_field(world(affine, shape), center).astype(np.float32), affine)


def interp_bound(*spacings) -> float:
    """Worst-case error of successive trilinear interpolations on these voxel sizes."""
    return M2 * sum(float(np.sum(np.square(h))) for h in spacings) / 8


def inside_hull(index: np.ndarray, shape, margin=0.0) -> np.ndarray:
    """Points (voxel coordinates) within the convex hull of the voxel centres, less a margin."""
    margin = np.broadcast_to(np.asarray(margin, dtype=float), (3,))
    return np.all((index >= margin) & (index <= np.asarray(shape) - 1 - margin), axis=-1)


def covered(image: Image, grid_affine_: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Input voxels whose round trip is pure interpolation (no edge repetition involved).

    Inside the hull of the grid's voxel centres, and far enough (one grid voxel) from the
    input's edge that every grid voxel they are interpolated from was itself inside the
    input's hull.
    """
    pts = world(image.affine, image.shape)
    margin = max(grid.spacing) / np.asarray(image.spacing)
    in_grid = inside_hull(to_index(grid_affine_, pts), grid.shape)
    in_input = inside_hull(np.indices(image.shape).transpose(1, 2, 3, 0).astype(float), image.shape, margin)
    return in_grid & in_input


def to_input_units(sample) -> np.ndarray:
    r = sample.record
    b0, b1 = r.value_range
    return (sample.array.astype(np.float64) - b0) * (r.hi - r.lo) / (b1 - b0) + r.lo


def bright_centroid(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centroid of the brightest blob: voxels above 80% of the peak, weighted by excess."""
    w = np.clip(values.astype(np.float64) - 0.8 * values.max(), 0, None)
    return (w[..., None] * world(affine, values.shape)).sum(axis=(0, 1, 2)) / w.sum()


def true_bright_centroid(center) -> np.ndarray:
    """The same centroid for the continuous field (sampled finely, 0.5 mm, around the blob).

    Not the blob's nominal centre: the other blobs' tails pull it by ~0.3 mm.
    """
    affine = make_affine(np.eye(3) * 0.5, (61, 61, 61), np.asarray(center) + BLOBS[0][0])
    return bright_centroid(blob_field(world(affine, (61, 61, 61)), center), affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def anatomical() -> Image:
    return load_image(ANATOMICAL)


def test_anatomical_round_trip_other_spacing_and_shape(anatomical):
    img = anatomical  # (33, 41, 25), LAS, 2 mm
    assert img.orientation == "LAS"
    grid = ModelGrid(shape=(48, 48, 40), spacing=(1.5, 1.5, 1.5))  # 72 mm < 82 mm along A: cropped
    sample = grid.forward(img)
    assert sample.array.shape == grid.shape and sample.array.dtype == np.float32
    assert "".join(nib.aff2axcodes(sample.affine)) == "RAS"
    assert np.allclose(np.linalg.norm(sample.affine[:3, :3], axis=0), 1.5)

    back = grid.inverse(sample.array, sample.record)
    assert np.array_equal(back.affine, img.affine)
    assert back.shape == img.shape and back.array.dtype == np.float32

    # Real data is not smooth, so no derivative bound: instead, the round trip is two
    # convex combinations, so each value must lie within the range of the (clipped) input
    # values it can have been made of. The grid voxels used lie within 1.5 mm of the input
    # voxel, and each was interpolated from the 2 mm input cell holding it: all within the
    # 3x3x3 neighbourhood.
    from scipy.ndimage import maximum_filter, minimum_filter

    lo, hi = sample.record.lo, sample.record.hi
    clipped = np.clip(img.array.astype(np.float64), lo, hi)
    mask = covered(img, sample.affine, grid)
    assert mask.sum() > 0.7 * mask.size
    slack = 1e-5 * (hi - lo)  # float32 storage of the grid
    assert np.all(back.array[mask] >= minimum_filter(clipped, size=3)[mask] - slack)
    assert np.all(back.array[mask] <= maximum_filter(clipped, size=3)[mask] + slack)
    # ... and on average close: measured mean |error| 3.2% of the intensity range (RMS 4.8%;
    # a 2 mm scan with sharp tissue edges, interpolated twice).
    err = np.abs(back.array[mask] - clipped[mask])
    assert err.mean() < 0.05 * (hi - lo)
    # Outside the grid (cropped along A) the input's background comes back.
    outside = ~_in_grid_box(img, sample.affine, grid)
    assert outside.any() and np.all(back.array[outside] == np.float32(lo))


def _in_grid_box(image: Image, affine: np.ndarray, grid: ModelGrid) -> np.ndarray:
    idx = to_index(affine, world(image.affine, image.shape))
    return np.all((idx >= -0.5) & (idx <= np.asarray(grid.shape) - 0.5), axis=-1)


def test_anatomical_same_spacing_is_exact(anatomical):
    # 2 mm grid, RAS: a flip of L, then pad/crop by whole voxels; no interpolation blur.
    img = anatomical
    grid = ModelGrid(shape=(40, 40, 32), spacing=(2.0, 2.0, 2.0))  # crops A (41 -> 40 voxels)
    sample = grid.forward(img)
    back = grid.inverse(sample.array, sample.record)
    assert np.array_equal(back.affine, img.affine) and back.shape == img.shape
    lo, hi = sample.record.lo, sample.record.hi
    inside = _in_grid_box(img, sample.affine, grid)
    assert (~inside).sum() == 25 * 33  # exactly one coronal slice cropped
    expected = np.clip(img.array, lo, hi)
    np.testing.assert_allclose(back.array[inside], expected[inside], rtol=0, atol=1e-6 * (hi - lo))
    assert np.all(back.array[~inside] == np.float32(lo))


# --------------------------------------------------------------------------- synthetic geometry

CASES = {
    # 20 degrees about x then 20 about z, 1.2 mm isotropic.
    "oblique": (rotation(2, 20) @ rotation(0, 20) * 1.2, (56, 60, 52), (5.0, -10.0, 12.0), 1.5, (56, 56, 56)),
    # Thick slices.
    "anisotropic": (np.diag([0.8, 0.8, 3.0]), (90, 96, 22), (-3.0, 4.0, 20.0), 1.5, (56, 56, 48)),
    # LPS (x and y flipped), far from the origin.
    "lps": (np.diag([-1.0, -1.0, 1.0]), (64, 72, 60), (120.0, -80.0, 40.0), 1.25, (64, 64, 56)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_synthetic_geometry_round_trip(case):
    linear, shape, fov_center, spacing, grid_shape = CASES[case]
    affine = make_affine(linear, shape, fov_center)
    img = blob_image(affine, shape, fov_center)
    grid = ModelGrid(shape=grid_shape, spacing=(spacing,) * 3, **NO_CLIP)

    sample = grid.forward(img)
    # The grid keeps the scan's obliquity: its axes are the input's, permuted/flipped to RAS.
    assert "".join(nib.aff2axcodes(sample.affine)) == "RAS"
    to_input = np.abs(np.linalg.solve(affine[:3, :3], sample.affine[:3, :3]))  # grid axis -> input axes
    assert np.all(np.count_nonzero(to_input > 1e-9, axis=0) == 1)  # a signed permutation...
    assert np.allclose(to_input.sum(axis=0), spacing / np.asarray(img.spacing)[to_input.argmax(axis=0)])  # ...rescaled

    # Placement: every grid voxel inside the input holds the analytic value at its world
    # position, within one trilinear interpolation on the input's voxels.
    grid_pts = world(sample.affine, grid.shape)
    inside = inside_hull(to_index(affine, grid_pts), shape)
    truth = blob_field(grid_pts, fov_center)
    on_grid = to_input_units(sample)
    bound_forward = interp_bound(img.spacing)
    assert np.abs(on_grid - truth)[inside].max() <= bound_forward + 1e-3
    # The brightest blob sits at the same world position before and after.
    c_in, c_grid = bright_centroid(img.array, affine), bright_centroid(on_grid, sample.affine)
    assert np.linalg.norm(c_in - c_grid) < 0.5 * min(min(img.spacing), spacing)
    assert np.linalg.norm(c_grid - true_bright_centroid(fov_center)) < 0.5 * min(min(img.spacing), spacing)

    back = grid.inverse(sample.array, sample.record)
    assert np.array_equal(back.affine, affine) and back.shape == shape
    mask = covered(img, sample.affine, grid)
    assert mask.mean() > 0.5
    err = np.abs(back.array.astype(np.float64) - img.array)
    assert err[mask].max() <= interp_bound(img.spacing, grid.spacing) + 1e-3
    # Within a grid voxel of the input's edge the forward repeated edge values, which the
    # derivation does not cover; with the blobs faded there the bound still holds.
    assert err[_in_grid_box(img, sample.affine, grid)].max() <= interp_bound(img.spacing, grid.spacing)


def test_measured_round_trip_error_is_far_below_the_bound():
    # The bound is a worst case (here 55, 5.5% of the peak amplitude; the largest error
    # measured is 9); the RMS error is much smaller (measured 0.54, 0.05% of the peak).
    linear, shape, fov_center, spacing, grid_shape = CASES["anisotropic"]
    affine = make_affine(linear, shape, fov_center)
    img = blob_image(affine, shape, fov_center)
    grid = ModelGrid(shape=grid_shape, spacing=(spacing,) * 3, **NO_CLIP)
    sample = grid.forward(img)
    back = grid.inverse(sample.array, sample.record)
    mask = covered(img, sample.affine, grid)
    rms = np.sqrt(np.mean((back.array[mask] - img.array[mask]) ** 2))
    assert rms < 0.002 * BLOBS[0][2]


def test_grid_affine_snaps_to_the_input_lattice():
    linear, shape, fov_center, _, _ = CASES["oblique"]
    affine = make_affine(linear, shape, fov_center)
    g = grid_affine(affine, shape, (33, 40, 41), (1.2, 1.2, 1.2))
    to_input = np.linalg.solve(affine, g)
    assert np.allclose(to_input[:3, 3], np.round(to_input[:3, 3]), atol=1e-9)  # voxel 0 on a voxel centre
    assert np.allclose(np.abs(to_input[:3, :3]).sum(axis=0), 1.0)  # a signed permutation: no rotation
    # The grid centre is within half an input voxel (per axis) of the field-of-view centre.
    centre = g[:3, :3] @ ((np.array([33, 40, 41]) - 1) / 2) + g[:3, 3]
    assert np.all(np.abs(to_index(affine, centre) - (np.array(shape) - 1) / 2) <= 0.5 + 1e-9)
    unsnapped = grid_affine(affine, shape, (33, 40, 41), (1.2, 1.2, 1.2), snap=False)
    assert np.allclose(unsnapped[:3, :3] @ ((np.array([33, 40, 41]) - 1) / 2) + unsnapped[:3, 3], fov_center)


def test_foreground_centre():
    # A head (ball) off-centre in a large field of view, on a zero background.
    shape, affine = (96, 96, 64), np.diag([1.0, 1.0, 1.0, 1.0])
    pts = world(affine, shape)
    ball_centre = np.array([70.0, 30.0, 32.0])
    ball = np.linalg.norm(pts - ball_centre, axis=-1) <= 14
    img = Image(np.where(ball, 200.0 + blob_field(pts, ball_centre), 0.0).astype(np.float32), affine)
    for center, whole in (("fov", False), ("foreground", True)):
        grid = ModelGrid(shape=(36, 36, 36), spacing=(1.0, 1.0, 1.0), center=center, **NO_CLIP)
        sample = grid.forward(img)
        grid_centre = sample.affine[:3, :3] @ np.full(3, 17.5) + sample.affine[:3, 3]
        back = grid.inverse(sample.array, sample.record)
        kept = np.isclose(back.array, img.array, rtol=0, atol=1e-3 * img.array.max())
        assert kept[ball].all() == whole
        if whole:
            assert np.all(np.abs(grid_centre - ball_centre) <= 0.5 + 1e-9)


# --------------------------------------------------------------------------- labels


def label_volume(affine: np.ndarray, shape, centre) -> np.ndarray:
    pts = world(affine, shape) - centre
    lab = np.zeros(shape, dtype=np.uint8)
    lab[np.linalg.norm(pts - (8, 0, 0), axis=-1) <= 13] = 1
    lab[np.linalg.norm(pts - (-12, 6, 2), axis=-1) <= 10] = 2
    lab[np.sum(((pts - (0, -12, -4)) / (12, 8, 9)) ** 2, axis=-1) <= 1] = 3
    return lab


LABEL_AFFINE = make_affine(np.diag([-1.0, -1.0, 1.0]) @ rotation(1, 15), (48, 52, 44), (10.0, 20.0, -5.0))


def test_labels_same_spacing_round_trip_is_exact():
    lab = label_volume(LABEL_AFFINE, (48, 52, 44), (10.0, 20.0, -5.0))
    img = Image(lab, LABEL_AFFINE)
    grid = ModelGrid(shape=(64, 64, 64), spacing=(1.0, 1.0, 1.0))
    sample = grid.forward(img, labels=True)
    assert set(np.unique(sample.array)) == {0.0, 1.0, 2.0, 3.0}
    assert sample.record.lo is None and sample.record.labels
    back = grid.inverse(sample.array, sample.record, labels=True)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, lab)
    assert np.array_equal(back.affine, LABEL_AFFINE)
    with pytest.raises(ValueError, match="labels=True"):
        grid.inverse(sample.array, sample.record)


def test_labels_other_spacing_dice():
    lab = label_volume(LABEL_AFFINE, (48, 52, 44), (10.0, 20.0, -5.0))
    img = Image(lab, LABEL_AFFINE)
    grid = ModelGrid(shape=(40, 40, 40), spacing=(1.6, 1.6, 1.6))
    sample = grid.forward(img, labels=True)
    back = grid.inverse(sample.array, sample.record, labels=True)
    assert np.array_equal(back.affine, LABEL_AFFINE) and back.shape == lab.shape
    for label in (1, 2, 3):
        assert dice(back.array == label, lab == label) > 0.9, label  # measured 0.943, 0.930, 0.928


def test_labels_follow_their_image_with_reference():
    lab = label_volume(LABEL_AFFINE, (48, 52, 44), (10.0, 20.0, -5.0))
    intensity = Image(blob_image(LABEL_AFFINE, lab.shape, (10.0, 20.0, -5.0)).array, LABEL_AFFINE)
    grid = ModelGrid(shape=(40, 40, 40), spacing=(1.6, 1.6, 1.6), center="foreground")
    image_sample = grid.forward(intensity)
    label_sample = grid.forward(Image(lab, LABEL_AFFINE), labels=True, reference=image_sample.record)
    assert np.array_equal(label_sample.affine, image_sample.affine)
    # A segmentation made on the grid goes back with the image's record.
    back = grid.inverse(label_sample.array, image_sample.record, labels=True)
    assert back.array.dtype == np.int32  # the image was float: labels come back as int32
    assert dice(back.array == 1, lab == 1) > 0.9


# --------------------------------------------------------------------------- intensities


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_intensity_scaling(anatomical, value_range):
    img = anatomical
    grid = ModelGrid(shape=(40, 48, 32), spacing=(2.0, 2.0, 2.0), value_range=value_range)
    sample = grid.forward(img)
    lo, hi = np.percentile(img.array, (0.5, 99.5))
    assert sample.record.lo == pytest.approx(lo) and sample.record.hi == pytest.approx(hi)
    b0, b1 = value_range
    assert sample.array.min() == b0 and sample.array.max() == b1
    # Same spacing: each grid voxel is an input voxel (or padding), mapped linearly.
    on_grid = resample_to(img, sample.affine, grid.shape, order=0, cval=lo).array
    expected = (np.clip(on_grid, lo, hi) - lo) / (hi - lo) * (b1 - b0) + b0
    np.testing.assert_allclose(sample.array, expected, rtol=0, atol=1e-6)
    assert np.all(sample.array[on_grid <= lo] == b0) and np.all(sample.array[on_grid >= hi] == b1)
    # Inverse: back to the input's units (clipped at the percentiles).
    back = grid.inverse(sample.array, sample.record)
    np.testing.assert_allclose(back.array, np.clip(img.array, lo, hi), rtol=0, atol=1e-6 * (hi - lo))
    # Model outputs beyond the range map beyond [lo, hi] linearly (no silent clipping).
    beyond = grid.inverse(np.full(grid.shape, b1 + (b1 - b0), dtype=np.float32), sample.record)
    np.testing.assert_allclose(beyond.array, 2 * hi - lo, rtol=1e-6)


def test_constant_image():
    img = Image(np.full((10, 12, 8), 7.0, dtype=np.float32), np.eye(4))
    grid = ModelGrid(shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), value_range=(-1.0, 1.0))
    sample = grid.forward(img)
    assert np.all(sample.array == -1.0)
    assert np.all(grid.inverse(sample.array, sample.record).array == 7.0)


def test_padding_small_input_comes_back_unchanged():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 1000, size=(20, 24, 16)).astype(np.int16)
    affine = make_affine(np.diag([-1.0, -1.0, 1.0]), data.shape, (30.0, -12.0, 7.0))
    img = Image(data, affine)
    grid = ModelGrid(shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0), value_range=(-1.0, 1.0), **NO_CLIP)
    sample = grid.forward(img)
    padded = sample.array == -1.0
    inside = inside_hull(to_index(affine, world(sample.affine, grid.shape)), data.shape)
    assert inside.sum() == data.size  # the whole input, voxel for voxel
    assert np.all(sample.array[~inside] == -1.0) and padded.sum() >= (~inside).sum()
    back = grid.inverse(sample.array, sample.record)
    assert np.array_equal(back.affine, affine) and back.shape == data.shape
    assert np.array_equal(np.rint(back.array), data)
    assert np.abs(back.array - data).max() < 1e-3


# --------------------------------------------------------------------------- resample_to


def test_resample_to_rotated_reference():
    shape, centre = (64, 72, 60), (120.0, -80.0, 40.0)
    affine = make_affine(np.diag([-1.0, -1.0, 1.0]), shape, centre)
    img = blob_image(affine, shape, centre)
    ref_shape = (50, 60, 50)
    ref = make_affine(rotation(1, 25) @ rotation(2, -10) * 1.4, ref_shape, np.asarray(centre) + (5, 0, -3))
    out = resample_to(img, ref, ref_shape, order=1, cval=-5.0)
    assert np.array_equal(out.affine, ref) and out.shape == ref_shape and out.array.dtype == np.float32
    pts = world(ref, ref_shape)
    idx = to_index(affine, pts)
    inside = inside_hull(idx, shape)
    assert inside.mean() > 0.5
    assert np.abs(out.array - blob_field(pts, centre))[inside].max() <= interp_bound(img.spacing) + 1e-3
    outside = ~np.all((idx >= -0.5) & (idx <= np.asarray(shape) - 0.5), axis=-1)
    assert outside.any() and np.all(out.array[outside] == -5.0)
    lab = resample_to(Image(label_volume(affine, shape, centre), affine), ref, ref_shape, order=0)
    assert lab.array.dtype == np.uint8 and set(np.unique(lab.array)) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="order"):
        resample_to(img, ref, ref_shape, order=3)


# --------------------------------------------------------------------------- records, inputs, validation


def test_record_json_round_trip_and_torch_input(anatomical):
    grid = ModelGrid(shape=(40, 40, 32), spacing=(1.7, 1.7, 1.7), value_range=(-1.0, 1.0))
    sample = grid.forward(anatomical)
    wire = json.dumps(sample.record.to_dict())
    record = GridRecord.from_dict(json.loads(wire))
    assert record == sample.record
    assert np.array_equal(record.affine, anatomical.affine)
    direct = grid.inverse(sample.array, sample.record)
    via_json = grid.inverse(sample.array, record)
    assert np.array_equal(via_json.affine, anatomical.affine)
    assert np.array_equal(via_json.array, direct.array)
    # torch in (with batch and channel axes), numpy out.
    via_torch = grid.inverse(torch.from_numpy(sample.array)[None, None], record)
    assert isinstance(via_torch.array, np.ndarray) and np.array_equal(via_torch.array, direct.array)
    half = grid.inverse(torch.from_numpy(sample.array).half(), record)
    assert half.array.dtype == np.float32 and np.abs(half.array - direct.array).max() < 2e-3 * record.hi
    # The grid sample is itself a correctly placed image.
    assert sample.image.same_geometry(Image(sample.array, sample.affine))
    with pytest.raises(ValueError, match="shape"):
        grid.inverse(sample.array[:-1], record)
    with pytest.raises(ValueError, match="grid of shape"):
        ModelGrid(shape=(40, 40, 30), spacing=(1.7, 1.7, 1.7)).inverse(sample.array[..., :30], record)
    with pytest.raises(ValueError, match="missing"):
        GridRecord.from_dict({k: v for k, v in record.to_dict().items() if k != "affine"})


def test_bad_images_raise_input_error():
    grid = ModelGrid(shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0))
    bad = np.ones((6, 6, 6), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="scan.nii"):
        grid.forward(Image(bad, np.eye(4), {"source": "scan.nii"}))
    with pytest.raises(InputError, match="4D"):
        grid.forward(Image(np.ones((6, 6, 6, 2), dtype=np.float32), np.eye(4)))
    with pytest.raises(InputError, match="singular"):
        grid.forward(Image(np.ones((6, 6, 6), dtype=np.float32), np.diag([1.0, 0.0, 1.0, 1.0])))


def test_model_grid_dict_round_trip():
    grid = ModelGrid(
        shape=(96, 112, 96),
        spacing=(1.5, 1.5, 1.5),
        orientation="LPS",
        percentiles=(1.0, 99.0),
        value_range=(-1.0, 1.0),
        interpolation="nearest",
        center="foreground",
    )
    card = json.loads(json.dumps(grid.to_dict()))
    assert ModelGrid.from_dict(card) == grid
    assert ModelGrid(shape=[64, 64, 64], spacing=[1, 1, 1]) == ModelGrid(shape=(64, 64, 64), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown"):
        ModelGrid.from_dict({**card, "spacng": [1, 1, 1]})
    with pytest.raises(ValueError, match="missing"):
        ModelGrid.from_dict({"shape": [64, 64, 64]})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"shape": (0, 64, 64)}, "shape"),
        ({"shape": (64, 64)}, "shape"),
        ({"shape": (64.5, 64, 64)}, "shape"),
        ({"shape": (True, 64, 64)}, "shape"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing"),
        ({"spacing": "1mm"}, "spacing"),
        ({"orientation": "RAX"}, "orientation"),
        ({"orientation": "RRS"}, "orientation"),
        ({"orientation": "RA"}, "orientation"),
        ({"percentiles": (99.0, 1.0)}, "percentiles"),
        ({"percentiles": (-1.0, 50.0)}, "percentiles"),
        ({"percentiles": (0.0, 101.0)}, "percentiles"),
        ({"value_range": (1.0, 1.0)}, "value_range"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"center": "middle"}, "center"),
    ],
)
def test_model_grid_validation_names_the_argument(kwargs, name):
    args = {"shape": (64, 64, 64), "spacing": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(ValueError) as info:
        ModelGrid(**args)
    assert str(info.value).startswith(name)
