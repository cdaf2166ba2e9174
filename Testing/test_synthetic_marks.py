"""Generated images say so (issue 13): the NIfTI header's descrip, the sidecar, result.json,
the command's last line and the Slicer nodes mark every generated image as synthetic, with
the model and whether it was trained on simulated data; real scans in a timeline stay
unmarked. Real command line, real files read back with nibabel, real MRML (slicer-core)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requires

from LongitudinalDiffusionLib.cli import main
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.subject import Provenance, load_provenance, save_result
from LongitudinalDiffusionLib.tasks import Result

EXPECTED = "SYNTHETIC longdiff interval-demo (sim-trained)"


def _descrip(path: Path) -> str:
    return nib.load(str(path)).header["descrip"].tobytes().rstrip(b"\0").decode("ascii")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`longdiff complete-ages` of a BIDS subject at 7 months, bundled interval-demo, 2 steps,
    2 samples, 2 captured denoising steps; its stdout and output folder."""
    root = tmp_path_factory.mktemp("marks")
    cohort = write_cohort(
        root / "cohort", CohortSpec(n_subjects=1, seed=4, heart=False, shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0))
    )
    out = root / "gen"
    argv = ["-q", "complete-ages", str(cohort / "sub-001"), "--ages", "7", "--model", "interval-demo",
            "--steps", "2", "--samples", "2", "--capture", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return cohort, out, buffer.getvalue()


def test_every_generated_nifti_says_so_in_its_header(run):
    _, out, _ = run
    summary = json.loads((out / "result.json").read_text())
    assert summary["synthetic"] is True and summary["model"] == "interval-demo"
    assert summary["trained_on_simulated_data"] is True
    for entry in summary["images"]:  # mean and std map
        assert _descrip(out / entry["file"]) == EXPECTED
    denoising = [s for s in summary["series"] if s["name"].startswith("denoising")]
    assert denoising and all(_descrip(out / f["file"]) == EXPECTED for s in denoising for f in s["frames"])
    # the completed timeline: the generated visit is marked, the real scans are not
    (timeline,) = [s for s in summary["series"] if s["name"] == "timeline"]
    marks = {f["generated"]: set() for f in timeline["frames"]}
    for f in timeline["frames"]:
        marks[f["generated"]].add(_descrip(out / f["file"]))
        assert f["synthetic"] is f["generated"]
    assert marks == {True: {EXPECTED}, False: {""}}
    assert len(EXPECTED.encode()) <= 80


def test_the_sidecar_starts_with_the_marks(run):
    _, out, _ = run
    summary = json.loads((out / "result.json").read_text())
    for entry in summary["images"]:
        sidecar = json.loads((out / entry["file"].replace(".nii.gz", ".json")).read_text())
        assert list(sidecar)[:3] == ["synthetic", "model", "trained_on_simulated_data"]
        assert sidecar["synthetic"] is True and sidecar["trained_on_simulated_data"] is True
        assert sidecar["model"] == "interval-demo" and sidecar["extra"]["trained_on"]["simulated"] is True


def test_the_last_console_line_says_synthetic(run):
    _, out, stdout = run
    last = stdout.strip().splitlines()[-1]
    assert last == f"2 SYNTHETIC images written to {out} (model interval-demo, trained on simulated data): not scans"


@pytest.mark.parametrize(
    "trained_on, tag, simulated",
    [
        (None, " (untrained)", False),
        ({"dataset": "BraTS 2023", "simulated": False}, "", False),
        ({"dataset": "demo", "simulated": True}, " (sim-trained)", True),
    ],  # fmt: skip
    ids=["untrained", "real-data", "simulated"],
)
def test_save_result_marks_by_what_the_model_learnt_from(tmp_path, trained_on, tag, simulated):
    prov = Provenance(model="m" * 100, extra={"trained_on": trained_on})
    path = save_result(Image(np.ones((4, 5, 6), np.float32), np.eye(4)), tmp_path / "r.nii.gz", prov)
    descrip = _descrip(path)
    assert descrip.startswith("SYNTHETIC longdiff mmm") and descrip.endswith(tag) and len(descrip) <= 80
    sidecar = json.loads((tmp_path / "r.json").read_text())
    assert sidecar["synthetic"] is True and sidecar["trained_on_simulated_data"] is simulated
    assert sidecar.get("untrained_model", False) is (trained_on is None)
    assert load_provenance(path) == prov  # the marks are derived: reading back gives the same provenance
    assert load_image(path).array.sum() == 120


def test_slicer_nodes_read_as_synthetic(run):
    requires.slicer()
    import mrml_harness
    from LongitudinalDiffusionSlicer import mrml, results

    from LongitudinalDiffusionLib.subject import load_subject

    cohort, out, _ = run
    result = Result.load(out)
    app = mrml_harness.bootstrapScene()
    try:
        scene = app.scene
        subject = load_subject(cohort / "sub-001")
        loaded = mrml.loadSubjectIntoScene(subject, scene)
        sceneSubject = mrml.subjectFromVolumes(loaded.volumeNodes, subject.subject_id, scene)
        placed = results.placeResult(result, scene, subject=sceneSubject, tissuePlot=False)
        generated = placed.volumeNodes + placed.uncertaintyNodes
        assert len(generated) == 2
        for node in generated:
            assert node.GetName().startswith("SYNTHETIC ")
            assert node.GetAttribute(results.SYNTHETIC_ATTRIBUTE) == "1"
            assert node.GetAttribute(results.MODEL_ATTRIBUTE) == "interval-demo"
            assert node.GetAttribute(results.SIMULATED_TRAINING_ATTRIBUTE) == "1"
        # the subject's own scans stay as they were
        for node in loaded.volumeNodes:
            assert not node.GetName().startswith("SYNTHETIC") and node.GetAttribute(results.SYNTHETIC_ATTRIBUTE) is None
        # the timeline: generated frames marked, real frames not
        timeline = next(s for s in placed.sequences if s.name.endswith("timeline"))
        sequence = timeline.volumeSequence
        for i, generatedFrame in enumerate(timeline.generated):
            frame = sequence.GetNthDataNode(i)
            if generatedFrame:
                assert frame.GetName().startswith("SYNTHETIC ")
                assert frame.GetAttribute(results.SYNTHETIC_ATTRIBUTE) == "1"
                assert frame.GetAttribute(results.MODEL_ATTRIBUTE) == "interval-demo"
            else:
                assert not frame.GetName().startswith("SYNTHETIC") and frame.GetName().endswith("(real)")
                assert frame.GetAttribute(results.SYNTHETIC_ATTRIBUTE) is None
        assert any(timeline.generated) and not all(timeline.generated)
        # a series of generated frames only (the denoising steps): its proxy reads as synthetic too
        denoising = next(s for s in placed.sequences if "denoising" in s.name)
        proxy = denoising.proxyVolume()
        assert proxy.GetName().startswith("SYNTHETIC ") and proxy.GetAttribute(results.SYNTHETIC_ATTRIBUTE) == "1"
    finally:
        app.close()


def test_an_mrb_longdiff_did_not_write_is_never_replaced(run, tmp_path):
    requires.slicer()
    import mrml_harness
    from LongitudinalDiffusionSlicer import mrml

    from LongitudinalDiffusionLib.errors import InputError

    app = mrml_harness.bootstrapScene()
    try:
        bundle = tmp_path / "scene.mrb"
        mrml.sceneToMrb(app.scene, bundle)
        mrml.sceneToMrb(app.scene, bundle)  # its own bundle: replaced
        mrml.mrbToScene(bundle, app.scene)  # and still a bundle Slicer reads
        foreign = tmp_path / "theirs.mrb"
        foreign.write_bytes(b"a user's scene")
        with pytest.raises(InputError, match="not written by longdiff"):
            mrml.sceneToMrb(app.scene, foreign)
        assert foreign.read_bytes() == b"a user's scene"
    finally:
        app.close()
    # the command line refuses it before any compute, even with --overwrite
    cohort, _, _ = run
    argv = ["-q", "complete-ages", str(cohort / "sub-001"), "--ages", "7", "--model", "interval-demo",
            "--out", str(tmp_path / "gen"), "--overwrite", "--scene", str(foreign)]  # fmt: skip
    assert main(argv) == 2
    assert foreign.read_bytes() == b"a user's scene" and not (tmp_path / "gen").exists()
