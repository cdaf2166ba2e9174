"""Tests of LongitudinalDiffusionLib.subject: modalities, ages, manifests, BIDS, provenance.

Everything runs on real files: nibabel's shipped test images and small volumes written
into pytest's ``tmp_path``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from LongitudinalDiffusionLib import __version__
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import Image, load_image
from LongitudinalDiffusionLib.subject import (
    AGE_UNITS,
    Modality,
    Provenance,
    Subject,
    Timepoint,
    bids_modality,
    bids_suffix,
    load_bids_subject,
    load_manifest,
    load_provenance,
    parse_age,
    parse_bids_name,
    parse_modality,
    save_result,
)

NIBABEL_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"
ANATOMICAL = NIBABEL_DATA / "anatomical.nii"
EXAMPLE_4D = NIBABEL_DATA / "example4d.nii.gz"

SHAPE = (8, 9, 10)


def _affine() -> np.ndarray:
    """A non-identity affine: rotated about z, anisotropic voxels, shifted origin."""
    t = np.deg2rad(12.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.2, 1.0, 0.8])
    aff[:3, 3] = [-40.0, 12.5, 7.0]
    return aff


AFFINE = _affine()


def write_volume(path: Path, data: np.ndarray | None = None, affine: np.ndarray = AFFINE, seed: int = 0) -> Path:
    """Write a small float32 NIfTI volume (random unless ``data`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(seed).random(SHAPE, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tsv(*rows: tuple) -> str:
    return "".join("\t".join(str(c) for c in row) + "\n" for row in rows)


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: proof that nothing was written."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------- modalities


@pytest.mark.parametrize(
    "text, expected",
    [
        ("T1w", Modality.T1W),
        ("t1", Modality.T1W),
        (" T1W ", Modality.T1W),
        ("t2", Modality.T2W),
        ("T2w", Modality.T2W),
        ("flair", Modality.FLAIR),
        ("T2-FLAIR", Modality.FLAIR),
        ("t2flair", Modality.FLAIR),
        ("T1ce", Modality.T1CE),
        ("t1c", Modality.T1CE),
        ("T1Gd", Modality.T1CE),
        ("ceT1w", Modality.T1CE),
        ("T1+C", Modality.T1CE),
        ("ce-gadolinium_T1w", Modality.T1CE),
        (Modality.FLAIR, Modality.FLAIR),
    ],
)
def test_parse_modality_aliases(text, expected):
    assert parse_modality(text) is expected


def test_parse_modality_unknown_names_source_and_choices():
    with pytest.raises(InputError) as info:
        parse_modality("PDw", source="scan.nii")
    assert str(info.value) == "scan.nii: unknown modality 'PDw'; expected one of T1w, T2w, FLAIR, T1ce"
    with pytest.raises(InputError, match="missing modality"):
        parse_modality("  ")


def test_modality_is_a_string_enum():
    assert Modality.T1CE == "T1ce"
    assert json.dumps({"m": Modality.T2W}) == '{"m": "T2w"}'


def test_bids_suffix_and_its_reverse():
    assert bids_suffix(Modality.T1CE) == ({"ce": "gadolinium"}, "T1w")
    assert bids_suffix("t2") == ({}, "T2w")
    for modality in Modality:
        entities, suffix = bids_suffix(modality)
        name = "_".join(["sub-01", "ses-01", *(f"{k}-{v}" for k, v in entities.items()), suffix]) + ".nii.gz"
        assert bids_modality(name) is modality
    assert bids_modality("sub-01_ses-01_ce-Gd_run-2_T1w.nii") is Modality.T1CE
    assert bids_modality("sub-01_ses-01_dseg.nii.gz") is None
    assert bids_modality("not a bids name.nii") is None
    entities = {"sub": "01", "ses": "02", "run": "1"}
    assert parse_bids_name("sub-01_ses-02_run-1_T1w.nii.gz") == (entities, "T1w", ".nii.gz")


# ------------------------------------------------------------------------------- ages


@pytest.mark.parametrize(
    "value, unit, months",
    [
        (6, "months", 6.0),
        ("6.5", "mo", 6.5),
        ("2", "years", 24.0),
        (1, "y", 12.0),
        ("30.4375", "days", 1.0),
        (14, "d", 14 / 30.4375),
        (2, "weeks", 14 / 30.4375),
        (1, "W", 7 / 30.4375),
        (0, "month", 0.0),
        (np.float32(3), "Months", 3.0),
    ],
)
def test_parse_age_converts_to_months(value, unit, months):
    assert parse_age(value, unit, "x") == pytest.approx(months)


def test_age_units_table():
    assert AGE_UNITS["days"] == pytest.approx(1 / 30.4375)
    assert AGE_UNITS["weeks"] == pytest.approx(7 / 30.4375)
    assert AGE_UNITS["months"] == 1 and AGE_UNITS["years"] == 12
    assert AGE_UNITS["mo"] == AGE_UNITS["m"] == 1 and AGE_UNITS["y"] == 12


@pytest.mark.parametrize(
    "value, unit, message",
    [
        ("", "months", "src: missing age"),
        (None, "months", "src: missing age"),
        ("n/a", "months", "src: missing age"),
        ("six", "months", "src: age 'six' is not a number"),
        ("6,5", "months", "decimal separator"),
        ("nan", "months", "src: age is NaN"),
        (float("nan"), "months", "src: age is NaN"),
        (-3, "months", "src: impossible age -3 months: ages count from birth"),
        ("-1", "y", "src: impossible age -1 years: ages count from birth"),
        (131, "years", "src: impossible age 131 years"),
        ("inf", "days", "src: impossible age inf days"),
        (3, "fortnights", "src: unknown age unit 'fortnights'"),
    ],
)
def test_parse_age_refuses(value, unit, message):
    with pytest.raises(InputError) as info:
        parse_age(value, unit, "src")
    assert message in str(info.value)


# ------------------------------------------------------------------- subject and timepoint


def _image(seed: int = 0) -> Image:
    return Image(np.random.default_rng(seed).random(SHAPE, dtype=np.float32), AFFINE)


def test_subject_queries():
    tps = [
        Timepoint(12.0, "T1w", _image(1), Path("/d/b.nii"), "ses-02"),
        Timepoint(6.0, Modality.T2W, _image(2), Path("/d/c.nii"), "ses-01"),
        Timepoint(6, "t1", _image(3), "/d/a.nii", "ses-01"),
        Timepoint(24.0, "FLAIR", None, None),
    ]
    subject = Subject("s1", tps, None, {})
    assert subject.ages() == [6.0, 12.0, 24.0]
    assert subject.modalities() == [Modality.T1W, Modality.T2W, Modality.FLAIR]
    assert subject.sessions() == ["ses-01", "ses-02"]
    assert subject.get(6, "T2w").source == Path("/d/c.nii")
    assert subject.get(12.0000001, Modality.T1W, tol=1e-3).session == "ses-02"
    assert subject.timepoints[0].age_label == "6.0 mo"
    with pytest.raises(KeyError, match=r"no T2w image at 12.0 mo.*6.0 mo \(T1w, T2w\); 12.0 mo \(T1w\)"):
        subject.get(12, "T2w")

    rows = subject.table()
    order = [(r["age_months"], r["modality"]) for r in rows]
    assert order == [(6.0, "T1w"), (6.0, "T2w"), (12.0, "T1w"), (24.0, "FLAIR")]
    assert rows[0] == {
        "session": "ses-01",
        "age_months": 6.0,
        "modality": "T1w",
        "shape": SHAPE,
        "spacing": pytest.approx((1.2, 1.0, 0.8)),
        "file": str(Path("/d/a.nii")),
    }
    assert rows[3]["shape"] is None and rows[3]["file"] is None

    data = json.loads(json.dumps(subject.to_dict()))
    assert data["subject_id"] == "s1"
    assert [t["modality"] for t in data["timepoints"]] == ["T1w", "T2w", "T1w", "FLAIR"]
    again = Subject.from_dict(data, load_images=False)
    assert [(t.age, t.modality) for t in again.timepoints] == [(t.age, t.modality) for t in subject.timepoints]


def test_subject_refuses_duplicates_and_emptiness():
    a = Timepoint(6.0, "T1w", None, Path("first.nii.gz"))
    b = Timepoint(6.0, "t1", None, Path("second.nii.gz"))
    with pytest.raises(InputError) as info:
        Subject("s1", [a, b], Path("m.tsv"), {})
    message = str(info.value)
    assert message.startswith("m.tsv:") and "first.nii.gz" in message and "second.nii.gz" in message
    with pytest.raises(InputError, match="no timepoints"):
        Subject("s1", [], None, {})
    with pytest.raises(InputError, match="ages count from birth"):
        Timepoint(-1.0, "T1w", None, None)


# ------------------------------------------------------------------------------ manifest


def test_manifest_with_nibabel_images(tmp_path):
    labels = write_volume(tmp_path / "seg" / "labels.nii.gz", np.ones(SHAPE, np.uint8))
    manifest = write_text(
        tmp_path / "manifest.tsv",
        "# longitudinal scans of one infant\n"
        + tsv(("file", "age_years", "modality", "session", "labels"))
        + "\n"
        + tsv(
            (ANATOMICAL, "0.5", "t1", "ses-01", "seg/labels.nii.gz"),
            (ANATOMICAL, "0.5", "T2w", "ses-01", ""),
            (ANATOMICAL, "1", "T1w", "ses-02", ""),
        ),
    )
    before = snapshot(tmp_path)
    subject = load_manifest(manifest)
    assert snapshot(tmp_path) == before
    assert subject.subject_id == tmp_path.name
    assert subject.ages() == [6.0, 12.0]
    assert subject.sessions() == ["ses-01", "ses-02"]
    tp = subject.get(6, "T1w")
    assert tp.labels == labels and subject.get(6, "T2w").labels is None
    reference = nib.load(str(ANATOMICAL))
    assert tp.image.shape == reference.shape
    np.testing.assert_allclose(tp.image.affine, reference.affine)
    np.testing.assert_allclose(tp.image.array, reference.get_fdata(dtype=np.float32))
    assert subject.meta["age_unit"] == "years" and "age_years" in subject.meta["age_unit_source"]


def test_manifest_4d_image_names_file_and_row(tmp_path):
    manifest = write_text(
        tmp_path / "manifest.tsv",
        tsv(("file", "age", "modality"), (ANATOMICAL, 6, "T1w"), (EXAMPLE_4D, 12, "T1w")),
    )
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert f"{manifest}, row 3" in message and "example4d.nii.gz" in message
    assert "4D image with 2 volumes" in message
    assert snapshot(tmp_path) == before


def test_manifest_units_relative_paths_and_subjects(tmp_path):
    write_volume(tmp_path / "img" / "a.nii.gz", seed=1)
    write_volume(tmp_path / "img" / "b.nii", seed=2)
    manifest = write_text(
        tmp_path / "manifest.tsv",
        tsv(
            ("Subject_ID", "FILE", "Age", "Age_Unit", "Modality"),
            ("sub-01", "img/a.nii.gz", "61", "days", "T1w"),
            ("sub-01", "img/b.nii", "2", "weeks", "flair"),
            ("sub-02", "img/b.nii", "3", "", "T2w"),
        ),
    )
    one = load_manifest(tmp_path, subject_id="01")  # a folder holding manifest.tsv works too
    assert one.subject_id == "01"
    assert one.ages() == pytest.approx([14 / 30.4375, 61 / 30.4375])
    assert one.timepoints[0].source == tmp_path / "img" / "b.nii"
    np.testing.assert_allclose(one.timepoints[0].image.affine, AFFINE, atol=1e-5)
    two = load_manifest(manifest, subject_id="sub-02")
    assert two.ages() == [3.0] and two.meta["age_unit"] == "months"
    assert "default" in two.meta["age_unit_source"]
    with pytest.raises(InputError, match="several subjects"):
        load_manifest(manifest)


def test_manifest_missing_column_lists_columns_found(tmp_path):
    manifest = write_text(tmp_path / "m.tsv", tsv(("file", "when", "modality"), ("a.nii", 3, "T1w")))
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert str(manifest) in message and "missing column age" in message
    assert "columns found: file, when, modality" in message


def test_manifest_comma_separated_is_explained(tmp_path):
    manifest = write_text(tmp_path / "m.tsv", "file,age,modality\na.nii,3,T1w\n")
    with pytest.raises(InputError, match="tab-separated"):
        load_manifest(manifest)


# Each case: (name, make(tmp_path) -> (file cell, age cell, modality cell), expected fragments).
def _corrupt_gzip(tmp: Path) -> str:
    (tmp / "x.nii.gz").write_bytes(np.random.default_rng(1).bytes(2000))
    return "x.nii.gz"


def _truncated(tmp: Path) -> str:
    good = write_volume(tmp / "full.nii")
    raw = good.read_bytes()
    (tmp / "cut.nii").write_bytes(raw[: len(raw) // 2])
    good.unlink()
    return "cut.nii"


def _truncated_gzip(tmp: Path) -> str:
    raw = gzip.compress(write_volume(tmp / "full.nii").read_bytes())
    (tmp / "full.nii").unlink()
    (tmp / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    return "cut.nii.gz"


def test_a_truncated_image_says_how_short_it_is(tmp_path):
    """Measured, not read from nibabel's message: a plain file cut short and a whole gzip
    stream of too few bytes both give the size the header makes and the size there is."""
    raw = write_volume(tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:-100]))
    for name in ("cut.nii", "cut.nii.gz"):
        expected = rf"file is truncated \(its header makes it {len(raw)} bytes, it holds {len(raw) - 100}\)"
        with pytest.raises(InputError, match=expected) as err:
            load_image(tmp_path / name)
        assert err.value.__cause__ is not None  # nibabel's own error kept as the cause


def _four_d(tmp: Path) -> str:
    write_volume(tmp / "four.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    return "four.nii.gz"


def _nan(tmp: Path) -> str:
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    write_volume(tmp / "nan.nii.gz", data)
    return "nan.nii.gz"


def _inf(tmp: Path) -> str:
    data = np.ones(SHAPE, np.float32)
    data[0, 0, 0] = np.inf
    write_volume(tmp / "inf.nii.gz", data)
    return "inf.nii.gz"


def _zero_size(tmp: Path) -> str:
    write_volume(tmp / "empty.nii", np.zeros((8, 0, 10), np.float32))
    return "empty.nii"


@pytest.mark.parametrize(
    "make, problem",
    [
        (_corrupt_gzip, "gzip"),
        (_truncated, "truncated"),
        (_truncated_gzip, "truncated"),
        (_four_d, "4D image with 3 volumes"),
        (_nan, "1 voxels are not finite (1 NaN, 0 Inf)"),
        (_inf, "(0 NaN, 1 Inf)"),
        (_zero_size, "zero-size dimension"),
        (lambda tmp: "missing.nii.gz", "file not found"),
    ],
    ids=["corrupt-gzip", "truncated", "truncated-gzip", "4d", "nan", "inf", "zero-size", "missing-file"],
)
def test_manifest_bad_image(tmp_path, make, problem):
    write_volume(tmp_path / "good.nii.gz")
    bad = make(tmp_path)
    manifest = write_text(
        tmp_path / "manifest.tsv",
        tsv(("file", "age", "modality"), ("good.nii.gz", 3, "T1w"), (bad, 6, "T1w")),
    )
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert f"{manifest}, row 3: " in message
    assert str(tmp_path / bad) in message
    assert problem in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([("a.nii.gz", "", "T1w")], "row 2: missing age"),
        (
            [("a.nii.gz", "3", "T1w"), ("a.nii.gz", "-3", "T2w")],
            "row 3: impossible age -3 months: ages count from birth",
        ),
        ([("a.nii.gz", "3", "T1w"), ("a.nii.gz", "3", "PDw")], "row 3: unknown modality 'PDw'"),
        ([("a.nii.gz", "3 mo", "T1w")], "row 2: age '3 mo' is not a number"),
        ([("", "3", "T1w")], "row 2: missing file name"),
    ],
    ids=["missing-age", "negative-age", "unknown-modality", "unit-in-cell", "no-file"],
)
def test_manifest_bad_rows(tmp_path, rows, fragment):
    write_volume(tmp_path / "a.nii.gz")
    manifest = write_text(tmp_path / "manifest.tsv", tsv(("file", "age", "modality"), *rows))
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    assert f"{manifest}, {fragment}" in str(info.value)
    assert snapshot(tmp_path) == before


def test_manifest_duplicate_age_names_both_files(tmp_path):
    write_volume(tmp_path / "a.nii.gz", seed=1)
    write_volume(tmp_path / "b.nii.gz", seed=2)
    manifest = write_text(
        tmp_path / "manifest.tsv",
        tsv(("file", "age_days", "modality"), ("a.nii.gz", 365.25, "T1w"), ("b.nii.gz", 365.25, "t1")),
    )
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert f"{manifest}, row 3: two T1w images at age 12.0 mo" in message
    assert f"{tmp_path / 'a.nii.gz'} (row 2)" in message and str(tmp_path / "b.nii.gz") in message
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------- BIDS


def make_bids(
    root: Path,
    *,
    units: str | None = "months",
    sidecar: str = "subject",
    ages: tuple[str, str] = ("6", "12"),
) -> Path:
    """A one-subject BIDS dataset with two sessions; returns the subject folder.

    ses-01: T1w, T2w (+ a derivatives dseg); ses-02: T1w, ce-gadolinium T1w, FLAIR.
    ``units`` goes into ``sub-01_sessions.json`` (``sidecar="subject"``) or the dataset's
    ``sessions.json`` (``sidecar="root"``); None states no unit at all.
    """
    write_text(root / "dataset_description.json", json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    sub = root / "sub-01"
    rows = (("session_id", "age", "scanner"), ("ses-01", ages[0], "A"), ("ses-02", ages[1], "A"))
    write_text(sub / "sub-01_sessions.tsv", tsv(*rows))
    if units is not None:
        target = sub / "sub-01_sessions.json" if sidecar == "subject" else root / "sessions.json"
        write_text(target, json.dumps({"age": {"Description": "age at scan", "Units": units}}))
    anat1, anat2 = sub / "ses-01" / "anat", sub / "ses-02" / "anat"
    write_volume(anat1 / "sub-01_ses-01_T1w.nii.gz", seed=1)
    write_text(anat1 / "sub-01_ses-01_T1w.json", "{}")
    write_volume(anat1 / "sub-01_ses-01_acq-fast_T2w.nii.gz", seed=2)
    write_volume(anat1 / "sub-01_ses-01_PDw.nii.gz", seed=3)  # not a supported modality: ignored
    write_volume(anat2 / "sub-01_ses-02_T1w.nii", seed=4)
    write_volume(anat2 / "sub-01_ses-02_ce-gadolinium_T1w.nii.gz", seed=5)
    write_volume(anat2 / "sub-01_ses-02_FLAIR.nii.gz", seed=6)
    write_volume(
        root / "derivatives" / "seg" / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_dseg.nii.gz",
        np.ones(SHAPE, np.uint8),
    )
    return sub


def test_bids_subject_in_months(tmp_path):
    sub = make_bids(tmp_path)
    before = snapshot(tmp_path)
    subject = load_bids_subject(sub)
    assert snapshot(tmp_path) == before
    assert subject.subject_id == "sub-01" and subject.source == sub
    assert subject.ages() == [6.0, 12.0]
    assert subject.sessions() == ["ses-01", "ses-02"]
    assert [(t.age, t.modality.value) for t in subject.timepoints] == [
        (6.0, "T1w"),
        (6.0, "T2w"),
        (12.0, "T1w"),
        (12.0, "FLAIR"),
        (12.0, "T1ce"),
    ]
    t1ce = subject.get(12, "T1ce")
    assert t1ce.source.name == "sub-01_ses-02_ce-gadolinium_T1w.nii.gz"
    np.testing.assert_allclose(t1ce.image.affine, AFFINE, atol=1e-5)
    assert t1ce.image.shape == SHAPE
    dseg = tmp_path / "derivatives" / "seg" / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_dseg.nii.gz"
    assert subject.get(6, "T1w").labels == dseg and subject.get(6, "T2w").labels == dseg
    assert t1ce.labels is None
    assert subject.meta["age_unit"] == "months"
    assert subject.meta["age_unit_source"] == str(sub / "sub-01_sessions.json")


def test_bids_subject_in_days_from_dataset_sidecar(tmp_path):
    make_bids(tmp_path, units="days", sidecar="root", ages=("14", "365.25"))
    for subject in (load_bids_subject(tmp_path, subject="01"), load_bids_subject(tmp_path, subject="sub-01")):
        assert subject.ages() == pytest.approx([14 / 30.4375, 12.0])
        assert subject.meta["age_unit"] == "days"
        assert subject.meta["age_unit_source"] == str(tmp_path / "sessions.json")


def test_bids_subject_without_units_assumes_years(tmp_path, caplog):
    make_bids(tmp_path, units=None, ages=("0.5", "1"))
    with caplog.at_level(logging.WARNING, logger="LongitudinalDiffusionLib.subject"):
        subject = load_bids_subject(tmp_path)  # the only subject of the dataset
    assert subject.ages() == [6.0, 12.0]
    assert subject.meta["age_unit"] == "years" and "assumed" in subject.meta["age_unit_source"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("assuming years" in w and "BIDS default" in w for w in warnings)


def _expect_bids_error(root: Path, *fragments: str, subject: str | None = "01") -> str:
    before = snapshot(root)
    with pytest.raises(InputError) as info:
        load_bids_subject(root, subject=subject)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert snapshot(root) == before
    return message


def test_bids_missing_sessions_tsv(tmp_path):
    sub = make_bids(tmp_path)
    (sub / "sub-01_sessions.tsv").unlink()
    _expect_bids_error(tmp_path, str(sub / "sub-01_sessions.tsv"), "sessions.tsv not found")


def test_bids_sessions_tsv_without_ages(tmp_path):
    sub = make_bids(tmp_path)
    write_text(sub / "sub-01_sessions.tsv", tsv(("session_id", "scanner"), ("ses-01", "A"), ("ses-02", "A")))
    _expect_bids_error(tmp_path, str(sub / "sub-01_sessions.tsv"), "sessions.tsv has no 'age' column; ages are needed")


def test_bids_unlisted_session_folder(tmp_path):
    sub = make_bids(tmp_path)
    write_volume(sub / "ses-03" / "anat" / "sub-01_ses-03_T1w.nii.gz")
    _expect_bids_error(tmp_path, str(sub / "sub-01_sessions.tsv"), "ses-03 is not listed")


def test_bids_empty_age_names_session(tmp_path):
    sub = make_bids(tmp_path, ages=("6", ""))
    _expect_bids_error(tmp_path, f"{sub / 'sub-01_sessions.tsv'}, row 3", "session ses-02: missing age")


def test_bids_negative_age(tmp_path):
    make_bids(tmp_path, ages=("-2", "12"))
    _expect_bids_error(tmp_path, "row 2", "session ses-01: impossible age -2 months: ages count from birth")


def test_bids_two_runs_of_one_modality(tmp_path):
    sub = make_bids(tmp_path)
    write_volume(sub / "ses-01" / "anat" / "sub-01_ses-01_run-2_T1w.nii.gz")
    _expect_bids_error(
        tmp_path, "two T1w images in session ses-01", "sub-01_ses-01_T1w.nii.gz", "sub-01_ses-01_run-2_T1w.nii.gz"
    )


def test_bids_bad_image_is_named(tmp_path):
    sub = make_bids(tmp_path)
    bad = sub / "ses-02" / "anat" / "sub-01_ses-02_FLAIR.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + np.random.default_rng(2).bytes(500))
    _expect_bids_error(tmp_path, str(bad))


def test_bids_unknown_subject_and_unit(tmp_path):
    sub = make_bids(tmp_path, units="fortnights")
    _expect_bids_error(tmp_path, "unknown age unit 'fortnights'")
    _expect_bids_error(tmp_path, "no such subject folder", "sub-01", subject="07")
    assert sub.is_dir()


# ---------------------------------------------------------------------------- provenance


def test_save_result_and_load_provenance(tmp_path):
    source = load_image(write_volume(tmp_path / "in" / "t1.nii.gz"))
    inputs = Provenance.inputs_from([Timepoint(6.0, "T1w", source, tmp_path / "in" / "t1.nii.gz", "ses-01")])
    provenance = Provenance(
        model="demo-model",
        model_version="1.0",
        method="Cas-DiffCom",
        seed=42,
        steps=50,
        sampler="ddim",
        inputs=inputs,
        task="complete_age",
        simulated_inputs=True,
        extra={"target_age_months": 12.0},
    )
    assert provenance.library_version == __version__
    assert datetime.fromisoformat(provenance.created).utcoffset().total_seconds() == 0

    result = Image(source.array * 2, source.affine)
    out = save_result(result, tmp_path / "out" / "t1_12mo.nii.gz", provenance)
    assert out == tmp_path / "out" / "t1_12mo.nii.gz" and out.is_file()
    assert (tmp_path / "out" / "t1_12mo.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["t1_12mo.json", "t1_12mo.nii.gz"]

    saved = load_image(out)
    np.testing.assert_array_equal(saved.affine, source.affine)
    np.testing.assert_allclose(saved.array, result.array)

    back = load_provenance(out)
    assert back == provenance
    assert back.inputs == [{"file": str(tmp_path / "in" / "t1.nii.gz"), "age_months": 6.0, "modality": "T1w"}]
    assert load_provenance(tmp_path / "out" / "t1_12mo.json") == provenance


def test_save_result_refuses_without_writing(tmp_path):
    provenance = Provenance(model="m")
    bad = Image(np.full(SHAPE, np.nan, np.float32), AFFINE)
    with pytest.raises(InputError, match="not finite"):
        save_result(bad, tmp_path / "r.nii.gz", provenance)
    with pytest.raises(InputError, match="NIfTI"):
        save_result(_image(), tmp_path / "r.png", provenance)
    assert snapshot(tmp_path) == {}
    with pytest.raises(InputError, match="no provenance sidecar"):
        load_provenance(tmp_path / "r.nii.gz")
    write_text(tmp_path / "broken.json", "{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_provenance(tmp_path / "broken.json")


def test_the_embedded_icbm_maps_load_through_a_manifest(tmp_path):
    """Real files of another origin: the ICBM 2009a maps shipped inside the library."""
    from LongitudinalDiffusionLib.demo.template import DATA

    (tmp_path / "manifest.tsv").write_text(
        f"file\tage_years\tmodality\n{DATA / 'icbm2009a_gm.nii.gz'}\t30\tT1w\n{DATA / 'icbm2009a_wm.nii.gz'}\t30\tT2w\n"
    )
    subject = load_manifest(tmp_path / "manifest.tsv")
    assert subject.ages() == [360.0]
    gm = subject.get(360, "T1w").image
    assert gm.shape == (155, 192, 161) and gm.spacing == (1.0, 1.0, 1.0) and gm.orientation == "RAS"
    assert 0 <= gm.array.min() and gm.array.max() == 255
