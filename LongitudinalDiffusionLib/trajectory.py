"""Cohort growth trajectories: tissue volumes against age, from real and generated scans.

After Cas-DiffCom's Fig. 3: each tissue's volume (ml) is plotted against age (months) for
every subject, and a growth curve is fitted twice, to the real timepoints only and to the
real plus the generated ones. If generated scans are anatomically plausible, adding them
tightens the curve without moving it; a curve that moves says the generator is biased.

The curve is log-linear in age with a random intercept per subject (a linear mixed-effects
model, statsmodels ``MixedLM``, REML)::

    volume_ml[subject, t] = a + b * log(age_months + c) + u[subject] + e,   u ~ N(0, s_u^2), e ~ N(0, s^2)

Choice: ``c`` (``offset_months``) is 1 month, so that newborn scans (age 0) are defined and
the curve is steepest in the first months, as infant brain growth is. Generated timepoints
carry the subject they were generated for, so they share that subject's intercept.

With a single subject the random intercept is not identifiable: the fit falls back to
ordinary least squares, logs a warning and says so in the fit record (``model == "OLS"``,
``note``). The same happens if MixedLM fails numerically.

Rows are plain dicts ``{"subject", "age_months", "tissue", "volume_ml", "generated"}``;
:func:`volume_rows` makes them from a label map. statsmodels and matplotlib are imported
inside the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, LongitudinalDiffusionError
from .imaging import Image, atomic_write

logger = logging.getLogger(__name__)

#: The two data sets every tissue is fitted on.
REAL, REAL_AND_GENERATED = "real", "real+generated"
DATA_SETS = (REAL, REAL_AND_GENERATED)
DEFAULT_OFFSET_MONTHS = 1.0


# --------------------------------------------------------------------------- volumes


def tissue_volumes(labels: Image, classes: Mapping[int, str]) -> dict[str, float]:
    """Volume in ml of each class of a label map; the voxel volume comes from the affine.

    Args:
        labels: a label map (whole-number values).
        classes: {label value: tissue name}; value 0 (background) is skipped.

    Returns:
        {tissue name: ml}, in the order of ``classes`` (0.0 for an absent class).
    """
    array = np.asarray(labels.array)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.rint(array)):
        raise InputError(labels.meta.get("source", "label map"), "label values must be whole numbers")
    voxel_ml = abs(float(np.linalg.det(np.asarray(labels.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    if not voxel_ml > 0:
        raise InputError(labels.meta.get("source", "label map"), "the affine gives voxels of zero volume")
    values = np.rint(array).astype(np.int64).ravel()
    return {name: float(np.count_nonzero(values == int(v))) * voxel_ml for v, name in classes.items() if int(v) != 0}


def volume_rows(
    subject: str, age_months: float, labels: Image, classes: Mapping[int, str], *, generated: bool = False
) -> list[dict[str, Any]]:
    """One trajectory row per tissue of one label map (see :func:`fit_trajectories`)."""
    return [
        {
            "subject": str(subject),
            "age_months": float(age_months),
            "tissue": tissue,
            "volume_ml": ml,
            "generated": bool(generated),
        }
        for tissue, ml in tissue_volumes(labels, classes).items()
    ]


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class TrajectoryFit:
    """One tissue's growth curve on one data set: ``volume = intercept + slope * log(age + offset)``.

    ``*_ci`` are 95% confidence intervals; ``group_sd`` the SD of the subjects' random
    intercepts (None for OLS); ``residual_sd`` the SD of the residual; ``note`` says why a
    fit is not the planned mixed model (or is empty).
    """

    tissue: str
    data: str
    model: str
    intercept: float
    slope: float
    intercept_ci: tuple[float, float]
    slope_ci: tuple[float, float]
    n_rows: int
    n_subjects: int
    n_generated: int
    offset_months: float
    group_sd: float | None
    residual_sd: float
    converged: bool
    note: str = ""

    @property
    def formula(self) -> str:
        random = " + (1 | subject)" if self.model == "MixedLM" else ""
        return f"volume_ml ~ 1 + log(age_months + {self.offset_months:g}){random}"

    def predict(self, age_months: Any) -> np.ndarray:
        """The fitted mean volume (ml) at ``age_months`` (scalar or array)."""
        return self.intercept + self.slope * np.log(np.asarray(age_months, dtype=np.float64) + self.offset_months)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["intercept_ci"], out["slope_ci"] = list(self.intercept_ci), list(self.slope_ci)
        out["formula"] = self.formula
        return out


def _check_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("subject", "age_months", "tissue", "volume_ml") if k not in row]
        if missing:
            raise InputError("trajectory rows", f"row {i} lacks {', '.join(missing)}")
        try:
            age, ml = float(row["age_months"]), float(row["volume_ml"])
        except (TypeError, ValueError) as exc:
            raise InputError("trajectory rows", f"row {i}: age_months and volume_ml must be numbers") from exc
        if not (math.isfinite(age) and age >= 0):
            raise InputError(
                "trajectory rows", f"row {i}: age_months must be a finite age >= 0, got {row['age_months']}"
            )
        if not (math.isfinite(ml) and ml >= 0):
            raise InputError("trajectory rows", f"row {i}: volume_ml must be finite and >= 0, got {row['volume_ml']}")
        out.append(
            {
                "subject": str(row["subject"]),
                "age_months": age,
                "tissue": str(row["tissue"]),
                "volume_ml": ml,
                "generated": bool(row.get("generated", False)),
            }
        )
    if not out:
        raise InputError("trajectory rows", "no rows to fit")
    return out


def fit_trajectories(
    rows: Iterable[Mapping[str, Any]],
    *,
    offset_months: float = DEFAULT_OFFSET_MONTHS,
    tissues: Sequence[str] | None = None,
) -> list[TrajectoryFit]:
    """Fit every tissue's log-linear growth curve on real-only and on real+generated rows.

    Args:
        rows: dicts ``{"subject", "age_months", "tissue", "volume_ml", "generated"}``
            (``generated`` defaults to False).
        offset_months: ``c`` in ``log(age_months + c)``; must be > 0.
        tissues: which tissues, in this order (default: all, in order of appearance).

    Returns:
        Per tissue, the "real" fit then the "real+generated" fit.

    Raises:
        InputError: malformed rows.
        LongitudinalDiffusionError: a tissue has fewer than 3 volumes or a single age in a
            data set (no curve can be fitted).
    """
    if not offset_months > 0:
        raise InputError("trajectory fit", f"offset_months must be > 0, got {offset_months}")
    rows = _check_rows(rows)
    present = list(dict.fromkeys(r["tissue"] for r in rows))
    if tissues is None:
        tissues = present
    unknown = [t for t in tissues if t not in present]
    if unknown:
        raise InputError("trajectory rows", f"no rows for tissue(s) {unknown} (have: {present})")
    fits = []
    for tissue in tissues:
        for data in DATA_SETS:
            chosen = [r for r in rows if r["tissue"] == tissue and (data != REAL or not r["generated"])]
            fits.append(_fit_one(tissue, data, chosen, offset_months))
    return fits


def _fit_one(tissue: str, data: str, rows: list[dict[str, Any]], offset: float) -> TrajectoryFit:
    ages = np.array([r["age_months"] for r in rows], dtype=np.float64)
    volumes = np.array([r["volume_ml"] for r in rows], dtype=np.float64)
    subjects = np.array([r["subject"] for r in rows])
    n_subjects = len(set(subjects.tolist()))
    n_generated = sum(r["generated"] for r in rows)
    if len(rows) < 3 or len(np.unique(ages)) < 2:
        raise LongitudinalDiffusionError(
            f"{tissue} ({data}): a growth curve needs at least 3 volumes at 2 or more ages, "
            f"got {len(rows)} at {len(np.unique(ages))} age(s)"
        )
    exog = np.column_stack([np.ones_like(ages), np.log(ages + offset)])
    common = dict(
        tissue=tissue,
        data=data,
        n_rows=len(rows),
        n_subjects=n_subjects,
        n_generated=n_generated,
        offset_months=float(offset),
    )
    if n_subjects < 2:
        note = f"{n_subjects} subject: a random intercept needs more than one, fitted by OLS instead"
        logger.warning("trajectory %s (%s): %s", tissue, data, note)
        return _fit_ols(volumes, exog, note=note, **common)
    from statsmodels.regression.mixed_linear_model import MixedLM

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = MixedLM(volumes, exog, groups=subjects).fit(reml=True)
        params = np.asarray(result.fe_params, dtype=np.float64)
        ci = np.asarray(result.conf_int(), dtype=np.float64)[:2]
        group_var = float(np.asarray(result.cov_re, dtype=np.float64).ravel()[0])
        residual_sd = math.sqrt(max(float(result.scale), 0.0))
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(ci))):
            raise ValueError("non-finite estimates")
    except (np.linalg.LinAlgError, ValueError) as exc:
        note = f"MixedLM failed ({type(exc).__name__}: {exc}), fitted by OLS instead"
        logger.warning("trajectory %s (%s): %s", tissue, data, note)
        return _fit_ols(volumes, exog, note=note, **common)
    messages = sorted({str(w.message).splitlines()[0] for w in caught})
    return _fit_result(
        "MixedLM",
        params,
        ci,
        group_sd=math.sqrt(max(group_var, 0.0)),
        residual_sd=residual_sd,
        converged=bool(result.converged),
        note="; ".join(messages),
        **common,
    )


def _fit_result(model: str, params: np.ndarray, ci: np.ndarray, **rest: Any) -> TrajectoryFit:
    """A :class:`TrajectoryFit` from the (intercept, slope) estimates and their intervals."""
    return TrajectoryFit(
        model=model,
        intercept=float(params[0]),
        slope=float(params[1]),
        intercept_ci=(float(ci[0, 0]), float(ci[0, 1])),
        slope_ci=(float(ci[1, 0]), float(ci[1, 1])),
        **rest,
    )


def _fit_ols(volumes: np.ndarray, exog: np.ndarray, *, note: str, **common: Any) -> TrajectoryFit:
    from statsmodels.regression.linear_model import OLS

    result = OLS(volumes, exog).fit()
    return _fit_result(
        "OLS",
        np.asarray(result.params, dtype=np.float64),
        np.asarray(result.conf_int(), dtype=np.float64),
        group_sd=None,
        residual_sd=math.sqrt(max(float(result.scale), 0.0)),
        converged=True,
        note=note,
        **common,
    )


# --------------------------------------------------------------------------- table


def _trajectory_csv(fits: Sequence[TrajectoryFit], ages: Sequence[float]) -> str:
    """:func:`trajectory_table` as CSV: full precision, one column per value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "tissue",
            "data",
            "model",
            "n_rows",
            "n_subjects",
            "n_generated",
            "offset_months",
            "intercept",
            "intercept_ci_low",
            "intercept_ci_high",
            "slope",
            "slope_ci_low",
            "slope_ci_high",
            *[f"ml_at_{a:g}_months" for a in ages],
            "group_sd",
            "residual_sd",
            "converged",
            "note",
        ]
    )
    for f in fits:
        writer.writerow(
            [
                f.tissue,
                f.data,
                f.model,
                f.n_rows,
                f.n_subjects,
                f.n_generated,
                f"{f.offset_months:g}",
                f"{f.intercept:.4f}",
                f"{f.intercept_ci[0]:.4f}",
                f"{f.intercept_ci[1]:.4f}",
                f"{f.slope:.4f}",
                f"{f.slope_ci[0]:.4f}",
                f"{f.slope_ci[1]:.4f}",
                *[f"{float(f.predict(a)):.4f}" for a in ages],
                "" if f.group_sd is None else f"{f.group_sd:.4f}",
                f"{f.residual_sd:.4f}",
                f.converged,
                f.note,
            ]
        )
    return buf.getvalue()


def trajectory_table(fits: Sequence[TrajectoryFit], *, fmt: str = "markdown", ages: Sequence[float] = (12, 24)) -> str:
    """The fits as a Markdown table (default) or CSV text.

    Columns: tissue, data set, model, rows / subjects / generated rows, intercept and slope
    (ml per unit log-month) with 95% CIs, the fitted volume at each of ``ages`` (months),
    the random-intercept and residual SDs, and the note.
    """
    if fmt not in ("markdown", "csv"):
        raise InputError("trajectory table", f"fmt must be 'markdown' or 'csv', got '{fmt}'")
    if fmt == "csv":
        return _trajectory_csv(fits, ages)
    header = [
        "tissue",
        "data",
        "model",
        "rows / subjects / generated",
        "intercept ml [95% CI]",
        "slope ml/log-month [95% CI]",
        *[f"ml at {a:g} mo" for a in ages],
        "subject SD ml",
        "residual SD ml",
        "note",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in fits:
        cells = [
            f.tissue,
            f.data,
            f.model,
            f"{f.n_rows} / {f.n_subjects} / {f.n_generated}",
            f"{f.intercept:.1f} [{f.intercept_ci[0]:.1f}, {f.intercept_ci[1]:.1f}]",
            f"{f.slope:.2f} [{f.slope_ci[0]:.2f}, {f.slope_ci[1]:.2f}]",
            *[f"{float(f.predict(a)):.1f}" for a in ages],
            "-" if f.group_sd is None else f"{f.group_sd:.1f}",
            f"{f.residual_sd:.1f}",
            f.note.replace("|", "/") or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figure

#: Colours: real points and the real-only curve grey/black, generated points and the
#: real+generated curve red.
REAL_COLOUR, REAL_CURVE_COLOUR = "#8c8c8c", "#303030"
GENERATED_COLOUR, GENERATED_CURVE_COLOUR = "#f06e9a", "#d62728"


def _tissue_panel(
    ax: Any, tissue: str, rows: list[dict[str, Any]], fits: Sequence[TrajectoryFit], grid: np.ndarray
) -> None:
    """One tissue's panel: real volumes joined per subject, generated ones, and the fits."""
    mine = [r for r in rows if r["tissue"] == tissue]
    real = [r for r in mine if not r["generated"]]
    generated = [r for r in mine if r["generated"]]
    for subject in dict.fromkeys(r["subject"] for r in real):
        pts = sorted((r["age_months"], r["volume_ml"]) for r in real if r["subject"] == subject)
        ax.plot(*zip(*pts), color=REAL_COLOUR, linewidth=0.6, alpha=0.5, zorder=1)
    if real:
        ax.scatter(
            [r["age_months"] for r in real],
            [r["volume_ml"] for r in real],
            s=14,
            color=REAL_COLOUR,
            label="real",
            zorder=2,
        )
    if generated:
        ax.scatter(
            [r["age_months"] for r in generated],
            [r["volume_ml"] for r in generated],
            s=16,
            color=GENERATED_COLOUR,
            edgecolors=GENERATED_CURVE_COLOUR,
            linewidths=0.4,
            label="generated",
            zorder=3,
        )
    for fit in fits:
        style = ("--", REAL_CURVE_COLOUR) if fit.data == REAL else ("-", GENERATED_CURVE_COLOUR)
        label = f"fit, {fit.data}" + (" (OLS)" if fit.model == "OLS" else "")
        ax.plot(grid, fit.predict(grid), style[0], color=style[1], linewidth=1.6, label=label, zorder=4)
    ax.set_title(tissue, fontsize=11)
    ax.set_xlabel("age (months)")
    ax.set_ylabel("volume (ml)")
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_xlim(left=0)


def plot_trajectories(
    rows: Iterable[Mapping[str, Any]],
    fits: Sequence[TrajectoryFit],
    out_png: str | os.PathLike,
    *,
    title: str = "Tissue volumes against age",
    simulated: bool = True,
) -> Path:
    """Draw the trajectories as a PNG (Cas-DiffCom Fig. 3 style), one panel per tissue.

    Real volumes are grey dots joined per subject, generated ones red/pink dots; the fitted
    curve of the real rows is dashed, that of the real + generated rows solid. x: age in
    months, y: volume in ml. ``simulated`` writes a "SIMULATED DATA" note on the figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = _check_rows(rows)
    tissues = list(dict.fromkeys([f.tissue for f in fits] + [r["tissue"] for r in rows]))
    max_age = max(r["age_months"] for r in rows)
    grid = np.linspace(0.0, max_age * 1.02 + 1e-6, 200)
    fig, axes = plt.subplots(1, len(tissues), figsize=(3.6 * len(tissues) + 0.4, 3.6), squeeze=False)
    for ax, tissue in zip(axes[0], tissues):
        _tissue_panel(ax, tissue, rows, [f for f in fits if f.tissue == tissue], grid)
    axes[0][0].legend(fontsize=7, loc="lower right", frameon=False)
    fig.suptitle(title + ("  [SIMULATED DATA]" if simulated else ""), fontsize=12)
    if simulated:
        fig.text(
            0.995,
            0.01,
            "SIMULATED DATA - not real patients",
            ha="right",
            va="bottom",
            fontsize=8,
            color=GENERATED_CURVE_COLOUR,
        )
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    out = Path(out_png)

    def _save(tmp: str) -> None:
        fig.savefig(tmp, dpi=100, format="png")

    try:
        atomic_write(out, _save)
    finally:
        plt.close(fig)
    return out
