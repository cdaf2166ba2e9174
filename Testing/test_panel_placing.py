"""Placing results without freezing Slicer: the tissue segmentation of a run's results runs
on a background thread before the run reports done (``Run``'s prepare step), and the scene
work is done in short steps (``placeResultSteps``) between which the panel lets Qt's event
loop run.

Checked here: the prepared labels give the same scene as segmenting on the spot, without
segmenting anything while placing; placing stopped between any two steps leaves the scene
as it was; the prepare step reports progress, can be cancelled and reports failures; Cancel
while the panel places the results takes out what was placed. ``bench/panel_stall.py``
measures the event loop's longest stall.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import threading
import time
from typing import Any

import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness
import slicer
import torch
from LongitudinalDiffusionSlicer import mrml, results
from LongitudinalDiffusionSlicer.run import CANCELLED, DONE, FAILED, Run

from LongitudinalDiffusionLib.imaging import Image
from LongitudinalDiffusionLib.jobs import JobEvent
from LongitudinalDiffusionLib.progress import Cancelled
from LongitudinalDiffusionLib.subject import load_subject
from LongitudinalDiffusionLib.tasks import complete_ages

torch.set_num_threads(1)
AGE = 7.5
MODEL = "interval-demo"
# subjectFolder (a real simulated BIDS subject, 20x24x20 voxels of 8 mm) is in conftest.py


class CountingSegmenter:
    """The tissue segmenter, counting its calls and the threads they come from."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.threads: list[str] = []

    @property
    def classes(self) -> dict[int, str]:
        return self.segmenter.classes

    def __call__(self, image: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return self.segmenter(image)


@pytest.fixture(scope="module")
def segmenter():
    return results.TissueSegmenter("tissue-seg-brain-demo")


@pytest.fixture(scope="module")
def completed(subjectFolder):
    """complete-ages at 7.5 months, 2 samples of 1 sampler step (about a second)."""
    subject = load_subject(subjectFolder)
    return subject, complete_ages(subject, [AGE], MODEL, steps=1, n_samples=2, device="cpu")


@pytest.fixture
def headless():
    app = mrml_harness.bootstrapScene()
    yield app
    app.close()


def _segments(segmentation: Any) -> list[str]:
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def _arrays(node: Any) -> np.ndarray:
    return slicer.util.arrayFromTableColumn(node, "white matter (ml)")


# ------------------------------------------------------------------------ prepared labels


def test_prepared_labels_place_the_same_scene_without_segmenting_while_placing(headless, completed, segmenter):
    scene = headless.scene
    subject, result = completed
    loaded = mrml.loadSubjectIntoScene(subject, scene)
    sceneSubject = mrml.subjectFromVolumes(loaded.volumeNodes, subject.subject_id, scene)
    plain = results.placeResult(result, scene, subject=sceneSubject, segmenter=segmenter)

    counting = CountingSegmenter(segmenter)
    events: list[Any] = []
    box: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: box.setdefault(
            "prepared", results.prepareSegmentations([result], sceneSubject, counting, progress=events.append)
        ),
        name="prepare",
    )
    worker.start()
    worker.join(60)
    prepared = box["prepared"]
    frames = len(result.series[0].frames)
    images = {id(result.image("mean", AGE)), *(id(f) for f in result.series[0].frames)}  # the mean is a frame too
    scans = sum(tp.modality.value == "T1w" for tp in subject.timepoints)
    assert counting.threads == ["prepare"] * (len(images) + scans)  # each image once, off the main thread
    assert events[-1].stage == "segmenting the results" and events[-1].step == events[-1].total

    placed = results.placeResult(result, scene, subject=sceneSubject, segmenter=prepared)
    assert len(counting.threads) == len(images) + scans  # nothing segmented while placing
    (a,), (b,) = plain.volumeNodes, placed.volumeNodes
    assert _segments(plain.segmentationNodes[a.GetID()]) == _segments(placed.segmentationNodes[b.GetID()])
    for kind in ("real", "generated"):
        assert np.allclose(_arrays(plain.tableNodes[kind]), _arrays(placed.tableNodes[kind]))
    assert len(placed.nodes()) == len(plain.nodes())
    assert placed.sequences[0].segmentationSequence.GetNumberOfDataNodes() == frames

    # an image that was not prepared is segmented on the spot
    frame = result.series[0].frames[0]
    other = Image(frame.array.copy(), frame.affine)
    assert np.array_equal(prepared(other).array, segmenter(other).array)
    assert len(counting.threads) == len(images) + scans + 1


def test_placing_stopped_between_two_steps_leaves_the_scene_as_it_was(headless, completed, segmenter):
    scene = headless.scene
    subject, result = completed
    mrml.loadSubjectIntoScene(subject, scene)
    nodes, items = scene.GetNumberOfNodes(), mrml_harness.shItemCount(scene)
    prepared = results.prepareSegmentations([result], subject, segmenter)
    steps, count = results.placeResultSteps(result, scene, subject=subject, segmenter=prepared), 0
    while True:
        try:
            next(steps)
            count += 1
        except StopIteration as end:
            placed = end.value
            break
    assert count > len(result.series[0].frames)  # at least one step per frame
    assert len(results.resultNodeIds(scene)) > 10
    placed.remove(scene)
    assert scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(scene) == items
    for stop in (1, count // 2, count - 1):
        steps = results.placeResultSteps(result, scene, subject=subject, segmenter=prepared)
        for _ in range(stop):
            next(steps)
        assert scene.GetNumberOfNodes() > nodes
        theirs = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "added between two steps")
        steps.close()
        assert results.resultNodeIds(scene) == []
        assert scene.IsNodePresent(theirs)  # not the placement's to take out
        scene.RemoveNode(theirs)
        assert scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(scene) == items


# ------------------------------------------------------------------------ the run's prepare step


class FinishedBackend:
    """A backend whose one job is done at once with ``result``."""

    def __init__(self, result: Any) -> None:
        self.value = result
        self.sent = False

    def submit(self, spec: Any) -> str:
        return "job-1"

    def poll(self, jobId: str) -> list[JobEvent]:
        if self.sent:
            return []
        self.sent = True
        return [JobEvent(jobId, "started"), JobEvent(jobId, "done", message="1 s")]

    def cancel(self, jobId: str) -> None:
        pass

    def result(self, jobId: str) -> Any:
        return self.value


def _run(prepare: Any) -> Run:
    return Run(FinishedBackend("the result"), [("job", object())], prepare=prepare)


def test_the_run_prepares_its_results_on_a_thread_before_it_is_done():
    from LongitudinalDiffusionLib.progress import Stage

    started, release = threading.Event(), threading.Event()

    def prepare(runResults, progress, cancel):
        started.set()
        stage = Stage("segmenting the results", 2, progress, cancel).start()
        stage.advance()
        release.wait(10)
        stage.advance()
        return {"thread": threading.current_thread().name, "results": list(runResults)}

    run = _run(prepare)
    update = run.poll()
    assert started.wait(10) and update.state == "running" and run.prepared is None
    time.sleep(0.05)
    update = run.poll()
    assert update.state == "running" and update.text.startswith("segmenting the results 1/2")
    release.set()
    assert run.wait(10) == ["the result"]
    assert run.state == DONE and run.prepared == {"thread": "longdiff-prepare-results", "results": ["the result"]}


def test_cancel_and_failure_while_preparing():
    def slow(runResults, progress, cancel):
        while not cancel.cancelled:
            time.sleep(0.01)
        raise Cancelled("segmenting")

    run = _run(slow)
    assert run.poll().state == "running"
    run.cancel()
    with pytest.raises(Cancelled):
        run.wait(10)
    assert run.state == CANCELLED and run.prepared is None

    def broken(runResults, progress, cancel):
        raise RuntimeError("no tissue model")

    run = _run(broken)
    while not run.poll().finished:
        time.sleep(0.01)
    assert run.state == FAILED and "no tissue model" in run.error


# ------------------------------------------------------------------------ the panel


def test_cancel_while_the_panel_places_the_results_takes_them_out(
    qtbot, monkeypatch, tmp_path, segmenter, subjectFolder
):
    from LongitudinalDiffusionSlicer.logic import RunLogic
    from PySide6 import QtCore

    placeRunSteps = RunLogic.placeRunSteps
    taken: list[int] = []

    def cancelAfterThreeSteps(logic, run):
        """The logic's steps; after the third one, Cancel is clicked (between two steps)."""
        steps = placeRunSteps(logic, run)
        for _ in range(3):
            next(steps)
            taken.append(1)
            yield
        QtCore.QTimer.singleShot(0, gui.ui.applyButton.click)
        yield from steps

    monkeypatch.setattr(RunLogic, "placeRunSteps", cancelAfterThreeSteps)
    with mrml_harness.panelOnScene(qtbot, monkeypatch, tmp_path / "home", segmenter, consentAnswer=False) as gui:
        ui, panel = gui.ui, gui.panel
        assert panel.loadSubjectFrom(subjectFolder) is not None
        names = [card.name for card in panel.models()]
        ui.modelComboBox.setCurrentIndex(names.index(MODEL))
        ui.agesLineEdit.setText(f"{AGE:g}")
        ui.stepsSpinBox.setValue(1)
        nodes, items = gui.scene.GetNumberOfNodes(), mrml_harness.shItemCount(gui.scene)
        ui.applyButton.click()
        qtbot.waitUntil(lambda: bool(gui.finished), timeout=60000)
        assert len(taken) == 3
        assert gui.finished[-1][0] == "cancelled", ui.logTextEdit.toPlainText()
        assert "nothing was added" in ui.statusLabel.text()
        assert "segmenting the results" in ui.logTextEdit.toPlainText()
        assert gui.scene.GetNumberOfNodes() == nodes and mrml_harness.shItemCount(gui.scene) == items
        assert results.resultNodeIds(gui.scene) == [] and panel.results() is None
        assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()
