"""Each model against classical baselines on test subjects: does it beat them, and how sure is that?

``python -m training.evaluate --data COHORT --model cwdm=NAME --model ddm=NAME --out DIR``
runs every given model on the test subjects (or hearts) of a cohort - a BIDS dataset plus
``cardiac/sub-*/cine`` folders, as ``longdiff demo-data cohort`` and
``python -m training.test_sets`` write it - and the baselines of ``training/baselines.py``
on exactly the same cases. The subjects are the model cards' ``splits.test`` that the
cohort holds (or ``--held-out``); a subject a card puts in its train or validation split is
refused (``--split validation`` scores the validation split and says it is no test).
``--reference`` names the cohort of the training subjects the fitted baselines learn from:

* **missing age** (Cas-DiffCom, SADM, the time-interval model): each interior scan of the
  model's modality (one with real scans before and after it) is hidden in turn - its whole
  session is taken out - and the model completes the subject at that age
  (:func:`~LongitudinalDiffusionLib.tasks.complete_ages`). Baselines: a copy of the real
  scan nearest in age, the age-weighted linear interpolation of the two neighbouring real
  scans, and registration interpolation (the two neighbours registered to each other with
  demons, each warped toward the missing age: :func:`baselines.registered_interpolation`).
* **missing modality** (cWDM): in each held-out session the model's target contrast is
  hidden (every contrast in turn for an any-missing model) and the model synthesises it
  from the session's other contrasts
  (:func:`~LongitudinalDiffusionLib.tasks.synthesize_modality`). Baselines: the session's
  nearest available contrast (T1w <- T1ce, T1ce <- T1w, T2w <- FLAIR, FLAIR <- T2w, then the
  others) histogram-matched to a reference of the target contrast - the mean quantile
  function of the **training** subjects' scans of that contrast, each subject's scan nearest
  in age to the hidden session (contrast changes with age in infancy); with no training
  subjects left, the held-out subject's own other session nearest in age - and the same
  contrast unchanged (on data whose contrasts share a similar intensity scale, such as the
  simulated cohort, the plain copy can score as well as the matched one, so it is kept
  as a baseline too) - and a quadratic per-voxel regression of the target from the
  session's other contrasts fitted on the training subjects' sessions nearest in age
  (:class:`baselines.ContrastRegression`), plain and histogram-matched. The hidden image is
  never read by any baseline.
* **frames** (DDM): for each held-out heart, source = the first frame (end-diastole), target
  = the last (end-systole); the model makes all ``n`` frames at ``gamma = k / (n - 1)``
  (:func:`~LongitudinalDiffusionLib.tasks.interpolate_frames`, the source labels carried
  along) and frame ``k`` is compared with real frame ``k`` (the cine's frames are equally
  spaced in time; a warning is logged when they are not). Baselines: the linear intensity
  blend ``(1 - gamma) source + gamma target``, the identity warp (the source and its
  labels) and demons registration of the source to the target with the field scaled by
  gamma, labels warped with nearest neighbour. The two ends (gamma 0 and 1, the inputs)
  are left out.

Metrics, per case, on the truth's geometry:

* intensities of the prediction and the truth are both mapped with the **truth's** 0.5th and
  99.5th percentiles onto [0, 1] and clipped (so units do not matter, and a few outliers do
  not set the scale);
* **PSNR** = 10 log10(1 / MSE) in dB over the whole volume (MONAI ``PSNRMetric``, max 1);
* **SSIM**: 3D SSIM over the whole volume (MONAI ``SSIMMetric``, Gaussian window of 11
  voxels - fewer when a side is shorter - sigma 1.5, data range 1);
* **Dice** (frames): for each label class present in the truth or the prediction (background
  excluded) 2|P and T| / (|P| + |T|), then the mean over those classes.

Primary metric: PSNR for missing age, PSNR for missing modality, Dice for frames and
segmentation. Every baseline is compared with the model on every metric of
:data:`COMPARED`, paired over the cases (:mod:`training.stats`): the mean difference with a
95 % interval from a subject-level cluster bootstrap, the Wilcoxon signed-rank p over cases
and over subject means, cases and subjects won. The model **beats** a baseline only when
the interval lies above zero, is **worse than** it when the interval lies below zero, and is
**no better than** it otherwise; the sentence under each table is about the strongest
baseline (the highest mean primary metric).

Outputs in ``--out``: ``evaluation.md`` (the tables with these notes), ``evaluation.csv``
(one row per method and entry: mean and sample standard deviation of each metric, and the
comparison on the primary metric), ``comparisons.csv`` (every comparison) and
``cases.csv`` (every case's numbers). ``--merge DIR...`` joins the outputs of separate runs
on one cohort (one process per model or per group of subjects) into one report.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from LongitudinalDiffusionLib import __version__
from LongitudinalDiffusionLib.catalog import LoadedModel, load_model
from LongitudinalDiffusionLib.diffusion import resolve_device
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.grid import ModelGrid
from LongitudinalDiffusionLib.imaging import Image, atomic_write, load_image
from LongitudinalDiffusionLib.models import METHODS, method_task, paper_name
from LongitudinalDiffusionLib.progress import ProgressCallback, Stage
from LongitudinalDiffusionLib.subject import Modality, Subject, Timepoint, load_bids_subject, parse_modality
from LongitudinalDiffusionLib.tasks import SAME_AGE, complete_ages, interpolate_frames, synthesize_modality

from . import baselines as bl
from . import stats
from .data import Cohort, open_cohort, simulation_seed, split, split_conflicts

log = logging.getLogger(__name__)

#: the metric each task is judged on
PRIMARY = {"complete-ages": "psnr", "synthesize-modality": "psnr", "interpolate": "dice", "segment": "dice"}
#: every metric a model is compared with its baselines on (primary first)
COMPARED = {
    "complete-ages": ("psnr", "ssim"),
    "synthesize-modality": ("psnr", "ssim"),
    "interpolate": ("dice", "psnr", "ssim"),
    "segment": ("dice",),
}
TASK_TITLE = {
    "complete-ages": "missing age",
    "synthesize-modality": "missing modality",
    "interpolate": "frames",
    "segment": "tissue segmentation",
}
REGISTRATION_INTERPOLATION = "registration interpolation"
REGRESSION = "quadratic regression"
REGRESSION_MATCHED = "quadratic regression, histogram-matched"
DEMONS = "demons registration"
#: not a baseline but a bound: the hidden truth itself taken onto the model's grid and back
#: (labels with nearest neighbour). It is what a perfect model on that grid would score; on
#: scans finer than the grid it lies below 100 % and no model of that grid can beat it.
GRID_CEILING = "model grid ceiling"
#: a PSNR above this (dB) is an exact copy up to float round-off (shown as "exact")
EXACT_PSNR_DB = 100.0
BASELINES = {
    "complete-ages": ("nearest timepoint", "linear interpolation", REGISTRATION_INTERPOLATION),
    "synthesize-modality": (
        "nearest contrast, histogram-matched",
        "nearest contrast, unchanged",
        REGRESSION,
        REGRESSION_MATCHED,
    ),
    "interpolate": ("linear blend", "identity warp", DEMONS),
    "segment": ("gaussian mixture",),
}
METRICS = ("psnr", "ssim", "dice")
METRIC_TITLE = {"psnr": "PSNR (dB)", "ssim": "SSIM", "dice": "Dice"}
METRIC_NAME = {"psnr": "PSNR", "ssim": "SSIM", "dice": "Dice"}
METRIC_UNIT = {"psnr": " dB", "ssim": "", "dice": ""}
PERCENTILES = (0.5, 99.5)
#: without a card split, the subjects (and hearts) evaluated when none are named: the last
#: ones in sorted order, as ``training.data.split`` holds them out of training
DEFAULT_HELD_OUT_SUBJECTS = 2
DEFAULT_HELD_OUT_HEARTS = 1
STAT_FIELDS = [
    "difference",
    "ci_low",
    "ci_high",
    "p_cases",
    "cases_won",
    "n_cases",
    "subject_difference",
    "subject_ci_low",
    "subject_ci_high",
    "p_subjects",
    "subjects_won",
    "n_subjects",
    "decision",
]
SUMMARY_FIELDS = [
    "method",
    "task",
    "model",
    "trained",
    "entry",
    "role",
    "cases",
    "subjects",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "sd")),
    "primary",
    "best_baseline",
    *STAT_FIELDS,
    "model_beats",
]
COMPARISON_CSV_FIELDS = ["method", "model", "baseline", "metric", *STAT_FIELDS]
CASE_FIELDS = ["method", "model", "subject", "case", "entry", "psnr", "ssim", "dice"]

# ----------------------------------------------------------------------------- metrics


def normalise(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays mapped with the truth's 0.5th/99.5th percentiles onto [0, 1], clipped."""
    truth = np.asarray(truth, np.float64)
    lo, hi = np.percentile(truth, PERCENTILES)
    scale = hi - lo if hi > lo else 1.0

    def to_unit(a: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(a, np.float64) - lo) / scale, 0.0, 1.0).astype(np.float32)

    return to_unit(prediction), to_unit(truth)


def _batch(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]


def _check_shapes(prediction: np.ndarray, truth: np.ndarray) -> None:
    if np.shape(prediction) != np.shape(truth):
        raise LongitudinalDiffusionError(
            f"prediction shape {np.shape(prediction)} differs from the truth's {np.shape(truth)}"
        )


def psnr(prediction: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of two volumes already in [0, 1] (MONAI ``PSNRMetric``, max value 1)."""
    from monai.metrics import PSNRMetric

    _check_shapes(prediction, truth)
    return float(PSNRMetric(max_val=1.0)(_batch(prediction), _batch(truth)).item())


def ssim(prediction: np.ndarray, truth: np.ndarray) -> float:
    """3D SSIM of two volumes already in [0, 1] (MONAI ``SSIMMetric``, Gaussian window of 11
    voxels or the largest odd size that fits the shortest side, sigma 1.5, data range 1)."""
    from monai.metrics import SSIMMetric

    _check_shapes(prediction, truth)
    if np.ndim(truth) != 3:
        raise LongitudinalDiffusionError(f"3D SSIM needs 3D volumes, not shape {np.shape(truth)}")
    shortest = min(np.shape(truth))
    win = min(11, shortest if shortest % 2 else shortest - 1)
    if win < 3:
        raise LongitudinalDiffusionError(f"volume of shape {np.shape(truth)} is too thin for 3D SSIM")
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=win, kernel_sigma=1.5)
    return float(metric(_batch(prediction), _batch(truth)).item())


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the label classes present in the truth or the prediction (background 0
    excluded); NaN when neither has any foreground."""
    _check_shapes(prediction, truth)
    p, t = np.rint(prediction).astype(np.int64), np.rint(truth).astype(np.int64)
    classes = [c for c in np.union1d(np.unique(p), np.unique(t)) if c != 0]
    if not classes:
        return float("nan")
    scores = []
    for c in classes:
        pc, tc = p == c, t == c
        scores.append(2.0 * np.logical_and(pc, tc).sum() / (pc.sum() + tc.sum()))
    return float(np.mean(scores))


def image_metrics(prediction: Image | np.ndarray, truth: Image | np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of a prediction against the truth, after :func:`normalise`."""
    p = prediction.array if isinstance(prediction, Image) else prediction
    t = truth.array if isinstance(truth, Image) else truth
    _check_shapes(p, t)
    p01, t01 = normalise(p, t)
    return {"psnr": psnr(p01, t01), "ssim": ssim(p01, t01)}


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One prediction problem: the entries (model and baselines) and their metrics."""

    subject: str
    label: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    generated: Image | None = None  # missing age: the model's image, for the tissue trajectories
    age: float | None = None

    def add(self, entry: str, prediction: Image, truth: Image, labels: tuple[Image, Image] | None = None) -> None:
        prediction = bl.on_geometry(prediction, truth.affine, truth.shape)
        scores = image_metrics(prediction, truth)
        if labels is not None:
            pred_labels = bl.on_geometry(labels[0], truth.affine, truth.shape, labels=True)
            scores["dice"] = dice(pred_labels.array, labels[1].array)
        self.scores[entry] = scores

    def add_ceiling(self, grid: dict[str, Any] | None, truth: Image, truth_labels: Image | None = None) -> None:
        """Score :data:`GRID_CEILING`: ``truth`` (and its labels, for Dice) through ``grid``, the
        grid the model's output comes from, and back onto the truth's own voxels."""
        if not grid:
            return
        model_grid = ModelGrid.from_dict(grid)
        sample = model_grid.forward(truth)
        back = model_grid.inverse(sample.array, sample.record)
        labels = None
        if truth_labels is not None:
            on_grid = model_grid.forward(truth_labels, labels=True, reference=sample.record)
            labels = (model_grid.inverse(on_grid.array, on_grid.record, labels=True), truth_labels)
        self.add(GRID_CEILING, back, truth, labels)
        if self.scores[GRID_CEILING]["psnr"] > EXACT_PSNR_DB:  # float round-off of an exact copy
            self.scores[GRID_CEILING]["psnr"] = math.inf


def output_grid(loaded: LoadedModel) -> dict[str, Any] | None:
    """The grid a model's output is made on: Cas-DiffCom's second stage, else the card's grid."""
    card = loaded.card.card
    return card.get("sr_grid") or card.get("grid")


@dataclass
class Run:
    """How to call the tasks."""

    steps: int | None
    n_samples: int
    seed: int
    device: torch.device

    def kwargs(self) -> dict[str, Any]:
        return {"steps": self.steps, "n_samples": self.n_samples, "seed": self.seed, "device": str(self.device)}

    @property
    def kind(self) -> str:
        return "mean" if self.n_samples > 1 else "generated"


def _model_modality(loaded: LoadedModel) -> Modality:
    return parse_modality((loaded.card.card.get("modalities") or ["T1w"])[0], loaded.card.path)


def _without(subject: Subject, drop: Callable[[Timepoint], bool]) -> Subject:
    kept = [tp for tp in subject.timepoints if not drop(tp)]
    return Subject(subject.subject_id, kept, subject.source, dict(subject.meta))


def age_cases(subject: Subject, modality: Modality) -> list[Timepoint]:
    """The scans of ``modality`` with real scans of it before and after: the ones to hide."""
    real = sorted((tp for tp in subject.timepoints if tp.modality == modality), key=lambda tp: tp.age)
    return real[1:-1]


def run_age_case(subject: Subject, hidden: Timepoint, loaded: LoadedModel, run: Run, cache: dict | None = None) -> Case:
    """Hide ``hidden``'s session, let the model and the baselines fill the age in, score them.
    ``cache`` keeps the baselines' images between models evaluated on the same cases."""
    age, modality = hidden.age, hidden.modality
    without = _without(subject, lambda tp: abs(tp.age - age) < SAME_AGE)
    truth = bl.image_of(hidden)
    case = Case(subject.subject_id, f"{modality.value} at {age:.2f} mo")
    result = complete_ages(without, [age], loaded, modality=modality, **run.kwargs())
    case.generated, case.age = result.image(run.kind, age), age
    case.add("model", case.generated, truth)
    real = [tp for tp in without.timepoints if tp.modality == modality]
    makers = {
        "nearest timepoint": bl.nearest_timepoint,
        "linear interpolation": bl.linear_interpolation,
        REGISTRATION_INTERPOLATION: bl.registered_interpolation,
    }
    cache = {} if cache is None else cache
    for entry, make in makers.items():
        key = ("age", subject.subject_id, modality, round(age, 6), entry)
        if key not in cache:
            cache[key] = make(real, age, truth.affine, truth.shape)
        case.add(entry, cache[key], truth)
    case.add_ceiling(output_grid(loaded), truth)
    return case


def _targets(config: dict[str, Any]) -> list[tuple[Modality, list[Modality]]]:
    """(target, conditions) pairs a cWDM model is evaluated on."""
    if config.get("any_missing"):
        mods = [parse_modality(m) for m in config["modalities"]]
        return [(m, [c for c in mods if c != m]) for m in mods]
    return [(parse_modality(config["target"]), [parse_modality(m) for m in config["conditions"]])]


def modality_cases(subject: Subject, config: dict[str, Any]) -> list[tuple[Timepoint, list[Timepoint]]]:
    """(hidden scan, the rest of its session) for every session that has the target and
    every condition the model needs."""
    out = []
    for age in subject.ages():
        visit = [tp for tp in subject.timepoints if abs(tp.age - age) < SAME_AGE]
        have = {tp.modality: tp for tp in visit}
        for target, conditions in _targets(config):
            if target in have and all(c in have for c in conditions):
                out.append((have[target], [tp for tp in visit if tp is not have[target]]))
    return out


class ReferenceHistograms:
    """Quantile functions of a contrast from scans that are not evaluated (the training
    subjects), looked up by age: the mean over subjects of each one's scan nearest in age."""

    def __init__(self, root: Path, subject_ids: Sequence[str]) -> None:
        self.root = Path(root)
        self.subject_ids = list(subject_ids)
        self._table: dict[Modality, list[list[tuple[float, np.ndarray]]]] = {}

    def _load(self) -> dict[Modality, list[list[tuple[float, np.ndarray]]]]:
        """Every contrast's (age, quantiles) per subject, read once (subject by subject, so
        a large cohort is never held in memory)."""
        if not self._table:
            self._table = {m: [] for m in Modality}
            for sid in self.subject_ids:
                subject = load_bids_subject(self.root, subject=sid.removeprefix("sub-"))
                for modality in subject.modalities():
                    chosen = [tp for tp in subject.timepoints if tp.modality == modality]
                    self._table[modality].append([(tp.age, bl.quantiles(bl.image_of(tp).array)) for tp in chosen])
        return self._table

    def at(self, modality: Modality, age: float) -> np.ndarray | None:
        """The reference quantiles of ``modality`` near ``age`` months; None without scans."""
        per_subject = self._load()[modality]
        if not per_subject:
            return None
        return np.mean([min(scans, key=lambda s: abs(s[0] - age))[1] for scans in per_subject], axis=0)


class TrainingSessions:
    """The training subjects' sessions (contrast -> array), for the contrast regression: a
    case at age ``a`` is predicted by a regression fitted on each training subject's session
    nearest in age that has the target and every condition (contrast changes with age in
    infancy). Fits are cached."""

    def __init__(self, root: Path, subject_ids: Sequence[str]) -> None:
        self.root = Path(root)
        self.subject_ids = list(subject_ids)
        self._sessions: list[list[tuple[float, dict[Modality, np.ndarray]]]] | None = None
        self._fits: dict[tuple, bl.ContrastRegression] = {}

    def _load(self) -> list[list[tuple[float, dict[Modality, np.ndarray]]]]:
        if self._sessions is None:
            self._sessions = []
            for sid in self.subject_ids:
                subject = load_bids_subject(self.root, subject=sid.removeprefix("sub-"))
                visits = []
                for age in subject.ages():
                    visit = [tp for tp in subject.timepoints if abs(tp.age - age) < SAME_AGE]
                    visits.append((age, {tp.modality: np.asarray(bl.image_of(tp).array, np.float32) for tp in visit}))
                self._sessions.append(visits)
        return self._sessions

    def regression(self, target: Modality, conditions: Sequence[Modality], age: float) -> bl.ContrastRegression | None:
        """The regression for a case at ``age``; None without a training session to fit it on."""
        chosen = []
        for visits in self._load():
            usable = [(a, s) for a, s in visits if target in s and all(c in s for c in conditions)]
            if usable:
                chosen.append(min(usable, key=lambda v: abs(v[0] - age)))
        if not chosen:
            return None
        key = (target, tuple(conditions), tuple(round(a, 6) for a, _ in chosen))
        if key not in self._fits:
            self._fits[key] = bl.ContrastRegression(conditions, target).fit([s for _, s in chosen])
        return self._fits[key]


def own_reference(subject: Subject, hidden: Timepoint) -> np.ndarray | None:
    """The fallback reference: the subject's other session of the target contrast nearest in age."""
    others = [
        tp for tp in subject.timepoints if tp.modality == hidden.modality and abs(tp.age - hidden.age) >= SAME_AGE
    ]
    if not others:
        return None
    nearest = min(others, key=lambda tp: abs(tp.age - hidden.age))
    return bl.quantiles(bl.image_of(nearest).array)


def run_modality_case(
    subject: Subject,
    hidden: Timepoint,
    rest: list[Timepoint],
    loaded: LoadedModel,
    run: Run,
    reference: np.ndarray,
    regression: bl.ContrastRegression | None = None,
) -> Case:
    """Hide one contrast of a session; the model synthesises it, the baselines copy and
    histogram-match the nearest contrast or regress it from the others; score them all."""
    without = _without(subject, lambda tp: tp is hidden)
    truth = bl.image_of(hidden)
    case = Case(subject.subject_id, f"{hidden.modality.value} of {hidden.session or f'{hidden.age:.2f} mo'}")
    session = hidden.session if hidden.session is not None else hidden.age
    result = synthesize_modality(without, session, hidden.modality, loaded, **run.kwargs())
    case.add("model", result.image(run.kind), truth)
    matched, unchanged = BASELINES["synthesize-modality"][:2]
    case.add(matched, bl.histogram_matched_contrast(rest, hidden.modality, reference), truth)
    case.add(unchanged, bl.image_of(bl.nearest_contrast(rest, hidden.modality)), truth)
    if regression is not None:
        regressed = regression.predict(rest)
        case.add(REGRESSION, regressed, truth)
        case.add(REGRESSION_MATCHED, Image(bl.match_histogram(regressed.array, reference), regressed.affine), truth)
    case.add_ceiling(output_grid(loaded), truth)
    return case


def run_heart(cohort: Cohort, hid: str, loaded: LoadedModel, run: Run) -> list[Case]:
    """All interior frames of one cine: the model's frames and the baselines against the real ones."""
    frames = cohort.heart_frames(hid)
    n = len(frames)
    if n < 3:
        raise InputError(cohort.root / "cardiac" / hid, f"{n} frames: at least 3 are needed to have one in between")
    times = np.array([f.time_ms for f in frames])
    fractions = (times - times[0]) / (times[-1] - times[0])
    gammas = np.linspace(0.0, 1.0, n)
    if np.max(np.abs(fractions - gammas)) > 0.02:
        log.warning("%s: frames are not equally spaced in time; frame k is compared at gamma k/(n-1)", hid)
    source, target = load_image(frames[0].image), load_image(frames[-1].image)
    source_labels = None if frames[0].labels is None else load_image(frames[0].labels, dtype=np.int16)
    result = interpolate_frames(
        source, target, n, loaded, source_labels=source_labels, **{**run.kwargs(), "n_samples": 1}
    )
    series = result.series[0]
    identity, identity_labels = bl.identity_warp(source, source_labels)
    field = bl.demons_field(target, source)  # source(x + u(x)) ~ target(x), once per heart
    cases = []
    for k in range(1, n - 1):
        truth = load_image(frames[k].image)
        truth_labels = None if frames[k].labels is None else load_image(frames[k].labels, dtype=np.int16)
        gamma = float(series.times[k])
        case = Case(hid, f"frame {k} (gamma {gamma:.3f})")
        with_labels = truth_labels is not None and series.labels is not None
        case.add("model", series.frames[k], truth, (series.labels[k], truth_labels) if with_labels else None)
        case.add("linear blend", bl.linear_blend(source, target, gamma), truth)
        pair = (identity_labels, truth_labels) if truth_labels is not None and identity_labels is not None else None
        case.add("identity warp", identity, truth, pair)
        registered, registered_labels = bl.registered_frame(source, target, gamma, source_labels, field=field)
        pair = (registered_labels, truth_labels) if truth_labels is not None and registered_labels is not None else None
        case.add(DEMONS, registered, truth, pair)
        case.add_ceiling(output_grid(loaded), truth, truth_labels)
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------- summary


def _stats(values: Iterable[float]) -> tuple[int, float, float]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], np.float64)  # PSNR may be inf
    if v.size == 0:
        return 0, float("nan"), float("nan")
    return int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def compare_entries(cases: list[Case], metric: str, baseline: str) -> stats.Comparison | None:
    """The model minus ``baseline`` on ``metric``, paired over the cases both have
    (:func:`training.stats.compare`: cluster bootstrap over subjects, Wilcoxon, cases and
    subjects won). None when no case has the metric for both."""
    model = [c.scores.get("model", {}).get(metric, math.nan) for c in cases]
    base = [c.scores.get(baseline, {}).get(metric, math.nan) for c in cases]
    return stats.compare(model, base, [c.subject for c in cases])


def summarise(method: str, loaded: LoadedModel, cases: list[Case]) -> tuple[list[dict[str, Any]], list[dict]]:
    """:func:`summarise_cases` for a loaded model."""
    return summarise_cases(method, loaded.card.name, loaded.card.trained, cases)


def summarise_cases(
    method: str, name: str, trained: bool, cases: list[Case]
) -> tuple[list[dict[str, Any]], list[dict]]:
    """Summary rows, one per entry (model first, then the baselines): means and sds over the
    cases and, on a baseline's row, the paired comparison of the model with it on the primary
    metric; on the model's row the same against the strongest baseline (``best_baseline``,
    the highest mean primary metric). Also every comparison on every metric of
    :data:`COMPARED` (the rows of ``comparisons.csv``)."""
    task = method_task(method)
    primary = PRIMARY[task]
    rows = []
    bound = [GRID_CEILING] if any(GRID_CEILING in c.scores for c in cases) else []
    for entry in ("model", *BASELINES[task], *bound):
        have = [c for c in cases if entry in c.scores]
        row: dict[str, Any] = {
            "method": method,
            "task": task,
            "model": name,
            "trained": trained,
            "entry": entry,
            "role": "model" if entry == "model" else "bound" if entry == GRID_CEILING else "baseline",
            "cases": len(have),
            "subjects": len({c.subject for c in have}),
            "primary": primary,
        }
        for metric in METRICS:
            _, mean, sd = _stats(c.scores[entry].get(metric, float("nan")) for c in have)
            row[f"{metric}_mean"], row[f"{metric}_sd"] = mean, sd
        rows.append(row)
    comparisons = []
    for row in rows[1:]:
        if row["cases"] == 0 or row["role"] != "baseline":  # a bound is shown, never compared with
            continue
        for metric in COMPARED[task]:
            result = compare_entries(cases, metric, row["entry"])
            if result is None:
                continue
            comparisons.append({"method": method, "model": name, "baseline": row["entry"]}
                               | {"metric": metric, **result.as_dict()})  # fmt: skip
            if metric == primary:
                row.update(result.as_dict(), model_beats=result.beats)
    compared = [r for r in rows[1:] if r.get("decision") is not None]
    if compared:
        best = max(compared, key=lambda r: r[f"{primary}_mean"])
        rows[0].update({k: best[k] for k in (*STAT_FIELDS, "model_beats")}, best_baseline=best["entry"])
    return rows, comparisons


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cell(mean: float, sd: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    if mean == math.inf:  # PSNR of an exact copy: the scans are on the model's grid
        return "exact"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{mean:.{digits}f}"


DIGITS = {"psnr": 2, "ssim": 3, "dice": 3}


def _p(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2g}" if value >= 0.001 else "<0.001"


def _ci(diff: float, lo: float, hi: float, digits: int) -> str:
    return f"{diff:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def comparison_cells(c: dict[str, Any], digits: int) -> list[str]:
    """Table cells of one comparison: difference [95 % CI], p, cases won, the same per subject, verdict."""
    return [
        _ci(c["difference"], c["ci_low"], c["ci_high"], digits),
        _p(c["p_cases"]),
        f"{c['cases_won']}/{c['n_cases']}",
        _ci(c["subject_difference"], c["subject_ci_low"], c["subject_ci_high"], digits),
        _p(c["p_subjects"]),
        f"{c['subjects_won']}/{c['n_subjects']}",
        c["decision"],
    ]


COMPARISON_HEADER = (
    "| baseline | metric | model minus baseline, per case [95 % CI] | Wilcoxon p (cases) | cases won "
    "| per subject [95 % CI] | Wilcoxon p (subjects) | subjects won | the model is |"
)


def verdict(row: dict[str, Any]) -> str:
    """The sentence saying whether the model beats the strongest baseline: only when the
    95 % interval of the paired difference lies above zero."""
    primary = row["primary"]
    if row.get("best_baseline") is None:
        return f"No baseline has a {METRIC_NAME[primary]} on these cases: no comparison."
    digits, unit = DIGITS[primary], METRIC_UNIT[primary]
    name = f"{row['method']} (`{row['model']}`)"
    decision = row["decision"]
    word = {stats.BEATS: "beats", stats.WORSE: "is worse than", stats.NO_BETTER: "is no better than"}[decision]
    head = f"**{name} {word} the strongest baseline ({row['best_baseline']}) on {METRIC_NAME[primary]}**"
    detail = (
        f"model minus baseline {row['difference']:+.{digits}f}{unit}, 95 % CI "
        f"[{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}] (cluster bootstrap over subjects), "
        f"Wilcoxon p = {_p(row['p_cases'])}; better on {row['cases_won']} of {row['n_cases']} cases and "
        f"{row['subjects_won']} of {row['n_subjects']} subjects (per-subject mean "
        f"{row['subject_difference']:+.{digits}f}{unit}, Wilcoxon p = {_p(row['p_subjects'])})"
    )
    return f"{head}: {detail}."


def reading_notes() -> list[str]:
    """The notes under every report's header: metrics, statistics, each task's baselines, the bound."""
    return [
        "How to read it:",
        "",
        "- Every entry of a method is scored on the same cases; numbers are mean ± sample standard deviation "
        "over the cases.",
        "- Intensities of the prediction and the truth are both mapped with the truth's 0.5th and 99.5th "
        "percentiles onto [0, 1] (clipped). PSNR = 10 log10(1 / MSE) in dB and 3D SSIM (Gaussian window 11, "
        "sigma 1.5) over the whole volume (MONAI `PSNRMetric`, `SSIMMetric`).",
        "- Dice: per label class present in the truth or the prediction (background excluded), then the mean.",
        "- Primary metric: PSNR for missing age and missing modality, Dice for frames and segmentation. "
        "Comparisons are paired (model minus baseline on the same case). Per case: the mean over all cases, a 95 % "
        f"percentile interval from a cluster bootstrap over subjects ({stats.RESAMPLES} resamples, seed "
        f"{stats.SEED}; a subject's cases stay together, since they are not independent) and the two-sided "
        "Wilcoxon signed-rank p over cases. Per subject: each subject's cases averaged first, then the mean, "
        "a bootstrap interval over subjects and the Wilcoxon p over subjects (with n subjects the smallest "
        "possible p is 2/2^n: 0.25 for 3). A model **beats** a baseline only when the per-case interval lies "
        "above zero, is **worse than** it when the interval lies below zero, and is **no better than** it "
        "otherwise.",
        "- Missing age: each interior scan is hidden (its whole session); baselines: a copy of the nearest real "
        "scan in age, the age-weighted linear interpolation of the two neighbouring scans, and registration "
        "interpolation (the two neighbours registered to each other with SimpleITK symmetric-forces demons, "
        "each warped toward the missing age by its fraction of the field, blended by age).",
        "- Missing modality: the target contrast of each session is hidden; baselines: the nearest available "
        "contrast (T1w <- T1ce, T1ce <- T1w, T2w <- FLAIR, FLAIR <- T2w) histogram-matched to the training "
        "subjects' scans of the target contrast nearest in age, and unchanged; a quadratic per-voxel regression "
        "of the target from the session's other contrasts (each scan divided by its 99th percentile; least squares "
        "on the training subjects' sessions nearest in age), and the same histogram-matched. No baseline reads the "
        "hidden image.",
        "- Frames: source end-diastole, target end-systole; frame k of n at gamma k/(n-1) against real frame k, "
        "the ends left out. Baselines: linear intensity blend (no labels, so no Dice), identity warp (the "
        "source and its labels), and demons registration (source to target, the field scaled by gamma, "
        "the labels warped with nearest neighbour).",
        f"- Bound, not a baseline: the {GRID_CEILING} is the hidden truth itself taken onto the model's grid "
        "(the grid its output is made on) and back onto the scan's voxels, labels with nearest neighbour: what a "
        "perfect model of that grid would score. On scans as fine as the grid it is exact (PSNR infinite, Dice 1); "
        "on finer scans it shows how much the grid alone loses. It is never compared with.",
        "- Tissue segmentation: every evaluated scan with ground-truth labels (mapped to CSF, grey matter, white "
        "matter); baseline: a Gaussian mixture on the intensities inside the ground-truth brain mask "
        "(the strongest form of this baseline), with a bias-field correction, its classes ordered by the "
        "scan's age.",
    ]


def markdown(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The evaluation tables with the notes that make them readable on their own."""
    evaluated_as = header.get("split", "test")
    title = f"# Models against baselines on the {header.get('set') or evaluated_as} set"
    lines = [
        title,
        "",
        f"Cohort: `{header['cohort']}`; evaluated as: **{evaluated_as}**; subjects: "
        f"{', '.join(header['subjects']) or 'none'}; hearts: {', '.join(header['hearts']) or 'none'}; "
        f"training subjects for the fitted baselines: {header.get('reference') or 'none'}; "
        f"sampler steps: {header['steps'] or 'card default'}; "
        f"samples per case: {header['n_samples']}; seed: {header['seed']}; library {__version__}.",
        "",
    ]
    if evaluated_as != "test":
        lines += [
            "These subjects are the models' **validation** split: training validated on them and design choices "
            "were made on them, so these numbers are not a test.",
            "",
        ]
    lines += reading_notes()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    for method, group in by_method.items():
        model_row = group[0]
        task = model_row["task"]
        lines += ["", f"## {paper_name(method)} ({method}): {TASK_TITLE[task]}", ""]
        lines.append(f"Model `{model_row['model']}`, {model_row['cases']} cases from {model_row['subjects']} subjects.")
        if not model_row["trained"]:
            lines.append("This model has RANDOM (untrained) weights: its numbers only test the pipeline.")
        used = [m for m in METRICS if any(not math.isnan(r[f"{m}_mean"]) for r in group)]
        lines += ["", "| entry | cases | " + " | ".join(METRIC_TITLE[m] for m in used) + " |"]
        lines.append("|---|---:|" + "---:|" * len(used))
        for row in group:
            name = {"model": f"model `{row['model']}`", "bound": f"bound: {row['entry']}"}.get(
                row["role"], f"baseline: {row['entry']}"
            )
            cells = [_cell(row[f"{m}_mean"], row[f"{m}_sd"], DIGITS[m]) for m in used]
            lines.append(f"| {name} | {row['cases']} | " + " | ".join(cells) + " |")
        mine = [c for c in comparisons if c["method"] == method]
        if mine:
            lines += ["", COMPARISON_HEADER, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
            for c in mine:
                cells = comparison_cells(c, DIGITS[c["metric"]])
                lines.append(f"| {c['baseline']} | {METRIC_NAME[c['metric']]} | " + " | ".join(cells) + " |")
        lines += ["", verdict(model_row)]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k), 6) for k in fields})

    atomic_write(path, write)


# ----------------------------------------------------------------------------- driver


def card_splits(loaded: LoadedModel) -> dict[str, Any] | None:
    """The ``"splits"`` entry of a model card (train / validation / test ids, simulator seed)."""
    splits = loaded.card.card.get("splits")
    return splits if isinstance(splits, dict) else None


def check_split(cohort: Cohort, ids: Sequence[str], models: dict[str, LoadedModel], evaluated_as: str) -> None:
    """Refuse ids a model card puts in its training (or, for a test, validation) split.

    Raises:
        InputError: naming the model, the ids and their split.
    """
    seed = simulation_seed(cohort.root)
    problems = []
    for model in models.values():
        splits = card_splits(model)
        if splits is None:
            continue
        for name, hit in split_conflicts(list(ids), splits, seed, evaluated_as=evaluated_as).items():
            problems.append(f"{', '.join(hit)} in the {name} split of `{model.card.name}`")
    if problems:
        hint = (
            "a test must use subjects no model trained or was validated on (the card's test split: "
            "python -m training.test_sets writes them); to score the validation split say --split validation"
            if evaluated_as == "test"
            else "a model cannot be validated on its training subjects"
        )
        raise InputError(cohort.root, f"cannot evaluate as {evaluated_as}: {'; '.join(problems)}. {hint}")


def held_out(
    cohort: Cohort,
    ids: Sequence[str] | None,
    models: dict[str, LoadedModel] | None = None,
    evaluated_as: str = "test",
) -> tuple[list[str], list[str]]:
    """(subjects, hearts) to evaluate on. Named ids are sorted into subjects and hearts; a kind
    not named takes its default: the ids of the models' card split (``test`` or
    ``validation``) that the cohort has, or - for models without a split - the last two
    subjects and the last heart in sorted order, as ``training.data.split`` holds them out."""
    ids = list(ids or [])
    unknown = [i for i in ids if i not in cohort.subjects and i not in cohort.hearts]
    if unknown:
        raise InputError(
            cohort.root,
            f"held-out id(s) {', '.join(unknown)} not in the cohort "
            f"(subjects: {', '.join(cohort.subjects) or 'none'}; hearts: {', '.join(cohort.hearts) or 'none'})",
        )
    subjects = [i for i in ids if i in cohort.subjects]
    hearts = [i for i in ids if i in cohort.hearts]
    splits = [card_splits(m) for m in (models or {}).values()]
    if splits and all(s is not None for s in splits):
        named = {i for s in splits for i in (s.get(evaluated_as) or [])}
        subjects = subjects or [i for i in cohort.subjects if i in named]
        hearts = hearts or [i for i in cohort.hearts if i in named]
        if not subjects and not hearts:
            raise InputError(
                cohort.root,
                f"the cohort has none of the models' {evaluated_as} subjects ({', '.join(sorted(named)) or 'none'}); "
                "write the test sets with python -m training.test_sets or name subjects with --held-out",
            )
    else:
        if not subjects and len(cohort.subjects) > DEFAULT_HELD_OUT_SUBJECTS:
            subjects = split(cohort.subjects, DEFAULT_HELD_OUT_SUBJECTS)[1]
        if not hearts and len(cohort.hearts) > DEFAULT_HELD_OUT_HEARTS:
            hearts = split(cohort.hearts, DEFAULT_HELD_OUT_HEARTS)[1]
    return subjects, hearts


def _load_models(models: dict[str, Any], device: torch.device) -> dict[str, LoadedModel]:
    if not models:
        raise LongitudinalDiffusionError("no models to evaluate (give --model METHOD=NAME)")
    loaded = {}
    for method, name in models.items():
        if method not in METHODS:
            raise LongitudinalDiffusionError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
        model = name if isinstance(name, LoadedModel) else load_model(name, device=device)
        if model.method != method:
            raise LongitudinalDiffusionError(f"model '{model.card.name}' is a {model.method} model, not {method}")
        loaded[method] = model
    return {m: loaded[m] for m in METHODS if m in loaded}


def training_subjects(
    reference: Cohort, evaluated: Sequence[str], models: dict[str, LoadedModel], same_cohort: bool
) -> list[str]:
    """The subjects the fitted baselines (histogram references, contrast regression) may learn
    from: the reference cohort's subjects that are not evaluated, kept to each card's training
    split where the card names subjects of that cohort (same population), and never a
    validation or test subject of a card."""
    chosen = [s for s in reference.subjects if not (same_cohort and s in evaluated)]
    seed = simulation_seed(reference.root)
    for splits in (card_splits(m) for m in models.values()):
        if splits is None or (seed is not None and splits.get("simulator_seed") not in (None, seed)):
            continue  # no split, or another population with the same ids
        train = set(splits.get("train") or [])
        if train & set(reference.subjects):
            chosen = [s for s in chosen if s in train]
        else:  # the card's split names other ids (DDM's hearts)
            held = set(splits.get("validation") or []) | set(splits.get("test") or [])
            chosen = [s for s in chosen if s not in held]
    return chosen


def evaluate(
    models: dict[str, Any],
    cohort_root: str | Path,
    held_out_ids: Sequence[str] | None,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    n_samples: int = 1,
    seed: int = 0,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    reference_root: str | Path | None = None,
    evaluated_as: str = "test",
    set_name: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``models`` ({method: catalog name, card path or LoadedModel}) and their
    baselines on the test (or validation) subjects / hearts of the cohort at ``cohort_root``.

    ``reference_root``: the cohort holding the training subjects the fitted baselines learn
    from (default: ``cohort_root`` itself). A subject a model card puts in its training or
    validation split is refused (:func:`check_split`). Writes ``evaluation.md``,
    ``evaluation.csv``, ``comparisons.csv`` and ``cases.csv`` into ``out_dir`` and returns
    the summary rows (those of ``evaluation.csv``). ``progress`` receives one event per case
    (per heart for DDM) under the stage ``evaluate <method>``.
    """
    if n_samples < 1:
        raise LongitudinalDiffusionError(f"n_samples must be at least 1, not {n_samples}")
    cohort = open_cohort(cohort_root)
    run = Run(steps, int(n_samples), int(seed), resolve_device(device))
    loaded = _load_models(models, run.device)
    subjects, hearts = held_out(cohort, held_out_ids, loaded, evaluated_as)
    check_split(cohort, subjects + hearts, loaded, evaluated_as)
    reference = cohort if reference_root is None else open_cohort(reference_root)
    same = reference_root is None or Path(reference_root).resolve() == cohort.root.resolve()
    if not same:
        check_split(reference, [], loaded, evaluated_as)
    train_ids = training_subjects(reference, subjects, loaded, same)
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    case_rows: list[dict[str, Any]] = []
    generated: dict[str, list[Case]] = {}
    cache: dict = {}
    for method, model in loaded.items():
        t0 = time.perf_counter()
        cases = _method_cases(method, model, cohort, subjects, hearts, run, progress, reference, train_ids, cache)
        if not cases:
            raise LongitudinalDiffusionError(f"{method}: the held-out data give no case to evaluate on")
        log.info("%s: %d cases in %.1f s", method, len(cases), time.perf_counter() - t0)
        if method_task(method) == "complete-ages":
            generated[method] = cases
        summary, compared = summarise(method, model, cases)
        rows += summary
        comparisons += compared
        for case in cases:
            for entry, scores in case.scores.items():
                case_rows.append(
                    {"method": method, "model": model.card.name, "subject": case.subject, "case": case.label}
                    | {"entry": entry, **scores}
                )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"cohort": str(cohort_root), "subjects": subjects, "hearts": hearts, "split": evaluated_as}
    header |= {"steps": steps, "n_samples": n_samples, "seed": seed, "set": set_name}
    header["reference"] = f"{len(train_ids)} of `{reference_root or cohort_root}`" if train_ids else None
    _write_csv(out / "evaluation.csv", rows, SUMMARY_FIELDS)
    _write_csv(out / "comparisons.csv", comparisons, COMPARISON_CSV_FIELDS)
    _write_csv(out / "cases.csv", case_rows, CASE_FIELDS)
    text = markdown(rows, comparisons, header)
    segmenter = loaded.get("tissue-seg")
    if segmenter is not None and generated:
        text += trajectories(cohort, segmenter, generated, out, run, progress)
    atomic_write(out / "evaluation.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return rows


def _method_cases(
    method: str,
    model: LoadedModel,
    cohort: Cohort,
    subjects: list[str],
    hearts: list[str],
    run: Run,
    progress: ProgressCallback | None,
    reference: Cohort,
    train_ids: list[str],
    cache: dict,
) -> list[Case]:
    """Every case of one model: its hearts (frames) or its subjects (the other tasks)."""
    if method_task(method) == "interpolate":
        if not hearts:
            raise InputError(cohort.root, f"no held-out heart to evaluate {method} on (name one with --held-out)")
        stage = Stage(f"evaluate {method}", len(hearts), progress).start()
        cases: list[Case] = []
        for hid in hearts:
            cases += run_heart(cohort, hid, model, run)
            stage.advance(message=hid)
        return cases
    if not subjects:
        raise InputError(
            cohort.root,
            f"no held-out subject to evaluate {method} on: the cohort has {len(cohort.subjects)}, too few "
            f"to hold out the default {DEFAULT_HELD_OUT_SUBJECTS}; name some with --held-out",
        )
    return _subject_cases(method, model, cohort, subjects, run, progress, reference, train_ids, cache)


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """A row read back from a CSV this module wrote: numbers as numbers, '' as NaN."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("trained", "model_beats"):
            out[key] = None if value == "" else value == "True"
        elif key in ("cases", "subjects", "cases_won", "subjects_won", "n_cases", "n_subjects"):
            out[key] = int(value) if value else None
        elif key in ("method", "task", "model", "entry", "role", "primary", "best_baseline", "baseline", "metric"):
            out[key] = value or None
        elif key in ("subject", "case"):
            out[key] = value or None
        elif key == "decision":
            out[key] = value or None
        else:
            out[key] = float(value) if value else float("nan")
    return out


def merge(parts: Sequence[str | Path], out_dir: str | Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """One report from evaluations of the same cohort run separately (e.g. one process per
    model or per group of subjects, in parallel): their ``cases.csv`` concatenated in method
    order, and the summaries, comparisons and ``evaluation.md`` computed again from all the
    cases (without the tissue trajectories, which need the age models and the segmenter in
    one run). A case found in two parts is an error."""

    def read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            raise InputError(path, "not found: give folders an evaluation wrote")
        with open(path, encoding="utf-8", newline="") as fh:
            return [_typed(r) for r in csv.DictReader(fh)]

    models: dict[str, tuple[str, bool]] = {}
    case_rows: list[dict[str, Any]] = []
    for part in parts:
        for row in read(Path(part) / "evaluation.csv"):
            if row["role"] == "model":
                if models.get(row["method"], (row["model"], row["trained"])) != (row["model"], row["trained"]):
                    raise LongitudinalDiffusionError(f"{row['method']}: the parts evaluated different models")
                models[row["method"]] = (row["model"], row["trained"])
        case_rows += read(Path(part) / "cases.csv")
    order = {m: i for i, m in enumerate(METHODS)}
    case_rows.sort(key=lambda r: order.get(r["method"], 99))  # stable: each part's order within a method
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    for method in sorted(models, key=lambda m: order.get(m, 99)):
        by_case: dict[tuple[str, str], Case] = {}
        for r in case_rows:
            if r["method"] != method:
                continue
            key = (r["subject"], r["case"])
            if key not in by_case:
                by_case[key] = Case(r["subject"], r["case"])
            elif r["entry"] in by_case[key].scores:
                raise LongitudinalDiffusionError(f"{method}: case {key} is in more than one part")
            by_case[key].scores[r["entry"]] = {m: r[m] for m in METRICS if not math.isnan(r[m])}
        summary, compared = summarise_cases(method, *models[method], list(by_case.values()))
        rows += summary
        comparisons += compared
    cases = case_rows
    ids = sorted({c["subject"] for c in cases if c.get("subject")})
    header = {"subjects": [i for i in ids if not i.startswith("sub-heart")]} | dict(header)
    header.setdefault("hearts", [i for i in ids if i.startswith("sub-heart")])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "evaluation.csv", rows, SUMMARY_FIELDS)
    _write_csv(out / "comparisons.csv", comparisons, COMPARISON_CSV_FIELDS)
    _write_csv(out / "cases.csv", cases, CASE_FIELDS)
    text = markdown(rows, comparisons, header)
    text += "\n" + f"Merged from {len(parts)} separate runs of the same cohort and settings.\n"
    atomic_write(out / "evaluation.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return rows


def trajectories(
    cohort: Cohort,
    segmenter: LoadedModel,
    generated: dict[str, list[Case]],
    out: Path,
    run: Run,
    progress: ProgressCallback | None,
) -> str:
    """Cas-DiffCom's Fig. 3: tissue volumes against age from every real T1w scan of the cohort
    and from each age model's generated scans (the held-out visits it filled in), segmented by
    the tissue model and fitted with log-linear mixed-effects models, real-only versus real +
    generated. Writes ``trajectories_<method>.png`` and ``trajectories.csv``; returns the
    Markdown section."""
    from LongitudinalDiffusionLib.segmentation import segment
    from LongitudinalDiffusionLib.trajectory import fit_trajectories, plot_trajectories, trajectory_table, volume_rows

    classes = dict(enumerate(segmenter.config["classes"]))
    grid = segmenter.card.card.get("grid")

    def volumes(sid: str, age: float, image: Image, is_generated: bool) -> list[dict[str, Any]]:
        labels = segment(segmenter.network, image, config=segmenter.config, grid=grid, device=run.device)
        return volume_rows(sid, age, labels, classes, generated=is_generated)

    scans = [
        (sid, tp) for sid in cohort.subjects for tp in cohort.subject(sid).timepoints if tp.modality.value == "T1w"
    ]
    stage = Stage("trajectories", len(scans), progress).start()
    real = []
    for sid, tp in scans:
        real += volumes(sid, tp.age, bl.image_of(tp), False)
        stage.advance()
    lines = [
        "",
        "## Tissue volumes by age (Cas-DiffCom Fig. 3)",
        "",
        f"Every real T1w scan of the cohort ({len(scans)}) and each age model's generated scans (the held-out "
        f"visits it filled in) segmented by `{segmenter.card.name}`; per tissue, volume = a + b log(age + c) with "
        "a random intercept per subject (statsmodels MixedLM), fitted on the real scans only and on the real plus "
        "the generated ones. Close fits mean the generated scans follow the cohort's growth.",
    ]
    table_rows = []
    for method, cases in generated.items():
        made = []
        for case in cases:
            if case.generated is not None:
                made += volumes(case.subject, float(case.age), case.generated, True)
        fits = fit_trajectories(real + made)
        png = plot_trajectories(real + made, fits, out / f"trajectories_{method}.png",
                                title=f"Tissue volumes by age: real and {paper_name(method)}-generated")  # fmt: skip
        lines += ["", f"### {paper_name(method)} (`{method}`)", "", f"![trajectories]({png.name})", ""]
        lines.append(trajectory_table(fits))
        table_rows += [{"method": method, **r} for r in made]
    _write_csv(out / "trajectories.csv", real + table_rows, ["method", "subject", "age_months", "tissue",
                                                             "volume_ml", "generated"])  # fmt: skip
    return "\n".join(lines) + "\n"


def _subject_cases(
    method: str,
    model: LoadedModel,
    cohort: Cohort,
    subjects: list[str],
    run: Run,
    progress: ProgressCallback | None,
    reference: Cohort | None = None,
    train_ids: Sequence[str] | None = None,
    cache: dict | None = None,
) -> list[Case]:
    task = method_task(method)
    if task == "complete-ages":
        modality = _model_modality(model)
        todo = [(sid, tp) for sid in subjects for tp in age_cases(cohort.subject(sid), modality)]
        lo, hi = model.card.card.get("age_range_months") or (-math.inf, math.inf)
        inside = [(sid, tp) for sid, tp in todo if lo - 1e-6 <= tp.age <= hi + 1e-6]
        if len(inside) < len(todo):
            log.info("%s: %d hidden ages lie outside the model's ages and are skipped", method, len(todo) - len(inside))
        todo = inside
        stage = Stage(f"evaluate {method}", len(todo), progress).start()
        cases = []
        for sid, hidden in todo:
            cases.append(run_age_case(cohort.subject(sid), hidden, model, run, cache))
            stage.advance(message=f"{sid} {hidden.age:.2f} mo")
        return cases
    if task == "segment":
        todo = [
            (sid, tp)
            for sid in subjects
            for tp in cohort.subject(sid).timepoints
            if tp.modality == Modality(model.config.get("modality") or "T1w") and tp.labels is not None
        ]
        stage = Stage(f"evaluate {method}", len(todo), progress).start()
        cases = []
        for sid, tp in todo:
            cases.append(run_segmentation_case(tp, model, run))
            stage.advance(message=f"{sid} {tp.age:.2f} mo")
        return cases
    todo = [(sid, *case) for sid in subjects for case in modality_cases(cohort.subject(sid), model.config)]
    stage = Stage(f"evaluate {method}", len(todo), progress).start()
    reference = cohort if reference is None else reference
    training = [s for s in cohort.subjects if s not in subjects] if train_ids is None else list(train_ids)
    references = ReferenceHistograms(reference.root, training)
    sessions = TrainingSessions(reference.root, training)
    cases = []
    for sid, hidden, rest in todo:
        subject = cohort.subject(sid)
        histogram = references.at(hidden.modality, hidden.age)
        if histogram is None:
            histogram = own_reference(subject, hidden)
        if histogram is None:
            raise LongitudinalDiffusionError(
                f"no {hidden.modality.value} scan outside the evaluated one to take a reference histogram from"
            )
        conditions = [c for t, cs in _targets(model.config) if t == hidden.modality for c in cs]
        regression = sessions.regression(hidden.modality, conditions, hidden.age) if training else None
        cases.append(run_modality_case(subject, hidden, rest, model, run, histogram, regression))
        stage.advance(message=f"{sid} {hidden.modality.value} {hidden.session}")
    return cases


def run_segmentation_case(tp: Timepoint, loaded: LoadedModel, run: Run) -> Case:
    """The tissue model and the Gaussian-mixture baseline (given the scan's age to order its
    classes, and the ground-truth brain mask - the strongest form of the baseline; its own
    threshold mask loses outer CSF at 5 mm) against the scan's ground-truth labels, in the
    model's classes; Dice only."""
    from LongitudinalDiffusionLib.segmentation import gmm_segment, map_labels, segment

    image = bl.image_of(tp)
    truth = map_labels(load_image(tp.labels, dtype=np.int16).array, loaded.config.get("anatomy", "brain"))
    grid = loaded.card.card.get("grid")
    case = Case(tp.source.parts[-4] if tp.source else "subject", f"{tp.age:.2f} mo")
    predicted = segment(loaded.network, image, config=loaded.config, grid=grid, device=run.device)
    case.scores["model"] = {"dice": dice(predicted.array, truth)}
    baseline = gmm_segment(image, mask=truth > 0, age_months=tp.age, contrast=tp.modality.value)
    case.scores["gaussian mixture"] = {"dice": dice(baseline.array, truth)}
    if grid:  # the true labels through the model's grid (nearest neighbour) and back
        labels = Image(truth.astype(np.int16), image.affine)
        model_grid = ModelGrid.from_dict(grid)
        sample = model_grid.forward(image)
        on_grid = model_grid.forward(labels, labels=True, reference=sample.record)
        back = model_grid.inverse(on_grid.array, on_grid.record, labels=True)
        case.scores[GRID_CEILING] = {"dice": dice(back.array, truth)}
    return case


def _model_arg(text: str) -> tuple[str, str]:
    method, eq, name = text.partition("=")
    if not eq or not method or not name:
        raise argparse.ArgumentTypeError(f"'{text}' is not METHOD=NAME (e.g. ddm=ddm-demo)")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    return method, name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate models against baselines on test subjects (PSNR, SSIM, Dice; bootstrap intervals, "
        "Wilcoxon tests).",
    )
    parser.add_argument("--data", required=True, help="the cohort folder (BIDS subjects and cardiac/ hearts)")
    parser.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        metavar="METHOD=NAME",
        help="a model to evaluate: its method and catalog name or card path (repeat for several)",
    )
    parser.add_argument(
        "--held-out",
        nargs="+",
        metavar="ID",
        help="subjects / hearts to evaluate on (default: the models' card split - test or validation - that the "
        "cohort has; for models without one, the last 2 subjects and the last heart, the ones training holds out)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="what the subjects are to the models: test (default; ids in a card's train or validation split are "
        "refused) or validation (ids in a train split are refused; the report says it is no test)",
    )
    parser.add_argument(
        "--reference",
        metavar="DIR",
        help="the cohort holding the training subjects the fitted baselines learn from (histogram references, "
        "contrast regression; default: --data)",
    )
    parser.add_argument("--name", help="the name of this evaluation set in the report (e.g. in-distribution)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="instead of evaluating: merge the outputs of separate runs on the same --data into --out",
    )
    parser.add_argument(
        "--out", required=True, help="folder for evaluation.md, evaluation.csv, comparisons.csv and cases.csv"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: each card's)")
    parser.add_argument("--samples", type=int, default=1, help="samples averaged per case (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    return parser


def _print_progress(event) -> None:
    if event.step == event.total or event.step % 5 == 0:
        print(f"{event.stage}: {event.step}/{event.total} {event.message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        header = {"cohort": args.data, "split": args.split, "steps": args.steps, "n_samples": args.samples}
        header |= {"seed": args.seed, "set": args.name, "reference": args.reference and f"`{args.reference}`"}
        try:
            merge(args.merge, args.out, header)
        except LongitudinalDiffusionError as exc:
            print(f"evaluate: error: {exc}", file=sys.stderr)
            return 2
        print(f"merged {len(args.merge)} runs into {Path(args.out) / 'evaluation.md'}")
        return 0
    if not args.model:
        parser.error("the following arguments are required: --model")
    methods = [m for m, _ in args.model]
    duplicated = sorted({m for m in methods if methods.count(m) > 1})
    if duplicated:
        print(f"evaluate: error: one model per method ({', '.join(duplicated)} given twice)", file=sys.stderr)
        return 2
    try:
        rows = evaluate(
            dict(args.model),
            args.data,
            args.held_out,
            args.out,
            steps=args.steps,
            n_samples=args.samples,
            seed=args.seed,
            device=args.device,
            progress=_print_progress,
            reference_root=args.reference,
            evaluated_as=args.split,
            set_name=args.name,
        )
    except LongitudinalDiffusionError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        if row["role"] == "model":
            print(verdict(row).replace("**", ""))
    print(f"tables written to {Path(args.out) / 'evaluation.md'} and evaluation.csv, comparisons.csv, cases.csv")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
