"""The README's Python examples run as written (on a small simulated cohort)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_has_library_and_slicer_examples():
    blocks = _python_blocks()
    assert any("slicer." in b for b in blocks)  # the Slicer console example
    assert any("slicer" not in b for b in blocks)  # the plain-Python example


@pytest.mark.parametrize("block", [b for b in _python_blocks() if "slicer" not in b])
def test_library_example_runs(block, tmp_path, monkeypatch):
    write_cohort(
        tmp_path / "cohort", CohortSpec(n_subjects=1, heart=False, shape=(20, 24, 20), spacing=(8.0, 8.0, 8.0))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # our own documentation
    if "back" in namespace:  # the model-grid example
        back, t2 = namespace["back"], namespace["t2"]
        assert back.shape == t2.shape and (back.affine == t2.affine).all()
    else:  # the task example
        subject = namespace["subject"]
        ref = subject.get(subject.ages()[0], "T1w").image
        assert namespace["mean"].same_geometry(ref) and namespace["spread"].array.max() > 0
        assert sum(namespace["timeline"].generated) == 1
        assert (tmp_path / "gen" / "result.json").exists() and namespace["events"][-1].stage == "complete-ages"
