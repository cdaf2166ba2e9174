"""The three-way split of the demo models: every card names its train, validation and test
subjects; the test subjects are new people of the simulator; evaluation refuses a test
subject that a card trained or validated on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from LongitudinalDiffusionLib.catalog import load_model
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.imaging import load_image
from training import evaluate as ev
from training import test_sets
from training.data import open_cohort, simulation_seed, split, split_conflicts

torch.set_num_threads(1)
# coarse hearts clip the phantom's ventricle (its volumes are not used here)
pytestmark = pytest.mark.filterwarnings("ignore:the 128 x 128 x 120 mm field of view")
MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"
CARDS = sorted(MODELS.glob("*-demo*.json"))  # every bundled demo model, ddm-demo-2mm too


def _card(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", CARDS, ids=[p.stem for p in CARDS])
def test_every_demo_card_records_a_disjoint_three_way_split(path):
    card = _card(path)
    splits = card["splits"]
    train, val, test = (set(splits[k]) for k in ("train", "validation", "test"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    # the split the weights were trained with: training's rule (last ones held out) on train + validation
    assert split(sorted(train | val), len(val)) == (sorted(train), sorted(val))
    assert sorted(val) == card["trained_on"]["held_out"] and len(train) == card["trained_on"]["subjects"]
    assert splits["simulator_seed"] == 11 and "--seed 11" in splits["dataset"]
    # test ids come after every id the training cohort drew: new indices of the same seed
    assert min(test) > max(train | val)
    # the weights are untouched: their checksum still matches the card
    weights = MODELS / card["weights"]["file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["weights"]["sha256"]


def test_test_subjects_are_the_simulators_next_subjects(tmp_path):
    """Subject k of a seed is the same whether the cohort or the test-set writer draws it, so
    the test set's sub-002 below is what a 2-subject cohort's sub-002 is - and a test set that
    starts after the training cohort holds people it never had."""
    spacing = (10.0, 10.0, 10.0)
    shape = test_sets._shape(test_sets.FOV_MM, spacing)
    cohort = write_cohort(tmp_path / "cohort", CohortSpec(n_subjects=2, seed=5, shape=shape, spacing=spacing))
    out = test_sets.write_test_set(
        tmp_path / "test",
        seed=5,
        first=1,
        n_subjects=1,
        first_heart=0,
        n_hearts=1,
        spacing=spacing,
        heart_spacing=(8.0, 8.0, 8.0),
        site="A",
    )
    assert open_cohort(out).subjects == ["sub-002"] and open_cohort(out).hearts == ["sub-heart01"]
    name = "sub-002/ses-01/anat/sub-002_ses-01_T1w.nii.gz"
    np.testing.assert_array_equal(load_image(out / name).array, load_image(cohort / name).array)
    assert not np.array_equal(load_image(out / name).array, load_image(cohort / name.replace("002", "001")).array)
    assert simulation_seed(out) == 5
    described = json.loads((out / "dataset_description.json").read_text(encoding="utf-8"))
    assert described["SimulationParameters"]["test_split"]["subjects"] == ["sub-002"]
    # site B: same anatomy, other sequence timings and more noise
    brains_only = dict(seed=5, first=1, n_subjects=1, first_heart=0, n_hearts=0, spacing=spacing, heart_spacing=False)
    site_b = test_sets.write_test_set(tmp_path / "site-b", site="B", **brains_only)
    sidecar = json.loads((site_b / name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
    assert sidecar["RepetitionTime"] == pytest.approx(0.45) and sidecar["EchoTime"] == pytest.approx(0.02)
    assert not np.array_equal(load_image(site_b / name).array, load_image(out / name).array)
    assert test_sets.physics.SEQUENCES["T1w"].tr == 600.0  # the site's settings do not leak out
    # site C: site A's protocol at 1.5 T - the same anatomy, shorter tissue T1, half the SNR
    site_c = test_sets.write_test_set(tmp_path / "site-c", site="C", **brains_only)
    sidecar_c = json.loads((site_c / name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
    sidecar_a = json.loads((out / name.replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
    assert sidecar_a["MagneticFieldStrength"] == 3 and sidecar_c["MagneticFieldStrength"] == 1.5
    assert sidecar_c["RepetitionTime"] == sidecar_a["RepetitionTime"]
    dseg = "derivatives/groundtruth/" + name.replace("_T1w.nii.gz", "_dseg.nii.gz")
    np.testing.assert_array_equal(load_image(site_c / dseg).array, load_image(out / dseg).array)
    assert not np.array_equal(load_image(site_c / name).array, load_image(out / name).array)
    assert test_sets.physics.SEQUENCES["T1w"].field_t == 3.0
    with pytest.raises(ValueError, match="unknown site 'Z'"):
        test_sets.write_test_set(tmp_path / "z", site="Z", **brains_only)
    assert not (tmp_path / "z").exists() and not (tmp_path / ".z.partial").exists()


def test_split_conflicts_follow_the_population():
    splits = {"simulator_seed": 11, "train": ["sub-001", "sub-002"], "validation": ["sub-003"], "test": ["sub-004"]}
    assert split_conflicts(["sub-004"], splits, 11) == {}
    assert split_conflicts(["sub-002", "sub-003", "sub-004"], splits, 11) == {
        "train": ["sub-002"],
        "validation": ["sub-003"],
    }
    assert split_conflicts(["sub-003"], splits, 11, evaluated_as="validation") == {}
    assert split_conflicts(["sub-001", "sub-003"], splits, 11, evaluated_as="validation") == {"train": ["sub-001"]}
    # a dataset that declares no seed is taken to be the card's; another seed is other people
    assert split_conflicts(["sub-001"], splits, None) == {"train": ["sub-001"]}
    assert split_conflicts(["sub-001"], splits, 12) == {}


@pytest.fixture(scope="module")
def demo_models():
    return {m: load_model(MODELS / f"{m}-demo.json", device="cpu") for m in ("cwdm", "ddm")}


def test_evaluation_refuses_training_and_validation_subjects_as_a_test(tmp_path, demo_models):
    """A cohort of the demo models' seed holds their training subjects under the same ids:
    evaluating on them as a test is refused, naming the split; the test subjects pass."""
    spec = CohortSpec(n_subjects=2, seed=11, shape=(16, 20, 16), spacing=(10.0, 10.0, 10.0), n_hearts=1)
    cohort = open_cohort(write_cohort(tmp_path / "seed11", spec))
    with pytest.raises(InputError, match=r"sub-001, sub-002 in the train split of `cwdm-demo`"):
        ev.check_split(cohort, cohort.subjects, demo_models, "test")
    with pytest.raises(InputError, match=r"sub-heart01 in the train split of `ddm-demo`"):
        ev.check_split(cohort, ["sub-heart01"], demo_models, "test")
    # the whole evaluation stops before any model runs, with the message on the command line
    with pytest.raises(InputError, match="cannot evaluate as test"):
        ev.evaluate(demo_models, cohort.root, ["sub-001"], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    # without named subjects the default is the cards' test split, which this cohort lacks
    with pytest.raises(InputError, match="none of the models' test subjects"):
        ev.held_out(cohort, None, demo_models)
    # the same ids drawn with another seed are other people
    other = open_cohort(write_cohort(tmp_path / "seed12", CohortSpec(**{**spec.__dict__, "seed": 12})))
    ev.check_split(other, other.subjects, demo_models, "test")


def test_validation_subjects_may_be_scored_as_validation_only(tmp_path, demo_models):
    out = test_sets.write_test_set(
        tmp_path / "val",
        seed=11,
        first=14,
        n_subjects=3,
        first_heart=5,
        n_hearts=2,
        spacing=(10.0, 10.0, 10.0),
        heart_spacing=(8.0, 8.0, 8.0),
        site="A",
    )
    cohort = open_cohort(out)
    assert cohort.subjects == ["sub-015", "sub-016", "sub-017"] and cohort.hearts == ["sub-heart06", "sub-heart07"]
    # defaults: the cards' test split that the cohort has
    assert ev.held_out(cohort, None, demo_models) == (["sub-017"], ["sub-heart07"])
    assert ev.held_out(cohort, None, demo_models, "validation") == (["sub-015", "sub-016"], ["sub-heart06"])
    ev.check_split(cohort, ["sub-017", "sub-heart07"], demo_models, "test")
    ev.check_split(cohort, ["sub-015", "sub-heart06"], demo_models, "validation")
    with pytest.raises(InputError, match=r"sub-015 in the validation split of `cwdm-demo`.*--split validation"):
        ev.check_split(cohort, ["sub-015", "sub-017"], demo_models, "test")
    # the report of a validation run says it is not a test
    text = ev.markdown([], [], {"cohort": "c", "subjects": ["sub-015"], "hearts": [], "split": "validation"}
                       | {"steps": None, "n_samples": 1, "seed": 0})  # fmt: skip
    assert "**validation** split" in text and "not a test" in text


def test_a_trained_model_records_its_split_and_evaluation_enforces_it(tmp_path):
    """A model trained from the command line's config writes train, validation and the named
    test subjects into its card; evaluating it on one of its training subjects as a test is
    refused; a test id that is also a training id stops the run before training."""
    from training import train as tt

    spec = CohortSpec(n_subjects=3, seed=5, shape=(16, 20, 16), spacing=(10.0, 10.0, 10.0), lesion_probability=0.0)
    root = write_cohort(tmp_path / "cohort", spec)
    raw = {
        "method": "tissue-seg",
        "scale": "tiny",
        "data": {"root": str(root), "n_val": 1, "test": ["sub-009"]},
        "train": {"steps": 1, "val_every": 1, "ckpt_every": 1, "val_cases": 1},
    }
    result = tt.Trainer(tt.resolve_config(raw), tmp_path / "run", device="cpu", progress=False).run()
    loaded = load_model(result.export)
    splits = loaded.card.card["splits"]
    assert (splits["train"], splits["validation"], splits["test"]) == (["sub-001", "sub-002"], ["sub-003"], ["sub-009"])
    assert splits["simulator_seed"] == 5
    cohort = open_cohort(root)
    with pytest.raises(InputError, match=r"sub-001 in the train split"):
        ev.check_split(cohort, ["sub-001"], {"tissue-seg": loaded}, "test")
    with pytest.raises(InputError, match=r"sub-003 in the validation split"):
        ev.check_split(cohort, ["sub-003"], {"tissue-seg": loaded}, "test")

    # fine-tuning starts from the exported weights (same method and architecture)
    tuned = {**raw, "train": {**raw["train"], "init_from": str(result.export), "lr": 0.0}}
    tuned["export"] = {"name": "tuned"}
    second = tt.Trainer(tt.resolve_config(tuned), tmp_path / "run2", device="cpu", progress=False)
    start = {k: v.clone() for k, v in second.model.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in loaded.network.state_dict().items())

    clash = {**raw, "data": {**raw["data"], "test": ["sub-002"]}}
    with pytest.raises(InputError, match="data.test names subjects the model trains or validates on: sub-002"):
        tt.Trainer(tt.resolve_config(clash), tmp_path / "run3", device="cpu", progress=False).run()
    assert not (tmp_path / "run3" / "model").exists()


def test_the_variety_test_set_holds_the_same_people_further_from_the_template():
    """Variety 2.5 keeps each subject's visits and sex but moves the anatomy about three times
    as far from the template, without folding; variety 1 is exactly the default subject."""
    from LongitudinalDiffusionLib.demo import brain

    for k in (16, 17):
        plain = brain.draw_subject(np.random.default_rng([11, k]), "x", seed=(11, k))
        same = brain.draw_subject(np.random.default_rng([11, k]), "x", seed=(11, k), variety=1.0)
        hard = brain.draw_subject(np.random.default_rng([11, k]), "x", seed=(11, k), variety=2.5)
        assert np.array_equal(plain.warp, same.warp) and np.array_equal(plain.pose, same.pose)
        assert (hard.ages, hard.sex) == (plain.ages, plain.sex)
        a, b = brain.deformation_stats(plain), brain.deformation_stats(hard)
        assert b["rms_mm"] > 1.8 * a["rms_mm"] and b["rms_mm"] > 3.0 and b["max_mm"] > 6.0
        assert b["min_jacobian"] > 0.3  # still a diffeomorphism: no tissue folds over itself
    with pytest.raises(ValueError, match="variety must lie in"):
        CohortSpec(variety=0.5)
    assert test_sets.SETS["variety"][3] == 2.5


def test_the_motion_test_set_moves_half_the_scans_and_says_which(tmp_path):
    """Scans drawn to move carry ghosts and their movements in the sidecar; the others are
    site A's scans bit for bit; the labels are those of the head before it moved."""
    spacing = (10.0, 10.0, 10.0)
    kwargs = dict(seed=5, first=1, n_subjects=1, first_heart=0, n_hearts=0, spacing=spacing, heart_spacing=False)
    still = test_sets.write_test_set(tmp_path / "still", site="A", **kwargs)
    moved = test_sets.write_test_set(tmp_path / "moved", site="A", motion=0.5, **kwargs)
    n_moved = n_still = 0
    for sidecar in sorted((moved / "sub-002").rglob("*.json")):
        if "sessions" in sidecar.name:
            continue
        nifti = sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))
        a = load_image(still / nifti.relative_to(moved)).array
        b = load_image(nifti).array
        record = json.loads(sidecar.read_text(encoding="utf-8")).get("SimulatedMotion")
        if record is None:
            n_still += 1
            np.testing.assert_array_equal(a, b)
        else:
            n_moved += 1
            assert len(record["MomentsFractionOfScan"]) == test_sets.MOTION_MOVES
            assert np.abs(np.asarray(record["RotationDegrees"])).max() <= test_sets.MOTION_DEGREES
            assert b.min() >= 0 and np.abs(b - a).mean() > 0.05 * a.mean()  # visibly corrupted
    assert n_moved >= 2 and n_still >= 2, (n_moved, n_still)
    for dseg in (still / "derivatives").rglob("*_dseg.nii.gz"):
        np.testing.assert_array_equal(load_image(dseg).array, load_image(moved / dseg.relative_to(still)).array)
    described = json.loads((moved / "dataset_description.json").read_text(encoding="utf-8"))
    assert described["SimulationParameters"]["motion"]["chance_per_scan"] == 0.5
    with pytest.raises(ValueError, match="motion is the chance"):
        test_sets.write_test_set(tmp_path / "bad", site="A", motion=1.5, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_a_head_that_does_not_move_leaves_no_artefact(monkeypatch):
    """The k-space motion model with zero movement returns the scan; with movement, signal
    leaks into the background as ghosts along the phase-encoding axis."""
    from LongitudinalDiffusionLib.demo import brain

    subject = brain.draw_subject(np.random.default_rng([11, 16]), "x", lesion_probability=0.0)
    ses = brain.simulate_session(
        subject, 12.0, np.random.default_rng(1), shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0), modalities=("T1w",)
    )
    image, air = ses.images["T1w"], ses.labels.array == 0
    moved, _ = test_sets.move_during_scan(image, np.random.default_rng(3))
    assert moved.array[air].mean() > 1.03 * image.array[air].mean()
    assert np.array_equal(moved.affine, image.affine) and moved.shape == image.shape
    monkeypatch.setattr(test_sets, "MOTION_DEGREES", 0.0)
    monkeypatch.setattr(test_sets, "MOTION_MM", 0.0)
    still, record = test_sets.move_during_scan(image, np.random.default_rng(3))
    np.testing.assert_allclose(still.array, image.array, atol=1e-3 * float(image.array.max()))
    assert record["TranslationMm"] == [[0.0, 0.0, 0.0]] * test_sets.MOTION_MOVES


def test_motion_cases_are_split_by_whether_the_hidden_scan_moved(tmp_path):
    """The per-case comparison is rerun on the cases whose hidden scan moved and on the others,
    reading each hidden scan's sidecar; a case it cannot place is an error, not a guess."""
    from training import motion_cases

    spacing = (10.0, 10.0, 10.0)
    root = test_sets.write_test_set(
        tmp_path / "motion", seed=5, first=1, n_subjects=1, first_heart=0, n_hearts=0, spacing=spacing,
        heart_spacing=False, site="A", motion=0.5,
    )  # fmt: skip
    sessions = [line.split("\t") for line in (root / "sub-002" / "sub-002_sessions.tsv").read_text().splitlines()[1:]]
    rows, expected = [], {True: [], False: []}
    for session, age in sessions:
        sidecar = root / "sub-002" / session / "anat" / f"sub-002_{session}_T1w.json"
        moved = "SimulatedMotion" in json.loads(sidecar.read_text(encoding="utf-8"))
        case = f"T1w at {float(age):.2f} mo"
        assert motion_cases.target_moved(root, "sub-002", case) is moved
        gain = -2.0 if moved else 1.0  # the model's PSNR minus the baseline's
        expected[moved].append(gain)
        rows += [
            ("sadm", "sadm-demo", "sub-002", case, "model", 20.0 + gain),
            ("sadm", "sadm-demo", "sub-002", case, "registration interpolation", 20.0),
        ]
    assert expected[True] and expected[False], "the seed moves some T1w scans and keeps others still"
    report = tmp_path / "report"
    report.mkdir()
    with (report / "cases.csv").open("w", encoding="utf-8") as f:
        f.write("method,model,subject,case,entry,psnr,ssim,dice\n")
        f.writelines(f"{m},{mdl},{s},{c},{e},{v},,\n" for m, mdl, s, c, e, v in rows)
    (report / "evaluation.csv").write_text(
        "method,model,entry,role,primary,best_baseline\nsadm,sadm-demo,model,model,psnr,registration interpolation\n",
        encoding="utf-8",
    )
    split = {r["moved"]: r for r in motion_cases.split_comparisons(root, report)}
    assert split[False]["difference"] == pytest.approx(1.0) and split[False]["n_cases"] == len(expected[False])
    assert split[True]["difference"] == pytest.approx(-2.0) and split[True]["decision"] == "worse than"
    with pytest.raises(ValueError, match="no single"):
        motion_cases.target_moved(root, "sub-002", "T1w at 99.00 mo")
