"""The simulated cohort: deterministic, complete, physically plausible, honest about itself."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from LongitudinalDiffusionLib.demo import brain, development
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.demo.template import DATA, load_template
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.subject import Modality, load_bids_subject

SMALL = dict(shape=(32, 38, 32), spacing=(5.0, 5.0, 5.0))
MEDIUM = dict(shape=(40, 48, 40), spacing=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "bids"
    return write_cohort(out, CohortSpec(n_subjects=2, seed=3, heart=False, lesion_probability=0.5, **SMALL))


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_template_is_the_icbm_anatomy_with_its_notice():
    tpl = load_template()
    notice = (DATA / "NOTICE.txt").read_text()
    assert "Louis Collins" in notice and "McGill University" in notice
    total = tpl.gm + tpl.wm + tpl.csf
    assert total.max() <= 1.0 + 1e-5
    # An adult brain: about 1.2-1.9 litres of tissue, ventricles of a few tens of ml.
    assert 1200 < (tpl.gm.sum() + tpl.wm.sum()) / 1000 < 1900
    assert 5 < tpl.ventricles.sum() / 1000 < 60


def test_cohort_is_deterministic_by_seed_and_subjects_do_not_depend_on_cohort_size(tmp_path, cohort):
    # Written again in two worker processes: the same bytes as the serial run.
    spec = CohortSpec(n_subjects=2, seed=3, heart=False, lesion_probability=0.5, **SMALL)
    again = write_cohort(tmp_path / "again", spec, jobs=2)
    a, b = _arrays(cohort), _arrays(again)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)

    one = write_cohort(tmp_path / "one", CohortSpec(n_subjects=1, seed=3, heart=False, lesion_probability=0.5, **SMALL))
    c = _arrays(one)
    assert c.keys() == {k for k in a if "sub-001" in k}
    assert all(np.array_equal(a[k], c[k]) for k in c)

    other = write_cohort(tmp_path / "other", CohortSpec(n_subjects=1, seed=4, heart=False, **SMALL))
    d = _arrays(other)
    key = "sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz"
    assert not np.array_equal(a[key], d[key])


def test_cohort_covers_birth_to_two_years_in_four_modalities_and_loads_back(cohort):
    for sid in ("001", "002"):
        subject = load_bids_subject(cohort, subject=sid)
        ages = subject.ages()
        assert len(ages) == len(brain.VISITS)
        assert 0.0 <= ages[0] <= 1.0 and 23.0 <= ages[-1] <= 24.0
        assert all(b > a for a, b in zip(ages, ages[1:]))
        assert set(subject.modalities()) == {Modality.T1W, Modality.T2W, Modality.FLAIR, Modality.T1CE}
        assert len(subject.timepoints) == 4 * len(ages)
        assert subject.meta["age_unit"] == "months"
        assert all(tp.labels is not None and tp.labels.is_file() for tp in subject.timepoints)
        for tp in subject.timepoints:
            assert tp.image.shape == SMALL["shape"]
            assert tp.image.spacing == SMALL["spacing"]
    assert (cohort / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_ce-gadolinium_T1w.nii.gz").is_file()
    assert "index\tname" in (cohort / "derivatives" / "groundtruth" / "dseg.tsv").read_text()


def test_everything_says_simulated(cohort):
    assert json.loads((cohort / "dataset_description.json").read_text())["Simulated"] is True
    assert "SIMULATED" in (cohort / "README.md").read_text()
    sidecars = [p for p in cohort.rglob("sub-*.json") if not p.name.endswith("sessions.json")]
    assert sidecars
    for p in sidecars:
        assert json.loads(p.read_text())["Simulated"] is True, p
    assert (cohort / "NOTICE-ICBM2009a.txt").is_file()
    # Even a NIfTI file separated from its sidecar says so, in its header.
    for p in cohort.rglob("*.nii.gz"):
        assert b"SIMULATED" in nib.load(p).header["descrip"].item(), p


def test_labels_match_images_and_infant_contrast_inverts_with_age():
    subject = brain.draw_subject(np.random.default_rng([11, 0]), "x", lesion_probability=0.0)

    def means(age):
        ses = brain.simulate_session(subject, age, np.random.default_rng(1), **MEDIUM)
        lab = ses.labels.array
        return {m: {k: float(ses.images[m].array[lab == k].mean()) for k in (1, 2, 3)} for m in brain.MODALITIES}

    newborn, toddler = means(0.5), means(24.0)
    # Infantile pattern: white matter darker than grey on T1w, brighter on T2w ...
    assert newborn["T1w"][3] < 0.95 * newborn["T1w"][2]
    assert newborn["T2w"][3] > 1.03 * newborn["T2w"][2]
    # ... and the adult-like pattern by two years.
    assert toddler["T1w"][3] > 1.1 * toddler["T1w"][2]
    assert toddler["T2w"][3] < 0.8 * toddler["T2w"][2]
    for m in (newborn, toddler):
        assert m["T2w"][1] > m["T2w"][2]  # CSF brightest on T2w
        assert m["T1w"][1] < m["T1w"][2]  # and dark on T1w
        assert m["FLAIR"][1] < 0.6 * m["FLAIR"][2]  # and nulled on FLAIR


def test_isointense_phase_lies_between_the_two():
    """T1w white/grey contrast passes through ~1 between 3 and 12 months (the isointense phase)."""
    subject = brain.draw_subject(np.random.default_rng([11, 0]), "x", lesion_probability=0.0)
    ratios = []
    for age in (0.5, 3.0, 6.0, 9.0, 12.0, 24.0):
        ses = brain.simulate_session(subject, age, np.random.default_rng(1), modalities=("T1w",), **MEDIUM)
        lab = ses.labels.array
        img = ses.images["T1w"].array
        ratios.append(img[lab == 3].mean() / img[lab == 2].mean())
    crossing = next(i for i, r in enumerate(ratios) if r > 1.0)
    assert 1 <= crossing <= 4, ratios  # crosses at 3-12 months, not at birth and not never
    assert ratios[0] < ratios[crossing] < ratios[-1] + 0.1


def test_t1_follows_the_field_strength_as_measured():
    """Rooney et al. (MRM 2007) fitted T1 = A * B0**b in white (583, 0.382) and grey matter
    (857, 0.376) from 0.2 to 7 T and found CSF's T1 field independent; the simulator's 3 T
    tissue values go to 1.5 T and 7 T with them, and a 1.5 T spin-echo T1w shows the adult
    white/grey contrast with a shorter T1 (both brighter, the ratio kept above 1)."""
    from dataclasses import replace

    from LongitudinalDiffusionLib.demo import physics

    wm3, gm3 = 583 * 3**0.382, 857 * 3**0.376
    for field, tol in ((1.5, 0.015), (1.0, 0.03), (7.0, 0.05)):
        assert physics.t1_at_field(wm3, field) == pytest.approx(583 * field**0.382, rel=tol)
        assert physics.t1_at_field(gm3, field) == pytest.approx(857 * field**0.376, rel=tol)
    assert physics.t1_at_field(physics.T1_CSF_MS, 1.5) == pytest.approx(physics.T1_CSF_MS)
    assert physics.t1_at_field(wm3, 3.0) == wm3  # the 3 T values unchanged, bit for bit
    with pytest.raises(ValueError, match="field strength"):
        physics.t1_at_field(wm3, 0.0)
    t1w = physics.SEQUENCES["T1w"]
    at15 = replace(t1w, field_t=1.5)
    wm, gm = (
        (physics.signal(s, wm3, 70.0, 0.69) for s in (t1w, at15)),
        (physics.signal(s, gm3, 95.0, 0.8) for s in (t1w, at15)),
    )
    (wm_3t, wm_15), (gm_3t, gm_15) = wm, gm
    assert wm_15 > wm_3t and gm_15 > gm_3t and wm_15 / gm_15 > 1.0
    assert at15.bids_sidecar()["MagneticFieldStrength"] == 1.5 and t1w.bids_sidecar()["MagneticFieldStrength"] == 3


def test_lesion_enhances_only_with_contrast_and_oedema_is_bright_on_t2_and_flair():
    subject = brain.draw_subject(np.random.default_rng([5, 2]), "x", lesion_probability=1.0)
    ses = brain.simulate_session(subject, 24.0, np.random.default_rng(2), **MEDIUM)
    lab = ses.labels.array
    assert (lab == 5).sum() > 5 and (lab == 6).sum() > 5 and (lab == 4).sum() > 0
    img = {m: ses.images[m].array for m in brain.MODALITIES}

    def rel(m, k):
        return img[m][lab == k].mean() / img[m][lab == 3].mean()  # relative to white matter

    assert rel("T1ce", 5) > 1.4 * rel("T1w", 5)  # the rim enhances with gadolinium
    assert rel("T1ce", 3) == pytest.approx(rel("T1w", 3))  # normal brain does not
    assert rel("T2w", 6) > 1.3 and rel("FLAIR", 6) > 1.2  # oedema: bright on T2w and FLAIR
    assert rel("T2w", 4) > rel("T2w", 5)  # necrotic core: fluid, brighter than the rim on T2w


def test_brain_grows_and_ventricles_shrink_relative_to_it():
    subject = brain.draw_subject(np.random.default_rng([8, 1]), "x", lesion_probability=0.0)
    vols = []
    for age in (0.5, 6.0, 12.0, 24.0):
        ses = brain.simulate_session(subject, age, np.random.default_rng(0), modalities=("T1w",), **MEDIUM)
        lab = ses.labels.array
        voxel_ml = np.prod(MEDIUM["spacing"]) / 1000
        vols.append((np.isin(lab, (2, 3))).sum() * voxel_ml)
    assert all(b > a for a, b in zip(vols, vols[1:])), vols
    # Brain tissue roughly doubles in the first year (Knickmeyer et al. 2008).
    assert 1.6 < vols[2] / vols[0] < 2.6, vols
    expected = development.brain_volume_fraction(24.0) / development.brain_volume_fraction(0.5)
    assert vols[3] / vols[0] == pytest.approx(expected, rel=0.15)


def test_newborn_volumes_are_those_of_a_newborn_and_grey_matter_outgrows_white():
    """About 500 ml of brain tissue at birth, 930 ml at one year (Knickmeyer et al. 2008:
    458 and 900 ml), and a cortex that thickens: grey matter grows faster than white."""
    subject = brain.draw_subject(np.random.default_rng([8, 1]), "x", lesion_probability=0.0)
    ml = {}
    for age in (0.5, 12.0):
        fr, _, _ = brain.tissue_fractions(subject, age, **MEDIUM)
        voxel_ml = np.prod(MEDIUM["spacing"]) / 1000
        ml[age] = {t: float(fr[t].sum()) * voxel_ml for t in ("gm", "wm")}
    newborn, one = (sum(ml[a].values()) for a in (0.5, 12.0))
    assert 400 < newborn < 620 and 800 < one < 1100, ml
    gm_growth = ml[12.0]["gm"] / ml[0.5]["gm"]
    wm_growth = ml[12.0]["wm"] / ml[0.5]["wm"]
    assert gm_growth > wm_growth + 0.2, ml


def test_nothing_half_made_is_left_behind(tmp_path):
    out = tmp_path / "cohort"

    def stop(what, done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cohort(out, CohortSpec(n_subjects=1, heart=False, **SMALL), progress=stop)
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_cohort(out, CohortSpec(n_subjects=1, heart=False, **SMALL))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_missing_visits_leave_gaps_but_keep_first_and_last():
    subject = brain.draw_subject(np.random.default_rng([1, 1]), "x", missing_visit_probability=1.0)
    assert len(subject.ages) == 2 and subject.ages[0] < 1.0 and subject.ages[-1] > 23.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_subjects=0), "n_subjects"),
        (dict(shape=(4, 40, 40)), "shape"),
        (dict(spacing=(0.0, 1.0, 1.0)), "spacing"),
        (dict(lesion_probability=1.5), "lesion_probability"),
    ],
)
def test_bad_cohort_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CohortSpec(**kwargs)


def test_ages_outside_the_model_are_refused():
    subject = brain.draw_subject(np.random.default_rng(0), "x")
    with pytest.raises(ValueError, match="outside the simulated range"):
        brain.simulate_session(subject, 30.0, np.random.default_rng(0), **SMALL)
