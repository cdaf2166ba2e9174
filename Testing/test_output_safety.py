"""Never lose a file: every way a user could lose data through an output location, refused
before anything is written (issue 13). Real command line, real files, the bundled demo model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from LongitudinalDiffusionLib.cli import main
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.outputs import MARKER, foreign_files, read_marker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "cohort"
    write_cohort(out, CohortSpec(n_subjects=1, seed=5, heart=False, shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0)))
    return out


@pytest.fixture
def subj(cohort, tmp_path) -> Path:
    """A user's folder: three T1w scans and the manifest naming them, as in the issue."""
    folder = tmp_path / "subj"
    folder.mkdir()
    rows = ["file\tage\tmodality"]
    ses = sorted((cohort / "sub-001").glob("ses-*"))
    ages = [line.split("\t") for line in (cohort / "sub-001" / "sub-001_sessions.tsv").read_text().splitlines()[1:]]
    age_of = {s: float(a) for s, a in ((row[0], row[1]) for row in ages)}
    for s in (ses[1], ses[3], ses[5]):
        src = s / "anat" / f"sub-001_{s.name}_T1w.nii.gz"
        shutil.copy(src, folder / f"t1_{s.name}.nii.gz")
        rows.append(f"t1_{s.name}.nii.gz\t{age_of[s.name]:.3f}\tT1w")
    (folder / "manifest.tsv").write_text("\n".join(rows) + "\n")
    (folder / "notes.txt").write_text("a user's own notes, unrelated to longdiff\n")
    return folder


def _between(subj: Path) -> str:
    """An age between the first two scans of the manifest (months)."""
    rows = [line.split("\t") for line in (subj / "manifest.tsv").read_text().splitlines()[1:]]
    return f"{(float(rows[0][1]) + float(rows[1][1])) / 2:.2f}"


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(subj: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "complete-ages", str(subj / "manifest.tsv"), "--ages", _between(subj), "--model", "interval-demo",
            "--steps", "2", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def test_out_is_the_input_folder(subj, tmp_path, capsys):
    """The issue's command: --out is the folder holding the scans and the manifest."""
    before = _snapshot(tmp_path)
    assert main(_run(subj, subj, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "input" in err and str(subj) in err
    assert _snapshot(tmp_path) == before  # scans, manifest and the unrelated notes all still there


def test_out_is_a_parent_of_the_inputs(subj, tmp_path, capsys):
    before = _snapshot(tmp_path)
    assert main(_run(subj, tmp_path, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "holds an input" in err and ("manifest.tsv" in err or "t1_" in err)
    assert _snapshot(tmp_path) == before


def test_out_is_a_link_to_the_input_folder(subj, tmp_path, capsys):
    link = tmp_path / "results-link"
    link.symlink_to(subj, target_is_directory=True)
    before = _snapshot(subj)
    assert main(_run(subj, link, "--overwrite")) == 2
    assert "input" in capsys.readouterr().err
    assert _snapshot(subj) == before and link.is_symlink()


def test_out_with_foreign_files_and_overwrite(subj, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"months of work")
    assert main(_run(subj, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "thesis.docx" in err and "did not write" in err  # the foreign file is named
    assert (out / "thesis.docx").read_bytes() == b"months of work"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]


def test_out_is_an_existing_file_with_overwrite(subj, tmp_path, capsys):
    out = tmp_path / "report.pdf"
    out.write_bytes(b"%PDF a user's file")
    assert main(_run(subj, out, "--overwrite")) == 2
    assert "existing file" in capsys.readouterr().err
    assert out.read_bytes() == b"%PDF a user's file"


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write into: chmod for a normal user; for root (which ignores
    permissions) the immutable attribute, which binds root too."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("running as root without chattr +i: no way to make a folder read-only here")
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)])
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-read-only", "out-under-read-only"])
def test_read_only_out_fails_before_any_compute(subj, read_only, inside):
    """The refusal names the folder and comes before any model is loaded: the process never
    even imported torch (every model runs on it)."""
    out = read_only / "gen" if inside else read_only
    script = (
        "import sys\n"
        "from LongitudinalDiffusionLib.cli import main\n"
        f"rc = main({_run(subj, out)!r})\n"
        "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-MODEL-LOADED')\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write" in proc.stderr and str(read_only) in proc.stderr
    assert "NO-MODEL-LOADED" in proc.stdout
    assert list(read_only.iterdir()) == []


def test_rerun_with_overwrite_replaces_the_tools_own_result(subj, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(_run(subj, out)) == 0
    marker = read_marker(out)
    assert marker["tool"] == "longdiff" and "result.json" in marker["files"]
    first = _snapshot(out)
    assert set(first) - {MARKER} == set(marker["files"])  # it lists every file it wrote, sidecars too
    assert main(_run(subj, out)) == 2  # without --overwrite: refused, left alone
    assert "not empty" in capsys.readouterr().err and _snapshot(out) == first
    assert main(_run(subj, out, "--overwrite", "--seed", "7")) == 0
    assert foreign_files(out) == [] and _snapshot(out) != first  # replaced by the new result
    # a file added to the result folder afterwards makes it no longer the tool's to replace
    (out / "my_notes.txt").write_text("mine")
    assert main(_run(subj, out, "--overwrite")) == 2
    assert "my_notes.txt" in capsys.readouterr().err and (out / "my_notes.txt").read_text() == "mine"


def test_result_save_keeps_the_workers_call_working(subj, tmp_path):
    """Result.save(folder, overwrite=True) (the worker's call) replaces a folder the tool wrote."""
    from LongitudinalDiffusionLib.tasks import Result

    out = tmp_path / "gen"
    assert main(_run(subj, out)) == 0
    result = Result.load(out)
    again = tmp_path / "job"
    result.save(again, overwrite=True)
    result.save(again, overwrite=True)  # a stale result of its own: replaced
    assert foreign_files(again) == []
    (again / "x.txt").write_text("foreign")
    with pytest.raises(InputError, match="x.txt"):
        result.save(again, overwrite=True)


def test_demo_cohort_over_a_foreign_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "patients.csv").write_text("id,age\n1,3\n")
    args = ["-q", "demo-data", str(out), "--subjects", "1", "--no-heart", "--spacing", "8", "--jobs", "1"]
    assert main([*args, "--overwrite"]) == 2
    assert "patients.csv" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["patients.csv"]
    # the demo's own folder, too
    assert main(["-q", "demo", str(out), "--no-models", "--subjects", "1", "--no-heart", "--overwrite"]) == 2
    assert "patients.csv" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["patients.csv"]
    # a scene file the tool did not write: refused before anything is simulated
    scene = tmp_path / "theirs.mrb"
    scene.write_bytes(b"a user's scene")
    demo = tmp_path / "demo"
    assert main(["-q", "demo", str(demo), "--no-models", "--subjects", "1", "--scene", str(scene), "--overwrite"]) == 2
    assert "not written by longdiff" in capsys.readouterr().err
    assert scene.read_bytes() == b"a user's scene" and not demo.exists()
    # a cohort the tool wrote may be replaced
    fresh = tmp_path / "fresh"
    assert main([*args[:2], str(fresh), *args[3:]]) == 0
    assert read_marker(fresh)["kind"] == "cohort"
    assert main([*args[:2], str(fresh), *args[3:], "--overwrite", "--seed", "2"]) == 0
    assert foreign_files(fresh) == []


def test_model_export_never_replaces_a_card_it_did_not_write(tmp_path):
    """Training exports and init-model write through catalog.save_model: same rule."""
    from LongitudinalDiffusionLib.catalog import check_model_target, create_untrained

    folder = tmp_path / "models"
    card = create_untrained("ddm", folder, scale="tiny", name="mine")
    assert create_untrained("ddm", folder, scale="tiny", name="mine", seed=1) == card  # its own: replaced
    (folder / "theirs.json").write_text(json.dumps({"method": "ddm", "note": "hand-written"}))
    with pytest.raises(InputError, match="not a model card longdiff wrote"):
        create_untrained("ddm", folder, scale="tiny", name="theirs")
    assert json.loads((folder / "theirs.json").read_text())["note"] == "hand-written"
    (folder / "lonely.safetensors").write_bytes(b"weights from elsewhere")
    with pytest.raises(InputError, match="without a card"):
        check_model_target(folder, "lonely")
    assert not (folder / "lonely.json").exists()
    (folder / "mine.safetensors").write_bytes(b"swapped")  # weights that no longer match their card
    with pytest.raises(InputError, match="differs from what its card says"):
        create_untrained("ddm", folder, scale="tiny", name="mine")
    assert (folder / "mine.safetensors").read_bytes() == b"swapped"


def test_training_refuses_a_foreign_export_before_training(tmp_path):
    """training/train.py checks its export target before the first step."""
    sys.path.insert(0, str(ROOT))
    try:
        from training import train
    finally:
        sys.path.remove(str(ROOT))
    config, _ = train.load_config("demo", "ddm")
    card = f"{config['export']['name']}.json"
    export = tmp_path / "export"
    export.mkdir()
    (export / card).write_text("{}")  # a file the tool did not write, where the card would go
    out = tmp_path / "run"
    argv = ["--method", "ddm", "--config", "demo", "--data", str(tmp_path / "no-data-needed"), "--out", str(out)]
    assert train.main([*argv, "--export", str(export), "--device", "cpu", "--no-progress"]) == 2
    assert (export / card).read_text() == "{}"
    assert not out.exists()  # refused before the data, the network or the run folder
