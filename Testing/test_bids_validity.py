"""The simulated cohort is a valid BIDS dataset, according to the official validator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

ROOT = Path(__file__).resolve().parents[1]


def _validator() -> str | None:
    for candidate in (
        os.environ.get("BIDS_VALIDATOR"),
        str(ROOT / ".tools" / "node_modules" / ".bin" / "bids-validator"),
        shutil.which("bids-validator"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_cohort_passes_the_bids_validator(tmp_path):
    exe = _validator()
    if exe is None:
        if os.environ.get("LONGDIFF_REQUIRE_TOOLS") == "1":
            pytest.fail("bids-validator is not installed (scripts/setup_tools.sh installs it)")
        pytest.skip("bids-validator not installed (run scripts/setup_tools.sh)")
    out = write_cohort(
        tmp_path / "bids",
        CohortSpec(n_subjects=2, seed=0, shape=(20, 24, 20), spacing=(8.0, 8.0, 8.0), lesion_probability=0.5),
    )
    done = subprocess.run([exe, str(out), "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout)
    errors = [
        (e["key"], [f["file"]["relativePath"] for f in e.get("files", [])][:3]) for e in report["issues"]["errors"]
    ]
    assert errors == []
    summary = report["summary"]
    assert summary["subjects"] == ["001", "002"]
    assert len(summary["sessions"]) == 7
    assert {"T1w", "T2w", "FLAIR"} <= set(summary["dataTypes"])
