"""Start-up paid once: N missing-age runs in one ``longdiff`` call against N separate calls.

    python bench/warm_runs.py [--subjects 10] [--rounds 3] [--steps N] [--quick]

Simulates a small cohort on the bundled demo models' grid (32x40x32 voxels of 5 mm), then
times, as real subprocesses of this interpreter, in alternating rounds:

* **one call**: ``longdiff complete-ages sub-001 ... sub-0NN --ages A --model interval-demo
  --out OUT`` (the model loaded once, one result folder per subject);
* **separate calls**: ``longdiff complete-ages sub-0XX --ages A ...`` once per subject, one
  after the other (what a script looping over a cohort did before).

Both generate the same images (checked: the first subject's result files are compared).
Prints the wall time of each side per round, the ratio separate / one call per round and
its median and spread, and the share of a separate call spent outside the runs (interpreter
start, imports, model load, exit). ``--quick``: 3 subjects, 2 steps, 1 round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def longdiff(*args: str, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "LongitudinalDiffusionLib", "-q", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model card's, 10)")
    parser.add_argument("--model", default="interval-demo")
    parser.add_argument("--quick", action="store_true", help="3 subjects, 2 steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.rounds, args.steps = 3, 1, 2
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
    from LongitudinalDiffusionLib.imaging import load_image

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = tmp / "cohort"
        spec = CohortSpec(n_subjects=args.subjects, seed=7, heart=False, shape=(32, 40, 32), spacing=(5.0,) * 3)
        write_cohort(cohort, spec, jobs=2)
        subjects = sorted(str(p) for p in cohort.glob("sub-*"))
        common = ["--ages", "7.5", "--model", args.model] + (["--steps", str(args.steps)] if args.steps else [])
        print(f"{len(subjects)} subjects, 32x40x32, model {args.model}, one missing age (7.5 months) each")

        def one_call(r: int) -> float:
            return longdiff("complete-ages", *subjects, *common, "--out", str(tmp / f"one-{r}"), env=env)

        def separate(r: int) -> float:
            return sum(
                longdiff("complete-ages", s, *common, "--out", str(tmp / f"sep-{r}" / Path(s).name), env=env)
                for s in subjects
            )

        times: dict[str, list[float]] = {"one call": [], "separate calls": []}
        for r in range(args.rounds):
            order = [("one call", one_call), ("separate calls", separate)]
            for name, fn in order if r % 2 == 0 else reversed(order):
                times[name].append(fn(r))
            print(
                f"round {r + 1}: one call {times['one call'][-1]:.1f} s, "
                f"separate calls {times['separate calls'][-1]:.1f} s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        # the same images either way
        first = Path(subjects[0]).name
        a = sorted((tmp / "one-0" / first).glob("*.nii.gz"))
        b = sorted((tmp / "sep-0" / first).glob("*.nii.gz"))
        diff = max(float(np.max(np.abs(load_image(x).array - load_image(y).array))) for x, y in zip(a, b))
        ratios = [s / o for s, o in zip(times["separate calls"], times["one call"])]
        one, sep = statistics.median(times["one call"]), statistics.median(times["separate calls"])
        n = len(subjects)
        print()
        print("| way | wall (median) | per subject |")
        print("|---|---:|---:|")
        print(f"| one call, {n} subjects | {one:.1f} s | {one / n:.2f} s |")
        print(f"| {n} separate calls | {sep:.1f} s | {sep / n:.2f} s |")
        print(f"start-up paid per separate call: {(sep - one) / n:.2f} s")
        print(f"same images: max |diff| {diff:.1e} over {len(a)} file(s) of {first}")
        print(
            f"ratio separate/one call: {statistics.median(ratios):.2f} "
            f"(spread {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} round(s))"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
