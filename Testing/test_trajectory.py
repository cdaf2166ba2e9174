"""Tissue volumes and their growth trajectories over age (real-only vs real+generated)."""

from __future__ import annotations

import csv
import io
import logging
import subprocess
import sys

import numpy as np
import pytest

from LongitudinalDiffusionLib import trajectory as tr
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.imaging import Image

CLASSES = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
#: the true curves: tissue -> (intercept ml, slope ml per log-month), offset 1 month
TRUE = {"grey matter": (200.0, 80.0), "white matter": (150.0, 40.0)}
AGES = (0.5, 3.0, 6.0, 9.0, 12.0, 18.0, 24.0)


def _rows(n_subjects: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        shift = rng.normal(0, 10)  # the subject's own size (random intercept)
        for visit in AGES:
            age = max(visit + rng.uniform(-0.3, 0.3), 0.0)
            for tissue, (a, b) in TRUE.items():
                ml = a + b * np.log(age + 1.0) + shift + rng.normal(0, 3)
                rows.append({"subject": f"sub-{s:02d}", "age_months": age, "tissue": tissue, "volume_ml": ml})
    return rows


def _generated(rows: list[dict], factor: float) -> list[dict]:
    """Generated timepoints between the visits, for the same subjects, grey matter scaled by ``factor``."""
    out = []
    for subject in sorted({r["subject"] for r in rows}):
        for age in (4.5, 15.0):
            for tissue, (a, b) in TRUE.items():
                ml = a + b * np.log(age + 1.0)
                out.append(
                    {
                        "subject": subject,
                        "age_months": age,
                        "tissue": tissue,
                        "generated": True,
                        "volume_ml": ml * (factor if tissue == "grey matter" else 1.0),
                    }
                )
    return out


def test_tissue_volumes_of_a_box_equal_the_analytic_ml():
    labels = np.zeros((20, 16, 12), dtype=np.int16)
    labels[2:12, 3:9, 1:5] = 2  # 10 x 6 x 4 = 240 voxels of grey matter
    labels[15:17, 10:13, 6:11] = 3  # 2 x 3 x 5 = 30 voxels of white matter
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, 3.0, 1.5])  # oblique, 9 mm^3 voxels
    affine[:3, 3] = [-20, 31, 7]
    volumes = tr.tissue_volumes(Image(labels, affine), CLASSES)
    assert volumes == pytest.approx({"CSF": 0.0, "grey matter": 240 * 9 / 1000, "white matter": 30 * 9 / 1000})
    rows = tr.volume_rows("sub-01", 12.0, Image(labels.astype(np.float32), affine), CLASSES, generated=True)
    assert [r["tissue"] for r in rows] == ["CSF", "grey matter", "white matter"]
    assert rows[1] == {
        "subject": "sub-01",
        "age_months": 12.0,
        "tissue": "grey matter",
        "volume_ml": 2.16,
        "generated": True,
    }
    with pytest.raises(InputError, match="whole numbers"):
        tr.tissue_volumes(Image(labels + 0.5, affine), CLASSES)


def test_fit_recovers_a_known_log_linear_curve():
    fits = tr.fit_trajectories(_rows())
    assert [(f.tissue, f.data) for f in fits] == [
        ("grey matter", "real"),
        ("grey matter", "real+generated"),
        ("white matter", "real"),
        ("white matter", "real+generated"),
    ]
    for fit in fits:
        a, b = TRUE[fit.tissue]
        assert fit.model == "MixedLM" and fit.converged
        assert fit.slope == pytest.approx(b, rel=0.05) and fit.intercept == pytest.approx(a, rel=0.05)
        assert fit.slope_ci[0] < b < fit.slope_ci[1]
        assert fit.n_rows == 70 and fit.n_subjects == 10 and fit.n_generated == 0
        assert 4 < fit.group_sd < 20 and 2 < fit.residual_sd < 4.5
        assert fit.formula == "volume_ml ~ 1 + log(age_months + 1) + (1 | subject)"
        assert float(fit.predict(24.0)) == pytest.approx(a + b * np.log(25.0), rel=0.02)
    assert fits[0].to_dict()["slope_ci"] == list(fits[0].slope_ci)


def test_real_plus_generated_fit_moves_with_biased_generated_rows_only():
    real = _rows()
    faithful = tr.fit_trajectories(real + _generated(real, 1.0))
    biased = tr.fit_trajectories(real + _generated(real, 0.8))
    by = {(f.tissue, f.data): f for f in biased}
    same = {(f.tissue, f.data): f for f in faithful}
    # The real-only fit ignores generated rows whatever they hold.
    assert by["grey matter", "real"] == same["grey matter", "real"]
    assert by["grey matter", "real"].n_generated == 0
    assert by["grey matter", "real+generated"].n_generated == 20
    # Faithful generated rows keep the curve; grey matter generated 20% too small pulls it down.
    gm_real = by["grey matter", "real"]
    assert float(same["grey matter", "real+generated"].predict(15.0)) == pytest.approx(
        float(gm_real.predict(15.0)), rel=0.01
    )
    assert float(by["grey matter", "real+generated"].predict(15.0)) < float(gm_real.predict(15.0)) - 15
    assert by["white matter", "real+generated"].slope == pytest.approx(same["white matter", "real+generated"].slope)


def test_one_subject_falls_back_to_ols_with_a_warning(caplog):
    rows = [r for r in _rows() if r["subject"] == "sub-00"]
    with caplog.at_level(logging.WARNING, logger="LongitudinalDiffusionLib.trajectory"):
        fits = tr.fit_trajectories(rows, tissues=["white matter"])
    assert [f.model for f in fits] == ["OLS", "OLS"]
    assert fits[0].group_sd is None and "OLS" in fits[0].note and "1 subject" in fits[0].note
    assert fits[0].slope == pytest.approx(40.0, rel=0.05)
    assert fits[0].formula == "volume_ml ~ 1 + log(age_months + 1)"
    assert "fitted by OLS" in caplog.text


def test_bad_rows_and_too_few_volumes_are_refused():
    with pytest.raises(InputError, match="row 0 lacks volume_ml"):
        tr.fit_trajectories([{"subject": "a", "age_months": 1, "tissue": "WM"}])
    with pytest.raises(InputError, match="row 1: age_months"):
        tr.fit_trajectories(
            [
                {"subject": "a", "age_months": 1, "tissue": "WM", "volume_ml": 1},
                {"subject": "a", "age_months": -2, "tissue": "WM", "volume_ml": 1},
            ]
        )
    with pytest.raises(InputError, match="no rows to fit"):
        tr.fit_trajectories([])
    with pytest.raises(InputError, match="CSF"):
        tr.fit_trajectories(_rows(2), tissues=["CSF"])
    same_age = [{"subject": s, "age_months": 6, "tissue": "WM", "volume_ml": 100 + i} for i, s in enumerate("abcd")]
    with pytest.raises(LongitudinalDiffusionError, match="2 or more ages"):
        tr.fit_trajectories(same_age)


def test_table_markdown_and_csv():
    real = _rows()
    fits = tr.fit_trajectories(real + _generated(real, 0.8))
    text = tr.trajectory_table(fits)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(fits) and lines[0].startswith("| tissue | data | model")
    assert "| grey matter | real+generated | MixedLM | 90 / 10 / 20 |" in text
    table = list(csv.DictReader(io.StringIO(tr.trajectory_table(fits, fmt="csv", ages=(6, 24)))))
    assert len(table) == 4 and table[0]["tissue"] == "grey matter" and table[0]["data"] == "real"
    assert float(table[0]["ml_at_24_months"]) == pytest.approx(float(fits[0].predict(24)), abs=1e-3)
    assert float(table[0]["slope_ci_low"]) < float(table[0]["slope"]) < float(table[0]["slope_ci_high"])
    with pytest.raises(InputError, match="fmt"):
        tr.trajectory_table(fits, fmt="xlsx")


def test_plot_is_a_non_blank_png_with_generated_points_in_red(tmp_path):
    import matplotlib.image as mpimg

    real = _rows(4)
    rows = real + _generated(real, 0.8)
    fits = tr.fit_trajectories(rows)
    out = tr.plot_trajectories(rows, fits, tmp_path / "figs" / "trajectories.png", title="Cohort")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(out)[..., :3]
    assert pixels.shape[1] > 2 * pixels.shape[0]  # two panels side by side
    assert pixels.std() > 0.05
    red = (pixels[..., 0] > 0.75) & (pixels[..., 1] < 0.55) & (pixels[..., 2] < 0.7)
    grey = (np.abs(pixels[..., 0] - pixels[..., 1]) < 0.03) & (pixels[..., 0] > 0.45) & (pixels[..., 0] < 0.65)
    assert red.sum() > 200 and grey.sum() > 200
    assert not list(tmp_path.joinpath("figs").glob(".tmp-*"))


def test_importing_trajectory_imports_neither_statsmodels_nor_matplotlib_nor_torch():
    code = (
        "import sys, LongitudinalDiffusionLib.trajectory; "
        "print([m for m in ('statsmodels', 'matplotlib', 'pandas', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
