"""Preprocessing measured on real scans: brain extraction, N4, registration, time per step.

    OMP_NUM_THREADS=1 python bench/preprocess_real.py [--quick] [--scans colin27 itk-head-t1]

For each real scan (Colin27 with skull from Debian's ``mricron-data``, ITK's head T1 from
``insighttoolkit5-examples``; see Testing/realdata.py):

* **brain mask**: deepbet at its native 256^3 and at the 192^3 the library uses, Dice
  against the reference brain (``ch2bet`` for Colin27, ITK's ``KmeansTest_T1RawSkullStrip``
  for the ITK head), and whether the scan and its reference are recognised as already
  stripped;
* **bias field**: N4 as the pipeline runs it (shrunk estimate, full-resolution field) on the
  scan; and on the reference brain multiplied by a known smooth field (about +-25 %), the
  spread (std of the log ratio to the clean brain) before and after;
* **known motion**: the scan rotated by 10 degrees about an oblique axis and shifted by
  15 mm (the same voxels under a moved affine), registered back at 2 mm (rigid, Mattes MI):
  rotation error (degrees), translation error (mm), target registration error over the
  reference brain's voxels (mean and max, mm); again with the moved head resampled onto the
  scan's own grid plus 3 % noise (new voxels, as a second acquisition); and that pair
  through the whole pipeline (N4, both visits to one another and to the atlas);
* **atlas**: rigid and affine alignment of the scan's deepbet brain to the ICBM 2009a atlas
  (as the pipeline does it), Dice of the reference brain carried into atlas space with the
  template's brain mask, and the time.

``--quick`` works at 3 mm with deepbet at 160^3 (a smoke test, about a minute).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))  # realdata: where the real scans live

from realdata import REAL_SCANS  # noqa: E402

from LongitudinalDiffusionLib import preprocess as P  # noqa: E402
from LongitudinalDiffusionLib.demo.template import load_template  # noqa: E402
from LongitudinalDiffusionLib.imaging import Image, load_image  # noqa: E402

REFERENCE = {"colin27": "colin27-brain", "itk-head-t1": "itk-head-t1-brain"}


def known_motion(degrees: float = 10.0, shift_mm: float = 15.0, centre=(0.0, -18.0, 10.0)) -> np.ndarray:
    """A RAS rigid motion: ``degrees`` about the axis (1, 2, 0.5) through ``centre``, then ``shift_mm``."""
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    c = np.asarray(centre)
    shift = np.array([15.0, -8.0, 5.0]) / np.linalg.norm([15.0, -8.0, 5.0]) * shift_mm
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c - rot @ c + shift
    return m


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def errors(found_lps: np.ndarray, known_lps: np.ndarray, brain: Image) -> tuple[float, float, float, float]:
    """Rotation error (deg), translation error (mm), mean and max TRE over the brain's voxels (mm)."""
    idx = np.argwhere(brain.array > 0).T.astype(np.float64)
    ras = brain.affine[:3, :3] @ idx + brain.affine[:3, 3:4]
    pts = np.vstack([-ras[0], -ras[1], ras[2], np.ones(ras.shape[1])])
    tre = np.linalg.norm((found_lps @ pts - known_lps @ pts)[:3], axis=0)
    rot = P.rotation_angle_deg(np.linalg.inv(known_lps) @ found_lps)
    return rot, float(np.linalg.norm(found_lps[:3, 3] - known_lps[:3, 3])), float(tre.mean()), float(tre.max())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def write_figure(path: Path, name: str, visit1: Image, visit2: Image, prep: P.PreprocessResult) -> None:
    """Axial and coronal mid slices: the two visits as given, both in the model's space, and
    visit 2 carried onto visit 1's grid through the alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("visit 1 as given", visit1),
        ("visit 2 as given\n(10 deg, 15 mm, noise)", visit2),
        ("visit 1 in model space", prep.images[0]),
        ("visit 2 in model space", prep.images[1]),
        ("visit 2 back on\nvisit 1's grid", prep.input_on(visit2, 1, 0)),
    ]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.6))
    import nibabel as nib

    for col, (title, img) in enumerate(panels):
        ornt = nib.io_orientation(img.affine)  # shown in RAS voxel order: axial and coronal whatever the scan's axes
        a = nib.apply_orientation(np.asarray(img.array, dtype=np.float32), ornt)
        sp = [img.spacing[int(axis)] for axis in np.argsort(ornt[:, 0])]
        vmax = float(np.percentile(a, 99.5)) or 1.0
        i, j, k = (n // 2 for n in a.shape)
        for row, (sl, aspect) in enumerate(((a[:, :, k].T, sp[1] / sp[0]), (a[:, j, :].T, sp[2] / sp[0]))):
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(title, fontsize=9)
    axes[0, 0].set_ylabel("axial (mid slice)")
    axes[1, 0].set_ylabel("coronal (mid slice)")
    fig.suptitle(f"{name}: rigid alignment through the ICBM 2009a atlas (bench/preprocess_real.py)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


Rows = list[tuple[str, str, str]]


def bench_scan(name: str, quick: bool, figure: Path | None = None) -> Rows:
    """Every measurement of one real scan, as table rows (step, result, time)."""
    rows: Rows = []
    spacing = 3.0 if quick else None
    scan, t_load = timed(lambda: load_image(REAL_SCANS[name][0]))
    ref = load_image(REAL_SCANS[REFERENCE[name]][0])
    if spacing:
        scan, ref = P._downsampled(scan, spacing), P._downsampled(ref, spacing)
    shape = "x".join(map(str, scan.shape))
    vox = "x".join(f"{s:g}" for s in scan.spacing)
    rows.append(("scan", f"{shape} at {vox} mm, {scan.orientation}", f"load {t_load:.2f} s"))
    mask = brain_extraction(rows, name, scan, ref, quick)
    bias_correction(rows, scan, ref)
    motion = known_motion()
    known = P.ras_to_lps(motion)
    small, noisy = known_motions(rows, name, scan, ref, motion)
    if figure is not None:
        spec = P.PreprocessSpec(bias_field=True, skull_strip=False, align="rigid", atlas="icbm2009a")
        card = {"grid": {"shape": [80, 100, 80], "spacing": [2.0, 2.0, 2.0]}}
        shown = P.preprocess_for(card, [scan, noisy], names=["visit 1", "visit 2"], spec=spec)
        write_figure(figure, name, scan, noisy, shown)
        rows.append(("figure", str(figure), ""))
    pipeline(rows, scan, noisy, known, ref)
    to_atlas(rows, scan, small, mask if spacing else P._downsampled_mask(mask, scan, small), ref)
    return rows


def brain_extraction(rows: Rows, name: str, scan: Image, ref: Image, quick: bool) -> np.ndarray:
    """deepbet at each size against the reference brain, and whether each is already stripped;
    returns the mask of the last size."""
    ref_mask = ref.array > 0
    sizes = (160,) if quick else (256, 192)
    for size in sizes:
        P.extract_brain(scan, size=size)  # warm-up: the model loads and TorchScript compiles once
        mask, t = timed(lambda size=size: P.extract_brain(scan, size=size))
        rows.append((f"deepbet {size}^3", f"Dice vs {REFERENCE[name]} {dice(mask, ref_mask):.3f}", f"{t:.1f} s"))
    ref_bet = P.extract_brain(ref, size=sizes[-1])
    stripped = f"scan {P.is_skull_stripped(scan, mask)}, {REFERENCE[name]} {P.is_skull_stripped(ref, ref_bet)}"
    rows.append(("already stripped?", stripped, ""))
    return mask


def bias_correction(rows: Rows, scan: Image, ref: Image) -> None:
    """N4 on the scan (its time), and on the reference brain shaded by a known field."""
    (_, _), t = timed(lambda: P.correct_bias(scan))
    rows.append(("N4 on the scan", f"shrink 4, {scan.array.size / 1e6:.1f} M voxels", f"{t:.1f} s"))
    clean = ref.array.astype(np.float32)
    inside = clean > 0.3 * clean.max()
    ijk = np.indices(clean.shape, dtype=np.float32)
    bias = np.exp(sum((ijk[a] / clean.shape[a] - 0.5) * w for a, w in enumerate((0.6, -0.4, 0.3)))).astype(np.float32)
    (corrected, _), t = timed(lambda: P.correct_bias(Image(clean * bias, ref.affine), mask=inside))
    before = float(np.std(np.log(bias[inside])))
    after = float(np.std(np.log(corrected.array[inside] / clean[inside])))
    rows.append(("N4 on a known field", f"log-ratio std {before:.3f} -> {after:.3f}", f"{t:.1f} s"))


def known_motions(rows: Rows, name: str, scan: Image, ref: Image, motion: np.ndarray) -> tuple[Image, Image]:
    """A known rigid motion (RAS) recovered: the moved header alone, then the moved head
    resampled with noise; returns the 2 mm scan and the noisy second visit."""
    known = P.ras_to_lps(motion)
    moved = Image(scan.array, motion @ scan.affine, {"source": f"{name} moved"})
    small, small_moved = P._downsampled(scan, 2.0), P._downsampled(moved, 2.0)
    found, t = timed(lambda: P.register(small, small_moved, kind="rigid"))
    rows.append(("known motion, rigid", motion_errors(found, known, ref), f"{t:.1f} s"))
    # harder: the moved head resampled onto the scan's own grid (new voxels, interpolated) with
    # 3 % Gaussian noise, as a second acquisition would be
    rng = np.random.default_rng(0)
    resampled = P._resample(scan, np.linalg.inv(known), scan.affine, scan.shape, labels=False)
    noise = rng.normal(0.0, 0.03 * float(np.percentile(scan.array, 99)), scan.shape).astype(np.float32)
    noisy = Image(resampled.array + noise, scan.affine.copy())
    found, t = timed(lambda: P.register(small, P._downsampled(noisy, 2.0), kind="rigid"))
    rows.append(("known motion, resampled + 3 % noise", motion_errors(found, known, ref), f"{t:.1f} s"))
    return small, noisy


def motion_errors(found: np.ndarray, known: np.ndarray, ref: Image) -> str:
    rot, trans, tre, tre_max = errors(found, known, ref)
    return f"{rot:.3f} deg, {trans:.2f} mm, TRE {tre:.2f} mm (max {tre_max:.2f})"


def pipeline(rows: Rows, scan: Image, noisy: Image, known: np.ndarray, ref: Image) -> None:
    """The whole preprocessing of the two visits: the motion between them it recovers, and each step's time."""
    card = {"grid": {"shape": [32, 40, 32], "spacing": [5.0, 5.0, 5.0]}}
    spec = P.PreprocessSpec(bias_field=True, skull_strip=False, align="rigid", atlas="icbm2009a")
    prep, t = timed(lambda: P.preprocess_for(card, [scan, noisy], names=["v1", "v2"], spec=spec))
    between = prep.scans[1].to_input_lps @ np.linalg.inv(prep.scans[0].to_input_lps)
    steps = "; ".join(f"{s['step']} {s['seconds']:.1f} s" for s in prep.scans[0].steps + prep.scans[1].steps)
    rows.append(
        ("known motion, resampled + noise, pipeline", f"{motion_errors(between, known, ref)}; {steps}", f"{t:.1f} s")
    )


def to_atlas(rows: Rows, scan: Image, small: Image, small_mask: np.ndarray, ref: Image) -> None:
    """The brain (masked as the pipeline masks it) to the atlas, rigid and affine: the reference
    brain carried along against the template's brain."""
    tpl = load_template()
    atlas_affine = tpl.affine.copy()
    atlas_affine[:3, 3] -= tpl.centre_mm
    template_brain = Image((tpl.brain > 0.5).astype(np.uint8), atlas_affine)
    atlas = P.atlas_image("icbm2009a", 2.0)
    ref_mask = ref.array > 0
    for kind in ("rigid", "affine"):
        brain = Image(np.where(small_mask, small.array, 0).astype(np.float32), small.affine)  # as the pipeline
        found, t = timed(lambda kind=kind, brain=brain: P.register(atlas, brain, kind=kind))
        carried = P._resample(Image(ref_mask.astype(np.uint8), ref.affine), found, atlas_affine, tpl.shape, labels=True)
        d = dice(carried.array > 0, template_brain.array > 0)
        rows.append((f"to atlas, {kind}", f"Dice with the template's brain {d:.3f}", f"{t:.1f} s"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 mm copies, deepbet at 160^3 (a smoke test)")
    parser.add_argument("--scans", nargs="+", default=["colin27", "itk-head-t1"], choices=sorted(REFERENCE))
    parser.add_argument("--figures", type=Path, metavar="DIR", help="write preprocess_<scan>.png there")
    args = parser.parse_args(argv)
    import torch

    missing = [n for n in args.scans if not Path(REAL_SCANS[n][0]).is_file()]
    if missing:
        print(f"real scans not installed: {', '.join(missing)} (scripts/setup_tools.sh installs them)")
        return 1
    print(f"# preprocessing on real scans ({'quick' if args.quick else 'full'})")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
    )
    for name in args.scans:
        print(f"\n## {name}\n\n| step | result | time |\n|---|---|---|")
        figure = None if args.figures is None else args.figures / f"preprocess_{name}.png"
        for step, result, t in bench_scan(name, args.quick, figure):
            print(f"| {step} | {result} | {t} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
