"""The smaller defects of issue 13, one test each: a broken model card disables only itself;
SADM's output lands on the nearest real scan's geometry; more steps than the model's chain
is said aloud; `longdiff info` shows '-' for a manifest without sessions; the bundled
models' README names them; `longdiff models` shows what cwdm-demo generates."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from LongitudinalDiffusionLib.catalog import BUNDLED_DIR, find_model, scan_models
from LongitudinalDiffusionLib.cli import main
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.subject import Subject, Timepoint, load_bids_subject

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("defects") / "cohort"
    return write_cohort(out, CohortSpec(n_subjects=1, seed=2, heart=False, shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0)))


def test_a_malformed_card_disables_only_itself(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LONGDIFF_MODELS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "typo.json").write_text('{"method": "interval",}')
    (tmp_path / "nomethod.json").write_text(json.dumps({"name": "nomethod"}))
    with caplog.at_level(logging.WARNING, logger="LongitudinalDiffusionLib.catalog"):
        models, broken = scan_models()
    assert "interval-demo" in {m.name for m in models}  # the bundled models still work
    assert find_model("cwdm-demo").method == "cwdm"
    reasons = {b.name: b.reason for b in broken}
    assert "not valid JSON" in reasons["typo"] and "no 'method'" in reasons["nomethod"]
    assert str(tmp_path / "typo.json") in caplog.text  # the warning names the file
    with pytest.raises(InputError, match="model 'typo' is broken: model card is not valid JSON"):
        find_model("typo")


def test_sadm_output_lands_on_the_nearest_scans_geometry(cohort):
    """Two scans on different grids; the missing age is nearer the second, so the output takes
    the second scan's shape and affine (docs: 'on the geometry of the nearest real scan')."""
    from LongitudinalDiffusionLib.tasks import complete_ages

    full = load_bids_subject(cohort, subject="001")
    t1 = [tp for tp in full.timepoints if tp.modality.value == "T1w"]
    first, second = t1[1], t1[3]
    img = load_image(second.source)
    # the second scan on another grid: cropped by a few voxels, origin moved to match
    crop = (slice(2, -2), slice(3, -1), slice(1, -3))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([2, 3, 1]) + img.affine[:3, 3]
    other = Image(np.ascontiguousarray(img.array[crop]), affine, {"source": "second"})
    subject = Subject(
        "sub-001",
        [
            Timepoint(first.age, "T1w", load_image(first.source), first.source),
            Timepoint(second.age, "T1w", other, None),
        ],
    )
    target = second.age - 0.25 * (second.age - first.age)  # nearer the second scan
    result = complete_ages(subject, [target], "sadm-demo", steps=2, device="cpu")
    out = result.image("generated", target)
    assert out.shape == other.shape != load_image(first.source).shape
    np.testing.assert_allclose(out.affine, other.affine)


def test_more_steps_than_the_chain_are_said_aloud(caplog):
    from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule, sample

    schedule = Schedule.linear(1e-4, 0.02, 10)
    calls = []

    def denoiser(x, t, cond):
        calls.append(1)
        return torch.zeros_like(x)

    with caplog.at_level(logging.WARNING):
        sample(denoiser, (1, 1, 4, 4, 4), schedule, "epsilon", SamplerSettings(name="ddim", steps=100000000, seed=0))
    assert "100000000 steps asked, but the model's chain has 10: sampling with 10 steps" in caplog.text
    assert len(calls) == 10


def test_info_shows_a_dash_for_a_manifest_without_sessions(cohort, tmp_path, capsys):
    full = load_bids_subject(cohort, subject="001")
    rows = ["file\tage\tmodality"]
    for tp in [tp for tp in full.timepoints if tp.modality.value == "T1w"][:2]:
        rows.append(f"{tp.source}\t{tp.age}\tT1w")
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    assert main(["info", str(manifest)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("session")) + 2 :]
    assert len(table) == 2 and all(line.startswith("-  ") for line in table)
    assert "None" not in out


def test_the_models_readme_names_the_bundled_models():
    text = (BUNDLED_DIR / "README.md").read_text()
    assert "none are bundled" not in text.lower()
    for card in sorted(BUNDLED_DIR.glob("*.json")):
        assert f"`{card.stem}`" in text


def test_models_shows_what_cwdm_demo_generates(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LONGDIFF_MODELS", str(tmp_path))
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cwdm-demo "))
    assert "FLAIR from T1w,T1ce,T2w" in row
    assert main(["models", "--json"]) == 0
    cards = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert cards["cwdm-demo"]["generates"] == "FLAIR from T1w,T1ce,T2w"
