"""Many subjects in one ``longdiff complete-ages`` call: the model is loaded once, one whole
result folder per subject, a subject that fails does not stop the others, and the thread
count asked for with ``--threads`` is the one the forwards use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from LongitudinalDiffusionLib import catalog
from LongitudinalDiffusionLib.catalog import create_untrained
from LongitudinalDiffusionLib.cli import main
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch") / "cohort"
    write_cohort(root, CohortSpec(n_subjects=3, seed=2, heart=False, shape=(20, 24, 20), spacing=(8, 8, 8)), jobs=1)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    create_untrained("interval", folder, scale="tiny")
    return folder


@pytest.fixture
def loads(monkeypatch):
    """Counts the models the command line loads (the real loader runs)."""
    calls = []
    real = catalog.load_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog, "load_model", counting)
    return calls


def _run(dataset, models, monkeypatch, *extra: str) -> int:
    monkeypatch.setenv("LONGDIFF_MODELS", str(models))
    argv = ["-q", "complete-ages", *extra, "--ages", "7.5", "--model", "interval-tiny-untrained", "--steps", "2"]
    return main(argv)


def test_several_subjects_one_call_one_model_load(dataset, models, tmp_path, monkeypatch, capsys, loads):
    out = tmp_path / "out"
    subs = [str(dataset / f"sub-00{i}") for i in (1, 2, 3)]
    assert _run(dataset, models, monkeypatch, *subs, "--out", str(out)) == 0
    assert len(loads) == 1  # loaded once for the three subjects
    for i in (1, 2, 3):
        summary = json.loads((out / f"sub-00{i}" / "result.json").read_text())
        assert summary["task"] == "complete-ages"
        inputs = [e["file"] for e in summary["provenance"]["inputs"]]
        assert inputs and all(f"sub-00{i}_" in Path(f).name for f in inputs)  # its own scans only
    printed = capsys.readouterr().out
    assert "3 subject(s):" in printed and "SYNTHETIC" in printed
    # the same call again: refused without --overwrite, nothing touched; replaced with it
    before = (out / "sub-001" / "result.json").stat().st_mtime_ns
    assert _run(dataset, models, monkeypatch, *subs, "--out", str(out)) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "sub-001" / "result.json").stat().st_mtime_ns == before
    assert _run(dataset, models, monkeypatch, *subs, "--out", str(out), "--overwrite") == 0


def test_cohort_option_runs_every_subject(dataset, models, tmp_path, monkeypatch, loads):
    out = tmp_path / "cohort-out"
    assert _run(dataset, models, monkeypatch, "--cohort", str(dataset), "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-001", "sub-002", "sub-003"]
    assert len(loads) == 1


def test_a_failing_subject_is_reported_and_the_others_are_written(dataset, models, tmp_path, monkeypatch, capsys):
    # sub-002 given as a manifest that already has a scan at the asked age
    first = sorted((dataset / "sub-002").glob("ses-*/anat/*_T1w.nii.gz"))[0]
    manifest = tmp_path / "sub-x.tsv"
    manifest.write_text(f"file\tage\tmodality\tsubject\n{first}\t7.5\tT1w\tsub-x\n")
    out = tmp_path / "mixed"
    code = _run(dataset, models, monkeypatch, str(dataset / "sub-001"), str(manifest), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "1 of 2 subject(s) failed" in err
    assert (out / "sub-001" / "result.json").is_file()
    assert not any(p.name.startswith("sub-x") for p in out.iterdir())  # nothing half-made


def test_the_same_subject_twice_is_refused_before_any_model(dataset, models, tmp_path, monkeypatch, capsys, loads):
    out = tmp_path / "twice"
    sub = str(dataset / "sub-001")
    assert _run(dataset, models, monkeypatch, sub, sub, "--out", str(out)) == 2
    assert "given twice" in capsys.readouterr().err
    assert not loads and not out.exists()


def test_threads_option_sets_the_forwards_threads(dataset, models, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        out = tmp_path / "threads"
        assert _run(dataset, models, monkeypatch, str(dataset / "sub-001"), "--out", str(out), "--threads", "1") == 0
        assert torch.get_num_threads() == 1
        assert main(["complete-ages", "x", "--ages", "1", "--model", "m", "--out", "o", "--threads", "0"]) == 2
    except SystemExit as exc:  # argparse refuses 0 with status 2
        assert exc.code == 2
    finally:
        torch.set_num_threads(before)
