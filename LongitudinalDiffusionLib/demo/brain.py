"""Simulated infant brain MRI: one subject's anatomy, scanned at any age from 0 to 24 months.

A subject is a random draw (:func:`draw_subject`): head size, maturation speed, ventricle
size, a smooth random deformation of the template anatomy, a small head pose, per-tissue
relaxation jitter, a sex, a visit schedule, and in some subjects a tumour-like lesion. A
session (:func:`simulate_session`) maps every output voxel back into the template through
the subject's pose, the age-dependent growth, the ventricle change and the subject's
deformation; samples the tissue maps there; computes each tissue's relaxation times for the
age (:mod:`.development`); and forms T1w, T2w, FLAIR and contrast-enhanced T1w images through
the signal equations (:mod:`.physics`), with a bias field and Rician noise per scan. The
ground-truth labels come from the same tissue fractions, so they match the images exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..imaging import Image
from . import development as dev
from . import physics
from .template import Template, load_template

#: Ground-truth label values written to the ``_dseg`` files.
BRAIN_LABELS = {
    0: "background",
    1: "CSF",
    2: "grey matter",
    3: "white matter",
    4: "lesion: necrotic core",
    5: "lesion: enhancing rim",
    6: "lesion: oedema",
}
MODALITIES = ("T1w", "T2w", "FLAIR", "T1ce")
#: Planned visits (months); each subject's actual ages scatter around them.
VISITS = (0.5, 3.0, 6.0, 9.0, 12.0, 18.0, 24.0)

DEFAULT_SHAPE = (80, 96, 80)
DEFAULT_SPACING = (2.0, 2.0, 2.0)
_WARP_SPACING_MM = 8.0
#: the coarse deformation's peak (mm) per unit of ``variety`` above 1 (:func:`draw_subject`)
COARSE_WARP_MM = 4.0
MAX_VARIETY = 4.0


@dataclass(frozen=True)
class Lesion:
    """A tumour-like focal lesion, placed in the subject's (pre-growth) template space."""

    centre_mm: tuple[float, float, float]
    radius_mm: float  # of the enhancing rim, when fully grown (template mm)
    onset_months: float
    growth_months: float
    oedema_extent: float  # oedema reaches (1 + extent) * radius
    shape_dirs: tuple[tuple[float, float, float], ...]
    shape_amps: tuple[float, ...]

    def radius_at(self, age_months: float) -> float:
        t = (age_months - self.onset_months) / self.growth_months
        return 0.0 if t <= 0 else self.radius_mm * float(np.clip(t, 0.0, 1.0)) ** 0.5


@dataclass
class BrainSubject:
    """Everything random about one simulated subject (deterministic from its seed)."""

    subject_id: str
    seed: tuple[int, ...]
    sex: str
    size_factor: float
    maturation_rate: float
    ventricle_offset_mm: float
    pose: np.ndarray  # 3x3, output <- template (rotation and mild anisotropic scale)
    warp: np.ndarray  # (3, nx, ny, nz) displacement (mm) on a coarse template-space grid
    warp_origin_mm: np.ndarray
    tissue_jitter: dict[str, tuple[float, float]]  # tissue -> (T1 factor, T2 factor)
    ages: list[float]
    lesion: Lesion | None = None
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The subject's parameters, for participants.tsv and the sidecars."""
        out = {
            "participant_id": f"sub-{self.subject_id}",
            "sex": self.sex,
            "size_factor": round(self.size_factor, 4),
            "maturation_rate": round(self.maturation_rate, 4),
            "ventricle_offset_mm": round(self.ventricle_offset_mm, 3),
            "lesion": "yes" if self.lesion else "no",
        }
        if self.lesion:
            out["lesion_onset_months"] = round(self.lesion.onset_months, 2)
        return out


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_subject(
    rng: np.random.Generator,
    subject_id: str,
    *,
    lesion_probability: float = 0.3,
    missing_visit_probability: float = 0.0,
    seed: tuple[int, ...] = (),
    variety: float = 1.0,
) -> BrainSubject:
    """Draw one subject. The same generator state always gives the same subject.

    ``variety`` > 1 makes the same person further from the template (a harder cohort): the
    head size, ventricle, pose and relaxation-time deviations are multiplied by it, and a
    coarse deformation of peak ``COARSE_WARP_MM * (variety - 1)`` mm, drawn from its own
    generator, joins the fine one (multiplied by ``sqrt(variety)``). The draws from ``rng``
    are the same as at 1, which gives exactly the default cohort's subject.
    """
    if not 1.0 <= variety <= MAX_VARIETY:
        raise ValueError(f"variety must lie in [1, {MAX_VARIETY:g}], got {variety}")

    def wider(value: float, centre: float, lo: float, hi: float) -> float:
        # the deviation from ``centre`` times ``variety``, inside [lo, hi] widened by the same factor
        if variety == 1.0:
            return float(np.clip(value, lo, hi))
        return float(np.clip(centre + (value - centre) * variety, centre + (lo - centre) * variety,
                             centre + (hi - centre) * variety))  # fmt: skip

    tpl = load_template()
    sex = str(rng.choice(["F", "M"]))
    size = wider(rng.normal(1.0, 0.035), 1.0, 0.9, 1.1) * (1.015 if sex == "M" else 0.985)
    rate = float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2))
    vent = wider(rng.normal(0.0, 0.35), 0.0, -0.6, 0.9)
    angles, drawn = rng.normal(0.0, 3.0, 3), rng.normal(1.0, 0.03, 3)
    stretch = np.clip(drawn, 0.92, 1.08) if variety == 1.0 else np.array([wider(v, 1.0, 0.92, 1.08) for v in drawn])
    pose = _rotation(angles * variety) @ np.diag(stretch)

    # Smooth random anatomy: Gaussian-filtered noise on an 8 mm grid, peak about 3.5 mm.
    lo = tpl.affine[:3, 3]
    hi = tpl.affine[:3, :3] @ (np.array(tpl.shape) - 1) + lo
    n = np.ceil((hi - lo) / _WARP_SPACING_MM).astype(int) + 1
    warp = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, n), 1.5, mode="wrap") for _ in range(3)])
    warp *= float(rng.uniform(2.5, 4.5)) / max(float(np.abs(warp).max()), 1e-6)
    if variety > 1.0:
        warp = warp * np.sqrt(variety) + _coarse_warp(np.random.default_rng([*seed, 17]), n, variety)

    jitter = {
        t: (wider(rng.normal(1, 0.03), 1.0, 0.0, 2.0), wider(rng.normal(1, 0.03), 1.0, 0.0, 2.0))
        for t in ("gm", "wm", "csf")
    }

    ages = []
    for i, visit in enumerate(VISITS):
        if i == 0:
            age = rng.uniform(0.1, 1.0)
        else:
            age = visit + rng.normal(0.0, 0.3)
        ages.append(float(np.clip(round(age, 2), 0.0, dev.MAX_AGE_MONTHS)))
    keep = [a for i, a in enumerate(ages) if i in (0, len(ages) - 1) or rng.uniform() >= missing_visit_probability]

    lesion = None
    if rng.uniform() < lesion_probability:
        lesion = _draw_lesion(rng, tpl)
    return BrainSubject(
        subject_id=subject_id,
        seed=tuple(seed),
        sex=sex,
        size_factor=size,
        maturation_rate=rate,
        ventricle_offset_mm=vent,
        pose=pose,
        warp=warp.astype(np.float32),
        warp_origin_mm=lo,
        tissue_jitter=jitter,
        ages=sorted(keep),
        lesion=lesion,
    )


def _coarse_warp(rng: np.random.Generator, n: np.ndarray, variety: float) -> np.ndarray:
    """A smooth deformation on the warp grid at the scale of lobes (sigma 3 grid cells, 24 mm),
    peak ``COARSE_WARP_MM * (variety - 1)`` mm: shape variety a smooth small warp cannot give."""
    field = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, n), 3.0, mode="wrap") for _ in range(3)])
    return field * (COARSE_WARP_MM * (variety - 1.0) / max(float(np.abs(field).max()), 1e-6))


def deformation_stats(subject: BrainSubject) -> dict[str, float]:
    """How far ``subject``'s anatomy is from the template, inside the template brain: the RMS
    and largest displacement (mm) and the smallest Jacobian determinant of the deformation
    (above 0: no folding)."""
    tpl = load_template()
    inside = np.argwhere(tpl.brain > 0.5)[::7].T.astype(np.float64)
    q = tpl.affine[:3, :3] @ inside + tpl.affine[:3, 3:4]
    wv = (q - subject.warp_origin_mm[:, None]) / _WARP_SPACING_MM
    disp = np.stack([_sample(subject.warp[c].astype(np.float64), wv) for c in range(3)])
    grads = [np.gradient(subject.warp[c].astype(np.float64), _WARP_SPACING_MM) for c in range(3)]
    jac = np.eye(3)[:, :, None, None, None] + np.array(grads)
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    norm = np.sqrt((disp**2).sum(0))
    return {
        "rms_mm": float(np.sqrt((norm**2).mean())),
        "max_mm": float(norm.max()),
        "min_jacobian": float(det.min()),
    }


def _draw_lesion(rng: np.random.Generator, tpl: Template) -> Lesion:
    cand = tpl.lesion_sites
    ijk = cand[rng.integers(len(cand))].astype(np.float64)
    centre = tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3]
    dirs = rng.normal(0, 1, (4, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return Lesion(
        centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        radius_mm=float(rng.uniform(9.0, 15.0)),
        onset_months=float(rng.uniform(0.0, 10.0)),
        growth_months=float(rng.uniform(4.0, 10.0)),
        oedema_extent=float(rng.uniform(0.5, 1.1)),
        shape_dirs=tuple((float(d[0]), float(d[1]), float(d[2])) for d in dirs),
        shape_amps=tuple(float(a) for a in rng.uniform(0.05, 0.18, 4)),
    )


def subject_scale(subject: BrainSubject, age: float) -> float:
    """Linear size of ``subject``'s brain at ``age`` relative to the template's."""
    return float(dev.brain_scale(age, subject.size_factor, load_template().tissue_ml))


def output_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of the scan grid, centred on the head (world origin at the FOV centre)."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return aff


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Smooth step from 0 (x << 0) to 1 (x >> 0) over ``width``: soft partial volumes."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _sample(volume: np.ndarray, vox: np.ndarray, order: int = 1) -> np.ndarray:
    return ndimage.map_coordinates(volume, vox, order=order, mode="nearest", prefilter=False)


@dataclass
class Session:
    """One simulated scan session: images per modality, labels and what went into them."""

    age_months: float
    images: dict[str, Image]
    labels: Image
    meta: dict


def tissue_fractions(
    subject: BrainSubject,
    age: float,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-voxel tissue fractions (flattened) at ``age``, the per-voxel myelination maturity
    coordinate, and the output affine."""
    tpl = load_template()
    affine = output_affine(shape, spacing)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]

    scale = subject_scale(subject, age)
    q = tpl.centre_mm[:, None] + np.linalg.inv(subject.pose) @ world / scale
    # Ventricles and the grey/white interface change with age: sampling the template
    # closer to a structure makes it bigger (relatively large ventricles and white matter,
    # thin cortex in the newborn).
    vq = tpl.world_to_voxel(q)
    for push, excess in (
        (tpl.ventricle_push, dev.ventricle_excess_mm(age, subject.ventricle_offset_mm)),
        (tpl.white_matter_push, dev.white_matter_excess_mm(age)),
    ):
        q = q + float(excess) * np.stack([_sample(push[c], vq) for c in range(3)])
    # The subject's own anatomy: a smooth random deformation of the template.
    wv = (q - subject.warp_origin_mm[:, None]) / _WARP_SPACING_MM
    p = q + np.stack([_sample(subject.warp[c], wv, order=1) for c in range(3)])
    vox = tpl.world_to_voxel(p)

    brain = _sample(tpl.brain, vox)
    gm = _sample(tpl.gm, vox)
    wm = _sample(tpl.wm, vox)
    maturation = _sample(tpl.maturation, vox)
    outside = _sample(tpl.outside_mm, vox)
    # Beyond the template's box (sideways, forwards, upwards) keep counting the distance;
    # downwards the column under the template's lowest slice becomes the neck (below).
    lim = np.array(tpl.shape, dtype=np.float32)[:, None] - 1
    beyond = np.maximum(vox - lim, 0) + np.maximum(-vox, 0)
    beyond[2] = np.maximum(vox[2] - lim[2, 0], 0)
    outside = outside + np.sqrt((beyond**2).sum(0))

    gm = np.minimum(gm, brain)
    wm = np.minimum(wm, np.clip(brain - gm, 0, 1))
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    width = max(spacing) / scale  # one output voxel, in template mm
    rest = 1.0 - brain

    # Shells outside the brain (template mm): subarachnoid CSF, dura, skull, scalp fat, muscle.
    e = float(dev.extra_axial_csf_mm(age))
    bone = 1.6 + 3.0 * age / dev.MAX_AGE_MONTHS
    edges = np.cumsum([0.0, e, 1.0, bone, 4.0, 1.5])
    cum = [_ramp(outside - edge, width) for edge in edges[1:]]
    shells = [1.0 - cum[0]] + [cum[i] - cum[i + 1] for i in range(len(cum) - 1)]
    extra_csf, dura, skull, scalp, muscle = (rest * s for s in shells)

    # The template ends at the foramen magnum: below it there is no brain but a neck,
    # muscle wrapped in the scalp's fat and skin.
    neck = _ramp(-vox[2], width)
    keep = 1.0 - neck
    muscle = muscle + neck * (brain + extra_csf + dura + skull)
    fractions = {
        "csf": (csf + extra_csf) * keep,
        "gm": gm * keep,
        "wm": wm * keep,
        "dura": dura * keep,
        "bone": skull * keep,
        "scalp": scalp,
        "muscle": muscle,
    }
    if subject.lesion is not None:
        _add_lesion(fractions, subject.lesion, age, q, width)
    return fractions, maturation, affine


def _add_lesion(fractions: dict, lesion: Lesion, age: float, q: np.ndarray, width: float) -> None:
    radius = lesion.radius_at(age)
    if radius <= 0:
        return
    d = q - np.asarray(lesion.centre_mm)[:, None]
    r = np.sqrt((d**2).sum(0)) + 1e-6
    u = d / r
    bump = sum(a * np.cos(3.0 * (np.asarray(v) @ u)) for v, a in zip(lesion.shape_dirs, lesion.shape_amps))
    rho = r / (radius * (1.0 + bump))  # irregular outline
    w = width / radius
    brain = fractions["gm"] + fractions["wm"] + np.where(r < 3 * radius, fractions["csf"], 0)
    core = _ramp(0.5 - rho, w) * brain
    rim = np.clip(_ramp(1.0 - rho, w) * brain - core, 0, 1)
    solid = core + rim
    keep = np.clip(1.0 - solid / np.maximum(brain, 1e-6), 0.0, 1.0)
    for t in ("gm", "wm"):
        fractions[t] = fractions[t] * keep
    fractions["csf"] = np.where(r < 3 * radius, fractions["csf"] * keep, fractions["csf"])
    # Oedema follows white matter (vasogenic oedema spreads along tracts).
    halo = np.clip(_ramp(1.0 + lesion.oedema_extent - rho, w) - _ramp(1.0 - rho, w), 0, 1)
    fractions["oedema_wm"] = halo * fractions["wm"]
    fractions["oedema_gm"] = 0.35 * halo * fractions["gm"]
    fractions["wm"] = fractions["wm"] - fractions["oedema_wm"]
    fractions["gm"] = fractions["gm"] - fractions["oedema_gm"]
    fractions["necrosis"] = core
    fractions["tumour"] = rim


def simulate_session(
    subject: BrainSubject,
    age: float,
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    modalities: tuple[str, ...] = MODALITIES,
) -> Session:
    """Scan ``subject`` at ``age`` months: images for each modality plus labels."""
    if not 0.0 <= age <= dev.MAX_AGE_MONTHS:
        raise ValueError(f"age {age} months is outside the simulated range 0..{dev.MAX_AGE_MONTHS:g}")
    fr, maturation, affine = tissue_fractions(subject, age, shape, spacing)

    jit = subject.tissue_jitter
    gm = dev.grey_matter(age)
    m1 = dev.myelination(maturation, age, subject.maturation_rate)
    m2 = dev.myelination(maturation, age, subject.maturation_rate, lag=4.0)
    wm_t1, wm_t2, wm_pd = dev.white_matter(m1, m2)
    wm_t1, wm_t2 = wm_t1 * jit["wm"][0], wm_t2 * jit["wm"][1]
    gm_t1, gm_t2, gm_pd = gm.t1 * jit["gm"][0], gm.t2 * jit["gm"][1], gm.pd
    params = {  # tissue -> (T1, T2, PD, gadolinium mM)
        "csf": (dev.CSF.t1 * jit["csf"][0], dev.CSF.t2 * jit["csf"][1], dev.CSF.pd, 0.0),
        "gm": (gm_t1, gm_t2, gm_pd, 0.0),
        "wm": (wm_t1, wm_t2, wm_pd, 0.0),
        "dura": (dev.DURA.t1, dev.DURA.t2, dev.DURA.pd, dev.GD_DURA_MM),
        "bone": (dev.BONE.t1, dev.BONE.t2, dev.BONE.pd, 0.0),
        "scalp": (dev.SCALP.t1, dev.SCALP.t2, dev.SCALP.pd, 0.05),
        "muscle": (dev.MUSCLE.t1, dev.MUSCLE.t2, dev.MUSCLE.pd, 0.1),
        "necrosis": (dev.NECROSIS.t1, dev.NECROSIS.t2, dev.NECROSIS.pd, 0.0),
        "tumour": (dev.TUMOUR.t1, dev.TUMOUR.t2, dev.TUMOUR.pd, dev.GD_TUMOUR_MM),
        "oedema_wm": (*dev.oedema(wm_t1, wm_t2, wm_pd), 0.0),
        "oedema_gm": (*dev.oedema(gm_t1, gm_t2, gm_pd), 0.0),
    }

    brain_mask = (fr["gm"] + fr["wm"] + fr.get("tumour", 0) + fr.get("necrosis", 0)) > 0.3
    images: dict[str, Image] = {}
    scan_meta: dict[str, dict] = {}
    for name in modalities:
        seq = physics.SEQUENCES[name]
        clean = np.zeros(fr["gm"].shape, np.float64)
        for tissue, frac in fr.items():
            t1, t2, pd, gd = params[tissue]
            clean += frac * physics.signal(seq, t1, t2, pd, gd)
        gain = 1000.0 * rng.uniform(0.85, 1.2) / max(float(clean[brain_mask].mean()), 1e-6)
        snr = rng.uniform(22.0, 40.0)
        bias = physics.bias_field(rng, shape).reshape(-1)
        sigma = 1000.0 / snr
        noisy = physics.rician(rng, (clean * gain * bias).astype(np.float32), sigma)
        images[name] = Image(noisy.reshape(shape).astype(np.float32), affine.copy())
        scan_meta[name] = {**seq.bids_sidecar(), "SimulatedSNR": round(float(snr), 2)}

    labels = _labels(fr, shape)
    meta = {
        "AgeMonths": age,
        "BrainScale": round(subject_scale(subject, age), 4),
        "MeanWhiteMatterMyelinationT1": round(float((m1 * fr["wm"]).sum() / max(fr["wm"].sum(), 1e-6)), 4),
        "MeanWhiteMatterMyelinationT2": round(float((m2 * fr["wm"]).sum() / max(fr["wm"].sum(), 1e-6)), 4),
        "LesionRadiusMm": round(subject.lesion.radius_at(age) * subject_scale(subject, age), 2)
        if subject.lesion
        else 0.0,
        "scans": scan_meta,
    }
    return Session(age, images, Image(labels, affine.copy()), meta)


def _labels(fr: dict[str, np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    zero = np.zeros_like(fr["gm"])
    classes = [
        fr["dura"] + fr["bone"] + fr["scalp"] + fr["muscle"],  # 0: non-brain head tissue
        fr["csf"],
        fr["gm"],
        fr["wm"],
        fr.get("necrosis", zero),
        fr.get("tumour", zero),
        fr.get("oedema_wm", zero) + fr.get("oedema_gm", zero),
    ]
    stack = np.stack(classes)
    labels = stack.argmax(0).astype(np.uint8)
    labels[stack.sum(0) < 0.5] = 0  # mostly air
    return labels.reshape(shape)
