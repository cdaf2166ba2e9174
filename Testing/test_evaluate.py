"""The evaluation against baselines: tables a reader can trust, baselines that behave as
their names say and never see the answer, and metrics with the values one expects."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from LongitudinalDiffusionLib.catalog import create_untrained
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.subject import Modality, Timepoint, load_bids_subject
from training import baselines as bl
from training import evaluate as ev
from training.data import open_cohort

torch.set_num_threads(1)
METHODS = ("cas-diffcom", "sadm", "interval", "cwdm", "ddm")
HELD_OUT = ["sub-003", "sub-heart02"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "cohort"
    spec = CohortSpec(n_subjects=3, seed=3, shape=(24, 28, 24), spacing=(7.0, 7.0, 7.0), n_hearts=2, heart_frames=5)
    return write_cohort(out, spec, jobs=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {m: create_untrained(m, folder, scale="tiny") for m in METHODS}


@pytest.fixture(scope="module")
def evaluated(cohort, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    events = []
    rows = ev.evaluate(models, cohort, HELD_OUT, out, steps=2, device="cpu", progress=events.append)
    return rows, out, events


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- the tables


def test_evaluation_tables_compare_each_model_with_its_baselines(evaluated):
    rows, out, events = evaluated
    expected_entries = {
        "cas-diffcom": ["model", "nearest timepoint", "linear interpolation"],
        "sadm": ["model", "nearest timepoint", "linear interpolation"],
        "interval": ["model", "nearest timepoint", "linear interpolation"],
        "cwdm": ["model", "nearest contrast, histogram-matched", "nearest contrast, unchanged"],
        "ddm": ["model", "linear blend", "identity warp"],
    }
    assert [r["method"] for r in rows] == [m for m in METHODS for _ in expected_entries[m]]
    # 7 visits per subject: 5 interior ages to hide; 7 sessions with a T1w to synthesise;
    # 5 frames per heart: 3 between the two ends.
    cases = {"cas-diffcom": 5, "sadm": 5, "interval": 5, "cwdm": 7, "ddm": 3}
    for method, entries in expected_entries.items():
        group = [r for r in rows if r["method"] == method]
        assert [r["entry"] for r in group] == entries
        assert all(r["cases"] == cases[method] for r in group)
        for r in group:
            assert math.isfinite(r["psnr_mean"]) and math.isfinite(r["psnr_sd"]) and 0 < r["psnr_mean"] < 100
            assert -1 <= r["ssim_mean"] <= 1
        model = group[0]
        primary = model["primary"]
        best = max(group[1:], key=lambda r: r[f"{primary}_mean"] if math.isfinite(r[f"{primary}_mean"]) else -1e9)
        assert model["best_baseline"] == best["entry"] and model["primary_difference"] == best["primary_difference"]
        for baseline in group[1:]:
            if not math.isfinite(baseline[f"{primary}_mean"]):
                assert baseline.get("model_beats") is None
                continue
            # every case has both entries, so the paired difference is the difference of the means
            gap = model[f"{primary}_mean"] - baseline[f"{primary}_mean"]
            assert baseline["primary_difference"] == pytest.approx(gap)
            assert baseline["model_beats"] == (gap > 0)
            assert baseline["cases_won"].endswith(f"/{cases[method]}")
    ddm = {r["entry"]: r for r in rows if r["method"] == "ddm"}
    assert 0 < ddm["model"]["dice_mean"] <= 1 and 0 < ddm["identity warp"]["dice_mean"] < 1
    assert math.isnan(ddm["linear blend"]["dice_mean"])  # a blend carries no labels
    # the three missing-age models were scored on the very same cases
    for entry in ("nearest timepoint", "linear interpolation"):
        values = {r["psnr_mean"] for r in rows if r["entry"] == entry}
        assert len(values) == 1

    summary = _read_csv(out / "evaluation.csv")
    assert [(r["method"], r["entry"]) for r in summary] == [(r["method"], r["entry"]) for r in rows]
    per_case = _read_csv(out / "cases.csv")
    assert len(per_case) == sum(cases[m] * len(e) for m, e in expected_entries.items())
    assert all(math.isfinite(float(r["psnr"])) and math.isfinite(float(r["ssim"])) for r in per_case)

    text = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "Primary metric: PSNR for missing age and missing modality, Dice for frames" in text
    for method in METHODS:
        model = rows[[r["method"] for r in rows].index(method)]
        claim = "beats the best baseline" if model["model_beats"] else "does NOT beat the best baseline"
        assert f"{method} (`{model['model']}`) {claim} ({model['best_baseline']})" in text
    assert text.count("RANDOM (untrained) weights") == len(METHODS)
    assert "held-out subjects: sub-003; held-out hearts: sub-heart02" in text
    # progress: one stage per method, counting its cases (hearts for DDM) to the end
    finals = {e.stage: (e.step, e.total) for e in events}
    assert finals == {f"evaluate {m}": (n, n) for m, n in {**cases, "ddm": 1}.items()}


def test_command_line_and_its_errors(cohort, models, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        ev.main(
            ["--data", str(cohort), "--model", f"ddm={models['ddm']}", "--held-out", "sub-heart01"]
            + ["--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ddm (`ddm-tiny-untrained`)" in printed and "beat the best baseline (identity warp) on Dice" in printed
    assert (out / "evaluation.md").is_file() and (out / "cases.csv").is_file()
    assert (
        ev.main(
            [
                "--data",
                str(cohort),
                "--model",
                f"ddm={models['ddm']}",
                "--held-out",
                "sub-099",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "held-out id(s) sub-099 not in the cohort" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--data", str(cohort), "--model", "nonsense=x", "--out", str(tmp_path / "bad")])
    assert "unknown method 'nonsense'" in capsys.readouterr().err
    with pytest.raises(LongitudinalDiffusionError, match="is a cwdm model, not ddm"):
        ev.evaluate({"ddm": models["cwdm"]}, cohort, None, tmp_path / "bad", device="cpu")


def test_default_held_out_ids_are_the_ones_training_leaves_out(cohort):
    c = open_cohort(cohort)
    assert ev.held_out(c, None) == (["sub-002", "sub-003"], ["sub-heart02"])
    assert ev.held_out(c, ["sub-001"]) == (["sub-001"], ["sub-heart02"])
    with pytest.raises(InputError, match="sub-heart09"):
        ev.held_out(c, ["sub-heart09"])


# ----------------------------------------------------------------------------- baselines


def _tp(age: float, array: np.ndarray, affine: np.ndarray) -> Timepoint:
    return Timepoint(age, "T1w", Image(array.astype(np.float32), affine), None)


def test_linear_interpolation_is_exact_when_the_truth_is_the_age_weighted_mean():
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a, b = rng.random((16, 16, 12)) * 100, rng.random((16, 16, 12)) * 100
    real = [_tp(2.0, a, affine), _tp(8.0, b, affine), _tp(20.0, rng.random((16, 16, 12)), affine)]
    truth = (2 / 3) * a + (1 / 3) * b  # 4 months: a third of the way from 2 to 8
    out = bl.linear_interpolation(real, 4.0, affine, (16, 16, 12))
    np.testing.assert_allclose(out.array, truth, rtol=1e-5, atol=1e-4)
    assert ev.image_metrics(out, truth)["psnr"] > 80
    near = bl.nearest_timepoint(real, 4.0, affine, (16, 16, 12))
    np.testing.assert_array_equal(near.array, a.astype(np.float32))
    assert ev.image_metrics(near, truth)["psnr"] < ev.image_metrics(out, truth)["psnr"]
    # on another geometry (same world, half the voxels in one axis) the output follows it
    coarse = bl.linear_interpolation(real, 4.0, np.diag([4.0, 2.0, 2.0, 1.0]), (8, 16, 12))
    assert coarse.shape == (8, 16, 12)
    with pytest.raises(LongitudinalDiffusionError, match="before and after 25 months"):
        bl.linear_interpolation(real, 25.0, affine, (16, 16, 12))


def test_identity_warp_is_perfect_at_the_source_and_not_later(cohort):
    frames = open_cohort(cohort).heart_frames("sub-heart01")
    source = load_image(frames[0].image)
    labels0 = load_image(frames[0].labels, dtype=np.int16)
    image, labels = bl.identity_warp(source, labels0)
    assert ev.dice(labels.array, labels0.array) == 1.0
    assert ev.image_metrics(image, source)["psnr"] == math.inf or ev.image_metrics(image, source)["psnr"] > 80
    last = load_image(frames[-1].labels, dtype=np.int16)
    assert 0.3 < ev.dice(labels.array, last.array) < 1.0  # the heart contracts: nothing-moves is wrong
    blend = bl.linear_blend(source, load_image(frames[-1].image), 0.0)
    np.testing.assert_array_equal(blend.array, source.array)


def test_histogram_matching_maps_quantiles_onto_the_reference():
    rng = np.random.default_rng(1)
    volume = rng.normal(5.0, 2.0, (20, 20, 20))
    reference = rng.gamma(2.0, 300.0, (24, 24, 24))
    matched = bl.match_histogram(volume, bl.reference_quantiles([reference]))
    levels = np.linspace(0.01, 0.99, 25)
    np.testing.assert_allclose(np.quantile(matched, levels), np.quantile(reference, levels), rtol=0.02)
    order = np.argsort(volume, axis=None)
    assert np.all(np.diff(matched.ravel()[order]) >= 0)  # intensity order is kept


def test_histogram_baseline_never_reads_the_hidden_image(cohort, tmp_path):
    copy = tmp_path / "cohort"
    shutil.copytree(cohort / "sub-003", copy / "sub-003")
    hidden = copy / "sub-003" / "ses-03" / "anat" / "sub-003_ses-03_T1w.nii.gz"
    truth = load_image(hidden)
    hidden.unlink()
    subject = load_bids_subject(copy, subject="003")
    age = subject.ages()[2]
    visit = [tp for tp in subject.timepoints if abs(tp.age - age) < 1e-6]
    assert Modality.T1W not in {tp.modality for tp in visit}
    reference = ev.ReferenceHistograms(cohort, ["sub-001", "sub-002"]).at(Modality.T1W, age)
    out = bl.histogram_matched_contrast(visit, "T1w", reference)
    stand_in = bl.image_of(next(tp for tp in visit if tp.modality is Modality.T1CE))
    assert out.same_geometry(truth) and np.isfinite(out.array).all()
    np.testing.assert_allclose(np.quantile(out.array, [0.5, 0.9]), np.interp([0.5, 0.9], bl.LEVELS, reference), 0.05)
    # the stand-in's structure, the reference's intensities: close to the hidden scan it never saw
    assert ev.image_metrics(out, truth)["psnr"] > 15
    assert np.corrcoef(out.array.ravel(), stand_in.array.ravel())[0, 1] > 0.9


# ----------------------------------------------------------------------------- metrics


def test_metrics_have_the_values_one_expects():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.2, 0.8, (16, 16, 16)).astype(np.float32)
    assert ev.psnr(truth + 0.1, truth) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 in [0, 1] units
    assert ev.ssim(truth, truth) == pytest.approx(1.0, abs=1e-6)
    assert ev.ssim(truth + rng.normal(0, 0.2, truth.shape).astype(np.float32), truth) < 0.9
    # scores do not depend on the intensity units of the scans
    pred = truth + rng.normal(0, 0.05, truth.shape).astype(np.float32)
    a, b = ev.image_metrics(pred, truth), ev.image_metrics(pred * 1000 + 5, truth * 1000 + 5)
    assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-4) and a["ssim"] == pytest.approx(b["ssim"], rel=1e-4)
    # Dice: class 1 overlaps half, class 2 only in the prediction -> mean (0.5 + 0) / 2
    p, t = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    p[0, 0, :4], t[0, 0, 2:], t[1, 0, :2], p[3, 3, 3] = 1, 1, 1, 2
    assert ev.dice(p, t) == pytest.approx((2 * 2 / 8 + 0.0) / 2)
    assert math.isnan(ev.dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))))
    with pytest.raises(LongitudinalDiffusionError, match="differs from the truth"):
        ev.psnr(truth[:8], truth)


def test_segmentation_cases_score_the_model_and_the_mixture_in_the_true_brain_mask(cohort, tmp_path):
    """The tissue model and the Gaussian-mixture baseline on a scan with labels: both scored,
    the mixture confined to the ground-truth brain mask (its strongest form)."""
    from LongitudinalDiffusionLib.catalog import load_model
    from LongitudinalDiffusionLib.subject import load_bids_subject

    loaded = load_model(create_untrained("tissue-seg", tmp_path, scale="tiny"), device="cpu")
    tp = next(t for t in load_bids_subject(cohort, subject="003").timepoints if t.labels and t.modality.value == "T1w")
    case = ev.run_segmentation_case(tp, loaded, ev.Run(None, 1, 0, torch.device("cpu")))
    assert set(case.scores) == {"model", "gaussian mixture"}
    assert 0.3 < case.scores["gaussian mixture"]["dice"] <= 1.0  # a real segmentation, not an empty mask
    assert 0.0 <= case.scores["model"]["dice"] <= 1.0
