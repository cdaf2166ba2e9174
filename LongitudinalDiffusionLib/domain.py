"""Domain checks: is a request, and are these scans, inside what a model was trained on?

Every task runs these checks after loading the model card and before any network runs.
Each check reads the card (``age_range_months``, ``grid``, ``trained_on``, ``domain``) and
the scans as the model grid will receive them (after preprocessing, when it ran), and
returns :class:`Finding` objects of two levels:

* ``refuse``: the result would be garbage or silently cut; the task stops before any
  compute with a :class:`DomainError` that lists every reason (a constant or nearly empty
  image, a single-slice image for a 3D model, scans of one subject that do not overlap in
  world space, a head the model's box would crop, an age outside the trained range);
* ``warn``: the result can be made but deserves doubt; the task goes on and the warning
  reaches the console (logging), the result's provenance (sidecars, ``result.json``), the
  job's event stream (a ``log`` event, so the Slicer panel and the worker's status show it).

Thresholds are stated beside each check; they were set on the real scans listed in
``docs/real-scans.md`` and on the simulated training cohort.

A model's box can be adapted instead of refused: when the grid centred on the field of
view would cut the head but the same grid centred on the head's foreground holds it,
:func:`fit_grid` re-centres it (and says so).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import LongitudinalDiffusionError
from .imaging import Image

log = logging.getLogger(__name__)

__all__ = [
    "DomainError",
    "DomainReport",
    "Finding",
    "WARNING_STAGE",
    "check_aligned_box",
    "check_images",
    "check_request",
    "cropped_fraction",
    "fit_grid",
    "foreground",
]

#: The progress-event stage that carries a warning (jobs.JobEvent turns it into a ``log``
#: event, the CLI's progress bars skip it).
WARNING_STAGE = "warning"

#: Fewer voxels than this along an axis is a slice (or a few), not a volume.
MIN_SLICES = 4
#: Foreground below this many mL (or this fraction of the image) is "nearly empty".
MIN_FOREGROUND_ML = 1.0
MIN_FOREGROUND_FRACTION = 1e-3
#: A foreground threshold at this fraction of the robust (0.5-99.5 percentile) range.
FOREGROUND_LEVEL = 0.1
#: More than this fraction of the foreground outside the model's box is a crop.
MAX_CROPPED = 0.005
#: More than this fraction of a scan's foreground outside the box after alignment: refused.
MAX_ALIGNED_CUT = 0.5
#: Visits whose foreground centres lie further apart than this (mm) are not aligned.
ALIGNED_MM = 10.0
#: Foreground volume outside [lo / slack, hi * slack] of the trained range is out of domain.
VOLUME_SLACK = 1.15
#: Input voxels this many times coarser than the model's are missing detail the model adds.
COARSER = 1.5
#: Input voxels this many times finer than the model's: the result has the model's detail.
FINER = 0.5
#: max/min voxel size above this is strongly anisotropic.
ANISOTROPY = 2.5


@dataclass(frozen=True)
class Finding:
    """One reason for doubt (``warn``) or refusal (``refuse``); ``code`` is stable for programs."""

    level: str  # "warn" | "refuse"
    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class DomainError(LongitudinalDiffusionError):
    """The request or the scans lie outside what the model can do; nothing was computed."""

    def __init__(self, model: str, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        reasons = "; ".join(f.message for f in self.findings)
        super().__init__(f"refused to run model '{model}': {reasons}")


@dataclass
class DomainReport:
    """The findings of one task's checks, in the order they were made."""

    model: str
    findings: list[Finding] = field(default_factory=list)
    #: id(image) -> (image, its foreground): the checks read each scan's foreground several times
    _foregrounds: dict[int, tuple[Image, Foreground]] = field(default_factory=dict, repr=False)

    def foreground(self, image: Image) -> Foreground:
        """:func:`foreground` of ``image``, computed once for this report's checks."""
        kept = self._foregrounds.get(id(image))
        if kept is None or kept[0] is not image:  # the image itself is kept, so its id stays its own
            kept = self._foregrounds[id(image)] = (image, foreground(image))
        return kept[1]

    def add(self, level: str, code: str, message: str) -> None:
        finding = Finding(level, code, message)
        if finding not in self.findings:  # one scan listed twice is one reason, not two
            self.findings.append(finding)

    def extend(self, findings: Sequence[Finding]) -> None:
        self.findings.extend(findings)

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "warn"]

    @property
    def refusals(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "refuse"]

    def raise_if_refused(self) -> None:
        if self.refusals:
            raise DomainError(self.model, self.refusals)

    def announce(self, progress: Any = None) -> None:
        """Send each warning to the log and, as a ``warning`` progress event, to ``progress``."""
        from .progress import ProgressEvent

        for message in self.warnings:
            log.warning("%s", message)
            if progress is not None:
                progress(ProgressEvent(WARNING_STAGE, 0, 0, 0.0, None, message))


# ----------------------------------------------------------------------------- foreground


@dataclass(frozen=True)
class Foreground:
    """The voxels of an image above its foreground level, and their world extent."""

    mask: np.ndarray
    volume_ml: float
    fraction: float
    lo: float
    hi: float
    center_ras: np.ndarray | None
    box_ras: tuple[np.ndarray, np.ndarray] | None  # (min corner, max corner) in RAS mm


def foreground(image: Image) -> Foreground:
    """Voxels above ``lo + FOREGROUND_LEVEL * (hi - lo)`` (lo, hi: the 0.5 and 99.5
    percentiles), the largest connected part with its holes filled; its volume and
    world-space centre and box."""
    from scipy import ndimage

    array = np.asarray(image.array, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(array, (0.5, 99.5)))
    voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    if not hi > lo:
        empty = np.zeros(array.shape, bool)
        return Foreground(empty, 0.0, 0.0, lo, hi, None, None)
    mask = array > lo + FOREGROUND_LEVEL * (hi - lo)
    labelled, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labelled.ravel())[1:]
        mask = labelled == (1 + int(np.argmax(sizes)))
    if mask.ndim == 3 and min(mask.shape) > 1:
        mask = ndimage.binary_fill_holes(mask)
    count = int(mask.sum())
    if not count:
        return Foreground(mask, 0.0, 0.0, lo, hi, None, None)
    idx = np.argwhere(mask)
    corners = np.array(
        [[a, b, c] for a in (idx[:, 0].min(), idx[:, 0].max()) for b in (idx[:, 1].min(), idx[:, 1].max())
         for c in (idx[:, 2].min(), idx[:, 2].max())],
        dtype=np.float64,
    )  # fmt: skip
    world = corners @ image.affine[:3, :3].T + image.affine[:3, 3]
    center = idx.mean(axis=0) @ image.affine[:3, :3].T + image.affine[:3, 3]
    return Foreground(mask, count * voxel_ml, count / mask.size, lo, hi, center, (world.min(0), world.max(0)))


def cropped_fraction(grid: Any, image: Image, fg: Foreground | None = None, *, stride: int = 2) -> float:
    """The fraction of ``image``'s foreground that falls outside ``grid`` placed on it."""
    fg = fg or foreground(image)
    if fg.volume_ml == 0:
        return 0.0
    sub = fg.mask[::stride, ::stride, ::stride]
    idx = np.argwhere(sub).astype(np.float64) * stride
    if not len(idx):
        return 0.0
    to_grid = np.linalg.inv(grid.affine_for(image)) @ image.affine
    g = idx @ to_grid[:3, :3].T + to_grid[:3, 3]
    shape = np.asarray(grid.shape, dtype=np.float64)
    outside = np.any((g < -0.5) | (g > shape - 0.5), axis=1)
    return float(outside.mean())


def fit_grid(
    grid: Any, images: Sequence[Image], report: DomainReport, names: Sequence[str] | None = None, *, strict: bool = True
) -> Any:
    """The model grid to use for ``images``: as the card says, re-centred on the foreground
    when that keeps a head the field-of-view placement would cut, or unchanged with a
    refusal in ``report`` when no placement of the model's box holds the head (a warning
    when not ``strict``: a card that states no ``domain``, such as an imported checkpoint or
    a tiny test model, gets the figure but is not stopped)."""
    names = list(names) if names is not None else [f"input {i + 1}" for i in range(len(images))]
    fgs = [report.foreground(img) for img in images]
    fractions = [cropped_fraction(grid, img, fg) for img, fg in zip(images, fgs)]
    if max(fractions, default=0.0) <= MAX_CROPPED:
        return grid
    if getattr(grid, "center", "fov") != "foreground":
        moved = dataclasses.replace(grid, center="foreground")
        moved_fractions = [cropped_fraction(moved, img, fg) for img, fg in zip(images, fgs)]
        if max(moved_fractions) <= MAX_CROPPED:
            report.add(
                "warn",
                "box-recentred",
                "the model's box was re-centred on the head's foreground: centred on the field of view it "
                f"would cut {100 * max(fractions):.1f} % of {names[int(np.argmax(fractions))]}",
            )
            return moved
        fractions = moved_fractions
    worst = int(np.argmax(fractions))
    fg = fgs[worst]
    span = fg.box_ras[1] - fg.box_ras[0] if fg.box_ras is not None else np.zeros(3)
    extent = " x ".join(f"{e:.0f}" for e in grid.extent_mm)
    report.add(
        "refuse" if strict else "warn",
        "cropped",
        f"{names[worst]}: {100 * fractions[worst]:.1f} % of the head would fall outside the model's "
        f"{extent} mm box (its foreground spans {span[0]:.0f} x {span[1]:.0f} x {span[2]:.0f} mm R-A-S); "
        "crop or skull-strip it first (--preprocess does), or use a model with a larger box",
    )
    return grid


def check_aligned_box(
    originals: Sequence[Image],
    supports: Sequence[np.ndarray],
    report: DomainReport,
    *,
    names: Sequence[str],
    extent_mm: Sequence[float],
) -> None:
    """After alignment into the model's space, how much of each input's head lies outside
    the model's box: the result is blank there. ``supports[i]`` marks, on input ``i``'s own
    grid, the voxels the model's box covers. A small part (the neck, the top of the scalp)
    is a warning; most of the head outside is a refusal (the alignment failed or the scan
    is not what the model expects)."""
    box = " x ".join(f"{e:.0f}" for e in extent_mm)
    for name, img, support in zip(names, originals, supports):
        fg = report.foreground(img)
        if fg.volume_ml == 0:
            continue
        cut = float(1.0 - (fg.mask & support).sum() / fg.mask.sum())
        if cut > MAX_ALIGNED_CUT:
            report.add(
                "refuse",
                "cropped-after-alignment",
                f"{name}: after alignment {100 * cut:.0f} % of the scan's foreground lies outside the model's "
                f"{box} mm box: the alignment failed or the scan does not show a head like the training heads",
            )
        elif cut > MAX_CROPPED:
            report.add(
                "warn",
                "outside-box",
                f"{name}: {100 * cut:.1f} % of the scan's foreground (neck, shoulders, scalp) lies outside the "
                f"model's {box} mm box around the aligned head; the result is blank (0) there",
            )


# ----------------------------------------------------------------------------- checks


def check_request(
    card: Mapping[str, Any],
    report: DomainReport,
    *,
    target_ages: Sequence[float] = (),
    input_ages: Sequence[float] = (),
) -> None:
    """Ages asked for and ages of the inputs against the card's ``age_range_months``."""
    age_range = card.get("age_range_months")
    if not age_range:
        return
    lo, hi = (float(a) for a in age_range)
    outside = [a for a in target_ages if not lo - 1e-6 <= a <= hi + 1e-6]
    if outside:
        report.add(
            "refuse",
            "age-outside",
            f"age(s) {', '.join(f'{a:g}' for a in outside)} months lie outside the ages model "
            f"'{card.get('name')}' was trained on ({lo:g} to {hi:g} months)",
        )
    far = sorted({round(a, 2) for a in input_ages if not lo - 1e-6 <= a <= hi + 1e-6})
    if far:
        report.add(
            "warn",
            "input-age-outside",
            f"scan(s) at {', '.join(f'{a:g}' for a in far)} months lie outside the ages model "
            f"'{card.get('name')}' was trained on ({lo:g} to {hi:g} months): it has never seen such anatomy",
        )


def check_images(
    card: Mapping[str, Any],
    images: Sequence[Image],
    report: DomainReport,
    *,
    names: Sequence[str] | None = None,
    same_subject: bool = True,
    labels: Sequence[str] | None = None,
    distinct: bool = False,
    content: bool = True,
    space: bool = True,
) -> None:
    """The scans against the card.

    Two phases, so that the tasks can check the scans as given before preprocessing
    spends any time on them, and the scans in the model's space after it:

    * ``content``: what each scan holds, as given: a volume (not a slice), not constant nor
      empty, intensities like an MR image, voxel size against the model's; and ``labels``
      (what each scan stands for: an age, a contrast): with ``distinct`` two scans with the
      same voxels under different labels are refused (one scan given as two contrasts),
      else warned (the same scan at two ages shows no change);
    * ``space``: what the model will read: foreground volume against the trained anatomy,
      whether a subject's scans overlap and sit together, and a simulation-trained model
      on real scans.
    """
    names = list(names) if names is not None else [f"input {i + 1}" for i in range(len(images))]
    grid = card.get("grid") or {}
    domain = card.get("domain") or {}
    model_spacing = np.asarray(grid.get("spacing") or card.get("config", {}).get("spacing_mm") or [1, 1, 1], float)
    fgs: list[Foreground | None] = []
    for name, img in zip(names, images):
        fg = _check_content(card, img, name, report) if content else report.foreground(img)
        fgs.append(fg)
        if fg is None:
            continue
        if content:
            _check_intensities(img, fg, name, report)
            _check_spacing(img, model_spacing, name, report)
        if space:
            _check_volume(domain, fg, name, card, report)
    if same_subject and content:
        _check_duplicates(images, names, labels, distinct, report)
    if same_subject and space:
        _check_alignment(names, fgs, report)
    trained = card.get("trained_on") or {}
    simulated_inputs = all("SIMULATED" in str(img.meta) for img in images)
    if space and isinstance(trained, Mapping) and trained.get("simulated") and not simulated_inputs:
        report.add(
            "warn",
            "simulated-training",
            f"model '{card.get('name')}' was trained on simulated data only: on real scans its output "
            "is a demonstration, not a validated image",
        )


def _check_content(card: Mapping[str, Any], img: Image, name: str, report: DomainReport) -> Foreground | None:
    """A volume with something in it: its foreground, or None after a refusal."""
    shape = img.shape[:3] if len(img.shape) >= 3 else (*img.shape, *([1] * (3 - len(img.shape))))
    if min(shape) < MIN_SLICES:
        report.add(
            "refuse",
            "single-slice",
            f"{name} is a {'x'.join(str(s) for s in shape)} image, a slice rather than a volume: "
            f"model '{card.get('name')}' is a 3D model and needs at least {MIN_SLICES} voxels along every axis "
            "(stack 2D frames into a volume only when they are slices of one 3D scan)",
        )
        return None
    lowest, highest = float(np.min(img.array)), float(np.max(img.array))
    if lowest == highest:
        report.add("refuse", "constant", f"{name} is constant (every voxel {lowest:g}): there is nothing to start from")
        return None
    fg = report.foreground(img)
    if not fg.hi > fg.lo or fg.volume_ml < MIN_FOREGROUND_ML or fg.fraction < MIN_FOREGROUND_FRACTION:
        report.add(
            "refuse",
            "empty",
            f"{name} is nearly empty ({fg.volume_ml:.1f} mL above background, "
            f"{100 * fg.fraction:.2f} % of its voxels): there is nothing to start from",
        )
        return None
    return fg


def _check_intensities(img: Image, fg: Foreground, name: str, report: DomainReport) -> None:
    values = np.unique(np.asarray(img.array).ravel()[:: max(1, img.array.size // 200_000)])
    if len(values) <= 16 and np.allclose(values, np.round(values)):
        report.add(
            "warn",
            "label-map",
            f"{name} holds only {len(values)} distinct integer values: it looks like a label map, not an MR image",
        )
    if fg.lo < 0 and abs(fg.lo) > 0.05 * abs(fg.hi):
        report.add(
            "warn",
            "negative",
            f"{name} has strongly negative intensities ({fg.lo:g} to {fg.hi:g}): MR magnitude images are "
            "not negative (a CT, a difference image, or a phase map?)",
        )


def _check_spacing(img: Image, model_spacing: np.ndarray, name: str, report: DomainReport) -> None:
    spacing = np.asarray(img.spacing, float)
    shown = "x".join(f"{s:g}" for s in np.round(spacing, 2))
    model = "x".join(f"{s:g}" for s in model_spacing)
    if spacing.max() > COARSER * model_spacing.max():
        report.add(
            "warn",
            "coarse",
            f"{name} has {shown} mm voxels, coarser than the model's {model} mm: "
            "the model fills in detail the scan does not have",
        )
    elif spacing.max() < FINER * model_spacing.min():
        report.add(
            "warn",
            "fine",
            f"{name} has {shown} mm voxels; the model works at {model} mm, so the result carries "
            f"{model} mm detail resampled onto the scan's voxels",
        )
    if spacing.max() / spacing.min() > ANISOTROPY:
        report.add("warn", "anisotropic", f"{name} is strongly anisotropic ({shown} mm voxels)")


def _check_volume(domain: Mapping[str, Any], fg: Foreground, name: str, card: Mapping[str, Any], report) -> None:
    rng = domain.get("foreground_ml")
    if not rng:
        return
    lo, hi = (float(v) for v in rng)
    if lo / VOLUME_SLACK <= fg.volume_ml <= hi * VOLUME_SLACK:
        return
    what = domain.get("anatomy", "the training scans")
    if fg.volume_ml > hi * VOLUME_SLACK:
        hint = "larger than anything the model saw: an adult head, or neck and shoulders in the field of view?"
        if domain.get("skull_stripped"):
            hint = "larger than anything the model saw: skull and scalp present? the model saw stripped brains"
    else:
        hint = "smaller than anything the model saw: a partial or cropped scan?"
    report.add(
        "warn",
        "foreground-volume",
        f"{name}: {fg.volume_ml:.0f} mL above background, outside the {lo:.0f}-{hi:.0f} mL of {what} "
        f"model '{card.get('name')}' was trained on ({hint})",
    )


def _check_duplicates(
    images: Sequence[Image], names: Sequence[str], labels: Sequence[str] | None, distinct: bool, report: DomainReport
) -> None:
    if labels is None:
        return
    seen: dict[tuple, int] = {}
    for i, img in enumerate(images):
        array = np.ascontiguousarray(img.array)
        key = (array.shape, array.dtype.str, hash(array.tobytes()))
        j = seen.setdefault(key, i)
        if j == i or not np.array_equal(images[j].array, array) or labels[j] == labels[i]:
            continue
        if distinct:
            report.add(
                "refuse",
                "duplicate",
                f"{names[i]} ({labels[i]}) and {names[j]} ({labels[j]}) are the same image: "
                "the model needs a different scan for each",
            )
        else:
            report.add(
                "warn",
                "duplicate",
                f"{names[i]} ({labels[i]}) and {names[j]} ({labels[j]}) are the same image: no change between them",
            )


def _check_alignment(names: Sequence[str], fgs: Sequence[Foreground | None], report: DomainReport) -> None:
    placed = [
        (n, f.center_ras, f.box_ras)
        for n, f in zip(names, fgs)
        if f is not None and f.center_ras is not None and f.box_ras is not None
    ]
    if len(placed) < 2:
        return
    ref_name, ref_center, ref_box = placed[0]
    for name, center, box in placed[1:]:
        dist = float(np.linalg.norm(center - ref_center))
        lo = np.maximum(box[0], ref_box[0])
        hi = np.minimum(box[1], ref_box[1])
        inter = float(np.prod(np.clip(hi - lo, 0, None)))
        smaller = min(float(np.prod(b[1] - b[0])) for b in (box, ref_box))
        overlap = inter / smaller if smaller > 0 else 0.0
        if overlap < 0.5:
            report.add(
                "refuse",
                "no-overlap",
                f"{name} and {ref_name} do not overlap in world space (their foregrounds' centres lie "
                f"{dist:.0f} mm apart, {100 * overlap:.0f} % of the smaller box shared): align the visits first "
                "(--preprocess does)",
            )
        elif dist > ALIGNED_MM:
            report.add(
                "warn",
                "misaligned",
                f"{name} and {ref_name} sit {dist:.0f} mm apart in world space: the model expects aligned "
                "visits (--preprocess aligns them)",
            )
