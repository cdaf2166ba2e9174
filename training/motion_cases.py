"""The motion test set's cases split by whether the hidden scan itself moved.

``python -m training.motion_cases --data testsets/motion --report docs/evaluation/shifted-motion``
reads an evaluation of the ``motion`` set (``cases.csv``, ``evaluation.csv``) and each hidden
scan's sidecar (``SimulatedMotion``, written by ``training.test_sets``), and compares every
model with its strongest baseline again, separately on the cases whose hidden scan moved
and on those whose hidden scan did not (the inputs may have moved in both). A generated
image has no motion artefact of its own, so against a moved truth it is scored partly on
the artefact; the cases with a still truth show what moved inputs alone do to a model.
The statistics are those of ``training.evaluate`` (cluster bootstrap over subjects).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import sys
from pathlib import Path

from LongitudinalDiffusionLib.bids import load_bids_subject
from LongitudinalDiffusionLib.modality import parse_modality

from . import stats

CASE = re.compile(r"^(?P<modality>\S+) (?:at (?P<age>[\d.]+) mo|of (?P<session>ses-\w+))\Z")


@functools.cache
def _subject(folder: Path):
    return load_bids_subject(folder)


def target_moved(root: Path, subject: str, case: str) -> bool:
    """Whether the hidden scan of an age case (``"T1w at 2.82 mo"``) or a modality case
    (``"FLAIR of ses-01"``) moved during its acquisition (its sidecar says so)."""
    match = CASE.match(case)
    if match is None:
        raise ValueError(f"not an age or modality case: {case!r}")
    modality = parse_modality(match["modality"])
    scans = [
        tp
        for tp in _subject(root / subject).timepoints
        if tp.modality == modality
        and (tp.session == match["session"] if match["session"] else abs(tp.age - float(match["age"])) < 0.005)
    ]
    if len(scans) != 1 or scans[0].source is None:
        raise ValueError(f"{root / subject}: no single {case} scan")
    sidecar = Path(str(scans[0].source).replace(".nii.gz", ".json"))
    return "SimulatedMotion" in json.loads(sidecar.read_text(encoding="utf-8"))


def split_comparisons(root: Path, report: Path) -> list[dict]:
    """One row per (method, model, hidden scan moved or not): the model minus its strongest baseline."""
    best = {}
    for row in csv.DictReader((report / "evaluation.csv").open(encoding="utf-8")):
        if row["role"] == "model" and row["primary"] == "psnr":
            best[(row["method"], row["model"])] = row["best_baseline"]
    cases: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for row in csv.DictReader((report / "cases.csv").open(encoding="utf-8")):
        if (row["method"], row["model"]) in best and row["psnr"]:
            cases.setdefault((row["method"], row["model"], row["subject"], row["case"]), {})[row["entry"]] = float(
                row["psnr"]
            )
    out = []
    for (method, model), baseline in sorted(best.items()):
        for moved in (False, True):
            picked = [
                (subject, entries["model"], entries[baseline])
                for (m, mdl, subject, case), entries in cases.items()
                if (m, mdl) == (method, model) and target_moved(root, subject, case) == moved
            ]
            result = stats.compare([p[1] for p in picked], [p[2] for p in picked], [p[0] for p in picked])
            if result is not None:
                out.append({"method": method, "model": model, "baseline": baseline, "moved": moved, **result.as_dict()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.motion_cases", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the motion test set (testsets/motion)")
    parser.add_argument("--report", required=True, help="the folder of its evaluation (cases.csv, evaluation.csv)")
    args = parser.parse_args(argv)
    print("| method | model | hidden scan | strongest baseline | model minus it (dB) [95 % CI] | won | the model is |")
    print("|---|---|---|---|---:|---:|---|")
    for r in split_comparisons(Path(args.data), Path(args.report)):
        hidden = "moved" if r["moved"] else "still"
        interval = f"{r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        won = f"{r['cases_won']}/{r['n_cases']}"
        print(f"| {r['method']} | `{r['model']}` | {hidden} | {r['baseline']} | {interval} | {won} | {r['decision']} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
