"""The benchmarks of the sampling engine (bench/*.py) run in their ``--quick`` form and
print their ratio lines. Only that: timings are never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: bench script -> patterns its output must contain
EXPECTED = {
    "loop_overhead.py": [
        r"ratio step/forward interval: \d+\.\d+",
        r"ratio step/forward sadm: \d+\.\d+",
        r"ratio step/forward cwdm: \d+\.\d+",
        r"ratio step/forward cas-diffcom generator: \d+\.\d+",
        r"ratio step/forward cas-diffcom refiner: \d+\.\d+",
        r"ratio step/forward U-Net 2\.9M 16\^3: \d+\.\d+",
        r"worst overhead: [-+]\d+\.\d+ %",
    ],
    "work_once.py": [
        r"speed-up hoisted vs per step, Cas-DiffCom AsMM guidance encoder: \d+\.\d+x",
        r"speed-up hoisted vs per step, SADM attention module: \d+\.\d+x",
        r"speed-up hoisted vs per step, cWDM condition wavelets: \d+\.\d+x",
        r"speed-up batched vs per step, SADM guidance [\d.]+, batch of 2: \d+\.\d+x",
        r"speed-up batched vs per step, SADM guidance [\d.]+, batch of 2, PyTorch default convolutions: \d+\.\d+x",
    ],
    "memory.py": [
        r"ratio step peak / parameter memory cwdm: \d+\.\d+",
        r"ratio step peak / parameter memory cas-diffcom-refiner: \d+\.\d+",
        r"CUDA path",
    ],
    "scaling.py": [
        *(
            rf"oneDNN speed-up per step, {name} \(\d+x\d+x\d+x\d+x\d+\): \d+\.\d+x, "
            r"max \|diff\| \d\.\de[-+]\d+ after \d+ steps"
            for name in ("interval", "sadm", "cwdm", "cas-diffcom generator", "cas-diffcom refiner")
        ),
        r"k \(time ~ voxels\^k\) interval demo U-Net \(attention\), PyTorch default: -?\d+\.\d+",
        r"k \(time ~ voxels\^k\) interval demo U-Net \(attention\), oneDNN forced: -?\d+\.\d+",
        r"k \(time ~ voxels\^k\) cWDM demo network \(convolutions only\), PyTorch default: -?\d+\.\d+",
        r"k \(time ~ voxels\^k\) cWDM demo network \(convolutions only\), oneDNN forced: -?\d+\.\d+",
        r"plot: \d+ bytes written to a temporary folder",
    ],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_bench_runs_and_reports(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for pattern in EXPECTED[script]:
        assert re.search(pattern, done.stdout), f"{script}: no line matching {pattern!r} in\n{done.stdout}"


def test_the_suite_runs_with_one_command_and_knows_every_benchmark():
    """``bench/run_all.py`` lists every script of bench/ (a new benchmark cannot be left out)
    and runs the chosen ones, reporting each one's status."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "bench"))
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"common", "run_all"}
    assert set(run_all.BENCHMARKS) == scripts
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "loop_overhead", "remote_overhead"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\| loop_overhead \| ok \| \d+ \|", done.stdout)
    assert re.search(r"ratio remote/local: \d+\.\d+", done.stdout)
    assert "bench suite: 2 of 2 benchmarks ran" in done.stdout
