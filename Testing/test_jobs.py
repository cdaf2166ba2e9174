"""Job specs, events and the local backend: JSON round trips, clear refusals of malformed
specs, FIFO order (in the local backend's child process, and on the thread backend's one
thread), progress, cancel (nothing left behind) and failures that end a job but not the
backend. Tiny untrained models, 2 sampler steps. The child process itself (warm reuse,
crashes, killing the tree, a GIL-holding main thread) is tested in test_backend_process.py."""

from __future__ import annotations

import json
import os
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from worker_harness import FAST, ages_spec, gapped_subject

from LongitudinalDiffusionLib.backends import LocalBackend, ThreadBackend
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.jobs import Backend, JobEvent, JobInput, JobNotFinished, JobSpec, UnknownJob, run_job
from LongitudinalDiffusionLib.progress import Cancelled
from LongitudinalDiffusionLib.subject import load_bids_subject
from LongitudinalDiffusionLib.tasks import Result, complete_ages

torch.set_num_threads(1)
# the fixtures cohort and models are in conftest.py


@pytest.fixture
def backend():
    b = LocalBackend()
    yield b
    b.close()


def test_spec_round_trips_through_json(cohort, models):
    spec = ages_spec(cohort, str(models["interval"]))
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.task == "complete-ages" and again.subject_id == "sub-001"
    assert all(isinstance(i, JobInput) and i.modality == "T1w" for i in again.inputs)
    assert spec.input_files() == [i.path for i in spec.inputs]
    frames = JobSpec.for_interpolation("a.nii.gz", "b.nii.gz", 4, "ddm", labels="l.nii.gz")
    assert frames.params == {"source": 0, "target": 1, "n_frames": 4} and frames.input_files()[-1] == "l.nii.gz"
    event = JobEvent("j1", "progress", "sampling", 2, 5, 0.5, 0.75, "", 3)
    assert JobEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    assert event.fraction == 0.4 and not event.final and JobEvent("j1", "done").final


def test_from_subject_stages_in_memory_images(cohort, tmp_path):
    subject = gapped_subject(cohort)
    for tp in subject.timepoints:
        tp.source = None
    with pytest.raises(InputError, match="staging folder"):
        JobSpec.from_subject(subject, "complete-ages", "m", {"ages": [5.0]})
    spec = JobSpec.from_subject(subject, "complete-ages", "m", {"ages": [5.0]}, staging=tmp_path)
    assert len(list(tmp_path.glob("*.nii.gz"))) == len(subject.timepoints) == len(spec.inputs)


GOOD = {
    "task": "complete-ages",
    "model": "interval-tiny-untrained",
    "subject_id": "sub-001",
    "inputs": [{"path": "a.nii.gz", "age_months": 3.0, "modality": "T1w"}],
    "params": {"ages": [6.0]},
    "options": {"steps": 2},
}
BAD_SPECS = [
    ("not an object", [1, 2], "must be a JSON object"),
    ("unknown field", {**GOOD, "shell": "rm -rf /"}, "unknown field"),
    ("unknown task", {**GOOD, "task": "segment"}, "unknown task 'segment'"),
    ("no model", {**GOOD, "model": ""}, "'model' must be a model name"),
    ("no inputs", {**GOOD, "inputs": []}, "non-empty list"),
    ("input not an object", {**GOOD, "inputs": ["a.nii.gz"]}, r"inputs\[0\]: must be a JSON object"),
    ("negative age", {**GOOD, "inputs": [{"path": "a", "age_months": -1, "modality": "T1w"}]}, "impossible age"),
    ("bad modality", {**GOOD, "inputs": [{"path": "a", "age_months": 1, "modality": "PET"}]}, "unknown modality"),
    ("ages not a list", {**GOOD, "params": {"ages": 6}}, "'ages' must be a non-empty list"),
    ("age is text", {**GOOD, "params": {"ages": ["six"]}}, "age 'six' is not a number"),
    ("missing param", {**GOOD, "task": "synthesize-modality", "params": {"target": "FLAIR"}}, "missing 'session'"),
    ("unknown option", {**GOOD, "options": {"temperature": 2}}, "unknown option"),
    ("steps is text", {**GOOD, "options": {"steps": "2"}}, "'steps' has the wrong type"),
    ("zero steps", {**GOOD, "options": {"steps": 0}}, "'steps' must lie in"),
    ("bad sampler", {**GOOD, "options": {"sampler": "euler"}}, "unknown sampler"),
    (
        "frame index out of range",
        {**GOOD, "task": "interpolate", "params": {"source": 0, "target": 5, "n_frames": 4}},
        "'target' must be an index",
    ),
]


@pytest.mark.parametrize("case, data, message", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_malformed_specs_are_refused_clearly(case, data, message):
    with pytest.raises(InputError, match=message):
        JobSpec.from_dict(data)


def test_run_job_is_the_task(cohort, models):
    spec = ages_spec(cohort, str(models["interval"]))
    gap = spec.params["ages"][0]
    via_job = run_job(spec)
    direct = complete_ages(gapped_subject(cohort), [gap], models["interval"], device="cpu", **FAST)
    assert np.array_equal(via_job.image("generated", gap).array, direct.image("generated", gap).array)


def test_local_backend_runs_fifo_with_progress_and_results(backend, cohort, models, tmp_path):
    assert isinstance(backend, Backend)
    specs = [ages_spec(cohort, str(models["interval"]), seed=s) for s in (1, 2, 3)]
    ids = [backend.submit(s) for s in specs]
    results = [backend.wait(i, timeout=120) for i in ids]
    events = {i: backend.poll(i) for i in ids}
    for i in ids:
        kinds = [e.kind for e in events[i]]
        assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done" and "progress" in kinds
        assert [e.seq for e in events[i]] == list(range(len(kinds)))
        assert backend.poll(i) == [] and backend.status(i) == "done"
    gap = specs[0].params["ages"][0]
    assert not np.array_equal(results[0].image("generated", gap).array, results[1].image("generated", gap).array)
    # The result survives a save/load round trip (what the remote backend does).
    results[0].save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert np.array_equal(back.image("generated", gap).array, results[0].image("generated", gap).array)
    assert [s.name for s in back.series] == [s.name for s in results[0].series]
    assert back.series[0].generated == results[0].series[0].generated
    assert back.provenance.model == results[0].provenance.model


def test_jobs_run_one_at_a_time_in_order(cohort, models):
    running, overlaps, order = [0], [], []
    lock = threading.Lock()

    def runner(spec, progress=None, cancel=None):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
            order.append(spec.options["seed"])
        try:
            return run_job(spec, progress=progress, cancel=cancel)
        finally:
            with lock:
                running[0] -= 1

    # a runner of the test's own runs only in this process: the thread backend
    with ThreadBackend(runner=runner) as b:
        ids = [b.submit(ages_spec(cohort, str(models["interval"]), seed=s)) for s in range(4)]
        for i in ids:
            b.wait(i, timeout=120)
    assert max(overlaps) == 1 and order == [0, 1, 2, 3]


def test_cancel_running_and_queued_jobs(backend, cohort, models):
    slow = ages_spec(cohort, str(models["interval"]), steps=200)
    first = backend.submit(slow)
    second = backend.submit(slow)
    while not any(e.kind == "progress" for e in backend.poll(first)):
        threading.Event().wait(0.02)
    backend.cancel(second)  # still queued: cancelled at once
    backend.cancel(first)  # running: stops within a step
    with pytest.raises(Cancelled):
        backend.wait(first, timeout=60)
    with pytest.raises(Cancelled):
        backend.result(second)
    assert backend.status(first) == backend.status(second) == "cancelled"
    assert backend.poll(second)[-1].kind == "cancelled"
    # the backend goes on serving
    done = backend.submit(ages_spec(cohort, str(models["interval"])))
    assert backend.wait(done, timeout=120).task == "complete-ages"


def test_failed_job_reports_its_error_and_the_backend_goes_on(backend, cohort, models, tmp_path):
    bad = ages_spec(cohort, str(models["interval"]))
    bad.model = str(tmp_path / "missing.json")
    job = backend.submit(bad)
    with pytest.raises(InputError, match="no model named"):
        backend.wait(job, timeout=60)
    last = backend.poll(job)[-1]
    assert last.kind == "failed" and "no model named" in last.message
    wrong = ages_spec(cohort, str(models["cwdm"]))  # a modality model asked for ages
    job2 = backend.submit(wrong)
    with pytest.raises(Exception, match="not for 'complete-ages'"):
        backend.wait(job2, timeout=60)
    with pytest.raises(UnknownJob):
        backend.poll("nope")
    slow = backend.submit(ages_spec(cohort, str(models["interval"]), steps=100))
    with pytest.raises(JobNotFinished):
        backend.result(slow)
    with pytest.raises(TimeoutError):
        backend.wait(slow, timeout=0.01)
    backend.delete(slow)
    assert slow not in backend.jobs()


def test_synthesis_and_interpolation_specs_run(cohort, models):
    subject = load_bids_subject(cohort, subject="001")
    target = json.loads(models["cwdm"].read_text())["config"]["target"]
    visit = [tp for tp in subject.timepoints if not (tp.session == "ses-03" and tp.modality.value == target)]
    from LongitudinalDiffusionLib.subject import Subject

    spec = JobSpec.from_subject(
        Subject(subject.subject_id, visit, subject.source),
        "synthesize-modality",
        str(models["cwdm"]),
        {"target": target, "session": "ses-03"},
        FAST,
    )
    assert run_job(spec).image("generated").array.shape == (32, 40, 32)
    cine = cohort / "cardiac" / "sub-heart01" / "cine"
    rows = [line.split("\t") for line in (cine / "manifest.tsv").read_text().splitlines()[1:]]
    frames = JobSpec.for_interpolation(cine / rows[0][0], cine / rows[2][0], 3, str(models["ddm"]))
    result = run_job(frames)
    assert len(result.series[0].frames) == 3
