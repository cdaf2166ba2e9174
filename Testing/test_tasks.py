"""The three tasks end to end on the simulated cohort, with tiny random-weight models of
every method: outputs on the input's geometry, seeds, samples, frames, cancel, saving,
and the catalog's checks on model files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from LongitudinalDiffusionLib.catalog import create_untrained, load_model, sha256_file
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.imaging import load_image
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken
from LongitudinalDiffusionLib.subject import Subject, load_bids_subject
from LongitudinalDiffusionLib.tasks import RunOptions, complete_ages, interpolate_frames, synthesize_modality

torch.set_num_threads(1)
FAST = {"steps": 3}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks") / "cohort"
    write_cohort(out, CohortSpec(n_subjects=1, seed=3, shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0)), jobs=1)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {m: create_untrained(m, folder, scale="tiny") for m in ("cas-diffcom", "interval", "sadm", "cwdm", "ddm")}


@pytest.fixture
def subject(cohort) -> Subject:
    """sub-001 without its 6-month visit (ages 0.3, 2.9, 9, 12, 18, 24 remain)."""
    full = load_bids_subject(cohort, subject="001")
    gap = sorted(full.ages())[2]
    kept = [tp for tp in full.timepoints if abs(tp.age - gap) > 0.01]
    return Subject(full.subject_id, kept, full.source, {**full.meta, "gap": gap})


@pytest.mark.parametrize("method", ["cas-diffcom", "interval", "sadm"])
def test_complete_ages_lands_on_the_input_geometry(subject, models, method):
    gap = subject.meta["gap"]
    events = []
    result = complete_ages(subject, [gap], models[method], steps=3, progress=events.append)
    out = result.image("generated", gap)
    nearest = min((tp for tp in subject.timepoints if tp.modality.value == "T1w"), key=lambda tp: abs(tp.age - gap))
    ref = load_image(nearest.source)
    assert out.same_geometry(ref) and out.array.dtype == np.float32
    assert np.isfinite(out.array).all() and out.array.std() > 0
    # The completed timeline: real scans and the generated one, in age order, flagged.
    timeline = result.series[0]
    assert timeline.unit == "months" and timeline.times == sorted(timeline.times)
    assert sum(timeline.generated) == 1 and timeline.generated[timeline.times.index(gap)]
    assert len(timeline.frames) == 1 + len([tp for tp in subject.timepoints if tp.modality.value == "T1w"])
    # Honest progress: every stage starts at 0 and ends at its total; the task says it is done.
    stages = {e.stage for e in events}
    for stage in stages:
        steps = [e.step for e in events if e.stage == stage]
        assert steps[0] == 0 or stage == "complete-ages"
        assert steps[-1] == max(e.total for e in events if e.stage == stage)
    assert events[-1].stage == "complete-ages"
    prov = result.provenance
    assert (
        prov.method and prov.seed == 0 and prov.extra["trained_on"] is None and prov.simulated_inputs is True
    )  # the cohort says so in its headers


def test_seeds_reproduce_and_samples_give_an_uncertainty_map(subject, models):
    gap = subject.meta["gap"]
    a = complete_ages(subject, [gap], models["interval"], seed=4, **FAST).image("generated", gap)
    b = complete_ages(subject, [gap], models["interval"], seed=4, **FAST).image("generated", gap)
    c = complete_ages(subject, [gap], models["interval"], seed=5, **FAST).image("generated", gap)
    assert np.array_equal(a.array, b.array) and not np.array_equal(a.array, c.array)
    two = complete_ages(subject, [gap], models["interval"], seed=4, n_samples=2, **FAST)
    kinds = sorted(r.kind for r in two.images)
    assert kinds == ["mean", "std"]
    mean, std = two.image("mean", gap), two.image("std", gap)
    np.testing.assert_allclose(mean.array, (a.array + c.array) / 2, rtol=1e-4, atol=1e-3 * np.abs(a.array).max())
    assert (std.array >= 0).all() and std.array.max() > 0
    assert std.same_geometry(mean)


def test_between_two_scans_both_neighbours_guide_the_model(subject, tmp_path):
    """An untrained residual x0 model (MONAI zero-initialises the U-Net's output) returns its
    source scan: one-sided it is a copy of the nearest scan, two-sided the age-weighted blend
    of the two neighbours, i.e. linear interpolation - the baseline a trained model refines."""
    from LongitudinalDiffusionLib.models import default_config
    from training import baselines as bl

    config = default_config("interval", "demo") | {"residual": True, "prediction": "sample"}  # the data's grid
    model = create_untrained("interval", tmp_path, config=config, name="interval-residual")
    gap = subject.meta["gap"]
    real = [tp for tp in subject.timepoints if tp.modality.value == "T1w"]
    two = complete_ages(subject, [gap], model, **FAST)
    one = complete_ages(subject, [gap], model, two_sided=False, **FAST)
    out_two, out_one = two.image("generated", gap), one.image("generated", gap)
    linear = bl.linear_interpolation(real, gap, out_two.affine, out_two.shape).array
    nearest = bl.nearest_timepoint(real, gap, out_one.affine, out_one.shape).array

    def err(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)) / (b.max() - b.min()))

    # Measured 0.014 / 0.076 and 0.007 / 0.084 (what is left: the grid's resampling).
    assert err(out_two.array, linear) < 0.03 and err(out_two.array, nearest) > 0.05
    assert err(out_one.array, nearest) < 0.03 and err(out_one.array, linear) > 0.05
    pair = sorted(bl.neighbours(real, gap), key=lambda tp: abs(tp.age - gap))
    assert two.provenance.extra["source_ages"] == [[pair[0].age, pair[1].age]]  # nearest first
    assert one.provenance.extra["source_ages"] == [[pair[0].age]]


def test_denoising_intermediates_are_frames(subject, models):
    gap = subject.meta["gap"]
    result = complete_ages(subject, [gap], models["interval"], steps=4, capture=3)
    series = {s.name: s for s in result.series}
    denoise = series[f"denoising-{gap:g}mo"]
    assert denoise.unit == "step" and len(denoise.frames) == 3
    assert denoise.times[0] > denoise.times[-1] == 0
    assert all(f.same_geometry(result.image("generated", gap)) for f in denoise.frames)


def test_synthesize_missing_modality(cohort, models):
    subject = load_bids_subject(cohort, subject="001")
    target = json.loads(models["cwdm"].read_text())["config"]["target"]
    visit = [tp for tp in subject.timepoints if tp.session == "ses-03"]
    missing = [tp for tp in visit if tp.modality.value == target][0]
    without = Subject(subject.subject_id, [tp for tp in subject.timepoints if tp is not missing], subject.source)
    result = synthesize_modality(without, "ses-03", target, models["cwdm"], steps=3, capture=2)
    out = result.image("generated")
    assert out.same_geometry(load_image(missing.source)) and np.isfinite(out.array).all()
    assert len(result.series[0].frames) == 2
    with pytest.raises(InputError, match=f"already has a {target} scan"):
        synthesize_modality(subject, "ses-03", target, models["cwdm"], **FAST)
    other = [tp for tp in visit if tp.modality.value != target][0]
    lacking = Subject(subject.subject_id, [tp for tp in without.timepoints if tp is not other], subject.source)
    with pytest.raises(InputError, match=f"lacks {other.modality.value}"):
        synthesize_modality(lacking, "ses-03", target, models["cwdm"], **FAST)


def test_interpolate_frames_carries_labels_along(cohort, models):
    cine = cohort / "cardiac" / "sub-heart01" / "cine"
    rows = [line.split("\t") for line in (cine / "manifest.tsv").read_text().splitlines()[1:]]
    source, target, labels = cine / rows[0][0], cine / rows[len(rows) // 2][0], cine / rows[0][3]
    result = interpolate_frames(source, target, 4, models["ddm"], source_labels=labels)
    series = result.series[0]
    src = load_image(source)
    assert series.unit == "gamma" and series.times == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert all(f.same_geometry(src) for f in series.frames)
    lab0 = load_image(labels, dtype=np.int16).array
    for lab in series.labels:
        assert lab.same_geometry(src) and set(np.unique(lab.array)) <= set(np.unique(lab0))
    assert series.fields[0].array.shape == (*src.shape, 3)
    with pytest.raises(LongitudinalDiffusionError, match="at least 2 frames"):
        interpolate_frames(source, target, 1, models["ddm"])


def test_cancel_stops_promptly_and_nothing_is_written(subject, models, tmp_path):
    token, seen = CancelToken(), []

    def progress(event):
        seen.append(event)
        if event.step == 2:
            threading.Thread(target=token.cancel).start()
            threading.Event().wait(0.05)

    with pytest.raises(Cancelled):
        complete_ages(subject, [subject.meta["gap"]], models["interval"], steps=50, progress=progress, cancel=token)
    assert max(e.step for e in seen) <= 3
    assert not any(tmp_path.iterdir())


def test_result_saves_atomically(subject, models, tmp_path):
    gap = subject.meta["gap"]
    result = complete_ages(subject, [gap], models["sadm"], steps=2)
    files = result.save(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["task"] == "complete-ages" and summary["provenance"]["model"] == "sadm-tiny-untrained"
    assert all(f.exists() for f in files)
    timeline = summary["series"][0]["frames"]
    assert [f["generated"] for f in timeline].count(True) == 1
    sidecar = json.loads((tmp_path / "out" / summary["images"][0]["file"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["age_months"] == pytest.approx(gap) and sidecar["seed"] == 0
    with pytest.raises(InputError, match="not empty"):
        result.save(tmp_path / "out")
    result.images[0].image.array[0, 0, 0] = np.nan  # a broken image: the save fails, nothing is left
    with pytest.raises(InputError):
        result.save(tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wrong_model_for_the_task_and_impossible_requests(subject, models):
    with pytest.raises(LongitudinalDiffusionError, match="not for 'complete-ages'"):
        complete_ages(subject, [5.0], models["cwdm"])
    with pytest.raises(InputError, match="already has a T1w scan"):
        complete_ages(subject, [subject.ages()[0]], models["interval"])
    with pytest.raises(InputError, match="impossible age"):
        complete_ages(subject, [-2.0], models["interval"])
    with pytest.raises(LongitudinalDiffusionError, match="n_samples"):
        complete_ages(subject, [5.0], models["interval"], options=RunOptions(n_samples=0))


def test_catalog_refuses_broken_model_files(models, tmp_path):
    import shutil

    card = models["ddm"]
    for suffix in (".json", ".safetensors"):
        shutil.copy(card.with_suffix(suffix), tmp_path / f"m{suffix}")
    data = json.loads((tmp_path / "m.json").read_text())
    data["weights"]["file"] = "m.safetensors"
    (tmp_path / "m.json").write_text(json.dumps(data))
    assert load_model(tmp_path / "m.json").network is not None

    weights = tmp_path / "m.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="checksum mismatch"):
        load_model(tmp_path / "m.json")

    weights.write_bytes(b"not a safetensors file at all")
    data["weights"]["sha256"] = sha256_file(weights)
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_model(tmp_path / "m.json")

    shutil.copy(card.with_suffix(".safetensors"), weights)
    data["weights"]["sha256"] = sha256_file(weights)
    field = data["config"]["network"]["field"]
    field["encoder_channels"] = [2 * c for c in field["encoder_channels"]]  # a wider registration net
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="do not match the card's architecture"):
        load_model(tmp_path / "m.json")

    weights.unlink()
    with pytest.raises(InputError, match="weights of model 'm' are missing"):
        load_model(tmp_path / "m.json")
    data["weights"]["file"] = "../elsewhere.safetensors"
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="must sit next to the card"):
        load_model(tmp_path / "m.json")


def test_upstream_cwdm_weights_use_the_brats_preprocessing(tmp_path):
    """A card made from an upstream checkpoint runs on BraTS arrays as stored (240x240x155),
    comes back on them, with the <=0.04 background rule."""
    from LongitudinalDiffusionLib.catalog import import_checkpoint
    from LongitudinalDiffusionLib.imaging import Image
    from LongitudinalDiffusionLib.models import cwdm
    from LongitudinalDiffusionLib.subject import Timepoint

    config = cwdm.default_config("tiny", target="T2w")
    config["image_size"] = [224, 224, 160]
    torch.manual_seed(0)
    torch.save(cwdm.build(config).state_dict(), tmp_path / "t2_gen.pt")
    config["preprocessing"] = "brats"
    card = import_checkpoint("cwdm", tmp_path / "t2_gen.pt", tmp_path / "cat", name="cwdm-t2", config=config)
    assert json.loads(card.read_text())["config"]["preprocessing"] == "brats"

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    head = np.zeros((240, 240, 155), np.float32)
    head[40:200, 30:210, 20:140] = 1.0
    visit = [
        Timepoint(30 * 12, m, Image(head * rng.uniform(50, 100, head.shape).astype(np.float32), affine), None, "ses-01")
        for m in ("T1w", "T1ce", "FLAIR")
    ]
    subject = Subject("sub-brats", visit, None)
    out = synthesize_modality(subject, "ses-01", "T2w", card, steps=2).image("generated")
    assert out.shape == (240, 240, 155) and np.array_equal(out.affine, affine)
    assert out.array.min() >= 0 and out.array.max() <= 1
    assert not ((out.array > 0) & (out.array <= 0.04)).any()
    assert (out.array[:8] == 0).all() and (out.array[-8:] == 0).all()  # the cropped rim comes back empty

    small = Subject(
        "sub-x",
        [
            Timepoint(1, m, Image(head[:200] * (k + 1), affine), None, "ses-01")
            for k, m in enumerate(("T1w", "T1ce", "FLAIR"))
        ],
        None,
    )  # three different scans (one scan as three contrasts is refused first)
    with pytest.raises(InputError, match="BraTS volumes of"):
        synthesize_modality(small, "ses-01", "T2w", card, steps=2)
