"""Pictures of the Slicer panel at work, for docs/slicer.md.

    python scripts/make_panel_images.py

1. ``docs/images/panel_results.png``: the module panel (PySide6 offscreen, the real .ui with
   stand-ins for the Slicer widgets) after a run of the bundled Cas-DiffCom demo model on the
   simulated subject, taken by ``Testing/test_panel_run.py``.
2. ``docs/images/slicer_frames.png``: real Slicer slice-view renders (the red, axial view;
   PyPI trame-slicer, offscreen) of the first, generated and last frame of the completed
   timeline, with each frame's tissue segmentation overlaid. The scene is the one the
   module's run logic makes (``RunLogic.run``: the sample subject, the 7.5-month visit
   completed); the sequence browser selects each frame, and the view cuts through the centre
   of that frame (the scans of different ages have different fields of view).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "LongitudinalDiffusion"), str(ROOT)]


def panelScreenshot() -> None:
    env = dict(os.environ, LONGDIFF_DOCS_IMAGES=str(IMAGES), QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    test = "Testing/test_panel_run.py::test_apply_runs_shows_progress_places_results_and_the_slider_moves_the_frame"
    subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env, check=True)
    print(f"wrote {IMAGES / 'panel_results.png'}")


def frameRenders(steps: int = 20) -> None:
    import slicer
    import torch
    from LongitudinalDiffusionSlicer import headless, sampledata, sliceviews
    from LongitudinalDiffusionSlicer.logic import RunLogic
    from LongitudinalDiffusionSlicer.panel import RunRequest

    from LongitudinalDiffusionLib.catalog import find_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = sampledata.sampleSubjectFolder(tmp)  # the Sample Data subject (2 mm, 28 scans)
        app = headless.bootstrapScene()
        logic = RunLogic(app.scene)
        try:
            subject = logic.loadSubject(folder)
            request = RunRequest(
                "complete-ages", subject, find_model("cas-diffcom-demo"), ages=(7.5,), steps=steps, device="cpu"
            )
            view = logic.run(request, timeout=600)
            timeline = next(s for s in view.placed[0].sequences if s.name.endswith("timeline"))
            picks = [0, timeline.generated.index(True), len(timeline.times) - 1]
            with sliceviews.OffscreenSliceView(app.scene, app.applicationLogic, size=(300, 340)) as sliceView:
                pictures = sliceviews.renderFrames(sliceView, timeline, picks)
            captions = [
                f"{timeline.times[i]:.1f} months ({'generated' if timeline.generated[i] else 'real scan'})"
                for i in picks
            ]
            target = sliceviews.composeFrames(
                pictures,
                captions,
                IMAGES / "slicer_frames.png",
                title="Slicer red slice view (trame-slicer, offscreen): completed timeline with the tissue "
                "segmentation; simulated data, demo models",
            )
            print(f"wrote {target}")
        finally:
            logic.close()
            app.close()
            slicer.mrmlScene = None


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    frameRenders()
    panelScreenshot()


if __name__ == "__main__":
    main()
