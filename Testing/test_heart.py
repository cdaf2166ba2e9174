"""Tests of LongitudinalDiffusionLib.demo.heart: the simulated beating-heart bSSFP cine.

The physiology tests measure everything from the label maps (volumes in ml, wall thickness
from a distance transform), not from the simulator's own parameters, and the contrast tests
from the images, so they check what a user of the files would see.
"""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from LongitudinalDiffusionLib.demo.heart import (
    HEART_LABELS,
    TISSUE_LABELS,
    TISSUES_1P5T,
    HeartCine,
    bssfp_signal,
    simulate_heart,
    write_heart,
)
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import load_image

#: A coarse grid with the default field of view (128 x 128 x 120 mm), for the fast tests.
SMALL = {"shape": (32, 32, 24), "spacing": (4.0, 4.0, 5.0)}


@pytest.fixture(scope="module")
def cine() -> HeartCine:
    """One default cine (64 x 64 x 48, 10 frames), shared by the physiology tests."""
    return simulate_heart(np.random.default_rng(2024))


def volume_ml(label_image, value: int) -> float:
    return float(np.count_nonzero(label_image.array == value)) * float(np.prod(label_image.spacing)) / 1000.0


def mean_wall_thickness_mm(label_image) -> float:
    """Mean LV wall thickness: for a wall of thickness T the mean distance of its voxels to
    the nearest non-wall voxel is T/4."""
    wall = label_image.array == 2
    distance = ndimage.distance_transform_edt(wall, sampling=label_image.spacing)
    return 4.0 * float(distance[wall].mean())


def core(mask: np.ndarray) -> np.ndarray:
    """The mask without its one-voxel rim (the partial-volume voxels)."""
    return ndimage.binary_erosion(mask)


# ----------------------------------------------------------------------------------------
# Structure and determinism
# ----------------------------------------------------------------------------------------


def test_cine_structure(cine: HeartCine) -> None:
    n = 10
    assert len(cine.frames) == len(cine.labels) == len(cine.times_ms) == len(cine.tissues) == n
    assert cine.phases == ["ED"] + ["mid"] * (n - 2) + ["ES"]
    assert cine.times_ms[0] == 0.0
    assert np.all(np.diff(cine.times_ms) > 0)
    assert 300.0 <= cine.times_ms[-1] <= 350.0
    affine = cine.frames[0].affine
    assert np.allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.5]))  # no obliquity
    assert np.linalg.norm(affine[:3, 3]) > 1.0  # origin is not at the first voxel
    for image in cine.frames + cine.labels + cine.tissues:
        assert image.shape == (64, 64, 48)
        assert np.array_equal(image.affine, affine)
        assert image.orientation == "RAS"
    for frame, label in zip(cine.frames, cine.labels):
        assert frame.array.dtype == np.float32 and np.all(np.isfinite(frame.array))
        assert frame.array.min() >= 0.0  # a magnitude image
        assert label.array.dtype == np.uint8
        assert set(np.unique(label.array)) == set(HEART_LABELS)
    assert HEART_LABELS == {0: "background", 1: "LV blood pool", 2: "LV myocardium", 3: "RV blood pool"}
    meta = cine.meta
    assert meta["simulated"] is True
    assert meta["anatomy"]["lv_inside_fov"] is True
    assert meta["sequence"]["field_strength_T"] == 1.5
    assert 50.0 <= meta["sequence"]["flip_angle_deg"] <= 60.0
    assert meta["contraction"][0] == 0.0 and meta["contraction"][-1] == pytest.approx(1.0)
    json.dumps(meta, default=float)  # everything recorded is serialisable


def test_same_seed_same_cine_and_different_seed_differs() -> None:
    a = simulate_heart(np.random.default_rng(7), n_frames=4, **SMALL)
    b = simulate_heart(np.random.default_rng(7), n_frames=4, **SMALL)
    c = simulate_heart(np.random.default_rng(8), n_frames=4, **SMALL)
    for x, y in zip(a.frames + a.labels, b.frames + b.labels):
        assert np.array_equal(x.array, y.array)
        assert np.array_equal(x.affine, y.affine)
    assert a.times_ms == b.times_ms
    assert not np.array_equal(a.frames[0].array, c.frames[0].array)
    assert not np.array_equal(a.labels[0].array, c.labels[0].array)
    assert a.meta["parameters"] != c.meta["parameters"]


def test_rng_state_recorded_regenerates_the_cine() -> None:
    first = simulate_heart(np.random.default_rng(11), n_frames=2, **SMALL)
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = first.meta["rng_state"]
    again = simulate_heart(generator, n_frames=2, **SMALL)
    assert np.array_equal(first.frames[1].array, again.frames[1].array)


def test_bad_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="n_frames"):
        simulate_heart(rng, n_frames=1)
    with pytest.raises(ValueError, match="shape"):
        simulate_heart(rng, shape=(64, 64))
    with pytest.raises(ValueError, match="spacing"):
        simulate_heart(rng, spacing=(2.0, 0.0, 2.5))
    with pytest.raises(TypeError, match="Generator"):
        simulate_heart(42)  # type: ignore[arg-type]


def test_a_field_of_view_smaller_than_the_heart_is_flagged() -> None:
    with pytest.warns(UserWarning, match="clipped"):
        clipped = simulate_heart(np.random.default_rng(0), n_frames=2, shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0))
    assert clipped.meta["anatomy"]["lv_inside_fov"] is False


# ----------------------------------------------------------------------------------------
# Physiology, measured from the labels
# ----------------------------------------------------------------------------------------


def test_lv_volume_falls_monotonically_and_ejection_fraction_is_normal(cine: HeartCine) -> None:
    lv = np.array([volume_ml(label, 1) for label in cine.labels])
    assert np.all(np.diff(lv) < 0), lv
    assert 90.0 < lv[0] < 180.0  # a normal adult end-diastolic volume
    ef = (lv[0] - lv[-1]) / lv[0]
    assert 0.50 <= ef <= 0.70
    assert cine.meta["ejection_fraction"] == pytest.approx(ef)
    # The label-measured EF matches the drawn (model) EF to within a percentage point.
    assert ef == pytest.approx(cine.meta["model"]["ejection_fraction"], abs=0.01)


def test_rv_also_ejects(cine: HeartCine) -> None:
    rv = np.array([volume_ml(label, 3) for label in cine.labels])
    assert np.all(np.diff(rv) < 0), rv
    assert 0.40 <= (rv[0] - rv[-1]) / rv[0] <= 0.75


def test_myocardial_volume_is_conserved(cine: HeartCine) -> None:
    myo = np.array([volume_ml(label, 2) for label in cine.labels])
    assert np.all(np.abs(myo / myo[0] - 1.0) < 0.05), myo
    assert myo[0] == pytest.approx(cine.meta["model"]["myocardial_volume_ml"], rel=0.05)


def test_wall_thickens_and_base_descends(cine: HeartCine) -> None:
    ed, es = mean_wall_thickness_mm(cine.labels[0]), mean_wall_thickness_mm(cine.labels[-1])
    assert es > 1.15 * ed, (ed, es)
    model = cine.meta["model"]
    assert model["wall_thickness_es_mm"] > 1.3 * model["wall_thickness_ed_mm"]
    # Longitudinal shortening: the LV's extent along the long axis shrinks by 10-20 %.
    axis = np.asarray(cine.meta["anatomy"]["long_axis_apex_to_base"])
    affine = cine.labels[0].affine

    def length(label) -> float:
        ijk = np.argwhere(label.array == 2)
        w = (ijk @ affine[:3, :3].T + affine[:3, 3]) @ axis
        return float(w.max() - w.min())

    shortening = 1.0 - length(cine.labels[-1]) / length(cine.labels[0])
    assert 0.08 <= shortening <= 0.22, shortening


# ----------------------------------------------------------------------------------------
# Contrast from the MR physics
# ----------------------------------------------------------------------------------------


def test_bssfp_signal_equation() -> None:
    a = math.radians(55.0)
    r = 1550.0 / 250.0
    expected = 0.87 * math.sin(a) / ((r + 1.0) - math.cos(a) * (r - 1.0))
    assert float(bssfp_signal(0.87, 1550.0, 250.0, 55.0)) == pytest.approx(expected)
    # When T1 = T2 the steady state is sin(a) / 2 whatever the flip angle's cosine.
    assert float(bssfp_signal(1.0, 100.0, 100.0, 30.0)) == pytest.approx(0.25)
    signal = {name: float(bssfp_signal(t.pd, t.t1_ms, t.t2_ms, 55.0)) for name, t in TISSUES_1P5T.items()}
    assert signal["blood"] > 2.0 * signal["myocardium"]
    assert signal["fat"] > signal["blood"]  # T2/T1 decides: fat is bright in bSSFP
    assert min(signal, key=lambda k: signal[k] if k != "air" else np.inf) == "lung"


def test_blood_is_more_than_twice_as_bright_as_myocardium(cine: HeartCine) -> None:
    image, label = cine.frames[0].array, cine.labels[0].array
    blood, myo = image[label == 1].mean(), image[label == 2].mean()
    assert blood > 2.0 * myo, (blood, myo)
    # Away from the partial-volume rim the contrast is at least as high.
    assert image[core(label == 1)].mean() > 2.0 * image[core(label == 2)].mean()


def test_lung_is_the_darkest_tissue(cine: HeartCine) -> None:
    image, tissue = cine.frames[0].array, cine.tissues[0].array
    means = {}
    for value, name in TISSUE_LABELS.items():
        mask = core(tissue == value)
        if name != "air" and mask.sum() >= 20:
            means[name] = float(image[mask].mean())
    assert {"lung", "myocardium", "blood", "skeletal muscle"} <= set(means)
    assert min(means, key=means.get) == "lung", means


def test_labels_match_the_images_in_every_frame(cine: HeartCine) -> None:
    for frame, label in zip(cine.frames, cine.labels):
        image, lab = frame.array, label.array
        blood, myo, rv = image[lab == 1], image[lab == 2], image[lab == 3]
        assert blood.mean() > 1.8 * myo.mean()
        assert rv.mean() > 1.8 * myo.mean()
        # Nearly every core blood voxel is brighter than the typical myocardium voxel.
        assert np.mean(image[core(lab == 1)] > np.median(myo)) > 0.98


def test_partial_volume_gives_intermediate_intensities(cine: HeartCine) -> None:
    """Boundaries look like MRI: voxels on the endocardial rim lie between the two tissues."""
    image, label = cine.frames[0].array, cine.labels[0].array
    blood_core, myo_core = image[core(label == 1)].mean(), image[core(label == 2)].mean()
    rim = (label == 1) & ~core(label == 1)
    rim_mean = image[rim].mean()
    assert myo_core < rim_mean < blood_core


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


def test_write_heart(tmp_path) -> None:
    small = simulate_heart(np.random.default_rng(3), n_frames=3, **SMALL)
    written = write_heart(small, tmp_path, "heart01")
    folder = tmp_path / "sub-heart01" / "cine"
    expected = []
    for k in range(3):
        stem = folder / f"sub-heart01_frame-{k:02d}"
        expected += [stem.with_name(stem.name + "_bssfp.nii.gz"), stem.with_name(stem.name + "_dseg.nii.gz")]
    expected += [folder / "sub-heart01_cine.json", folder / "manifest.tsv"]
    assert written == expected
    assert all(path.is_file() for path in written)
    assert not list(folder.glob(".tmp-*"))
    for path in written[:6]:  # every NIfTI says it is simulated, in its own header
        assert b"SIMULATED" in nib.load(path).header["descrip"].item(), path

    with open(folder / "manifest.tsv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert list(rows[0]) == ["file", "time_ms", "phase", "labels"]
    assert [r["file"] for r in rows] == [p.name for p in expected[0:6:2]]
    assert [r["labels"] for r in rows] == [p.name for p in expected[1:6:2]]
    assert [r["phase"] for r in rows] == ["ED", "mid", "ES"]
    assert [float(r["time_ms"]) for r in rows] == pytest.approx(small.times_ms, abs=0.05)

    sidecar = json.loads((folder / "sub-heart01_cine.json").read_text(encoding="utf-8"))
    assert sidecar["Simulated"] is True
    assert sidecar["Phases"] == ["ED", "mid", "ES"]
    assert sidecar["FrameTimes_ms"] == pytest.approx(small.times_ms)
    assert sidecar["EjectionFraction"] == pytest.approx(small.meta["ejection_fraction"])
    assert sidecar["FlipAngle"] == pytest.approx(small.meta["sequence"]["flip_angle_deg"])
    assert sidecar["Labels"] == {str(k): v for k, v in HEART_LABELS.items()}

    frame = load_image(expected[2])
    labels = load_image(expected[3], dtype=np.uint8)
    assert np.allclose(frame.array, small.frames[1].array)
    assert np.array_equal(labels.array, small.labels[1].array)
    assert np.allclose(labels.affine, small.labels[1].affine)


def test_write_heart_refuses_bad_subject_ids(tmp_path) -> None:
    small = simulate_heart(np.random.default_rng(3), n_frames=2, **SMALL)
    with pytest.raises(InputError, match="letters and digits"):
        write_heart(small, tmp_path, "heart_01/../x")
    assert not any(tmp_path.iterdir())
    written = write_heart(small, tmp_path, "sub-02")  # the BIDS prefix is accepted
    assert written[0].parent == tmp_path / "sub-02" / "cine"
