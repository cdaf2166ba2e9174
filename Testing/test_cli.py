"""The ``longdiff`` command line, run as a user runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from LongitudinalDiffusionLib.cli import main

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
TINY = ["--spacing", "6", "-q"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cohort"
    assert main(["-q", "demo-data", str(out), "--subjects", "2", "--spacing", "6", "--no-heart", "--lesions", "1"]) == 0
    return out


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "demo-data", "info", "models", "complete-ages", "synthesize-modality", "interpolate"):
        assert command in text
    with pytest.raises(SystemExit):
        main(["demo-data", "--help"])
    assert "Deterministic by seed" in capsys.readouterr().out


def test_module_runs_as_a_program():
    done = subprocess.run(
        [sys.executable, "-m", "LongitudinalDiffusionLib", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("longdiff ")
    exe = shutil.which("longdiff")
    if exe:  # the console script, when the package is installed (as by the set-up scripts)
        assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout == done.stdout


def test_demo_data_writes_a_bids_cohort_and_a_montage(tmp_path, capsys):
    png = tmp_path / "first.png"
    out = tmp_path / "c"
    assert (
        main(["-q", "demo-data", str(out), "--subjects", "1", "--spacing", "6", "--no-heart", "--montage", str(png)])
        == 0
    )
    assert (out / "dataset_description.json").is_file()
    assert len(list(out.glob("sub-001/ses-*/anat/*_T2w.nii.gz"))) == 7
    import matplotlib.image

    picture = matplotlib.image.imread(png)
    assert picture.shape[0] > 300 and picture.shape[1] > 600  # 5 rows x 7 ages
    assert picture[..., :3].std() > 0.05  # not a blank canvas


def test_info_shows_the_timepoints(dataset, capsys):
    assert main(["info", str(dataset / "sub-002")]) == 0
    out = capsys.readouterr().out
    assert "sub-002: 28 images at 7 ages" in out
    assert "SIMULATED DATA" in out
    assert "months" in out
    lines = [line for line in out.splitlines() if line.startswith("ses-")]
    assert len(lines) == 28
    assert "ce-gadolinium_T1w" in out and "27x32x27" in out and "6x6x6" in out

    assert main(["info", str(dataset), "--subject", "001", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["subject_id"] == "sub-001" and len(data["timepoints"]) == 28


def test_info_reads_a_manifest_of_real_images(tmp_path, capsys):
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "t1.nii")
    img = nib.load(tmp_path / "t1.nii")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].astype(np.float32), img.affine), tmp_path / "t2.nii.gz")
    (tmp_path / "manifest.tsv").write_text("file\tage\tmodality\nt1.nii\t6\tT1w\nt2.nii.gz\t12\tt2\n")
    png = tmp_path / "m.png"
    assert main(["info", str(tmp_path / "manifest.tsv"), "--montage", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2 images at 2 ages" in out and "33x41x25" in out and "T2w" in out
    assert png.stat().st_size > 5000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "{tmp}/nowhere"], "nowhere: not found"),
        (["complete-ages", "{data}/sub-001", "--ages", "-3", "--model", "m", "--out", "{tmp}/o"], "impossible age"),
        (
            ["complete-ages", "{data}/sub-001", "--ages", "30", "--model", "nope", "--out", "{tmp}/o"],
            "no model named 'nope'",
        ),
        (
            [
                "synthesize-modality",
                "{data}/sub-001",
                "--session",
                "ses-01",
                "--modality",
                "PD",
                "--model",
                "m",
                "--out",
                "{tmp}/o",
            ],
            "unknown modality 'PD'",
        ),
        (
            [
                "synthesize-modality",
                "{data}/sub-001",
                "--session",
                "ses-99",
                "--modality",
                "FLAIR",
                "--model",
                "m",
                "--out",
                "{tmp}/o",
            ],
            "not a session of sub-001",
        ),
        (["demo-data", "{data}", "--subjects", "1", *TINY], "not empty"),
        (  # an age in months names a session too: the input is accepted, the model is what is missing
            ["synthesize-modality", "{data}/sub-001", "--session", "6.03", "--modality", "FLAIR", "--model", "nope"]
            + ["--out", "{tmp}/o"],
            "no model named 'nope'",
        ),
        (
            ["synthesize-modality", "{data}/sub-001", "--session", "7.5", "--modality", "FLAIR", "--model", "m"]
            + ["--out", "{tmp}/o"],
            "ages in months: 0.3, 2.9, 6.0",
        ),
        (
            ["interpolate", "{tmp}/a.nii.gz", "{tmp}/b.nii.gz", "--model", "m", "--out", "{tmp}/o"],
            "a.nii.gz: file not found",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_status_2(dataset, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, data=dataset) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("longdiff: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_models_lists_cards_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGDIFF_MODELS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["models"]) == 0
    assert "cwdm-demo" in capsys.readouterr().out  # the bundled demo models
    (tmp_path / "tiny-ddm.json").write_text(json.dumps({"method": "ddm", "trained_on": {"simulated": True}}))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-ddm" in out and "ddm" in out and "yes" in out
    # one malformed card disables only itself: listed as broken with its reason, the rest still there
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    broken = next(line for line in out.splitlines() if line.startswith("broken "))
    assert "BROKEN" in broken and "model card is not valid JSON" in broken
    assert "tiny-ddm" in out and "cwdm-demo" in out
    assert "FLAIR from T1w,T1ce,T2w" in out  # what cwdm-demo generates


@pytest.mark.parametrize("trained_on", ["absent", None, {}], ids=["no-trained_on", "null", "empty"])
def test_a_card_that_does_not_say_what_it_learnt_from_is_listed_as_untrained(tmp_path, capsys, monkeypatch, trained_on):
    """Weights of unknown origin are never presented as trained: `longdiff models` says
    UNTRAINED, the card's ``trained`` (the worker's "trained" flag) is False."""
    from LongitudinalDiffusionLib.catalog import find_model

    monkeypatch.setenv("LONGDIFF_MODELS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    card = {"method": "ddm"} if trained_on == "absent" else {"method": "ddm", "trained_on": trained_on}
    (tmp_path / "mystery.json").write_text(json.dumps(card))
    (tmp_path / "known.json").write_text(json.dumps({"method": "ddm", "trained_on": {"simulated": False}}))
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "UNTRAINED" in rows["mystery"] and "UNTRAINED" not in rows["known"]
    assert find_model("mystery").trained is False and find_model("known").trained is True


# ----------------------------------------------------------------------------- tasks end to end


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalog")
    for method in ("interval", "cwdm", "ddm"):
        assert main(["-q", "init-model", method, "--out", str(folder)]) == 0
    return folder


def test_init_model_and_models_listing(catalog, capsys, monkeypatch):
    monkeypatch.setenv("LONGDIFF_MODELS", str(catalog))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("interval-tiny-untrained", "cwdm-tiny-untrained", "ddm-tiny-untrained"):
        assert name in out
    card = json.loads((catalog / "cwdm-tiny-untrained.json").read_text())
    assert card["trained_on"] is None and len(card["weights"]["sha256"]) == 64
    assert card["grid"]["shape"] == card["config"]["image_size"]


def test_complete_ages_from_the_command_line(dataset, catalog, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGDIFF_MODELS", str(catalog))
    out = tmp_path / "gen"
    argv = ["complete-ages", str(dataset / "sub-001"), "--ages", "7.5", "--model", "interval-tiny-untrained"]
    assert main([*argv, "--out", str(out), "--steps", "3", "--samples", "2", "--capture", "2"]) == 0
    captured = capsys.readouterr()
    # Progress bars per stage; between two scans the model runs from each neighbour.
    assert re.search(r"sample 2/2: 7\.5 mo from [0-9.]+ mo: generate", captured.err) and "3/3" in captured.err
    assert "UNTRAINED" in captured.out
    summary = json.loads((out / "result.json").read_text())
    assert sorted(i["kind"] for i in summary["images"]) == ["mean", "std"]
    mean = nib.load(out / summary["images"][0]["file"])
    ses = sorted((dataset / "sub-001").glob("ses-*/anat/*_T1w.nii.gz"))[0]
    assert mean.shape == nib.load(ses).shape and np.allclose(mean.affine, nib.load(ses).affine)
    assert {s["name"] for s in summary["series"]} == {"timeline", "denoising-7.5mo"}
    # Asking again without --overwrite refuses, and leaves the result alone.
    assert main([*argv, "--out", str(out), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "result.json").exists()
    # --one-sided: the nearest scan only, as in the paper.
    assert main([*argv, "--out", str(tmp_path / "one"), "--steps", "2", "--one-sided"]) == 0
    err = capsys.readouterr().err
    assert "7.5 mo: generate" in err and " from " not in err
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert len(one["provenance"]["extra"]["source_ages"][0]) == 1


def test_synthesize_and_interpolate_from_the_command_line(dataset, catalog, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGDIFF_MODELS", str(catalog))
    ses = dataset / "sub-002" / "ses-03" / "anat"
    t1 = next(ses.glob("*_T1w.nii.gz"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    t1.rename(hidden / t1.name)  # the session loses its T1w
    try:
        argv = ["-q", "synthesize-modality", str(dataset / "sub-002"), "--session", "ses-03", "--modality", "T1w"]
        assert main([*argv, "--model", "cwdm-tiny-untrained", "--out", str(tmp_path / "syn"), "--steps", "2"]) == 0
    finally:
        (hidden / t1.name).rename(t1)
    syn = json.loads((tmp_path / "syn" / "result.json").read_text())
    assert syn["images"][0]["modality"] == "T1w"
    assert nib.load(tmp_path / "syn" / syn["images"][0]["file"]).shape == nib.load(t1).shape

    a, b = sorted(ses.glob("*.nii.gz"))[:2]
    assert main(["-q", "interpolate", str(a), str(b), "--frames", "3", "--model", "ddm-tiny-untrained"]
                + ["--out", str(tmp_path / "frames")]) == 0  # fmt: skip
    frames = json.loads((tmp_path / "frames" / "result.json").read_text())["series"][0]["frames"]
    assert [f["time"] for f in frames] == [0.0, 0.5, 1.0]
    field = nib.load(tmp_path / "frames" / frames[1]["displacement"])
    assert field.shape == (*nib.load(a).shape, 1, 3) and field.header.get_intent()[0] == "vector"


def test_interrupt_leaves_nothing_behind(dataset, catalog, tmp_path):
    """Ctrl-C in the middle of sampling: exit 130, a message, and no output folder."""
    import os
    import signal
    import time

    out = tmp_path / "never"
    env = {**os.environ, "LONGDIFF_MODELS": str(catalog), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "LongitudinalDiffusionLib", "complete-ages", str(dataset / "sub-001")]
    cmd += ["--ages", "7.5", "--model", "interval-tiny-untrained", "--out", str(out), "--steps", "1000"]
    # A terminal delivers Ctrl-C to a process with the default SIGINT disposition; a test run
    # started in the background inherits "ignored", which Python then keeps.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    seen = ""
    deadline = time.time() + 120
    while "/1000" not in seen and time.time() < deadline:  # wait until sampling is under way
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    err = seen + proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted; nothing half-written was kept" in err
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_import_an_upstream_checkpoint(tmp_path, capsys):
    """A DDM checkpoint in the upstream layout (torch.save of a state dict) becomes a catalog model;
    a file that needs pickled code to load is refused."""
    import torch

    from LongitudinalDiffusionLib.models import ddm

    config = ddm.default_config("paper")
    net = ddm.build(config)
    state = {ddm.key_to_upstream(k): v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "I100_E1_gen_G.pth")
    assert main(["import-model", "ddm", str(tmp_path / "I100_E1_gen_G.pth"), "--name", "ddm-up"]
                + ["--out", str(tmp_path / "cat")]) == 0  # fmt: skip
    card = json.loads((tmp_path / "cat" / "ddm-up.json").read_text())
    assert card["method"] == "ddm" and card["import_report"]["loaded"] == len(state)
    from LongitudinalDiffusionLib.catalog import load_model

    loaded = load_model(tmp_path / "cat" / "ddm-up.json")
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value)

    torch.save({"weights": state, "evil": Path("x")}, tmp_path / "pickled.pth")
    assert (
        main(["import-model", "ddm", str(tmp_path / "pickled.pth"), "--name", "bad", "--out", str(tmp_path / "c2")])
        == 2
    )
    assert "pickled.pth" in capsys.readouterr().err and not (tmp_path / "c2" / "bad.json").exists()


def test_demo_data_draws_a_harder_population_on_request(tmp_path, capsys):
    """--variety draws the same subjects further from the template and says so in the
    dataset's description; a value outside [1, 4] is refused before anything is written."""
    from LongitudinalDiffusionLib.imaging import load_image

    args = ["-q", "demo-data", "--subjects", "1", "--spacing", "10", "--no-heart", "--lesions", "0"]
    assert main([*args[:2], str(tmp_path / "plain"), *args[2:]]) == 0
    assert main([*args[:2], str(tmp_path / "varied"), *args[2:], "--variety", "3"]) == 0
    plain = json.loads((tmp_path / "plain" / "dataset_description.json").read_text())
    varied = json.loads((tmp_path / "varied" / "dataset_description.json").read_text())
    assert "variety" not in plain["SimulationParameters"] and varied["SimulationParameters"]["variety"] == 3.0
    scan = "sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz"
    a, b = (load_image(tmp_path / name / scan).array for name in ("plain", "varied"))
    assert a.shape == b.shape and not np.allclose(a, b)  # the same visit, another anatomy
    with pytest.raises(SystemExit) as exc:
        main([*args[:2], str(tmp_path / "bad"), *args[2:], "--variety", "5"])
    assert exc.value.code == 2 and "must lie in [1, 4]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
