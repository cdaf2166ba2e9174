"""Real Slicer slice-view renders, offscreen: PyPI trame-slicer's slice view (Slicer's slice
logic and displayable managers) on a real MRML scene (slicer-core), no X server.

A frame series placed by the module (``results.addFrameSequence``: a volume sequence, its
segmentation sequence, one browser) is rendered frame by frame through the browser; the
picture is not blank, the segmentation overlay changes pixels where the labels are, and each
frame is cut through its own centre although the frames have different fields of view.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import requires

requires.slicer()

import mrml_harness
from LongitudinalDiffusionSlicer import results, sliceviews

from LongitudinalDiffusionLib.imaging import Image
from LongitudinalDiffusionLib.tasks import FrameSeries

if sliceviews.unavailableReason():  # trame-slicer's slice views
    requires.missing(sliceviews.unavailableReason())


def ball(shape, spacing, origin, radius_mm):
    """A bright ball (value 100 + texture) with a two-label map: inner core 2, shell 1."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    ijk = np.indices(shape).reshape(3, -1).T
    ras = ijk * np.asarray(spacing) + np.asarray(origin)
    centre = np.asarray(origin) + (np.asarray(shape) - 1) * np.asarray(spacing) / 2
    distance = np.linalg.norm(ras - centre, axis=1).reshape(shape)
    rng = np.random.default_rng(0)
    array = np.where(distance < radius_mm, 100.0, 5.0) + rng.normal(0, 3, shape)
    labels = np.zeros(shape, np.int16)
    labels[distance < radius_mm] = 1
    labels[distance < radius_mm / 2] = 2
    return Image(array.astype(np.float32), affine), Image(labels, affine)


@pytest.fixture
def placed():
    app = mrml_harness.bootstrapScene()
    # two frames of different grids and fields of view (like scans of a growing brain)
    first, firstLabels = ball((24, 28, 20), (2.0, 2.0, 2.0), (-24.0, -28.0, -10.0), 16.0)
    second, secondLabels = ball((30, 34, 26), (2.0, 2.0, 2.0), (-20.0, -30.0, 6.0), 22.0)
    series = FrameSeries("growth", [first, second], [1.0, 2.0], "months", labels=[firstLabels, secondLabels])
    yield app, results.addFrameSequence(series, "sub-x growth", app.scene, labelNames={1: "shell", 2: "core"})
    app.close()


def test_a_real_slice_view_renders_the_frames_with_the_overlay(placed, tmp_path):
    app, series = placed
    with sliceviews.OffscreenSliceView(app.scene, app.applicationLogic, size=(160, 160)) as view:
        plain, plainSecond = sliceviews.renderFrames(view, series, [0, 1], overlay=False)
        overlaid, overlaidSecond = sliceviews.renderFrames(view, series, [0, 1])
        # the view cuts through the centre of the selected frame (the frames' centres differ in S)
        assert view.sliceOffset() == pytest.approx(view.centreOffset(series.proxyVolume()), abs=1.0)
        assert view.sliceNode.GetOrientation() == "Axial"
        path = view.save(tmp_path / "frame.png")

    assert plain.shape == (160, 160, 3) and plain.dtype == np.uint8
    # not blank: a bright disc on a dark background
    grey = plain.mean(axis=2)
    assert grey.std() > 20 and (grey > 150).mean() > 0.1 and (grey < 40).mean() > 0.1
    # the overlay changes pixels inside the disc (segment colours), not the background corners
    changed = np.any(overlaid != plain, axis=2)
    assert changed.mean() > 0.1
    assert not changed[:8, :8].any() and not changed[-8:, -8:].any()
    tinted = overlaid[changed].astype(int)
    assert np.abs(tinted[:, 0] - tinted[:, 2]).mean() > 5  # coloured, not grey
    # the second frame is shown through the browser: a bigger disc
    assert (plainSecond.mean(axis=2) > 150).sum() > (grey > 150).sum()
    assert np.any(overlaidSecond != plainSecond)
    # the overlay of the proxy segmentation only; the saved PNG is the view's pixels
    from PIL import Image as PILImage

    assert np.array_equal(np.asarray(PILImage.open(path).convert("RGB")), overlaidSecond)


def test_compose_frames_keeps_the_rendered_pixels(tmp_path):
    pictures = [np.full((40, 50, 3), value, np.uint8) for value in (60, 120, 180)]
    path = sliceviews.composeFrames(pictures, ["a", "b", "c"], tmp_path / "strip.png", title="t", gap=4)
    from PIL import Image as PILImage

    strip = np.asarray(PILImage.open(path).convert("RGB"))
    assert strip.shape[1] == 3 * 50 + 2 * 4
    top = strip.shape[0] - 40
    assert np.all(strip[top:, 54:104] == 120)
