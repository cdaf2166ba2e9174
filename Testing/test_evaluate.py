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


def test_evaluation_tables_compare_each_model_with_every_baseline(evaluated):
    rows, out, events = evaluated
    expected_entries = {m: ["model", *ev.BASELINES[ev.method_task(m)], ev.GRID_CEILING] for m in METHODS}
    assert expected_entries["cwdm"] == [
        "model",
        "nearest contrast, histogram-matched",
        "nearest contrast, unchanged",
    ] + [
        "quadratic regression",
        "quadratic regression, histogram-matched",
        "model grid ceiling",
    ]
    assert expected_entries["ddm"] == ["model", "linear blend", "identity warp", "demons registration", ev.GRID_CEILING]
    assert expected_entries["sadm"][-2] == "registration interpolation"
    assert [r["method"] for r in rows] == [m for m in METHODS for _ in expected_entries[m]]
    # 7 visits per subject: 5 interior ages to hide; 7 sessions with the target contrast to synthesise;
    # 5 frames per heart: 3 between the two ends.
    cases = {"cas-diffcom": 5, "sadm": 5, "interval": 5, "cwdm": 7, "ddm": 3}
    for method, entries in expected_entries.items():
        group = [r for r in rows if r["method"] == method]
        assert [r["entry"] for r in group] == entries
        assert all(r["cases"] == cases[method] and r["subjects"] == 1 for r in group)
        for r in group:
            assert math.isfinite(r["psnr_mean"]) and math.isfinite(r["psnr_sd"]) and 0 < r["psnr_mean"] < 100
            assert -1 <= r["ssim_mean"] <= 1
        model, bound = group[0], group[-1]
        primary = model["primary"]
        # the bound (the truth through the tiny models' coarser grid and back) is shown, never compared with
        assert bound["role"] == "bound" and bound.get("decision") is None and model["best_baseline"] != bound["entry"]
        assert 0 < bound[f"{primary}_mean"] < (1 if primary == "dice" else 100)
        scored = [r for r in group[1:-1] if math.isfinite(r[f"{primary}_mean"])]
        best = max(scored, key=lambda r: r[f"{primary}_mean"])
        assert model["best_baseline"] == best["entry"] and model["difference"] == best["difference"]
        for baseline in group[1:-1]:
            if not math.isfinite(baseline[f"{primary}_mean"]):
                assert baseline.get("decision") is None
                continue
            # every case has both entries, so the paired difference is the difference of the means
            gap = model[f"{primary}_mean"] - baseline[f"{primary}_mean"]
            assert baseline["difference"] == pytest.approx(gap)
            assert baseline["ci_low"] <= gap <= baseline["ci_high"]
            # "beats" only when the interval excludes zero on the positive side
            expected = (
                "beats" if baseline["ci_low"] > 0 else "worse than" if baseline["ci_high"] < 0 else "no better than"
            )
            assert baseline["decision"] == expected and baseline["model_beats"] == (expected == "beats")
            assert baseline["n_cases"] == cases[method] and 0 <= baseline["cases_won"] <= cases[method]
    ddm = {r["entry"]: r for r in rows if r["method"] == "ddm"}
    assert 0 < ddm["model"]["dice_mean"] <= 1 and 0 < ddm["identity warp"]["dice_mean"] < 1
    assert 0 < ddm["demons registration"]["dice_mean"] <= 1
    assert math.isnan(ddm["linear blend"]["dice_mean"])  # a blend carries no labels
    # the three missing-age models were scored on the very same cases
    for entry in ("nearest timepoint", "linear interpolation", "registration interpolation"):
        values = {r["psnr_mean"] for r in rows if r["entry"] == entry}
        assert len(values) == 1

    summary = _read_csv(out / "evaluation.csv")
    assert [(r["method"], r["entry"]) for r in summary] == [(r["method"], r["entry"]) for r in rows]
    per_case = _read_csv(out / "cases.csv")
    assert len(per_case) == sum(cases[m] * len(e) for m, e in expected_entries.items())
    assert all(math.isfinite(float(r["psnr"])) and math.isfinite(float(r["ssim"])) for r in per_case)
    # every baseline in every comparison table - DDM's linear blend on PSNR too
    compared = {(r["method"], r["baseline"], r["metric"]) for r in _read_csv(out / "comparisons.csv")}
    for method, entries in expected_entries.items():
        for entry in entries[1:-1]:
            assert (method, entry, "psnr" if method != "ddm" or entry == "linear blend" else "dice") in compared
    assert ("ddm", "linear blend", "dice") not in compared
    assert not any(baseline == ev.GRID_CEILING for _, baseline, _ in compared)

    text = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "Primary metric: PSNR for missing age and missing modality, Dice for frames" in text
    assert "cluster bootstrap over subjects (10000 resamples, seed 0" in text
    words = {"beats": "beats", "no better than": "is no better than", "worse than": "is worse than"}
    for method in METHODS:
        model = rows[[r["method"] for r in rows].index(method)]
        claim = f"{method} (`{model['model']}`) {words[model['decision']]} the strongest baseline"
        assert f"{claim} ({model['best_baseline']})" in text
    assert text.count("RANDOM (untrained) weights") == len(METHODS)
    assert "evaluated as: **test**; subjects: sub-003; hearts: sub-heart02" in text
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
    assert "ddm (`ddm-tiny-untrained`)" in printed and "the strongest baseline (" in printed and "95 % CI" in printed
    assert all((out / f).is_file() for f in ("evaluation.md", "evaluation.csv", "comparisons.csv", "cases.csv"))
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
    assert set(case.scores) == {"model", "gaussian mixture", ev.GRID_CEILING}
    assert 0.3 < case.scores["gaussian mixture"]["dice"] <= 1.0  # a real segmentation, not an empty mask
    # the true labels through the tiny model's coarser grid lose detail, but most survive
    assert 0.5 < case.scores[ev.GRID_CEILING]["dice"] < 1.0
    # random weights label no tissue as the truth does: far below the mixture, but scored (not NaN)
    assert 0.0 <= case.scores["model"]["dice"] < case.scores["gaussian mixture"]["dice"] - 0.2


# ----------------------------------------------------------------------------- statistics


def test_a_model_beats_a_baseline_only_when_the_interval_excludes_zero():
    subjects = [s for s in "ABCDEF" for _ in range(4)]
    rng = np.random.default_rng(4)
    baseline = rng.normal(20.0, 2.0, len(subjects))
    # better on every case by 1-2 dB: the interval lies above zero
    better = ev.stats.compare(baseline + rng.uniform(1.0, 2.0, len(subjects)), baseline, subjects)
    assert better.decision == "beats" and better.beats and better.ci_low > 0
    assert better.cases_won == 24 and better.subjects_won == 6 and better.n_subjects == 6
    assert better.p_cases < 1e-4 and better.p_subjects == pytest.approx(2 / 64)  # exact: all 6 subjects won
    # worse on every case: entirely below zero
    worse = ev.stats.compare(baseline - 1.5, baseline, subjects)
    assert worse.decision == "worse than" and worse.ci_high < 0 and not worse.beats
    # a positive mean from noise around zero is not a win
    noise = ev.stats.compare(baseline + rng.normal(0.1, 2.0, len(subjects)), baseline, subjects)
    assert noise.ci_low < 0 < noise.ci_high and noise.decision == "no better than"
    # the same inputs give the same interval (fixed seed)
    again = ev.stats.compare(baseline + rng.normal(0.1, 2.0, len(subjects)) * 0 + noise.difference, baseline, subjects)
    assert again.ci_low == again.ci_high == pytest.approx(noise.difference)
    assert (
        ev.stats.compare([1.0, 2.0], [0.0, 0.5], ["A", "B"]).as_dict()
        == ev.stats.compare([1.0, 2.0], [0.0, 0.5], ["A", "B"]).as_dict()
    )


def test_cases_of_one_subject_do_not_count_as_independent_evidence():
    """Subject A: 20 cases won by 2 dB; subjects B and C: one case each lost by 1 dB. Over
    cases the model looks far better; resampling whole subjects shows it rests on one."""
    diffs = [2.0] * 20 + [-1.0, -1.0]
    subjects = ["A"] * 20 + ["B", "C"]
    naive = ev.stats.cluster_bootstrap_ci(diffs)  # every case its own cluster
    assert naive[0] > 1.0
    clustered = ev.stats.cluster_bootstrap_ci(diffs, subjects)
    assert clustered[0] == pytest.approx(-1.0)  # some resamples draw no A at all
    result = ev.stats.compare(np.array(diffs), np.zeros(22), subjects)
    assert result.decision == "no better than" and result.difference > 1.5
    assert result.subject_difference == pytest.approx((2.0 - 1.0 - 1.0) / 3) and result.subjects_won == 1


def test_wilcoxon_and_missing_values():
    assert ev.stats.wilcoxon_p([1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)  # exact two-sided
    assert math.isnan(ev.stats.wilcoxon_p([0.0, 0.0, 1.0]))  # a single non-zero difference
    # a case without the metric (a blend has no Dice) is left out, not counted as a loss
    result = ev.stats.compare([0.9, 0.8, 0.7], [math.nan, 0.5, 0.6], ["A", "B", "C"])
    assert result.n_cases == 2 and result.cases_won == 2
    assert ev.stats.compare([1.0], [math.nan], ["A"]) is None
    assert ev.stats.decide(math.nan, math.nan) == "no better than"


# ----------------------------------------------------------------------------- strong baselines


def _ball(shape, centre, radius, spacing=2.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) * spacing for n in shape], indexing="ij"), -1)
    distance = np.linalg.norm(grid - np.asarray(centre) * spacing, axis=-1)
    return np.clip(radius - distance + 1.0, 0.0, 2.0) * 50.0  # a soft-edged ball


def test_demons_registration_moves_the_source_and_its_labels_by_gamma():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (32, 32, 32)
    source = Image(_ball(shape, (14, 16, 16), 12.0).astype(np.float32), affine)
    target = Image(_ball(shape, (18, 16, 16), 12.0).astype(np.float32), affine)  # moved 8 mm
    labels = Image((source.array > 50).astype(np.int16), affine)
    truth_labels = (target.array > 50).astype(np.int16)
    field = bl.demons_field(target, source)
    start, start_labels = bl.registered_frame(source, target, 0.0, labels, field=field)
    np.testing.assert_allclose(start.array, source.array, atol=1e-3)
    np.testing.assert_array_equal(start_labels.array, labels.array)
    end, end_labels = bl.registered_frame(source, target, 1.0, labels, field=field)
    assert set(np.unique(end_labels.array)) <= {0, 1}  # nearest neighbour: labels stay labels
    moved, unmoved = ev.dice(end_labels.array, truth_labels), ev.dice(labels.array, truth_labels)
    assert moved > 0.85 and moved > unmoved + 0.15
    half, _ = bl.registered_frame(source, target, 0.5, labels, field=field)
    midway = _ball(shape, (16, 16, 16), 12.0)
    assert (
        ev.image_metrics(half, midway)["psnr"] > ev.image_metrics(bl.linear_blend(source, target, 0.5), midway)["psnr"]
    )


def test_registration_interpolation_follows_growth_where_blending_blurs():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (32, 32, 32)
    small, large, truth = (_ball(shape, (16, 16, 16), r) for r in (8.0, 16.0, 12.0))
    real = [_tp(0.0, small, affine), _tp(12.0, large, affine)]
    registered = bl.registered_interpolation(real, 6.0, affine, shape)
    blended = bl.linear_interpolation(real, 6.0, affine, shape)
    assert ev.image_metrics(registered, truth)["psnr"] > ev.image_metrics(blended, truth)["psnr"] + 3


def test_contrast_regression_fits_on_training_sessions_and_ignores_gain():
    rng = np.random.default_rng(5)

    def session(gain_t1: float, gain_t2: float):
        t1, t2 = rng.uniform(0.5, 1.5, (12, 12, 12)), rng.uniform(0.5, 1.5, (12, 12, 12))
        flair = 0.2 + 0.5 * t2 - 0.3 * t1 * t2 + 0.4 * t1**2
        return {Modality.T1W: t1 * gain_t1, Modality.T2W: t2 * gain_t2, Modality.FLAIR: flair * 700}

    train = [session(1000, 800), session(1200, 900), session(900, 1100)]
    model = bl.ContrastRegression(["T1w", "T2w"], "FLAIR").fit(train)
    test = session(1500, 600)  # another gain: the regression works in each scan's own units
    affine = np.eye(4)
    visit = [
        Timepoint(3.0, m.value, Image(test[m].astype(np.float32), affine), None) for m in (Modality.T1W, Modality.T2W)
    ]
    predicted = model.predict(visit)
    assert model.sessions == 3 and np.corrcoef(predicted.array.ravel(), test[Modality.FLAIR].ravel())[0, 1] > 0.99
    assert ev.image_metrics(predicted, test[Modality.FLAIR])["psnr"] > 30
    with pytest.raises(LongitudinalDiffusionError, match="lacks T2w"):
        model.predict(visit[:1])


def test_separate_runs_merge_into_one_report(evaluated, tmp_path, capsys):
    """Models (or groups of subjects) evaluated in separate processes give the report one run
    would have given: the summaries are computed again from all the cases."""
    rows, out, _ = evaluated
    merged = tmp_path / "merged"
    args = ["--merge", str(out), "--data", "cohort", "--name", "in-distribution", "--out", str(merged)]
    assert ev.main(args) == 0
    again = _read_csv(merged / "evaluation.csv")
    assert [(r["method"], r["entry"], r["decision"], r["cases_won"]) for r in again] == [
        (r["method"], r["entry"], r.get("decision") or "", str(r.get("cases_won", ""))) for r in rows
    ]
    for row, new in zip(rows, again):
        for key in ("psnr_mean", "difference", "ci_low", "ci_high", "p_cases"):
            if isinstance(row.get(key), float) and math.isfinite(row[key]):
                assert float(new[key]) == pytest.approx(row[key], abs=1e-5)
    assert len(_read_csv(merged / "comparisons.csv")) == len(_read_csv(out / "comparisons.csv"))
    text = (merged / "evaluation.md").read_text(encoding="utf-8")
    assert "subjects: sub-003; hearts: sub-heart02" in text and "evaluated as: **test**" in text
    assert ev.main(args[:2] + [str(out)] + args[2:-1] + [str(tmp_path / "twice")]) == 2
    assert "is in more than one part" in capsys.readouterr().err


def test_the_grid_ceiling_is_exact_on_the_grid_and_shows_what_a_coarser_grid_loses(cohort):
    """The bound every table shows: a scan on the model's own grid comes back unchanged
    (PSNR infinite, shown as "exact"); through a grid twice as coarse it loses detail."""
    from LongitudinalDiffusionLib.subject import load_bids_subject

    tp = next(t for t in load_bids_subject(cohort, subject="003").timepoints if t.modality.value == "T1w")
    truth = bl.image_of(tp)
    same = {"shape": list(truth.shape), "spacing": [7.0, 7.0, 7.0]}
    coarse = {"shape": [s // 2 for s in truth.shape], "spacing": [14.0, 14.0, 14.0]}
    on_grid, through_coarse = ev.Case("003", "a"), ev.Case("003", "b")
    on_grid.add_ceiling(same, truth)
    through_coarse.add_ceiling(coarse, truth)
    assert on_grid.scores[ev.GRID_CEILING]["psnr"] == math.inf
    assert 10 < through_coarse.scores[ev.GRID_CEILING]["psnr"] < 40
    assert ev._cell(math.inf, math.nan, 2) == "exact"


def test_the_grid_ceiling_command_reports_the_evaluations_bound_without_a_model(evaluated, models, cohort, capsys):
    """`python -m training.grid_ceiling` gives, from the cohort and the cards alone, the bound the
    evaluation printed beside each model (the same cases, the same numbers)."""
    from training import grid_ceiling

    rows, _, _ = evaluated
    args = ["--data", str(cohort), "--held-out", *HELD_OUT]
    for method in ("sadm", "cwdm", "ddm"):
        args += ["--model", f"{method}={models[method]}"]
    assert grid_ceiling.main(args) == 0
    printed = {line.split("|")[2].strip(): line.split("|")[4:7] for line in capsys.readouterr().out.splitlines()[2:]}
    for method in ("sadm", "cwdm", "ddm"):
        bound = next(r for r in rows if r["method"] == method and r["entry"] == ev.GRID_CEILING)
        cases, psnr, dice = (cell.strip() for cell in printed[method])
        assert int(cases) == bound["cases"]
        assert float(psnr) == pytest.approx(bound["psnr_mean"], abs=0.006)
        if method == "ddm":
            assert float(dice) == pytest.approx(bound["dice_mean"], abs=0.0006)


def test_shift_diagnosis_separates_the_inputs_from_the_output_grid(cohort, models, capsys):
    """With the same scans as 'shifted' and 'native' input, the model given either scores the
    same on every hidden scan (the inputs are the only difference the diagnosis measures); the
    ceiling of the tiny model's coarser grid and the baseline are scored beside it."""
    from training import shift_diagnosis as sd

    rows = sd.diagnose(str(models["sadm"]), cohort, cohort, ["sub-003"])
    assert len(rows) == 5
    for row in rows:
        assert row["model"] == row[sd.NATIVE]
        assert 0 < row[ev.GRID_CEILING] < 100 and 0 < row[ev.REGISTRATION_INTERPOLATION] < 100
    assert sd.main(["--model", str(models["sadm"]), "--shifted", str(cohort), "--native", str(cohort),
                    "--held-out", "sub-003"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "(5 hidden scans)" in table and f"| {sd.NATIVE} |" in table
