"""Preprocessing on real scans: N4, deepbet, registration, the transform files and the way back.

Real scans (Testing/realdata.py) downsampled to 2-3 mm keep every test to a few seconds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from realdata import real_scan

from LongitudinalDiffusionLib import preprocess as P
from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError
from LongitudinalDiffusionLib.imaging import Image, load_image

sitk = pytest.importorskip("SimpleITK")

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def _small(name: str, spacing: float = 3.0) -> Image:
    return P._downsampled(load_image(real_scan(name)), spacing)


def _known_motion(degrees: float = 10.0, shift_mm: float = 15.0) -> np.ndarray:
    """A RAS rigid motion: ``degrees`` about an oblique axis through (0, -18, 10) mm, then ``shift_mm``."""
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    centre = np.array([0.0, -18.0, 10.0])
    shift = np.array([15.0, -8.0, 5.0]) / np.linalg.norm([15.0, -8.0, 5.0]) * shift_mm
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre - rot @ centre + shift
    return m


def _brain_points_lps(mask_img: Image) -> np.ndarray:
    idx = np.argwhere(mask_img.array > 0).T.astype(np.float64)
    ras = mask_img.affine[:3, :3] @ idx + mask_img.affine[:3, 3:4]
    return np.vstack([-ras[0], -ras[1], ras[2], np.ones(ras.shape[1])])


def test_known_rigid_motion_is_recovered_within_1mm_and_1_degree():
    head = _small("colin27")
    motion = _known_motion()  # RAS: where each point of the head moved to
    moved = Image(head.array, motion @ head.affine)  # the same voxels, the head rotated and shifted in the world
    found = P.register(head, moved, kind="rigid")  # fixed point -> moving point, LPS
    known = P.ras_to_lps(motion)
    error = np.linalg.inv(known) @ found
    assert P.rotation_angle_deg(error) < 1.0
    assert np.linalg.norm(found[:3, 3] - known[:3, 3]) < 1.0
    points = _brain_points_lps(_small("colin27-brain"))
    tre = np.linalg.norm((found @ points - known @ points)[:3], axis=0)
    assert tre.mean() < 1.0 and tre.max() < 2.0
    # and the motion really was 10 degrees and 15 mm: an identity answer would fail
    assert P.rotation_angle_deg(known) == pytest.approx(10.0, abs=1e-6)


def test_transform_files_read_back_equal_and_follow_the_lps_convention(tmp_path):
    motion_ras = _known_motion(7.0, 12.0)
    lps = P.ras_to_lps(motion_ras)
    for name in ("x-to-atlas.tfm", "x-to-atlas.h5"):
        path = P.write_transform(lps, tmp_path / name)
        back = P.read_transform(path)
        assert np.allclose(back, lps, atol=1e-9)
        # ITK applies it to LPS points: a RAS point p lands on motion_ras @ p
        t = sitk.ReadTransform(str(path))
        p_ras = np.array([12.0, -30.0, 25.0])
        q_lps = np.asarray(t.TransformPoint((-p_ras[0], -p_ras[1], p_ras[2])))
        q_ras = np.array([-q_lps[0], -q_lps[1], q_lps[2]])
        assert np.allclose(q_ras, (motion_ras @ np.append(p_ras, 1.0))[:3], atol=1e-9)
    assert "AffineTransform_double_3_3" in (tmp_path / "x-to-atlas.tfm").read_text()
    with pytest.raises(Exception, match="x.tfm"):
        P.read_transform(tmp_path / "x.tfm")


def test_sitk_round_trip_keeps_geometry_of_an_oblique_lps_scan():
    head = load_image(real_scan("itk-head-t1"))  # LSA voxel axes, 2x2x3 mm
    back = P.from_sitk(P.to_sitk(head))
    assert back.shape == head.shape
    assert np.allclose(back.affine, head.affine, atol=1e-6)
    assert np.array_equal(back.array, head.array)


@pytest.fixture(scope="module")
def colin_masks():
    """deepbet's masks of Colin27 with and without skull, at 2 mm (computed once: a few seconds)."""
    pytest.importorskip("deepbet")
    head, brain = _small("colin27", 2.0), _small("colin27-brain", 2.0)
    return head, brain, P.extract_brain(head, size=160), P.extract_brain(brain, size=160)


def test_deepbet_brain_mask_matches_ch2bet(colin_masks):
    head, brain, mask, _ = colin_masks
    ref = brain.array > 0
    assert mask.shape == head.shape and mask.dtype == bool
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    assert dice > 0.9


def test_already_stripped_scans_are_recognised(colin_masks):
    head, brain, head_mask, brain_mask = colin_masks
    assert P.is_skull_stripped(brain, brain_mask)
    assert not P.is_skull_stripped(head, head_mask)
    itk_head = load_image(real_scan("itk-head-t1"))  # 75 % exact zeros and still a head with skull
    assert not P.is_skull_stripped(itk_head, P.extract_brain(itk_head, size=160))
    # without a mask, the volume rule (on the scans as stored)
    assert P.is_skull_stripped(load_image(real_scan("colin27-brain")))
    assert not P.is_skull_stripped(load_image(real_scan("colin27")))


def test_n4_removes_a_synthetic_multiplicative_bias():
    brain = _small("colin27-brain", 3.0)
    clean = brain.array.astype(np.float32)
    inside = clean > 0.3 * clean.max()
    ijk = np.indices(clean.shape, dtype=np.float32)
    ramp = sum((ijk[a] / clean.shape[a] - 0.5) * w for a, w in enumerate((0.6, -0.4, 0.3)))
    bias = np.exp(ramp).astype(np.float32)  # about +-25 % across the head
    shaded = Image(clean * bias, brain.affine)
    corrected, field = P.correct_bias(shaded, mask=inside)
    before = np.std(np.log(shaded.array[inside] / clean[inside]))
    after = np.std(np.log(corrected.array[inside] / clean[inside]))
    assert after < 0.35 * before
    assert np.allclose(corrected.array * field, shaded.array, rtol=1e-5)
    assert corrected.same_geometry(shaded)


def _card(align: str = "rigid", skull_strip: bool = False, bias_field: bool = True) -> dict:
    return {
        "grid": {"shape": [32, 40, 32], "spacing": [5.0, 5.0, 5.0]},
        "preprocessing": {
            "bias_field": bias_field,
            "skull_strip": skull_strip,
            "align": align,
            "atlas": "icbm2009a",
            "intensity": "percentile",
        },
    }


def test_round_trip_lands_on_each_input_grid_uncropped():
    head = _small("colin27", 3.0)
    motion = _known_motion()
    visit2 = Image(head.array, motion @ head.affine)
    prep = P.preprocess_for(
        _card(), [head, visit2], names=["v1", "v2"], register_spacing_mm=3.0, brain_masks=False, spacing_mm=3.0
    )
    a, b = prep.images
    assert a.same_geometry(b) and a.shape == (53, 67, 53)  # the card grid's 160x200x160 mm at 3 mm
    inside = (a.array > 0) & (b.array > 0)
    assert np.corrcoef(a.array[inside], b.array[inside])[0, 1] > 0.95  # the two visits agree in model space
    # visit 2 -> visit 1 recovered through the atlas: v2 point = motion @ v1 point
    v2_from_v1 = prep.scans[1].to_input_lps @ np.linalg.inv(prep.scans[0].to_input_lps)
    assert P.rotation_angle_deg(np.linalg.inv(P.ras_to_lps(motion)) @ v2_from_v1) < 1.0
    for i, scan in enumerate((head, visit2)):
        back = prep.back_to_input(prep.images[i], i, bias=True)
        assert back.shape == scan.shape and np.array_equal(back.affine, scan.affine)
        ones = prep.back_to_input(Image(np.ones(a.shape, np.float32), a.affine), i)
        # the way back covers the input's whole field of view; beyond the model's box it gives 0
        assert 0.0 < prep.outside_fraction(i) < 0.7
        assert (ones.array == 0).mean() == pytest.approx(prep.outside_fraction(i), abs=0.02)
        fg = scan.array > 0.1 * scan.array.max()
        assert np.corrcoef(back.array[fg & (ones.array > 0.99)], scan.array[fg & (ones.array > 0.99)])[0, 1] > 0.97
        labels = prep.back_to_input(Image((a.array > a.array.mean()).astype(np.int16), a.affine), i, labels=True)
        assert np.issubdtype(labels.array.dtype, np.integer) and set(np.unique(labels.array)) <= {0, 1}
    brain = load_image(real_scan("colin27-brain"))  # the whole brain lies in the model's box
    brain = P._downsampled(Image((brain.array > 0).astype(np.float32), brain.affine), 3.0).array > 0.5
    assert prep.back_to_input(Image(np.ones(a.shape, np.float32), a.affine), 0).array[brain].min() > 0.99
    assert [t.name for t in prep.transforms()] == ["v1-to-atlas", "v2-to-atlas"]
    described = prep.describe()
    json.dumps(described)
    assert described["inputs"][1]["to_atlas_tfm"] == "transforms/v2-to-atlas.tfm"


def test_skull_strip_and_nothing_to_align():
    pytest.importorskip("deepbet")
    head = _small("colin27", 3.0)
    prep = P.preprocess_for(_card(align="none", skull_strip=True, bias_field=False), [head])
    out = prep.images[0]
    assert out.same_geometry(head)
    brain = _small("colin27-brain", 3.0).array > 0
    stripped = out.array > 0
    assert 2 * (stripped & brain).sum() / (stripped.sum() + brain.sum()) > 0.85
    assert prep.transforms() == []
    assert np.array_equal(prep.back_to_input(out).array, out.array)


def test_missing_deepbet_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepbet", None)
    P._deepbet_model.cache_clear()
    try:
        with pytest.raises(LongitudinalDiffusionError, match="pip install --no-deps deepbet==1.0.2"):
            P.extract_brain(_small("colin27", 4.0))
    finally:
        P._deepbet_model.cache_clear()


def test_bundled_cards_say_what_their_models_expect():
    specs = {}
    for path in sorted(MODELS.glob("*.json")):
        card = json.loads(path.read_text())
        assert "preprocessing" in card, path.name
        specs[card["name"]] = P.PreprocessSpec.from_card(card)
    assert specs["ddm-demo"] == P.PreprocessSpec(align="none", atlas=None)
    for name in ("cas-diffcom-demo", "interval-demo", "sadm-demo", "cwdm-demo"):
        assert specs[name].align in ("rigid", "affine") and specs[name].atlas == "icbm2009a"
        assert specs[name].bias_field
    assert specs["cas-diffcom-demo"].align == "rigid"  # as the paper: rigid alignment to the atlas
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        P.PreprocessSpec.from_card({"preprocessing": {"align": "rigid", "atlas": "icbm2009a", "deform": True}})
    with pytest.raises(ValueError, match="align"):
        P.PreprocessSpec.from_card({"preprocessing": {"align": "warp"}})


def test_model_space_is_recognised():
    assert not P.in_model_space(load_image(real_scan("colin27")))
    cohort_like = np.diag([5.0, 5.0, 5.0, 1.0])
    cohort_like[:3, 3] = -(np.array([32, 40, 32]) - 1) / 2 * 5.0
    assert P.in_model_space(Image(np.zeros((32, 40, 32), np.float32), cohort_like))
    assert P.in_model_space(Image(np.zeros((4, 4, 4), np.float32), np.eye(4), {"description": "SIMULATED"}))


# ----------------------------------------------------------------------------- wired into the tasks


def test_complete_ages_on_a_real_scan_preprocesses_and_lands_back_on_its_grid(tmp_path):
    """``longdiff complete-ages --preprocess`` on a real head: the result on the scan's own
    grid, the transform saved as an ITK file, the provenance saying what was done."""
    pytest.importorskip("deepbet")
    from LongitudinalDiffusionLib.cli import main
    from LongitudinalDiffusionLib.imaging import save_image

    scan = _small("colin27", 4.0)
    save_image(scan, tmp_path / "subj" / "colin.nii.gz")
    (tmp_path / "subj" / "manifest.tsv").write_text("file\tage\tmodality\ncolin.nii.gz\t18\tT1w\n")
    out = tmp_path / "out"
    args = ["complete-ages", str(tmp_path / "subj" / "manifest.tsv"), "--ages", "12", "--model", "interval-demo"]
    assert main([*args, "--out", str(out), "--preprocess", "--seed", "1"]) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["transforms"] == ["transforms/colin-to-atlas.tfm"]
    moved = P.read_transform(out / "transforms" / "colin-to-atlas.tfm")
    assert P.rotation_angle_deg(moved) < 5.0  # Colin27 is already close to MNI: a small rotation
    generated = load_image(out / summary["images"][0]["file"])
    assert generated.shape == scan.shape and np.allclose(generated.affine, scan.affine, atol=1e-5)
    note = summary["provenance"]["extra"]["preprocessing"]
    assert note["applied"] and note["spec"]["align"] == "rigid"
    assert [s["step"] for s in note["inputs"][0]["steps"]][:3] == [
        "brain mask (deepbet)",
        "bias field (N4)",
        "rigid to atlas icbm2009a",
    ]
    # outside the model's box the generated image is 0, and the provenance says how much that is
    assert 0.05 < note["inputs"][0]["outside_fraction"] <= (generated.array == 0).mean() + 0.01


def test_preprocess_option_reaches_the_tasks_from_the_command_line_and_job_specs():
    from LongitudinalDiffusionLib.cli import _job_options, build_parser
    from LongitudinalDiffusionLib.jobs import OPTION_FIELDS
    from LongitudinalDiffusionLib.tasks import RunOptions

    parser = build_parser()
    base = ["complete-ages", "m.tsv", "--ages", "3", "--model", "x", "--out", "o"]
    assert parser.parse_args(base).preprocess is None  # auto
    assert parser.parse_args([*base, "--preprocess"]).preprocess is True
    off = parser.parse_args([*base, "--no-preprocess"])
    assert off.preprocess is False and _job_options(off)["preprocess"] is False
    assert "preprocess" not in _job_options(parser.parse_args(base))
    assert OPTION_FIELDS["preprocess"] == (bool, type(None))
    assert RunOptions().preprocess is None
