"""Pure-Python helpers of the Slicer module: dependency checks and the sample subject."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LongitudinalDiffusion"))  # as in Slicer: the module's folder is on the path

from LongitudinalDiffusionSlicer import dependencies, sampledata


def test_the_module_requirements_are_met_in_a_full_environment():
    pytest.importorskip("torch", reason="a torch-free environment (scripts/run_compat.sh) lacks monai too")
    assert dependencies.missingRequirements(ROOT / "LongitudinalDiffusion" / "Resources" / "requirements.txt") == []


def test_missing_and_outdated_packages_are_reported(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# a comment\nnibabel>=5.0\n\nnumpy>=999  # far future\nno-such-package-here>=1\n")
    assert dependencies.missingRequirements(reqs) == ["numpy>=999", "no-such-package-here>=1"]
    reqs.write_text("nibabel>=>5\n")
    with pytest.raises(ValueError, match="not a valid requirement"):
        dependencies.missingRequirements(reqs)


def test_sample_subject_is_simulated_once_into_the_cache(tmp_path):
    folder = sampledata.sampleSubjectFolder(tmp_path, coarse=True)  # the 8 mm grid: same files, 10x faster
    assert folder.name == "sub-001" and (folder / "sub-001_sessions.tsv").is_file()
    images = sorted(folder.glob("ses-*/anat/*.nii.gz"))
    assert len(images) == 28
    stamp = {p: os.stat(p).st_mtime_ns for p in images}
    assert sampledata.sampleSubjectFolder(tmp_path, coarse=True) == folder  # second time: nothing simulated again
    assert {p: os.stat(p).st_mtime_ns for p in images} == stamp
