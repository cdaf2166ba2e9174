"""Figures a person would rather look at than read: montages of a subject over ages.

Slices are shown as a radiologist (and Slicer) shows them: patient right on screen left,
anterior up, after reorienting each image to RAS. Matplotlib runs with the non-interactive
Agg backend, so figures can be made on a server without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .imaging import Image, atomic_write

#: Colours of the label overlay (index -> RGBA); label 0 is transparent.
LABEL_COLOURS = {
    1: (0.25, 0.55, 1.00, 0.55),
    2: (0.20, 0.80, 0.30, 0.45),
    3: (1.00, 0.85, 0.20, 0.45),
    4: (0.60, 0.20, 0.80, 0.75),
    5: (1.00, 0.15, 0.15, 0.80),
    6: (1.00, 0.55, 0.10, 0.60),
}


def to_ras(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """The image's array reoriented (by axis flips/permutations only) to RAS, and its affine."""
    ornt = nib.orientations.io_orientation(image.affine)
    array = nib.orientations.apply_orientation(np.asarray(image.array), ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[:3])
    return array, affine


def _slice_index(affine_ras: np.ndarray, shape: tuple[int, ...], world: np.ndarray) -> int:
    """Axial index of a RAS volume nearest to the world point ``world`` (mm)."""
    ijk = np.linalg.inv(affine_ras) @ np.append(world, 1.0)
    return int(np.clip(np.round(ijk[2]), 0, shape[2] - 1))


def axial_display(volume_ras: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS volume as a display array (radiological convention)."""
    return volume_ras[:, :, k].T[::-1, ::-1]


def window(array: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """Display window from percentiles of the non-background voxels."""
    vals = array[array > np.percentile(array, 20)] if array.size > 100 else array.ravel()
    if vals.size == 0:
        vals = array.ravel()
    lo, hi = np.percentile(vals, [lo_pct, hi_pct])
    return float(lo), float(max(hi, lo + 1e-6))


def pick_axial_slice(volume_ras: np.ndarray, labels_ras: np.ndarray | None = None) -> int:
    """A slice worth showing: through a lesion if labels show one, else just above the
    centre of the head (where the ventricles are)."""
    if labels_ras is not None and np.any(labels_ras >= 4):
        return int(np.round(np.argwhere(labels_ras >= 4)[:, 2].mean()))
    fg = volume_ras > np.percentile(volume_ras, 60)
    if not fg.any():
        return volume_ras.shape[2] // 2
    zs = np.argwhere(fg)[:, 2]
    return int(np.clip(zs.mean() + 0.12 * (zs.max() - zs.min()), 0, volume_ras.shape[2] - 1))


def _reference_point(images, labels, ages) -> np.ndarray:
    if labels:
        sizes = {a: int((np.asarray(im.array) >= 4).sum()) for a, im in labels.items()}
        best = max(sizes, key=lambda a: sizes[a])
        if sizes[best]:
            arr, aff = to_ras(labels[best])
            k = pick_axial_slice(arr, arr)
            return (aff @ np.array([arr.shape[0] / 2, arr.shape[1] / 2, k, 1.0]))[:3]
    last = ages[-1]
    image = next((per_age[last] for per_age in images.values() if last in per_age), None)
    if image is None:
        image = labels[last]
    arr, aff = to_ras(image)
    k = pick_axial_slice(arr)
    return (aff @ np.array([arr.shape[0] / 2, arr.shape[1] / 2, k, 1.0]))[:3]


# long by its signature and docstring: 60 lines of code, one figure
def subject_montage(
    images: Mapping[str, Mapping[float, Image]],
    out: str | os.PathLike,
    *,
    labels: Mapping[float, Image] | None = None,
    title: str = "",
    simulated: bool = False,
    age_unit: str = "mo",
    focus_mm: Sequence[float] | None = None,
    label_colours: Mapping[int, tuple[float, float, float, float]] = LABEL_COLOURS,
    empty_text: str | Mapping[str, str] = "missing",
) -> Path:
    """Write a PNG grid: one row per modality (+ a label row), one column per age.

    Args:
        images: modality -> {age: Image}. Missing (modality, age) cells are drawn empty,
            which is exactly what a gap in a longitudinal study looks like.
        out: PNG path (written atomically).
        labels: age -> label Image, drawn as a colour overlay on the first modality.
        title: figure title; ``simulated`` adds a visible "SIMULATED" badge.
        age_unit: shown after each column's value ("mo", "ms", ...).
        focus_mm: a world point (RAS mm) the axial slices go through; by default a lesion
            if the labels show one, else the upper middle of the last head.
        label_colours: label value -> RGBA of the overlay.
        empty_text: the word in an empty cell, or row -> word (rows not named: "missing");
            e.g. "" for a row of generated images, where an empty cell is simply not asked for.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    modalities = list(images)
    ages = sorted({a for per_age in images.values() for a in per_age} | set(labels or {}))
    rows = modalities + (["labels"] if labels else [])
    if not ages or not rows:
        raise ValueError("nothing to draw: no images given")

    # One world position for every column, so the same anatomy is shown at every age:
    # through the largest lesion if the labels show one, else the last (largest) head.
    fig, axes = plt.subplots(len(rows), len(ages), figsize=(1.9 * len(ages), 2.05 * len(rows) + 0.6), squeeze=False)
    fig.patch.set_facecolor("black")
    n_colours = max(label_colours, default=1) + 1
    cmap = ListedColormap([(0, 0, 0, 0)] + [label_colours.get(i, (1, 1, 1, 0.5)) for i in range(1, n_colours)])
    world = np.asarray(focus_mm, float) if focus_mm is not None else _reference_point(images, labels, ages)
    for c, age in enumerate(ages):
        age_labels = labels.get(age) if labels else None
        lab_ras = to_ras(age_labels)[0] if age_labels is not None else None
        ref = next((images[m][age] for m in modalities if age in images[m]), age_labels)
        if ref is None:  # cannot happen: every age comes from an image or a label map
            raise ValueError(f"no image or label map at age {age}")
        ref_arr, ref_aff = to_ras(ref)
        k = _slice_index(ref_aff, ref_arr.shape, world)
        for r, row in enumerate(rows):
            ax = axes[r, c]
            _blank_axes(ax)
            if row == "labels":
                base = images[modalities[0]].get(age) if modalities else None
                if base is not None:
                    _draw_gray(ax, to_ras(base)[0], k)
                if lab_ras is not None:
                    ax.imshow(
                        axial_display(lab_ras, k), cmap=cmap, vmin=-0.5, vmax=n_colours - 0.5, interpolation="nearest"
                    )
            elif age in images[row]:
                _draw_gray(ax, to_ras(images[row][age])[0], k)
            else:
                text = empty_text if isinstance(empty_text, str) else empty_text.get(row, "missing")
                ax.text(0.5, 0.5, text, color="#888888", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(f"{age:.1f} {age_unit}", color="white", fontsize=10)
            if c == 0:
                ax.set_ylabel(row, color="white", fontsize=10)
    badge = "  [SIMULATED DATA]" if simulated else ""
    fig.suptitle(title + badge, color="white", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out)

    def _save(tmp: str) -> None:
        fig.savefig(tmp, dpi=90, facecolor=fig.get_facecolor(), format="png")

    try:
        atomic_write(out, _save)
    finally:
        plt.close(fig)
    return out


def _blank_axes(ax: Any) -> None:
    """A black cell without ticks, framed in dark grey."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    for side in ax.spines.values():
        side.set_color("#333333")


def _draw_gray(ax: Any, vol: np.ndarray, k: int) -> None:
    """Axial slice ``k`` of a RAS volume in grey, windowed on the volume."""
    lo, hi = window(vol)
    ax.imshow(axial_display(vol, k), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")


def montage_from_timepoints(
    timepoints: Sequence,
    out: str | os.PathLike,
    *,
    title: str = "",
    simulated: bool = False,
    labels: Mapping[float, Image] | None = None,
) -> Path:
    """Montage from objects with ``age``, ``modality`` and ``image`` (e.g. a Subject's timepoints)."""
    grid: dict[str, dict[float, Image]] = {}
    for tp in timepoints:
        grid.setdefault(str(getattr(tp.modality, "value", tp.modality)), {})[float(tp.age)] = tp.image
    order = ["T1w", "T2w", "FLAIR", "T1ce"]
    grid = {m: grid[m] for m in sorted(grid, key=lambda m: (order.index(m) if m in order else 99, m))}
    return subject_montage(grid, out, labels=labels, title=title, simulated=simulated)


#: Overlay colours of the heart phantom's labels (LV blood pool, LV myocardium, RV blood pool).
HEART_COLOURS = {1: (1.0, 0.2, 0.2, 0.45), 2: (0.2, 0.85, 0.3, 0.55), 3: (0.25, 0.5, 1.0, 0.45)}


def cine_montage(folder: str | os.PathLike, out: str | os.PathLike, *, title: str = "") -> Path:
    """Draw a cine written by the heart phantom (``manifest.tsv`` with file, time_ms,
    labels) as one row of frames and one row with the labels overlaid, through the
    left ventricle's centre at the first frame."""
    import csv

    from .imaging import load_image

    folder = Path(folder)
    with open(folder / "manifest.tsv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    frames = {float(r["time_ms"]): load_image(folder / r["file"]) for r in rows}
    labels = {float(r["time_ms"]): load_image(folder / r["labels"], dtype=np.int16) for r in rows if r.get("labels")}
    return frames_montage(
        frames, labels, out, title=title or f"{folder.parent.name}: end-diastole to end-systole", unit="ms"
    )


def frames_montage(
    frames: Mapping[float, Image],
    labels: Mapping[float, Image] | None,
    out: str | os.PathLike,
    *,
    title: str,
    unit: str,
    row: str = "bSSFP",
) -> Path:
    """Heart frames in one row and the labels overlaid in a second, through the left
    ventricle's centre (label 1) of the first frame; columns keyed by time in ``unit``."""
    focus = None
    if labels:
        first = labels[min(labels)]
        arr = np.asarray(first.array)
        ijk = np.argwhere(arr == 1).mean(0) if np.any(arr == 1) else np.array(first.shape) / 2
        focus = (first.affine @ np.append(ijk, 1.0))[:3]
    return subject_montage(
        {row: dict(frames)},
        out,
        labels=dict(labels) if labels else None,
        title=title,
        simulated=True,
        age_unit=unit,
        focus_mm=focus,
        label_colours=HEART_COLOURS,
    )
