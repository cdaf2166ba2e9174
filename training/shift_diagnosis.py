"""Where a resolution shift hurts a missing-age model: its inputs, or the grid its output is made on.

``python -m training.shift_diagnosis --model sadm-demo --shifted valsets/4mm --native valsets/in-distribution``
hides each interior scan of the shifted cohort (the same subjects as the native one, scanned at
another resolution) and scores against the shifted truth:

* ``model``: the model given the shifted scans (what a user gets);
* ``model from native inputs``: the model given the native scans of the same visits, its result
  taken onto the shifted truth's voxels - the same output grid, in-distribution inputs;
* ``registration interpolation``: the strongest classical baseline, on the shifted scans;
* ``model grid ceiling``: the shifted truth through the model's grid and back.

``model`` close to ``model from native inputs`` means the inputs are not the problem (training
with resolution augmentation would not help); a ceiling below the baseline means no model of
that grid can beat it. Made for the validation split (a choice is made on it), never the test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from LongitudinalDiffusionLib.catalog import load_model
from LongitudinalDiffusionLib.subject import load_bids_subject, parse_modality
from LongitudinalDiffusionLib.tasks import complete_ages

from . import baselines as bl
from . import evaluate as ev
from .data import open_cohort

NATIVE = "model from native inputs"


def diagnose(model: str, shifted: Path, native: Path, ids: list[str]) -> list[dict[str, float]]:
    """One row of PSNRs per hidden scan (entries as in the module's docstring)."""
    loaded = load_model(model)
    modality = parse_modality((loaded.card.card.get("modalities") or ["T1w"])[0])
    run = ev.Run(None, 1, 0, torch.device("cpu"))
    rows = []
    for sid in ids:
        moved, home = load_bids_subject(shifted / sid), load_bids_subject(native / sid)
        for hidden in ev.age_cases(moved, modality):
            case = ev.run_age_case(moved, hidden, loaded, run)
            age, truth = hidden.age, bl.image_of(hidden)
            without = ev._without(home, lambda tp, age=age: abs(tp.age - age) < ev.SAME_AGE)
            result = complete_ages(without, [age], loaded, modality=modality, **run.kwargs())
            case.add(NATIVE, result.image(run.kind, age), truth)
            rows.append({"subject": sid, "age": age} | {k: v["psnr"] for k, v in case.scores.items()})
            print(f"{sid} {age:6.2f} mo " + " ".join(f"{k}={v['psnr']:.2f}" for k, v in case.scores.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.shift_diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a missing-age model (catalog name or card)")
    parser.add_argument("--shifted", required=True, type=Path, help="the cohort at the shifted resolution")
    parser.add_argument("--native", required=True, type=Path, help="the same subjects as the model's training data")
    parser.add_argument("--held-out", nargs="*", default=None, help="subjects (default: every one of --shifted)")
    args = parser.parse_args(argv)
    ids = args.held_out or open_cohort(args.shifted).subjects
    rows = diagnose(args.model, args.shifted, args.native, ids)
    entries = ["model", NATIVE, ev.REGISTRATION_INTERPOLATION, ev.GRID_CEILING]
    print(f"| {args.model} on {args.shifted.name} ({len(rows)} hidden scans) | mean PSNR (dB) |")
    print("|---|---:|")
    for entry in entries:
        print(f"| {entry} | {np.mean([r[entry] for r in rows]):.2f} |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
