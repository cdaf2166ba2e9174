"""The benchmarks of the panel's responsiveness and of fast sampling run in their quick
form and say what they measured (no timing is asserted: that is the benchmarks' job).

* ``bench/panel_stall.py --quick``: a local job from the panel (tiny subject, 2 steps),
  the event loop's longest stall per phase;
* ``bench/fewer_steps.py --quick``: one held-out case of a small simulated cohort, DDIM with
  1 and 2 steps against a 20-step DDPM, PSNR/SSIM table, CSV and plot;
* ``bench/sample_spread.py --quick``: the spread of 2 samples at DDIM 1 and 2 steps.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import requires

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, timeout: float) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QT_QPA_PLATFORM": "offscreen", "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("LONGDIFF_MODELS", None)
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_panel_stall_quick(tmp_path):
    requires.slicer()
    requires.module("PySide6", "needs PySide6 (real Qt, offscreen)")
    out = _run([str(ROOT / "bench" / "panel_stall.py"), "--quick"], tmp_path, 300)
    for phase in ("job", "segmenting", "placing"):
        assert f"panel-stall {phase}: " in out, out
    assert "| placing |" in out and "Placing ran in" in out and "panel-stall: measured in" in out


def test_fewer_steps_quick(tmp_path):
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    cohort = write_cohort(  # three subjects on the demo models' 5 mm grid: the last two are held out
        tmp_path / "cohort", CohortSpec(n_subjects=3, seed=11, shape=(32, 40, 32), spacing=(5, 5, 5), heart=False)
    )
    png, table = tmp_path / "steps.png", tmp_path / "steps.csv"
    args = [str(ROOT / "bench" / "fewer_steps.py"), "--quick", "--data", str(cohort), "--methods", "cwdm"]
    out = _run([*args, "--out", str(png), "--csv", str(table)], tmp_path, 300)
    assert "| cwdm | DDPM (reference) | 20 | 20 |" in out and "fewer-steps: 3 settings measured" in out
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [("ddpm", "20", "20"), ("ddim", "1", "1"),
                                                                   ("ddim", "2", "2")]  # fmt: skip
    # a setting meets the target exactly when its numbers say so (20x fewer NFE, at most 0.5 dB lost) ...
    for r in rows[1:]:
        meets = float(r["nfe_reduction"]) >= 20 and float(r["psnr_delta"]) >= -0.5
        assert r["meets_target"] == str(meets), r
    # ... and the verdict names the fastest such setting, or says none met it
    met = [r for r in rows if r["meets_target"] == "True"]
    if met:
        best = min(met, key=lambda r: (int(r["nfe"]), -float(r["psnr_mean"])))
        assert "cwdm: fastest setting meeting the target" in out, out
        assert f"steps {best['steps']}, {best['nfe']} NFE vs 20 " in out, out
    else:
        assert "cwdm: no setting meets the target" in out and "closest: DDIM" in out, out
    assert all(float(r["psnr_mean"]) > 0 for r in rows) and png.stat().st_size > 10_000


def test_sample_spread_quick(tmp_path):
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    cohort = write_cohort(
        tmp_path / "cohort", CohortSpec(n_subjects=3, seed=11, shape=(32, 40, 32), spacing=(5, 5, 5), heart=False)
    )
    out = _run([str(ROOT / "bench" / "sample_spread.py"), "--quick", "--data", str(cohort)], tmp_path, 300)
    assert "| interval | sub-002 " in out, out  # the first held-out subject
    assert "ratio spread DDIM 1 / DDIM 2 interval: " in out and "sample-spread: 1 method(s), 2 samples" in out
