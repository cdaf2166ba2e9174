"""Domain checks on real scans the project never trained on (Colin27, the ITK head, a real
echo cine): refused with the reason before any compute, or run with the warnings shown in
the console, the provenance, the job's events; never cropped or blank without a word."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from realdata import real_scan

from LongitudinalDiffusionLib.cli import main
from LongitudinalDiffusionLib.domain import DomainError, DomainReport, check_images, foreground
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.jobs import JobEvent
from LongitudinalDiffusionLib.subject import Subject, Timepoint
from LongitudinalDiffusionLib.tasks import complete_ages, interpolate_frames

FAST = {"steps": 2, "device": "cpu"}
RAW = {**FAST, "preprocess": False}  # the scans as given: what the domain checks see without preprocessing


def _downsampled(src: Path, out: Path, factor: int = 2, shift_mm=(0.0, 0.0, 0.0), pad=None) -> Path:
    """A real scan at ``factor`` times its voxel size (every ``factor``-th voxel), optionally
    moved in world space or padded (voxels on the low side of each axis)."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)[::factor, ::factor, ::factor]
    affine = img.affine.copy()
    affine[:3, :3] *= factor
    affine[:3, 3] += np.asarray(shift_mm)
    if pad is not None:
        data = np.pad(data, [(p, 0) for p in pad])
        affine[:3, 3] -= affine[:3, :3] @ np.asarray(pad, float)
    nib.save(nib.Nifti1Image(data, affine), str(out))
    return out


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    brain = _downsampled(real_scan("colin27-brain"), root / "ch2bet_2mm.nii.gz")
    ref = nib.load(str(brain))
    empty = np.zeros(ref.shape, np.float32)
    nib.save(nib.Nifti1Image(empty, ref.affine), str(root / "zero.nii.gz"))
    empty[40, 50, 40] = 100.0
    nib.save(nib.Nifti1Image(empty, ref.affine), str(root / "one_voxel.nii.gz"))
    return {
        "brain": brain,
        "moved200": _downsampled(real_scan("colin27-brain"), root / "moved200.nii.gz", shift_mm=(200, 0, 0)),
        "moved25": _downsampled(real_scan("colin27-brain"), root / "moved25.nii.gz", shift_mm=(0, 25, 0)),
        "offcentre": _downsampled(real_scan("colin27-brain"), root / "offcentre.nii.gz", pad=(60, 0, 0)),
        "head": _downsampled(real_scan("colin27"), root / "ch2_2mm.nii.gz"),
        "zero": root / "zero.nii.gz",
        "one_voxel": root / "one_voxel.nii.gz",
    }


def _manifest(folder: Path, rows: list[tuple[Path, float]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file\tage\tmodality"] + [f"{p}\t{a}\tT1w" for p, a in rows]
    (folder / "manifest.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "manifest.tsv"


def _subject(rows: list[tuple[Path, float]]) -> Subject:
    return Subject("sub-real", [Timepoint(a, "T1w", load_image(p), p) for p, a in rows])


@pytest.mark.parametrize(
    ("neighbour", "reason"), [("zero", "is constant"), ("one_voxel", "is nearly empty")], ids=["constant", "empty"]
)
def test_a_blank_neighbour_is_refused_before_any_compute(scans, tmp_path, capsys, neighbour, reason):
    manifest = _manifest(tmp_path / "subj", [(scans[neighbour], 6), (scans["brain"], 12)])
    out = tmp_path / "out"
    code = main(["-q", "complete-ages", str(manifest), "--ages", "9", "--model", "interval-demo", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert reason in err and neighbour in err and "refused to run model 'interval-demo'" in err
    assert not out.exists()  # nothing half-made


def test_visits_200_mm_apart_are_refused_raw_and_aligned_by_preprocessing(scans, tmp_path):
    rows = [(scans["brain"], 12), (scans["moved200"], 18)]
    with pytest.raises(DomainError, match="do not overlap in world space.*200 mm apart") as info:
        complete_ages(_subject(rows), [15], "interval-demo", **RAW)
    assert [f.code for f in info.value.findings] == ["no-overlap"]
    result = complete_ages(_subject(rows), [15], "interval-demo", **FAST)  # preprocessing aligns the visits
    assert not any("apart" in w for w in result.warnings)
    out, near = result.image("generated", 15), load_image(scans["brain"])
    assert out.same_geometry(near)  # on the nearest visit's own grid, where that visit's head is
    gap = np.linalg.norm(foreground(out).center_ras - foreground(near).center_ras)
    assert gap < 6.0, f"the generated head sits {gap:.1f} mm from the visit it was aligned to"


def test_visits_25_mm_apart_are_warned_without_preprocessing(scans):
    rows = [(scans["brain"], 12), (scans["moved25"], 18)]
    result = complete_ages(_subject(rows), [15], "interval-demo", **RAW)
    assert any("25 mm apart" in w and "--preprocess aligns them" in w for w in result.warnings)


def test_a_head_with_skull_that_the_box_would_crop_is_refused_with_its_size(scans):
    with pytest.raises(DomainError) as info:
        complete_ages(_subject([(scans["head"], 12), (scans["head"], 20)]), [15], "interval-demo", **RAW)
    message = str(info.value)
    assert "would fall outside the model's 160 x 200 x 160 mm box" in message and "--preprocess" in message
    assert "cropped" in [f.code for f in info.value.findings]


def test_an_off_centre_head_gets_a_recentred_box_and_an_uncropped_result(scans):
    rows = [(scans["offcentre"], 12), (scans["offcentre"], 20)]
    result = complete_ages(_subject(rows), [15], "interval-demo", **RAW)
    assert any("re-centred on the head's foreground" in w for w in result.warnings)
    out = result.image("generated", 15).array
    fg = foreground(load_image(scans["offcentre"])).mask
    background = float(out.min())
    # the generated head covers the input head: no slab of it left at the background value
    assert (out[fg] > background + 1e-3).mean() > 0.97


def test_ages_outside_the_trained_range_refuse_the_target_and_warn_for_the_inputs(scans):
    subject = _subject([(scans["brain"], 72), (scans["brain"], 216)])
    with pytest.raises(DomainError, match=r"age\(s\) 300 months lie outside"):
        complete_ages(subject, [300], "interval-demo", **RAW)
    result = complete_ages(_subject([(scans["brain"], 6), (scans["brain"], 216)]), [12], "interval-demo", **RAW)
    assert any("216 months lie outside the ages" in w for w in result.warnings)


def test_a_single_slice_echo_frame_is_refused_by_the_3d_frame_model(tmp_path):
    from pydicom import dcmread

    frames = dcmread(real_scan("echo")).pixel_array[..., 0].astype(np.float32)  # luma of 30 real frames
    paths = []
    for i in (0, 10):
        p = tmp_path / f"echo{i}.nii.gz"
        nib.save(nib.Nifti1Image(frames[i].T[:, :, None].copy(), np.diag([0.3, 0.3, 1.0, 1.0])), str(p))
        paths.append(p)
    with pytest.raises(DomainError, match=r"320x240x1 image, a slice rather than a volume"):
        interpolate_frames(paths[0], paths[1], 4, "ddm-demo", device="cpu")


def test_warnings_reach_the_console_the_sidecar_and_the_job_events(scans, tmp_path, caplog):
    events = []
    result = complete_ages(
        _subject([(scans["brain"], 6), (scans["brain"], 12)]), [9], "interval-demo", progress=events.append, **RAW
    )
    warned = [e for e in events if e.stage == "warning"]
    assert any("trained on simulated data only" in e.message for e in warned)
    job_events = [JobEvent.from_progress("job1", e) for e in warned]
    assert {e.kind for e in job_events} == {"log"} and all(e.message.startswith("warning: ") for e in job_events)
    assert any("trained on simulated data only" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    files = result.save(tmp_path / "out")
    image = next(p for p in files if p.name.endswith("_generated.nii.gz"))
    sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
    assert sidecar["extra"]["warnings"] == result.warnings
    assert any("trained on simulated data only" in w for w in sidecar["extra"]["warnings"])


def test_simulated_inputs_are_not_told_the_model_is_simulation_trained(tmp_path):
    from LongitudinalDiffusionLib.demo import SIMULATED_NIFTI_DESCRIPTION

    rng = np.random.default_rng(0)
    array = np.zeros((24, 28, 24), np.float32)
    array[4:20, 4:24, 4:20] = 100 + rng.normal(0, 5, (16, 20, 16))
    images = [Image(array, np.diag([5.0, 5.0, 5.0, 1.0]), {"description": SIMULATED_NIFTI_DESCRIPTION})]
    report = DomainReport("interval-demo")
    card = {"name": "interval-demo", "trained_on": {"simulated": True}, "grid": {"spacing": [5, 5, 5]}}
    check_images(card, images, report)
    assert report.warnings == [] and report.refusals == []
    images[0].meta.clear()
    check_images(card, images, report)
    assert [f.code for f in report.findings] == ["simulated-training"]


def test_one_real_scan_given_as_two_contrasts_is_refused_and_as_two_ages_warned(scans):
    from LongitudinalDiffusionLib.tasks import synthesize_modality

    brain = load_image(scans["brain"])
    visit = [Timepoint(12, m, brain, scans["brain"], "ses-01") for m in ("T1w", "T1ce", "T2w")]
    with pytest.raises(DomainError, match=r"\(T1ce\) and ch2bet_2mm.nii.gz \(T1w\) are the same image"):
        synthesize_modality(Subject("sub-real", visit), "ses-01", "FLAIR", "cwdm-demo", **FAST)
    result = complete_ages(_subject([(scans["brain"], 6), (scans["brain"], 12)]), [9], "interval-demo", **RAW)
    assert any("are the same image: no change between them" in w for w in result.warnings)


def test_a_brain_given_to_the_heart_model_is_refused_with_its_anatomy_named(scans, caplog):
    with pytest.raises(DomainError, match="would fall outside the model's 128 x 128 x 128 mm box"):
        interpolate_frames(scans["brain"], scans["moved25"], 2, "ddm-demo", device="cpu", preprocess=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("outside the 448-1004 mL of the simulated beating-heart phantom" in w for w in warned)


def test_a_head_partly_outside_the_aligned_box_is_warned_and_mostly_outside_refused(scans):
    from LongitudinalDiffusionLib.domain import check_aligned_box

    head = load_image(scans["head"])
    support = np.ones(head.shape, bool)
    support[:, :, :12] = False  # the box ends above the lowest slices (the neck)
    report = DomainReport("interval-demo")
    check_aligned_box([head], [support], report, names=["ch2_2mm.nii.gz"], extent_mm=(160, 200, 160))
    assert [f.code for f in report.findings] == ["outside-box"] and "the result is blank (0) there" in report.warnings[
        0
    ]
    support[:, :, : head.shape[2] // 2 + 10] = False  # most of the head outside: a failed alignment
    report = DomainReport("interval-demo")
    check_aligned_box([head], [support], report, names=["ch2_2mm.nii.gz"], extent_mm=(160, 200, 160))
    assert [f.code for f in report.refusals] == ["cropped-after-alignment"]


def test_a_model_on_a_grid_closer_to_the_scans_is_named(tmp_path):
    """4 mm scans given to the 5 mm SADM: the warning names the installed 4 mm SADM, whose grid
    the scans' detail survives; given to that model, no such warning."""
    brain = _downsampled(real_scan("colin27-brain"), tmp_path / "ch2bet_4mm.nii.gz", factor=4)
    subject = _subject([(brain, 6), (brain, 20)])
    five = complete_ages(subject, [12], "sadm-demo", **RAW)
    hint = [w for w in five.warnings if "closer to these scans" in w]
    assert len(hint) == 1 and "'sadm-demo-4mm'" in hint[0] and "4 mm voxels" in hint[0], five.warnings
    four = complete_ages(subject, [12], "sadm-demo-4mm", **RAW)
    assert not any("closer to these scans" in w for w in four.warnings), four.warnings
