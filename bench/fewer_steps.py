"""Fewer steps, same quality: fast samplers against each method's full chain on held-out subjects.

    python bench/fewer_steps.py [--data COHORT] [--methods cwdm sadm cas-diffcom interval]
                                [--cases 4] [--out PNG] [--csv CSV] [--merge] [--quick]

For each diffusion method with a demo model (``<method>-demo``; DDM has no reverse chain and
is left out), the same held-out cases as ``training/evaluate.py`` (missing age for SADM,
Cas-DiffCom and the time-interval model, missing FLAIR for cWDM; subjects sub-015 and
sub-016 of the simulated cohort the demo models were trained on) are run with:

* the full chain the paper uses, ancestral DDPM over every step of the schedule: cWDM 1000,
  SADM 400, Cas-DiffCom 4000 generator + 1000 refiner steps, time-interval model 1000;
* DDIM (eta 0) with 1, 2, 5, 10, 25 and 50 steps and DPM-Solver++(2M) with 10 and 25 steps
  (Cas-DiffCom: that many steps in each of its two stages).

Everything else is the model card's (guidance, variance, clipping, seed 0). The sampler is
selected the way the tasks read it, through the loaded model's config (``sampler`` and, for
Cas-DiffCom, ``refine_sampler``), and the cases are run and scored by the evaluation code
itself (``run_age_case`` / ``run_modality_case``: PSNR and 3D SSIM against the hidden real
scan, both mapped with the truth's 0.5th/99.5th percentiles onto [0, 1]).

NFE = network forwards per predicted image, counted from the samplers' progress events: every
denoising step of every stage, and both runs of a two-sided missing age (the model runs from
the scan before and the scan after the hidden age and blends the two). SADM's forwards carry
the conditional and the unconditional input of classifier-free guidance as one batch of 2.
Seconds per case are the task's own time (resampling and sampling), not the scoring.

Target: at least 20x fewer NFE than the full chain for at most 0.5 dB lower mean PSNR (the
paired mean difference over the same cases). Prints a table and, per method, the fastest
setting that meets the target; writes a CSV and a PNG (PSNR against NFE, one panel per method).

The full chains take minutes per case on a CPU (a whole run, 4 cases of each method, takes
hours on 2 cores, most of it Cas-DiffCom's and the time-interval model's full chains): run
methods one at a time with ``--methods M --merge`` to keep the others' rows in the CSV and
plot them all. ``--quick`` is a smoke test: one case, cWDM and SADM, DDIM with 1 and 2 steps
against a 20-step DDPM standing in for the full chain.
Without ``--data`` the cohort is simulated once into a cache folder (``longdiff demo-data``
with the settings the demo models were trained on).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LongitudinalDiffusionLib.catalog import LoadedModel, load_model  # noqa: E402
from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError  # noqa: E402
from LongitudinalDiffusionLib.models import paper_name  # noqa: E402
from LongitudinalDiffusionLib.progress import ProgressEvent  # noqa: E402
from training.evaluate import (  # noqa: E402
    Case,
    ReferenceHistograms,
    Run,
    _model_modality,
    age_cases,
    held_out,
    modality_cases,
    open_cohort,
    own_reference,
    run_age_case,
    run_modality_case,
)

#: the methods with a reverse chain, in the order of the table
METHODS = ("cwdm", "sadm", "cas-diffcom", "interval")
QUICK_METHODS = ("cwdm", "sadm")
#: where each method's task reads its sampler settings in the model config
SAMPLER_KEYS = {"cas-diffcom": ("sampler", "refine_sampler")}
SCHEDULE_KEYS = {"sampler": "schedule", "refine_sampler": "refine_schedule"}
#: the cohort the demo models were trained on (their cards' "trained_on")
COHORT_ARGS = ["--subjects", "16", "--hearts", "6", "--seed", "11", "--spacing", "5", "--fov", "160", "200", "160"]
TARGET_SPEEDUP = 20.0
TARGET_LOSS_DB = 0.5
TASK_DONE = ("complete-ages", "synthesize-modality")
SHORT_NAME = {"cwdm": "cWDM", "sadm": "SADM", "cas-diffcom": "Cas-DiffCom", "interval": "Time-interval model"}
SAMPLER_TITLE = {"ddpm": "DDPM", "ddim": "DDIM (eta 0)", "dpm++2m": "DPM-Solver++(2M)"}
CSV_FIELDS = [
    "method",
    "model",
    "sampler",
    "steps",
    "reference",
    "nfe",
    "nfe_reduction",
    "cases",
    "psnr_mean",
    "psnr_sd",
    "ssim_mean",
    "ssim_sd",
    "seconds_per_case",
    "psnr_delta",
    "psnr_delta_sd",
    "meets_target",
    "best_baseline",
    "best_baseline_psnr",
]


@dataclass(frozen=True)
class Setting:
    """One sampler configuration; ``steps=None`` is every step of the schedule."""

    sampler: str
    steps: int | None
    reference: bool = False  # the chain the others are compared with

    def config(self, base: dict[str, Any]) -> dict[str, Any]:
        """The card's sampler settings with this sampler and number of steps."""
        return {**base, "name": self.sampler, "steps": self.steps, "eta": 0.0, "capture": 0}


FULL = [Setting("ddpm", None, reference=True)]
FAST = [Setting("ddim", n) for n in (1, 2, 5, 10, 25, 50)] + [Setting("dpm++2m", n) for n in (10, 25)]
QUICK = [Setting("ddpm", 20, reference=True), Setting("ddim", 1), Setting("ddim", 2)]


class Counter:
    """A progress callback: counts the denoising steps (one network forward each) and keeps
    the task's own elapsed time from its final event."""

    def __init__(self) -> None:
        self.forwards = 0
        self.seconds = math.nan

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage in TASK_DONE:
            self.seconds = event.elapsed
        elif event.step > 0:
            self.forwards += 1


@dataclass
class CountingRun(Run):
    """The evaluation's :class:`Run` with a progress callback that counts network forwards."""

    counter: Counter = field(default_factory=Counter)

    def kwargs(self) -> dict[str, Any]:
        return {**super().kwargs(), "progress": self.counter}


@dataclass
class Measured:
    setting: Setting
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    nfe: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- cases


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items evenly spread over ``items`` (the centres of ``count`` equal parts)."""
    if count >= len(items):
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def method_cases(method: str, loaded: LoadedModel, cohort, subjects: list[str]) -> list[tuple]:
    """The cases ``training/evaluate.py`` evaluates this model on, as argument tuples."""
    if method == "cwdm":
        return [
            (sid, hidden, rest)
            for sid in subjects
            for hidden, rest in modality_cases(cohort.subject(sid), loaded.config)
        ]
    modality = _model_modality(loaded)
    lo, hi = loaded.card.card.get("age_range_months") or (-math.inf, math.inf)
    return [
        (sid, tp)
        for sid in subjects
        for tp in age_cases(cohort.subject(sid), modality)
        if lo - 1e-6 <= tp.age <= hi + 1e-6
    ]


def case_name(case: tuple) -> str:
    return f"{case[0]} {case[1].modality.value} at {case[1].age:.2f} mo"


# ----------------------------------------------------------------------------- running


def configure(loaded: LoadedModel, base: dict[str, Any], setting: Setting) -> None:
    """Put ``setting`` where the tasks read the sampler: the loaded model's config."""
    for key in SAMPLER_KEYS.get(loaded.method, ("sampler",)):
        loaded.config[key] = setting.config(base[key])


def steps_label(loaded: LoadedModel, setting: Setting) -> str:
    """Steps per stage, e.g. ``1000`` or ``4000+1000`` (Cas-DiffCom's two stages)."""
    parts = []
    for key in SAMPLER_KEYS.get(loaded.method, ("sampler",)):
        total = int(loaded.config[SCHEDULE_KEYS[key]]["num_steps"])
        parts.append(str(total if setting.steps is None else min(setting.steps, total)))
    return "+".join(parts)


def run_method(
    method: str, loaded: LoadedModel, cohort, subjects: list[str], settings: list[Setting], args
) -> tuple[list[Measured], dict[str, list[float]]]:
    """Every setting on every chosen case; also the baselines' PSNR (the same on every setting)."""
    cases = method_cases(method, loaded, cohort, subjects)
    if not cases:
        raise LongitudinalDiffusionError(f"{method}: the held-out subjects give no case")
    chosen = spread(cases, args.cases)
    print(f"{method}: {len(chosen)} of {len(cases)} cases: " + "; ".join(case_name(c) for c in chosen), file=sys.stderr)
    base = {key: copy.deepcopy(loaded.config.get(key) or {}) for key in SAMPLER_KEYS.get(method, ("sampler",))}
    references = None
    if method == "cwdm":
        references = ReferenceHistograms(cohort.root, [s for s in cohort.subjects if s not in subjects])
    results = [Measured(s) for s in settings]
    baselines: dict[str, list[float]] = {}
    try:
        for i, args_case in enumerate(chosen):
            subject = cohort.subject(args_case[0])
            for m in results:
                configure(loaded, base, m.setting)
                run = CountingRun(None, 1, args.seed, torch.device(args.device))
                if method == "cwdm":
                    _, hidden, rest = args_case
                    reference = references.at(hidden.modality, hidden.age)
                    if reference is None:
                        reference = own_reference(subject, hidden)
                    case: Case = run_modality_case(subject, hidden, rest, loaded, run, reference)
                else:
                    case = run_age_case(subject, args_case[1], loaded, run)
                scores = case.scores["model"]
                m.psnr.append(scores["psnr"])
                m.ssim.append(scores["ssim"])
                m.nfe.append(run.counter.forwards)
                m.seconds.append(run.counter.seconds)
                if m.setting.reference:
                    for entry, s in case.scores.items():
                        if entry != "model":
                            baselines.setdefault(entry, []).append(s["psnr"])
                print(
                    f"{method} case {i + 1}/{len(chosen)} {m.setting.sampler} {steps_label(loaded, m.setting)}: "
                    f"{scores['psnr']:.2f} dB, {run.counter.forwards} NFE, {run.counter.seconds:.1f} s",
                    file=sys.stderr,
                )
    finally:
        for key, value in base.items():
            loaded.config[key] = value
    return results, baselines


# ----------------------------------------------------------------------------- summary


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def summarise(method: str, loaded: LoadedModel, results: list[Measured], baselines) -> list[dict[str, Any]]:
    full = next(m for m in results if m.setting.reference)
    full_nfe = float(np.mean(full.nfe))
    best = max(baselines, key=lambda e: np.mean(baselines[e])) if baselines else None
    rows = []
    for m in results:
        nfe = float(np.mean(m.nfe))
        psnr_mean, psnr_sd = _mean_sd(m.psnr)
        ssim_mean, ssim_sd = _mean_sd(m.ssim)
        delta, delta_sd = _mean_sd([a - b for a, b in zip(m.psnr, full.psnr)])
        reduction = full_nfe / nfe if nfe else math.nan
        rows.append(
            {
                "method": method,
                "model": loaded.card.name,
                "sampler": m.setting.sampler,
                "steps": steps_label(loaded, m.setting),
                "reference": m.setting.reference,
                "nfe": int(round(nfe)),
                "nfe_reduction": reduction,
                "cases": len(m.psnr),
                "psnr_mean": psnr_mean,
                "psnr_sd": psnr_sd,
                "ssim_mean": ssim_mean,
                "ssim_sd": ssim_sd,
                "seconds_per_case": float(np.mean(m.seconds)),
                "psnr_delta": delta,
                "psnr_delta_sd": delta_sd,
                "meets_target": (not m.setting.reference) and reduction >= TARGET_SPEEDUP and delta >= -TARGET_LOSS_DB,
                "best_baseline": best,
                "best_baseline_psnr": float(np.mean(baselines[best])) if best else math.nan,
            }
        )
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    """The fastest setting of one method that meets the target, or the closest miss."""
    method = rows[0]["method"]
    full = next(r for r in rows if r["reference"])
    target = f">= {TARGET_SPEEDUP:g}x fewer NFE, <= {TARGET_LOSS_DB:g} dB PSNR loss"
    met = [r for r in rows if r["meets_target"]]
    if met:
        r = min(met, key=lambda r: (r["nfe"], -r["psnr_mean"]))
        return (
            f"{method}: fastest setting meeting the target ({target}): "
            f"{SAMPLER_TITLE[r['sampler']]}, steps {r['steps']}, "
            f"{r['nfe']} NFE vs {full['nfe']} ({r['nfe_reduction']:.0f}x fewer), "
            f"{r['psnr_delta']:+.2f} dB PSNR vs the full chain, {r['seconds_per_case']:.1f} s vs "
            f"{full['seconds_per_case']:.1f} s per case"
        )
    fast = [r for r in rows if not r["reference"] and r["nfe_reduction"] >= TARGET_SPEEDUP]
    if not fast:
        return f"{method}: no setting meets the target ({target}): none is {TARGET_SPEEDUP:g}x cheaper"
    r = max(fast, key=lambda r: r["psnr_delta"])
    return (
        f"{method}: no setting meets the target ({target}); closest: "
        f"{SAMPLER_TITLE[r['sampler']]}, steps {r['steps']}, "
        f"{r['nfe']} NFE ({r['nfe_reduction']:.0f}x fewer), {r['psnr_delta']:+.2f} dB"
    )


def _pm(mean: float, sd: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if math.isfinite(sd) else f"{mean:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "sampler", "steps", "NFE", "PSNR (dB)", "SSIM", "s/case", "Δ PSNR vs full (dB)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sampler = SAMPLER_TITLE[r["sampler"]] + (" (reference)" if r["reference"] else "")
        delta = "-" if r["reference"] else _pm(r["psnr_delta"], r["psnr_delta_sd"], 2)
        if r["meets_target"]:
            delta += " ✓"
        cells = [r["method"], sampler, r["steps"], str(r["nfe"]), _pm(r["psnr_mean"], r["psnr_sd"], 2),
                 f"{r['ssim_mean']:.3f}", f"{r['seconds_per_case']:.1f}", delta]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.6g}"
        return "" if v is None else str(v)

    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: fmt(r.get(k)) for k in CSV_FIELDS})


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows written by :func:`write_csv`, with their types back."""
    ints, flags = {"nfe", "cases"}, {"reference", "meets_target"}
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k in CSV_FIELDS:
                v = raw.get(k, "")
                if k in ints:
                    row[k] = int(v)
                elif k in flags:
                    row[k] = v == "True"
                elif k in ("method", "model", "sampler", "steps", "best_baseline"):
                    row[k] = v or None
                else:
                    row[k] = float(v) if v else math.nan
            rows.append(row)
    return rows


def plot(path: Path, rows: list[dict[str, Any]], note: str) -> None:
    """PSNR against NFE (log axis), one panel per method, the target region shaded."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    methods = list(dict.fromkeys(r["method"] for r in rows))
    ncols = min(2, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.set_visible(False)
    for ax, method in zip(axes.flat, methods):
        group = [r for r in rows if r["method"] == method]
        full = next(r for r in group if r["reference"])
        lo_x = min(r["nfe"] for r in group) / 1.6
        hi_x = full["nfe"] * 1.6
        floor = full["psnr_mean"] - TARGET_LOSS_DB
        ax.axhline(floor, color="tab:green", ls="--", lw=1, label=f"full chain - {TARGET_LOSS_DB:g} dB")
        ax.axvline(
            full["nfe"] / TARGET_SPEEDUP, color="tab:green", ls=":", lw=1, label=f"{TARGET_SPEEDUP:g}x fewer NFE"
        )
        for sampler, style in (("ddim", "o-"), ("dpm++2m", "s-")):
            pts = sorted((r for r in group if r["sampler"] == sampler and not r["reference"]), key=lambda r: r["nfe"])
            if pts:
                errs = [r["psnr_sd"] / math.sqrt(r["cases"]) if math.isfinite(r["psnr_sd"]) else 0 for r in pts]
                ax.errorbar([r["nfe"] for r in pts], [r["psnr_mean"] for r in pts], yerr=errs, fmt=style, ms=4,
                            capsize=2, label=SAMPLER_TITLE[sampler])  # fmt: skip
        ax.plot([full["nfe"]], [full["psnr_mean"]], "k*", ms=11, label=f"DDPM, {full['steps']} steps (reference)")
        if full["best_baseline"]:
            ax.axhline(full["best_baseline_psnr"], color="grey", ls="-.", lw=1,
                       label=f"baseline: {full['best_baseline']}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(lo_x, hi_x)
        ticks = sorted({r["nfe"] for r in group if r["sampler"] != "dpm++2m"})  # DDIM's and the reference's
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7)
        y0, y1 = ax.get_ylim()
        ax.fill_between([lo_x, full["nfe"] / TARGET_SPEEDUP], floor, max(y1, floor + 0.5), color="tab:green",
                        alpha=0.08, lw=0, label="target region")  # fmt: skip
        ax.set_ylim(y0, max(y1, floor + 0.5))
        ax.set_xlabel("network evaluations per prediction (NFE)")
        ax.set_ylabel("PSNR against ground truth (dB)")
        cases = f"{full['cases']} case" + ("s" if full["cases"] != 1 else "")
        ax.set_title(f"{SHORT_NAME.get(method, paper_name(method))} ({cases})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    fig.suptitle(f"Fewer steps, same quality: PSNR against NFE{note}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def default_cohort() -> Path:
    """The demo models' training cohort, simulated once into a cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "LongitudinalDiffusion" / "bench-cohort-seed11-16x5mm"
    if not (folder / "dataset_description.json").is_file():
        print(f"simulating the held-out cohort into {folder} (once) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "LongitudinalDiffusionLib", "demo-data", str(folder), *COHORT_ARGS, "--quiet"]
        subprocess.run([*cmd, "--overwrite"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return folder


def _in_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by method in the table's order, each method's rows as measured."""
    return sorted(rows, key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="cohort folder (default: simulated once into a cache folder)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--cases", type=int, help="cases per method, evenly spread (default 4; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="PNG plot (default docs/images/perf_steps.png)")
    parser.add_argument("--csv", type=Path, help="CSV table (default docs/performance_steps.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 case, DDIM 1 and 2 vs a 20-step DDPM")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other methods' rows already in the CSV (run methods one at a time, plot them together)",
    )
    args = parser.parse_args(argv)
    methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    args.cases = args.cases or (1 if args.quick else 4)
    settings = QUICK if args.quick else FULL + FAST
    if args.quick and (args.out is None or args.csv is None):
        quick_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "longdiff-bench-quick"
        args.out = args.out or quick_dir / "perf_steps.png"
        args.csv = args.csv or quick_dir / "performance_steps.csv"
    args.out = args.out or ROOT / "docs" / "images" / "perf_steps.png"
    args.csv = args.csv or ROOT / "docs" / "performance_steps.csv"
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))

    cohort = open_cohort(args.data or default_cohort())
    subjects, _ = held_out(cohort, None)

    def kept() -> list[dict[str, Any]]:  # read again at each write: another run may have added its rows
        if not (args.merge and args.csv.is_file()):
            return []
        return [r for r in read_csv(args.csv) if r["method"] not in methods]

    rows: list[dict[str, Any]] = []
    verdicts: list[str] = []
    t0 = time.perf_counter()
    for method in methods:
        try:
            loaded = load_model(f"{method}-demo", device=args.device)
        except LongitudinalDiffusionError as exc:
            print(f"{method}: skipped, its model cannot be loaded: {exc}")
            continue
        results, baselines = run_method(method, loaded, cohort, subjects, settings, args)
        group = summarise(method, loaded, results, baselines)
        rows += group
        verdicts.append(verdict(group))
        write_csv(args.csv, _in_order(kept() + rows))  # after every method: an interrupted run keeps what it measured
    if not rows:
        print("fewer-steps: no method could be measured")
        return 2
    measured = len(rows)
    rows = _in_order(kept() + rows)
    verdicts = [verdict([r for r in rows if r["method"] == m]) for m in dict.fromkeys(r["method"] for r in rows)]
    note = " (quick: the reference is a 20-step DDPM, not the full chain)" if args.quick else ""
    plot(args.out, rows, note)
    print()
    print(f"Held-out subjects {', '.join(subjects)} of {cohort.root}; seed {args.seed}; device {args.device}{note}.")
    print("NFE = network forwards per predicted image (both sides of a two-sided missing age, both Cas-DiffCom")
    print("stages); Δ PSNR = paired mean difference to the reference over the same cases; ✓ = meets the target.")
    print()
    print(table(rows))
    print()
    for line in verdicts:
        print(line)
    elapsed = time.perf_counter() - t0
    kept_note = f" ({len(rows) - measured} kept from {args.csv})" if len(rows) > measured else ""
    print(f"fewer-steps: {measured} settings measured in {elapsed:.0f} s{kept_note}; wrote {args.csv} and {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
