"""Regenerate the pictures in docs/images and the extension icons from the simulated cohort.

    python scripts/make_docs_images.py

Runs `longdiff demo` (seed 0) into a temporary folder, copies its figures to
docs/images/ (demo_*.png, heart_frames.png), draws the 128x128 icon (one simulated subject at three ages, T2w), and has
the panel test (PySide6, offscreen) save its screenshot as docs/images/panel.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from LongitudinalDiffusionLib.cli import main as longdiff
from LongitudinalDiffusionLib.figures import axial_display, to_ras, window
from LongitudinalDiffusionLib.subject import load_bids_subject

ROOT = Path(__file__).resolve().parents[1]


def icon(subject, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ages = subject.ages()
    picks = [ages[0], ages[len(ages) // 2], ages[-1]]
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    fig.patch.set_facecolor("black")
    for i, age in enumerate(picks):
        vol, _ = to_ras(subject.get(age, "T2w").image)
        k = int(vol.shape[2] * 0.58)
        sl = axial_display(vol, k)[8:-8, 10:-10]
        lo, hi = window(vol)
        ax = fig.add_axes((0.02 + i * 0.32, 0.18, 0.32, 0.64))
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
        ax.axis("off")
    fig.savefig(out, facecolor="black")
    plt.close(fig)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        assert longdiff(["-q", "demo", str(out), "--subjects", "1", "--seed", "0"]) == 0
        names = {"sub-001_montage.png": "demo_montage.png", "heart_frames.png": "heart_frames.png"}
        names |= {f"{task}.png": f"demo_{task}.png" for task in ("missing_age", "missing_modality", "frames")}
        names["tissue_volumes.png"] = "demo_tissue_volumes.png"
        for name, picture in names.items():
            target = ROOT / "docs" / "images" / picture
            shutil.copyfile(out / "figures" / name, target)
            print(f"wrote {target}")
        subject = load_bids_subject(out / "cohort", subject="001")
        for target in (
            ROOT / "Resources" / "Icons" / "LongitudinalDiffusion.png",
            ROOT / "LongitudinalDiffusion" / "Resources" / "Icons" / "LongitudinalDiffusion.png",
        ):
            icon(subject, target)
            print(f"wrote {target}")
    env = dict(os.environ, LONGDIFF_DOCS_IMAGES=str(ROOT / "docs" / "images"), QT_QPA_PLATFORM="offscreen")
    test = "Testing/test_panel.py::test_a_model_card_is_listed_shown_and_enables_apply"
    subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env, check=True)
    print(f"wrote {ROOT / 'docs' / 'images' / 'panel.png'}")


if __name__ == "__main__":
    main()
