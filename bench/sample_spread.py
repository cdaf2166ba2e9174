"""How much the samples of the missing-age models still differ with few sampler steps.

    python bench/sample_spread.py [--data COHORT] [--methods interval sadm cas-diffcom]
                                  [--steps 1 2 10 50] [--samples 3] [--quick]

The demo models predict x0 (a residual from a reference scan). With one DDIM step their
output is the network's single estimate of x0 from pure noise, which can be accurate (see
``bench/fewer_steps.py``) while the samples of different seeds hardly differ: then the
per-voxel standard deviation that the tasks write as the uncertainty map (``--samples`` > 1)
says little. This benchmark measures that spread against the number of DDIM steps, side by
side in one run: on each held-out subject (sub-015, sub-016) the second missing-age case of
``training/evaluate.py`` is generated ``--samples`` times (seeds 0, 1, ...) per setting, and
the mean standard deviation inside the head (voxels above the 60th percentile of the mean
image) is reported with its ratio to the longest setting's.

Without ``--data`` the cohort is simulated once into a cache folder (as fewer_steps.py does).
``--quick``: one case, interval model, DDIM 1 and 2 steps, 2 samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewer_steps import default_cohort  # noqa: E402

from LongitudinalDiffusionLib.catalog import load_model  # noqa: E402
from LongitudinalDiffusionLib.tasks import SAME_AGE, complete_ages  # noqa: E402
from training.evaluate import _model_modality, _without, age_cases, held_out, open_cohort  # noqa: E402

METHODS = ("interval", "sadm", "cas-diffcom")


def head_spread(mean: np.ndarray, std: np.ndarray) -> float:
    head = mean > np.percentile(mean, 60)
    return float(std[head].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="the simulated cohort (default: simulated into a cache)")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--steps", nargs="+", type=int, help="DDIM steps to compare (default 1 2 10 50)")
    parser.add_argument("--samples", type=int, help="samples per setting (default 3)")
    parser.add_argument("--quick", action="store_true", help="one case, interval, DDIM 1 and 2, 2 samples")
    args = parser.parse_args(argv)
    methods = args.methods or (["interval"] if args.quick else list(METHODS))
    steps = sorted(args.steps or ([1, 2] if args.quick else [1, 2, 10, 50]))
    samples = args.samples or (2 if args.quick else 3)
    if samples < 2:
        parser.error("--samples must be at least 2 (a spread needs two samples)")
    cohort = open_cohort(args.data or default_cohort())
    subjects = held_out(cohort, None)[0][: 1 if args.quick else 2]
    t0 = time.perf_counter()
    print("| method | case | " + " | ".join(f"DDIM {n}" for n in steps) + " |")
    print("|---|---|" + "---:|" * len(steps))
    ratios: dict[str, list[list[float]]] = {}
    for method in methods:
        loaded = load_model(f"{method}-demo")
        modality = _model_modality(loaded)
        for sid in subjects:
            subject = cohort.subject(sid)
            cases = age_cases(subject, modality)
            hidden = cases[min(1, len(cases) - 1)]
            without = _without(subject, lambda tp, age=hidden.age: abs(tp.age - age) < SAME_AGE)
            row = []
            for n in steps:
                result = complete_ages(
                    without,
                    [hidden.age],
                    loaded,
                    modality=modality,
                    sampler="ddim",
                    steps=n,
                    eta=0.0,
                    n_samples=samples,
                    seed=0,
                    device="cpu",
                )
                row.append(head_spread(result.image("mean", hidden.age).array, result.image("std", hidden.age).array))
            ratios.setdefault(method, []).append([v / row[-1] for v in row])
            cells = " | ".join(f"{v:.1f}" for v in row)
            print(f"| {method} | {sid} {hidden.age:.1f} mo | {cells} |", flush=True)
    print()
    for method, rows in ratios.items():
        mean = np.mean(rows, axis=0)
        for n, r in zip(steps[:-1], mean[:-1]):
            print(f"ratio spread DDIM {n} / DDIM {steps[-1]} {method}: {r:.2f}")
    print(f"sample-spread: {len(methods)} method(s), {samples} samples per setting, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
