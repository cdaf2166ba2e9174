"""The labels of a run's results prepared in batches: a segmenter that labels several images
in one call (``segment_many``; the job process's ``ChildSegmenter``, which the module's logic
uses for local runs) gets the results' images and the subject's real scans a few at a time
(``segmenters.SEGMENT_BATCH``), one job of the warm job process per batch instead of one per
image. The labels and the tissue volume rows are those of segmenting each image on its own,
the progress moves after each batch, and a cancel stops between two batches.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from typing import Any

import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness  # noqa: F401  (puts the module's package on the path, MRML set up)
import torch
from LongitudinalDiffusionSlicer import results, segmenters
from LongitudinalDiffusionSlicer.run import childSegmenter

from LongitudinalDiffusionLib.backends import LocalBackend
from LongitudinalDiffusionLib.backends.process import ChildSegmenter
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken
from LongitudinalDiffusionLib.subject import load_subject
from LongitudinalDiffusionLib.tasks import complete_ages

torch.set_num_threads(1)
AGE = 7.5
# subjectFolder (a real simulated BIDS subject, 20x24x20 voxels of 8 mm) is in conftest.py


class CountingChild(ChildSegmenter):
    """The job process's segmenter, noting the size of each batch it is given."""

    def __init__(self, child: ChildSegmenter) -> None:
        super().__init__(child.backend, child.model, child.device, child.timeout)
        self.batches: list[int] = []

    def segment_many(self, images: list[Any]) -> list[Any]:
        self.batches.append(len(images))
        return super().segment_many(images)


@pytest.fixture(scope="module")
def completed(subjectFolder):
    """complete-ages at 7.5 months, 2 samples of 1 sampler step (about a second)."""
    subject = load_subject(subjectFolder)
    return subject, complete_ages(subject, [AGE], "interval-demo", steps=1, n_samples=2, device="cpu")


@pytest.fixture(scope="module")
def backend():
    with LocalBackend(progress_interval=0.0) as local:
        yield local


@pytest.fixture(scope="module")
def here():
    return results.TissueSegmenter("tissue-seg-brain-demo")


def test_batches_give_the_labels_and_rows_of_one_image_at_a_time_in_fewer_jobs(completed, backend, here):
    subject, result = completed
    child = CountingChild(childSegmenter(backend, here))
    events: list[Any] = []
    batched = results.prepareSegmentations([result], subject, child, progress=events.append)
    single = results.prepareSegmentations([result], subject, here)

    images = {id(f): f for f in result.series[0].frames}  # the mean is a frame too
    scans = sum(tp.modality.value == "T1w" for tp in subject.timepoints)
    size = segmenters.SEGMENT_BATCH
    chunks = [min(size, n - start) for n in (len(images), scans) for start in range(0, n, size)]
    assert child.batches == chunks and len(chunks) < len(images) + scans  # fewer jobs than images
    for image in images.values():
        assert np.array_equal(batched(image).array, single(image).array)
    assert batched.tissueRows(result) == single.tissueRows(result)
    assert child.batches == chunks  # nothing asked again
    steps = [e.step for e in events]
    assert steps[0] == 0 and steps[-1] == events[-1].total == len(images) + scans
    assert len(steps) == 1 + len(child.batches) and steps == sorted(steps)


def test_a_cancel_stops_between_two_batches(completed, backend, here):
    subject, result = completed
    child = CountingChild(childSegmenter(backend, here))
    cancel = CancelToken()

    def progress(event: Any) -> None:
        if event.step > 0:
            cancel.cancel()

    with pytest.raises(Cancelled):
        results.prepareSegmentations([result], subject, child, progress=progress, cancel=cancel)
    assert len(child.batches) == 1  # the first batch, then no other
