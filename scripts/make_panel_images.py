"""Pictures of the Slicer panel at work, for docs/slicer.md.

    python scripts/make_panel_images.py

1. ``docs/images/panel_results.png``: the module panel (PySide6 offscreen, the real .ui with
   stand-ins for the Slicer widgets) after a run of the bundled Cas-DiffCom demo model on the
   simulated subject, taken by ``Testing/test_panel_run.py``.
2. ``docs/images/slicer_frames.png``: the first, middle and last frame of the completed
   timeline with the tissue segmentation overlaid. The frames are taken from the real MRML
   scene (slicer-core): the sequence browser selects each frame, and the picture is drawn
   from the proxy volume's voxels and the proxy segmentation exported to a label map, one
   axial slice in Slicer's radiological convention (patient right on screen left). It is a
   numpy/matplotlib composite of those nodes, not a Slicer slice-view render (trame-slicer
   is not installed in this environment).
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


def frameRenders() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import slicer
    import torch
    from LongitudinalDiffusionSlicer import headless, mrml, results

    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
    from LongitudinalDiffusionLib.figures import axial_display, to_ras, window
    from LongitudinalDiffusionLib.imaging import Image
    from LongitudinalDiffusionLib.tasks import complete_ages

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = write_cohort(Path(tmp) / "cohort", CohortSpec(n_subjects=1, heart=False, shape=(32, 40, 32),
                                                                spacing=(5.0, 5.0, 5.0)))  # fmt: skip
        app = headless.bootstrapScene()
        try:
            from LongitudinalDiffusionSlicer.logic import RunLogic

            subject = RunLogic(app.scene).loadSubject(cohort / "sub-001")
            age = 7.5
            result = complete_ages(subject, [age], "cas-diffcom-demo", steps=20, device="cpu")
            placed = results.placeResult(result, app.scene, subject=subject, segmenter=results.TissueSegmenter())
            timeline = next(s for s in placed.sequences if s.name.endswith("timeline"))
            picks = [0, timeline.generated.index(True), len(timeline.times) - 1]
            segmentationsLogic = mrml.moduleLogic("segmentations", app.scene)
            fig, axes = plt.subplots(1, 3, figsize=(9, 3.6), facecolor="black")
            for ax, index in zip(axes, picks):
                proxy = results.selectFrame(timeline.browser, index)
                image = mrml.imageFromVolumeNode(proxy)
                labelNode = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
                segmentationsLogic.ExportAllSegmentsToLabelmapNode(timeline.proxySegmentation(), labelNode, 1)
                labels = mrml.imageFromVolumeNode(labelNode)
                labels = Image(np.asarray(labels.array), labels.affine)
                app.scene.RemoveNode(labelNode)
                volume, _ = to_ras(image)
                labelVolume, _ = to_ras(labels)
                k = int(volume.shape[2] * 0.55)
                lo, hi = window(volume)
                ax.imshow(axial_display(volume, k), cmap="gray", vmin=lo, vmax=hi)
                overlay = np.ma.masked_equal(axial_display(labelVolume, k).astype(float), 0)
                ax.imshow(overlay, cmap="tab10", vmin=0, vmax=9, alpha=0.45, interpolation="nearest")
                kind = "generated" if timeline.generated[index] else "real scan"
                ax.set_title(f"{timeline.times[index]:.1f} months ({kind})", color="white", fontsize=10)
                ax.axis("off")
            fig.suptitle("Completed timeline in the scene: first, generated and last frame, tissue overlay "
                         "(simulated data, demo model)", color="white", fontsize=9)  # fmt: skip
            fig.tight_layout()
            target = IMAGES / "slicer_frames.png"
            fig.savefig(target, dpi=100, facecolor="black")
            plt.close(fig)
            print(f"wrote {target}")
        finally:
            app.close()
            slicer.mrmlScene = None


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    frameRenders()
    panelScreenshot()


if __name__ == "__main__":
    main()
