"""Paired comparisons a reviewer accepts: bootstrap intervals, Wilcoxon tests, cases and subjects won.

The cases of one subject (its hidden visits, its frames) are not independent, so every
comparison is made at two levels:

* **cases**: the mean paired difference (model minus baseline) over all cases, with a 95 %
  interval from a **subject-level cluster bootstrap** (subjects are drawn with replacement,
  each bringing all its cases), and the Wilcoxon signed-rank p over the cases;
* **subjects**: each subject's cases averaged first, then the mean over subjects, a
  bootstrap interval over subjects and the Wilcoxon p over the subject means.

A model **beats** a baseline only when the case-level interval lies entirely above zero; it
is **worse than** the baseline when the interval lies entirely below zero, and **no better
than** it otherwise. The bootstrap uses a fixed seed (:data:`SEED`) and :data:`RESAMPLES`
resamples, so the numbers are the same on every run. Percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95

BEATS, NO_BETTER, WORSE = "beats", "no better than", "worse than"


@dataclass
class Comparison:
    """Model minus baseline, paired over cases (and over subjects)."""

    n_cases: int
    n_subjects: int
    difference: float  # mean over cases
    ci_low: float  # cluster bootstrap over subjects
    ci_high: float
    p_cases: float  # Wilcoxon signed-rank, two-sided, over cases
    cases_won: int
    subject_difference: float  # mean of the subject means
    subject_ci_low: float
    subject_ci_high: float
    p_subjects: float  # Wilcoxon over subject means
    subjects_won: int
    decision: str  # BEATS, NO_BETTER or WORSE

    @property
    def beats(self) -> bool:
        return self.decision == BEATS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(ci_low: float, ci_high: float) -> str:
    """BEATS when the interval excludes zero on the positive side, WORSE on the negative side,
    else NO_BETTER (also when the interval is undefined)."""
    if math.isfinite(ci_low) and ci_low > 0:
        return BEATS
    if math.isfinite(ci_high) and ci_high < 0:
        return WORSE
    return NO_BETTER


def cluster_bootstrap_ci(
    values: Sequence[float],
    clusters: Sequence[Any] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` when whole clusters are resampled.

    ``clusters[i]`` names the cluster (subject) of ``values[i]``; without clusters every
    value is its own. Each resample draws as many clusters as there are, with replacement,
    and takes the mean of all the values they bring. (nan, nan) for no values; a single
    cluster gives the interval of its own values resampled (no between-subject spread is
    known, so the interval is zero wide only when its values are equal).
    """
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    labels = np.arange(v.size) if clusters is None else np.asarray([str(c) for c in clusters])
    if len(labels) != v.size:
        raise ValueError(f"{v.size} values but {len(labels)} cluster labels")
    names, index = np.unique(labels, return_inverse=True)
    if names.size == 1:
        # one cluster: fall back to resampling its values
        names, index = np.arange(v.size), np.arange(v.size)
    sums = np.bincount(index, weights=v, minlength=names.size)
    counts = np.bincount(index, minlength=names.size).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, names.size, size=(resamples, names.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences (scipy, exact for small n
    without ties); nan with fewer than 2 non-zero differences."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, np.float64)
    d = d[np.isfinite(d)]
    if np.count_nonzero(d) < 2:
        return float("nan")
    return float(wilcoxon(d).pvalue)


def compare(
    model: Sequence[float],
    baseline: Sequence[float],
    subjects: Sequence[Any],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Comparison | None:
    """The paired comparison of a model with a baseline over cases.

    ``model[i]``, ``baseline[i]``: the primary metric of case ``i`` for each; ``subjects[i]``:
    its subject. Cases where either value is not finite (a missing metric, PSNR inf - inf)
    are dropped. None when no case is left.
    """
    m, b = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
    if not (m.shape == b.shape and len(subjects) == m.size):
        raise ValueError("model, baseline and subjects must have one entry per case")
    diff = m - b
    keep = np.isfinite(diff)
    diff = diff[keep]
    subj = [str(s) for s, k in zip(subjects, keep) if k]
    if diff.size == 0:
        return None
    lo, hi = cluster_bootstrap_ci(diff, subj, resamples=resamples, seed=seed, level=level)
    names = sorted(set(subj))
    per_subject = np.array([diff[[s == name for s in subj]].mean() for name in names])
    s_lo, s_hi = cluster_bootstrap_ci(per_subject, None, resamples=resamples, seed=seed, level=level)
    return Comparison(
        n_cases=int(diff.size),
        n_subjects=len(names),
        difference=float(diff.mean()),
        ci_low=lo,
        ci_high=hi,
        p_cases=wilcoxon_p(diff),
        cases_won=int((diff > 0).sum()),
        subject_difference=float(per_subject.mean()),
        subject_ci_low=s_lo,
        subject_ci_high=s_hi,
        p_subjects=wilcoxon_p(per_subject),
        subjects_won=int((per_subject > 0).sum()),
        decision=decide(lo, hi),
    )
