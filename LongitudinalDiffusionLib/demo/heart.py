"""Simulated 3D+t beating heart: a balanced-SSFP cine from end-diastole to end-systole.

No real cardiac data ships with the extension, so the demos, the tests and the training of
the diffusion deformable model (DDM), which makes the frames between two scans, use this
phantom. Everything in it is simulated, and its metadata says so (``"simulated": True``).

Anatomy (millimetres, RAS world coordinates, the body's midline at x = 0):

* the **left ventricle** (LV) is a thick-walled, truncated prolate spheroid: two nested
  ellipsoids of revolution (endocardium and epicardium) cut by the basal (mitral) plane half
  a semi-long axis beyond their equator, the classic geometry of LV mechanics (Streeter &
  Hanna, Circ. Res. 1973). The base is open: a thin-walled **left atrium** sits on it;
* the **right ventricle** (RV) is a crescent: an ellipsoid offset towards the septum, minus
  the LV, so its cavity wraps round the septum; its free wall is 3-4 mm thick, and a
  **right atrium** sits on its tricuspid plane;
* the long axis points from the base towards the apex left, anteriorly and inferiorly
  (about 45 degrees from the sagittal plane and 30 degrees below the axial one, varied per
  subject), so the heart is oblique to the scanner axes as real hearts are;
* round it: **lung** (low proton density), the **chest wall** (skeletal muscle under
  subcutaneous fat), the **diaphragm** with the liver below it, and the **descending aorta**
  beside the spine (visible when the field of view reaches that far back).

Motion, from end-diastole (ED, frame 0) to end-systole (ES, last frame):

* the LV cavity volume falls from EDV to ESV = EDV * (1 - EF), EF drawn in 55-65 % (normal
  CMR values: Kawel-Boehm et al., J. Cardiovasc. Magn. Reson. 2015;17:29);
* the apex stays put and the base descends towards it by 13-17 % of the LV length (11-17 mm,
  the mitral annular excursion; Rogers et al., Circulation 1991;84:721), the tricuspid plane by
  16-22 mm (TAPSE);
* the cavity narrows radially and the wall thickens: the epicardium is solved, frame by frame,
  so that the myocardial volume stays exactly the ED one (the myocardium is nearly
  incompressible; Yin et al., Am. J. Physiol. 1996;271:H1864). The wall thickens by 35-60 %;
* the time course is a raised cosine, ``s(t) = (1 - cos(pi t / T_sys)) / 2``, with the
  end-systolic time ``T_sys`` drawn in 300-350 ms. Twist is left out: the LV surfaces are
  surfaces of revolution and the myocardium has no texture, so a rotation about the long
  axis would not change a single voxel.

Image formation: each voxel holds fractions of air, lung, fat, skeletal muscle, liver,
myocardium and blood, computed from anti-aliased edges (the signed distance to each surface
against the voxel's width across it), never from hard masks. Each tissue gives the
balanced-SSFP steady state at TE = TR/2 when TR << T2 (Scheffler & Lehnhardt, Eur. Radiol.
2003;13:2409):

``S = PD * sin(a) / ((T1/T2 + 1) - cos(a) * (T1/T2 - 1))``

with 1.5 T relaxation times and proton densities (:data:`TISSUES_1P5T`; Stanisz et al., Magn.
Reson. Med. 2005;54:507; Messroghli et al., Magn. Reson. Med. 2004;52:141; Giri et al., J.
Cardiovasc. Magn. Reson. 2009;11:56; de Bazelaire et al., Radiology 2004;230:652; Hatabu et
al., Eur. J. Radiol. 1999;29:245; Stadler et al., J. Magn. Reson. Imaging 2005;21:759), the
flip angle drawn in 50-60 degrees. Partial volumes mix signals. The result is multiplied by
the receive field of a 12-element chest array (root-sum-of-squares of loop-coil profiles,
partly flattened as vendors' intensity normalisation does) and shown as the magnitude of a
complex value with Gaussian noise in both channels, which makes the noise Rician
(Gudbjartsson & Patz, Magn. Reson. Med. 1995;34:910).

Labels (:data:`HEART_LABELS`) come from the same fractions: a voxel takes the class that
covers most of it, so the labels match the images by construction.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..imaging import Image, atomic_write, save_image, write_json
from . import SIMULATED_NIFTI_DESCRIPTION
from .physics import rician

__all__ = [
    "HEART_LABELS",
    "TISSUE_LABELS",
    "TISSUES_1P5T",
    "HeartCine",
    "TissueParameters",
    "bssfp_signal",
    "simulate_heart",
    "write_heart",
]

#: Ground-truth label values of the ``_dseg`` files (every other tissue is background).
HEART_LABELS: dict[int, str] = {0: "background", 1: "LV blood pool", 2: "LV myocardium", 3: "RV blood pool"}

#: Values of the dominant-tissue maps in :attr:`HeartCine.tissues`.
TISSUE_LABELS: dict[int, str] = {
    0: "air",
    1: "lung",
    2: "fat",
    3: "skeletal muscle",
    4: "liver",
    5: "myocardium",
    6: "blood",
}
_AIR, _LUNG, _FAT, _MUSCLE, _LIVER, _MYO, _BLOOD = range(7)
_TISSUE_NAMES = tuple(TISSUE_LABELS[i] for i in range(7))


@dataclass(frozen=True)
class TissueParameters:
    """Relaxation times (ms) at 1.5 T and proton density relative to pure water.

    Attributes:
        t1_ms: longitudinal relaxation time.
        t2_ms: transverse relaxation time.
        pd: proton density (water content, or MR-visible density for lung; 0 for air).
        source: where the values come from.
    """

    t1_ms: float
    t2_ms: float
    pd: float
    source: str


#: Nominal tissue parameters at 1.5 T. Each subject scales T1 and T2 by up to +-5 %.
TISSUES_1P5T: dict[str, TissueParameters] = {
    "air": TissueParameters(1.0, 1.0, 0.0, "no protons"),
    "lung": TissueParameters(
        1300.0,
        40.0,
        0.15,
        "parenchyma about 0.2 g/ml, ~80 % air (Hatabu et al. 1999); T1 ~1.2-1.4 s at 1.5 T (Stadler et al. 2005)",
    ),
    "fat": TissueParameters(
        250.0,
        70.0,
        0.90,
        "subcutaneous fat, T1 250-350 ms, T2 ~60-70 ms at 1.5 T (de Bazelaire et al. 2004)",
    ),
    "skeletal muscle": TissueParameters(1000.0, 40.0, 0.76, "1008/44 ms at 1.5 T (Stanisz et al. 2005); ~76 % water"),
    "liver": TissueParameters(580.0, 46.0, 0.71, "576/46 ms at 1.5 T (Stanisz et al. 2005); ~71 % water"),
    "myocardium": TissueParameters(
        950.0,
        50.0,
        0.78,
        "native T1 ~950 ms (MOLLI, Messroghli et al. 2004), T2 ~50 ms (T2 mapping, Giri et al. 2009); ~78 % water",
    ),
    "blood": TissueParameters(
        1550.0,
        250.0,
        0.87,
        "arterial blood T1 ~1450-1600 ms, T2 ~250-290 ms at 1.5 T (Stanisz et al. 2005); ~87 % water",
    ),
}


def bssfp_signal(pd: Any, t1_ms: Any, t2_ms: Any, flip_deg: float) -> Any:
    """Balanced-SSFP steady-state magnitude at TE = TR/2 for TR << T2 (on resonance).

    ``S = PD sin(a) / ((T1/T2 + 1) - cos(a) (T1/T2 - 1))`` (Scheffler & Lehnhardt, Eur. Radiol.
    2003;13:2409). The contrast is governed by T2/T1: blood and fat are bright, myocardium and
    skeletal muscle dark. Arguments broadcast; the unit is that of ``pd``.

    Args:
        pd: proton density.
        t1_ms: longitudinal relaxation time (ms).
        t2_ms: transverse relaxation time (ms).
        flip_deg: flip angle (degrees).
    """
    a = math.radians(flip_deg)
    ratio = np.asarray(t1_ms, dtype=np.float64) / np.asarray(t2_ms, dtype=np.float64)
    return np.asarray(pd) * math.sin(a) / ((ratio + 1.0) - math.cos(a) * (ratio - 1.0))


@dataclass
class HeartCine:
    """A simulated cine from end-diastole (frame 0) to end-systole (last frame).

    Attributes:
        frames: bSSFP magnitude images (float32, arbitrary units), one per time point.
        labels: label maps (uint8, values of :data:`HEART_LABELS`), one per frame.
        times_ms: time of each frame after end-diastole (ms).
        meta: everything about the simulation: the generator's state, the drawn anatomy and
            motion, the sequence, the tissue parameters, and the volumes and ejection
            fraction measured from the labels. ``meta["simulated"]`` is True.
        tissues: dominant-tissue maps (uint8, values of :data:`TISSUE_LABELS`), one per frame.
    """

    frames: list[Image]
    labels: list[Image]
    times_ms: list[float]
    meta: dict
    tissues: list[Image] = field(default_factory=list)

    @property
    def phases(self) -> list[str]:
        """``"ED"``, ``"mid"``, ..., ``"ES"``: the cardiac phase name of each frame."""
        return [_phase_name(k, len(self.frames)) for k in range(len(self.frames))]


def _phase_name(index: int, n_frames: int) -> str:
    if index == 0:
        return "ED"
    return "ES" if index == n_frames - 1 else "mid"


# --------------------------------------------------------------------------------------
# Subject draw
# --------------------------------------------------------------------------------------

#: The basal plane cuts the LV ellipsoids this many semi-long axes beyond their equator
#: (a prolate spheroid truncated at about 120 degrees of its angular coordinate).
_LV_TRUNCATION = 0.5
#: The tricuspid plane cuts the RV ellipsoid this far beyond its equator.
_RV_TRUNCATION = 0.6


def _cap_factor(beta: float) -> float:
    """Volume of an ellipsoid of revolution cut at ``beta`` semi-axes beyond its equator,
    in units of ``pi R^2 L`` (R equatorial, L polar semi-axis)."""
    return (1.0 + beta) - (1.0 + beta**3) / 3.0


def _draw_subject(rng: np.random.Generator) -> dict[str, Any]:
    """Every random quantity of one subject, drawn in a fixed order."""
    u = rng.uniform
    p: dict[str, Any] = {}
    # Left ventricle at end-diastole (normal adults, Kawel-Boehm et al. 2015: EDV about
    # 100-170 ml, diastolic wall about 6-11 mm).
    p["lv_length_mm"] = u(85.0, 100.0)  # epicardial apex to mitral plane
    p["lv_cavity_radius_mm"] = u(23.5, 27.5)  # endocardial equatorial radius
    p["lv_wall_mm"] = u(8.0, 11.0)  # equatorial wall thickness
    p["apical_wall_fraction"] = u(0.6, 0.8)  # apical / equatorial wall thickness
    # Systolic function.
    p["ejection_fraction"] = u(0.55, 0.65)
    p["longitudinal_shortening"] = u(0.13, 0.17)
    p["apical_thickening"] = u(0.25, 0.45)
    p["end_systole_ms"] = u(300.0, 350.0)
    p["heart_rate_bpm"] = u(58.0, 78.0)
    # Right ventricle and atria.
    p["rv_gap_mm"] = u(18.0, 25.0)  # septum to RV free wall at ED
    p["rv_gap_shortening"] = u(0.30, 0.45)
    p["rv_width_factor"] = u(1.25, 1.45)  # crescent half-width / LV epicardial radius
    p["rv_wall_mm"] = u(3.0, 4.0)
    p["tapse_mm"] = u(16.0, 22.0)
    p["la_radius_mm"] = u(18.0, 22.0)
    p["la_length_mm"] = u(24.0, 30.0)
    p["ra_radius_mm"] = u(19.0, 24.0)
    p["ra_length_mm"] = u(24.0, 30.0)
    # Orientation: long axis (base -> apex) azimuth from anterior towards the left, and
    # elevation below the axial plane; roll of the septum about the long axis.
    p["azimuth_deg"] = u(35.0, 55.0)
    p["elevation_deg"] = u(22.0, 38.0)
    p["roll_deg"] = u(-12.0, 12.0)
    p["lv_centre_mm"] = [-35.0 + u(-6.0, 6.0), 15.0 + u(-6.0, 6.0), u(-6.0, 6.0)]
    # Thorax.
    p["retrosternal_gap_mm"] = u(3.0, 12.0)
    p["chest_muscle_mm"] = u(8.0, 14.0)
    p["subcutaneous_fat_mm"] = u(6.0, 18.0)
    p["thorax_half_depth_mm"] = u(78.0, 92.0)  # inside the chest wall, anterior-posterior
    p["thorax_aspect"] = u(1.35, 1.55)  # left-right / anterior-posterior half-width
    p["diaphragm_gap_mm"] = u(0.0, 4.0)
    p["diaphragm_radius_mm"] = u(160.0, 240.0)
    p["aorta_radius_mm"] = u(10.0, 13.0)
    p["aorta_offset_mm"] = [u(-3.0, 7.0), u(-62.0, -54.0)]  # from the LV centre (x, y)
    # Acquisition.
    p["flip_angle_deg"] = u(50.0, 60.0)
    p["snr_myocardium"] = u(15.0, 25.0)
    p["fov_jitter_mm"] = [u(-4.0, 4.0), u(-4.0, 4.0), u(-4.0, 4.0)]
    p["coil_jitter_mm"] = rng.uniform(-10.0, 10.0, size=(12, 3)).tolist()
    p["intensity_normalisation"] = u(0.5, 0.75)
    p["relaxation_jitter"] = {name: [u(0.95, 1.05), u(0.95, 1.05)] for name in _TISSUE_NAMES if name != "air"}
    return p


def _frame_axes(p: dict[str, Any]) -> np.ndarray:
    """Rows: the LV long axis (apex -> base), the septal direction (towards the RV), their
    cross product; unit vectors in RAS."""
    az, el = math.radians(p["azimuth_deg"]), math.radians(p["elevation_deg"])
    to_apex = np.array([-math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), -math.sin(el)])
    e_l = -to_apex
    # The RV lies anterior and to the right of the LV: project (right, anterior) off the axis.
    v = np.array([1.0, 0.6, 0.0])
    e_s = v - (v @ e_l) * e_l
    e_s /= np.linalg.norm(e_s)
    roll = math.radians(p["roll_deg"])
    e_s = math.cos(roll) * e_s + math.sin(roll) * np.cross(e_l, e_s)
    e_t = np.cross(e_l, e_s)
    return np.stack([e_l, e_s, e_t])


class _Shape:
    """The heart's surfaces at one contraction phase ``s`` (0 = ED, 1 = ES).

    Lengths are measured in the LV frame: ``w`` along the long axis from the (fixed)
    epicardial apex towards the base, ``s``/``t`` across it.
    """

    def __init__(self, p: dict[str, Any], s: float):
        beta, k = _LV_TRUNCATION, _cap_factor(_LV_TRUNCATION)
        length0 = p["lv_length_mm"]
        r_endo0 = p["lv_cavity_radius_mm"]
        t_apex0 = p["lv_wall_mm"] * p["apical_wall_fraction"]
        l_endo0 = (length0 - t_apex0) / (1.0 + beta)
        r_epi0 = r_endo0 + p["lv_wall_mm"]
        l_epi0 = length0 / (1.0 + beta)
        self.edv = math.pi * r_endo0**2 * l_endo0 * k
        self.myocardial_volume = math.pi * r_epi0**2 * l_epi0 * k - self.edv

        # LV: base descends, cavity empties linearly in s, epicardium keeps the wall volume.
        self.base = length0 * (1.0 - p["longitudinal_shortening"] * s)
        self.t_apex = t_apex0 * (1.0 + p["apical_thickening"] * s)
        self.cavity_volume = self.edv * (1.0 - p["ejection_fraction"] * s)
        self.l_endo = (self.base - self.t_apex) / (1.0 + beta)
        self.r_endo = math.sqrt(self.cavity_volume / (math.pi * self.l_endo * k))
        self.l_epi = self.base / (1.0 + beta)
        self.r_epi = math.sqrt((self.myocardial_volume + self.cavity_volume) / (math.pi * self.l_epi * k))
        self.endo_centre = self.t_apex + self.l_endo
        self.epi_centre = self.l_epi

        # RV: crescent from an ellipsoid offset towards the septum; its apex is fixed at 20 %
        # of the LV length, its tricuspid plane descends by TAPSE, its free wall moves in.
        rv_apex = 0.2 * length0
        self.rv_base = length0 - 4.0 - p["tapse_mm"] * s
        self.rv_l = (self.rv_base - rv_apex) / (1.0 + _RV_TRUNCATION)
        self.rv_centre = rv_apex + self.rv_l
        reach = self.r_epi + p["rv_gap_mm"] * (1.0 - p["rv_gap_shortening"] * s)
        self.rv_offset = 0.45 * reach
        self.rv_a = 0.55 * reach
        self.rv_b = p["rv_width_factor"] * r_epi0 * (1.0 - 0.12 * s)
        self.rv_wall = p["rv_wall_mm"] * (1.0 + 0.4 * s)

        # Atria: tops fixed, floors follow the valve planes, a little filling in systole.
        self.la_l = p["la_length_mm"] + (length0 - self.base) / 1.75
        self.la_r = p["la_radius_mm"] * (1.0 + 0.08 * s)
        self.la_centre = self.base + 0.75 * self.la_l
        self.la_offset = -0.15 * r_epi0
        self.ra_l = p["ra_length_mm"] + (length0 - 4.0 - self.rv_base) / 1.75
        self.ra_r = p["ra_radius_mm"] * (1.0 + 0.08 * s)
        self.ra_centre = self.rv_base + 0.75 * self.ra_l
        self.ra_offset = self.rv_offset + 0.25 * self.rv_a
        self._check()

    def _check(self) -> None:
        """The endocardium must lie inside the epicardium everywhere (positive wall)."""
        w = np.linspace(self.t_apex, self.base, 64)
        r_endo = self.r_endo * np.sqrt(np.clip(1.0 - ((w - self.endo_centre) / self.l_endo) ** 2, 0.0, None))
        r_epi = self.r_epi * np.sqrt(np.clip(1.0 - ((w - self.epi_centre) / self.l_epi) ** 2, 0.0, None))
        if np.any(r_epi - r_endo < 1.0):  # pragma: no cover - guarded by the parameter ranges
            raise RuntimeError("simulated LV wall is thinner than 1 mm somewhere; parameters out of range")

    def wall_thickness(self) -> float:
        """Wall thickness (mm) at the level of the endocardial equator, across the axis."""
        w = self.endo_centre
        r_epi = self.r_epi * math.sqrt(max(0.0, 1.0 - ((w - self.epi_centre) / self.l_epi) ** 2))
        return r_epi - self.r_endo

    def describe(self) -> dict[str, float]:
        return {
            "base_mm": self.base,
            "apical_wall_mm": self.t_apex,
            "endo_semi_axes_mm": [self.l_endo, self.r_endo],
            "epi_semi_axes_mm": [self.l_epi, self.r_epi],
            "wall_thickness_mm": self.wall_thickness(),
            "cavity_volume_ml": self.cavity_volume / 1000.0,
            "myocardial_volume_ml": self.myocardial_volume / 1000.0,
            "tricuspid_plane_mm": self.rv_base,
            "rv_semi_axes_mm": [self.rv_l, self.rv_a, self.rv_b],
            "rv_offset_mm": self.rv_offset,
        }


# --------------------------------------------------------------------------------------
# Anti-aliased geometry: signed distances and partial-volume fractions
# --------------------------------------------------------------------------------------


class _Field:
    """A signed distance (mm, negative inside) and the voxel's width across the surface."""

    __slots__ = ("d", "width")

    def __init__(self, d: np.ndarray, width: np.ndarray | float):
        self.d = d
        self.width = width

    def __and__(self, other: _Field) -> _Field:
        """Intersection: the farther surface decides (max of distances)."""
        first = self.d >= other.d
        return _Field(np.where(first, self.d, other.d), np.where(first, self.width, other.width))

    def fraction(self) -> np.ndarray:
        """Fraction of each voxel inside: a linear ramp across the voxel's width.

        The width is ``||n * spacing||``: for a surface along a voxel face the ramp is the
        exact box-filtered (partial-volume) fraction; for oblique surfaces it matches the
        spread of the exact one.
        """
        return np.clip(0.5 - self.d / self.width, 0.0, 1.0)


def _width(normal: Sequence[np.ndarray | float], spacing: tuple[float, float, float]) -> np.ndarray:
    """Extent of a voxel along the unit normal (components in RAS; voxel axes are RAS)."""
    return np.sqrt(sum((n * sp) ** 2 for n, sp in zip(normal, spacing)))


def _ellipsoid(
    coords: list[np.ndarray],
    centre: list[float],
    semi: list[float],
    axes: np.ndarray,
    spacing: tuple[float, float, float],
) -> _Field:
    """Ellipsoid in a local orthonormal frame; first-order signed distance ``(k - 1) / |grad k|``.

    ``k = |q|`` with ``q_i = (x_i - c_i) / a_i`` is 1 on the surface, so the distance is exact on
    it and accurate across a voxel. ``|grad k|`` is bounded by ``[1/max a, 1/min a]`` (also at
    the centre, where the gradient direction is undefined).

    Args:
        coords: local coordinates (arrays, broadcastable).
        centre, semi: centre and semi-axes in the local frame (mm).
        axes: rows are the local unit vectors in RAS (3 x 3, or 2 x 3 for a cylinder).
        spacing: voxel size (mm) along the RAS axes.
    """
    q = [(c - c0) * (1.0 / a) for c, c0, a in zip(coords, centre, semi)]
    k = np.sqrt(sum(qi * qi for qi in q))
    g = [qi * (1.0 / a) for qi, a in zip(q, semi)]
    g_norm = np.maximum(np.sqrt(sum(gi * gi for gi in g)), 1e-12)
    grad = np.clip(g_norm / np.maximum(k, 1e-12), 1.0 / max(semi), 1.0 / min(semi))
    d = (k - 1.0) / grad
    normal = [sum(g[j] * float(axes[j][i]) for j in range(len(g))) / g_norm for i in range(3)]
    return _Field(d, _width(normal, spacing))


def _half_space(
    w: np.ndarray, level: float, below: bool, axis: np.ndarray, spacing: tuple[float, float, float]
) -> _Field:
    """``w <= level`` (``below``) or ``w >= level``, ``w`` a coordinate along unit ``axis``."""
    d = (w - level) if below else (level - w)
    return _Field(d, float(_width([float(a) for a in axis], spacing)))


Box = tuple[slice, slice, slice]


class _Grid:
    """The voxel grid: its RAS coordinates (float32, broadcastable) and bounding boxes."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray, origin: np.ndarray):
        self.shape = shape
        self.spacing: tuple[float, float, float] = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        self.origin = origin
        self.xyz = [
            (origin[i] + spacing[i] * np.arange(shape[i]))
            .astype(np.float32)
            .reshape([-1 if j == i else 1 for j in range(3)])
            for i in range(3)
        ]
        self.full: Box = (slice(None), slice(None), slice(None))

    def box(self, centre: np.ndarray, semi: list[float], axes: np.ndarray) -> Box | None:
        """Voxel slices covering an ellipsoid (world ``centre``, ``semi`` along ``axes`` rows)
        with a one-voxel margin for the anti-aliasing ramp; None when it misses the grid."""
        extent = np.sqrt(((np.asarray(semi, dtype=np.float64)[:, None] * axes) ** 2).sum(axis=0))
        sp = np.asarray(self.spacing)
        lo = np.floor((centre - extent - self.origin) / sp).astype(int) - 1
        hi = np.ceil((centre + extent - self.origin) / sp).astype(int) + 2
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


class _Canvas:
    """Tissue fractions composited layer over layer (a later layer hides what it covers).

    Each layer of coverage ``f`` keeps ``(1 - f)`` of everything below it, so fractions always
    sum to one; ``tracked`` coverages (the labelled structures) are hidden the same way.
    """

    def __init__(self, fractions: np.ndarray):
        self.fractions = fractions
        self.tracked: dict[str, np.ndarray] = {}

    def paint(self, tissue: int, field_: _Field, box: Box, track: str | None = None) -> None:
        f = field_.fraction().astype(np.float32, copy=False)
        keep = 1.0 - f
        region = self.fractions[(slice(None),) + box]
        region *= keep
        region[tissue] += f
        for cover in self.tracked.values():
            cover[box] *= keep
        if track is not None:
            cover = np.zeros(self.fractions.shape[1:], np.float32)
            cover[box] = f
            self.tracked[track] = cover


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------


def _surface_points(
    centre: np.ndarray, semi: list[float], axes: np.ndarray, apex: np.ndarray, level: float
) -> np.ndarray:
    """Points (n x 3, RAS mm) on an ellipsoid cut at ``w <= level``, ``w`` the distance from
    ``apex`` along the long axis ``axes[0]``."""
    theta = np.linspace(0.0, math.pi, 61)[:, None]
    phi = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)[None, :]
    unit = [np.cos(theta) + 0.0 * phi, np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi)]
    points = centre + sum((a * u).reshape(-1, 1) * ax[None, :] for a, u, ax in zip(semi, unit, axes))
    return points[(points - apex) @ axes[0] <= level + 1e-6]


def _ventricles_ed(ed: _Shape, apex: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface points of the LV epicardium and of the RV's outer wall at end-diastole."""
    e_l, e_s = axes[0], axes[1]
    lv = _surface_points(apex + ed.epi_centre * e_l, [ed.l_epi, ed.r_epi, ed.r_epi], axes, apex, ed.base)
    rv_semi = [ed.rv_l + ed.rv_wall, ed.rv_a + ed.rv_wall, ed.rv_b + ed.rv_wall]
    rv = _surface_points(apex + ed.rv_centre * e_l + ed.rv_offset * e_s, rv_semi, axes, apex, ed.rv_base)
    return lv, rv


def _place_fov(
    lv: np.ndarray, rv: np.ndarray, half: np.ndarray, spacing: np.ndarray, jitter: np.ndarray
) -> tuple[np.ndarray, bool]:
    """Centre of the field of view: on the ventricles at ED (a little anterior, towards the
    chest wall, plus ``jitter``), but moved as needed to keep the whole LV two voxels inside,
    as a cine stack planned on localisers covers the LV. Grids smaller than the LV clip it.

    Returns:
        The centre (RAS mm) and whether the whole LV fits.
    """
    lv_lo, lv_hi = lv.min(axis=0), lv.max(axis=0)
    rv_lo, rv_hi = rv.min(axis=0), rv.max(axis=0)
    lo, hi = np.minimum(lv_lo, rv_lo), np.maximum(lv_hi, rv_hi)
    wanted = 0.5 * (lo + hi) + np.array([0.0, 8.0, 0.0]) + jitter
    margin = 2.0 * spacing
    low_limit, high_limit = lv_hi + margin - half, lv_lo - margin + half
    fits = low_limit <= high_limit
    centre = np.where(fits, np.clip(wanted, low_limit, high_limit), 0.5 * (lv_lo + lv_hi))
    return centre, bool(np.all(fits))


def _check_inputs(n_frames: int, shape: Any, spacing: Any) -> tuple[tuple[int, int, int], np.ndarray]:
    if not isinstance(n_frames, (int, np.integer)) or isinstance(n_frames, bool) or n_frames < 2:
        raise ValueError(f"n_frames must be an integer of at least 2 (ED and ES), got {n_frames!r}")
    sizes = [int(n) for n in shape]
    if len(sizes) != 3 or min(sizes) < 4:
        raise ValueError(f"shape must be three sizes of at least 4 voxels, got {tuple(shape)}")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive voxel sizes (mm), got {spacing!r}")
    return (sizes[0], sizes[1], sizes[2]), sp


def simulate_heart(
    rng: np.random.Generator,
    *,
    n_frames: int = 10,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
) -> HeartCine:
    """Simulate one subject's bSSFP cine from end-diastole to end-systole.

    The anatomy, motion, sequence and noise are drawn from ``rng`` (see the module docstring
    for the model and its sources), so the same generator state gives the same arrays. The
    field of view is centred on the heart (a little anteriorly, to include the chest wall);
    the default 64 x 64 x 48 grid of 2 x 2 x 2.5 mm voxels covers 128 x 128 x 120 mm.

    Args:
        rng: the random generator; its state on entry is recorded in ``meta["rng_state"]``.
        n_frames: number of frames, ED first and ES last (at least 2).
        shape: grid size (i, j, k) along R, A, S.
        spacing: voxel size (mm) along R, A, S.

    Returns:
        The cine: frames (float32), labels (uint8, :data:`HEART_LABELS`), the frame times (ms)
        and the metadata, with the LV/RV volumes and ejection fractions measured from the
        labels and the myocardial volume of every frame.

    Warns:
        UserWarning: the grid is smaller than the subject's LV, which is then clipped
            (``meta["anatomy"]["lv_inside_fov"]`` is False and the volumes are not valid).

    Raises:
        TypeError: ``rng`` is not a :class:`numpy.random.Generator`.
        ValueError: ``n_frames`` below 2, or a malformed ``shape`` / ``spacing``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), got {type(rng).__name__}"
        )
    shape, sp = _check_inputs(n_frames, shape, spacing)
    rng_state = rng.bit_generator.state
    p = _draw_subject(rng)
    axes = _frame_axes(p)
    lv_centre = np.asarray(p["lv_centre_mm"], dtype=np.float64)
    apex = lv_centre - 0.5 * p["lv_length_mm"] * axes[0]
    phase_times = _frame_times(p["end_systole_ms"], n_frames)
    shapes = [_Shape(p, s) for s in phase_times[1]]
    lv_points, rv_points = _ventricles_ed(shapes[0], apex, axes)
    view = _place_view(shape, sp, lv_points, rv_points, p)
    chest = _Thorax.around(p, np.concatenate([lv_points, rv_points]), lv_centre)
    tissue_signal, tissue_used = _tissue_signals(p)
    gain = 1000.0  # receiver scaling: blood comes out at ~150-200 a.u.
    sigma = gain * float(tissue_signal[_MYO]) / p["snr_myocardium"]
    static = _paint_chest(view.grid, chest, p)
    # receive field: 2 x 3 loops on the front and on the back, root-sum-of-squares
    bias, coils = _coil_field(p, view.grid, lv_centre, chest.body_semi, chest.thorax_y)
    bias_range = [float(bias.min()), float(bias.max())]
    bias *= np.float32(gain)
    cine = _render_frames(rng, static, shapes, view, apex, axes, tissue_signal, bias, sigma, phase_times)
    meta = {
        "simulated": True,
        "generator": "LongitudinalDiffusionLib.demo.heart.simulate_heart",
        "description": "Simulated bSSFP cine of a beating-heart phantom, end-diastole to end-systole; "
        "not patient data.",
        "rng_state": rng_state,
        "labels": HEART_LABELS,
        "tissue_labels": TISSUE_LABELS,
        "grid": {"shape": list(shape), "spacing_mm": sp.tolist(), "affine": view.affine.tolist(), "orientation": "RAS"},
        "times_ms": phase_times[0],
        "phases": [_phase_name(k, n_frames) for k in range(n_frames)],
        "contraction": phase_times[1],
        "ejection_fraction": cine.measured["lv_ejection_fraction"],
        "parameters": p,
        "anatomy": _anatomy_meta(axes, apex, lv_centre, view, chest, shapes),
        "model": _model_meta(p, shapes),
        "measured": cine.measured,
        **_acquisition_meta(p, tissue_used, gain, sigma, coils, bias_range),
    }
    return HeartCine(cine.frames, cine.labels, [float(t) for t in phase_times[0]], meta, cine.tissues)


@dataclass
class _View:
    """The field of view: axis-aligned (RAS), centred on the ventricles, keeping the whole LV."""

    grid: _Grid
    affine: np.ndarray
    fov_centre: np.ndarray
    lv_inside: bool


def _place_view(
    shape: tuple[int, int, int], sp: np.ndarray, lv_points: np.ndarray, rv_points: np.ndarray, p: dict[str, Any]
) -> _View:
    half = 0.5 * (np.asarray(shape) - 1) * sp
    fov_centre, lv_inside = _place_fov(lv_points, rv_points, half, sp, np.asarray(p["fov_jitter_mm"]))
    if not lv_inside:
        warnings.warn(
            f"the {' x '.join(f'{v:g}' for v in 2 * half + sp)} mm field of view is smaller than this "
            "subject's left ventricle: it is clipped, and its volumes and ejection fraction are not valid",
            stacklevel=3,  # simulate_heart's caller
        )
    origin = fov_centre - half
    affine = np.eye(4)
    affine[:3, :3] = np.diag(sp)
    affine[:3, 3] = origin
    return _View(_Grid(shape, sp, origin), affine, fov_centre, lv_inside)


@dataclass
class _Thorax:
    """The chest round the heart: an elliptic cavity behind muscle and fat, the diaphragm's
    dome under the heart and the descending aorta (mm, RAS)."""

    cavity_a: float
    cavity_b: float
    thorax_y: float
    muscle: float
    body_semi: list[float]
    low: np.ndarray  # the heart's lowest point: the diaphragm's dome lies under it
    dome_top: float
    aorta_xy: np.ndarray

    @classmethod
    def around(cls, p: dict[str, Any], heart: np.ndarray, lv_centre: np.ndarray) -> _Thorax:
        """Sized round the heart's points: the thorax sits so that the heart lies just behind
        the anterior chest wall - its centre is the lowest that keeps every point of the heart
        inside, plus the retrosternal gap."""
        cavity_b = p["thorax_half_depth_mm"]
        cavity_a = p["thorax_aspect"] * cavity_b
        ellipse_y = cavity_b * np.sqrt(np.clip(1.0 - (heart[:, 0] / cavity_a) ** 2, 0.0, None))
        thorax_y = float(np.max(heart[:, 1] - ellipse_y)) + p["retrosternal_gap_mm"]
        muscle, fat = p["chest_muscle_mm"], p["subcutaneous_fat_mm"]
        body_semi = [cavity_a + muscle + fat, cavity_b + muscle + fat]
        low = heart[np.argmin(heart[:, 2])]
        dome_top = float(low[2] - p["diaphragm_gap_mm"])
        aorta_xy = lv_centre[:2] + np.asarray(p["aorta_offset_mm"])
        return cls(cavity_a, cavity_b, thorax_y, muscle, body_semi, low, dome_top, aorta_xy)

    def describe(self) -> dict[str, Any]:
        return {
            "thorax_centre_mm": [0.0, self.thorax_y],
            "thorax_cavity_semi_axes_mm": [self.cavity_a, self.cavity_b],
            "body_semi_axes_mm": self.body_semi,
            "diaphragm_top_mm": [float(self.low[0]), float(self.low[1]), self.dome_top],
            "aorta_centre_xy_mm": self.aorta_xy.tolist(),
        }


def _tissue_signals(p: dict[str, Any]) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Each tissue's bSSFP signal (in :data:`_TISSUE_NAMES` order) with this subject's
    relaxation times, and those times for the metadata."""
    used: dict[str, dict[str, float]] = {}
    signal = np.zeros(len(_TISSUE_NAMES), dtype=np.float32)
    for index, name in enumerate(_TISSUE_NAMES):
        nominal = TISSUES_1P5T[name]
        f1, f2 = p["relaxation_jitter"].get(name, [1.0, 1.0])
        t1, t2 = nominal.t1_ms * f1, nominal.t2_ms * f2
        value = float(bssfp_signal(nominal.pd, t1, t2, p["flip_angle_deg"]))
        signal[index] = value
        used[name] = {"T1_ms": t1, "T2_ms": t2, "PD": nominal.pd, "bSSFP_signal": value}
    return signal, used


def _paint_chest(grid: _Grid, chest: _Thorax, p: dict[str, Any]) -> np.ndarray:
    """The static layers (the chest does not move during the breath-hold): tissue fractions,
    (tissues, *shape), of fat, muscle, lung, liver under the diaphragm, and the aorta."""
    shape = grid.shape
    x, y, z = grid.xyz
    static = np.zeros((len(_TISSUE_NAMES),) + shape, dtype=np.float32)
    static[_AIR] = 1.0
    canvas = _Canvas(static)
    full = grid.full
    xy_axes = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    xy = [x, y]
    centre0 = [0.0, chest.thorax_y]
    cavity_semi = [chest.cavity_a, chest.cavity_b]
    canvas.paint(_FAT, _broadcast(_ellipsoid(xy, centre0, chest.body_semi, xy_axes, grid.spacing), shape), full)
    wall = [chest.cavity_a + chest.muscle, chest.cavity_b + chest.muscle]
    canvas.paint(_MUSCLE, _broadcast(_ellipsoid(xy, centre0, wall, xy_axes, grid.spacing), shape), full)
    cavity = _broadcast(_ellipsoid(xy, centre0, cavity_semi, xy_axes, grid.spacing), shape)
    canvas.paint(_LUNG, cavity, full)
    # Diaphragm: a dome z = top - r^2 / (2 R) under the heart; the liver fills the space below.
    r_d = p["diaphragm_radius_mm"]
    dx, dy = x - np.float32(chest.low[0]), y - np.float32(chest.low[1])
    phi = (z - np.float32(chest.dome_top)) + (dx * dx + dy * dy) * np.float32(0.5 / r_d)
    grad = np.sqrt(1.0 + (dx * dx + dy * dy) * np.float32(1.0 / r_d**2))
    dome = _Field(phi / grad, _width([dx / r_d / grad, dy / r_d / grad, 1.0 / grad], grid.spacing))
    canvas.paint(_LIVER, cavity & _broadcast(dome, shape), full)
    # Descending aorta: a vertical tube with a 2 mm wall, beside the spine.
    ao = [x - np.float32(chest.aorta_xy[0]), y - np.float32(chest.aorta_xy[1])]
    r_ao = p["aorta_radius_mm"]
    canvas.paint(_MUSCLE, _broadcast(_ellipsoid(ao, [0.0, 0.0], [r_ao + 2.0] * 2, xy_axes, grid.spacing), shape), full)
    canvas.paint(_BLOOD, _broadcast(_ellipsoid(ao, [0.0, 0.0], [r_ao] * 2, xy_axes, grid.spacing), shape), full)
    return static


@dataclass
class _Frames:
    frames: list[Image]
    labels: list[Image]
    tissues: list[Image]
    measured: dict[str, Any]


def _render_frames(
    rng: np.random.Generator,
    static: np.ndarray,
    shapes: list[_Shape],
    view: _View,
    apex: np.ndarray,
    axes: np.ndarray,
    tissue_signal: np.ndarray,
    bias: np.ndarray,
    sigma: float,
    phase_times: tuple[list[float], list[float]],
) -> _Frames:
    """Every frame: the heart of that phase painted over the chest, its signal through the
    coils with Rician noise (drawn from ``rng`` frame by frame), its labels and tissue map,
    and the volumes measured from the labels."""
    grid, affine = view.grid, view.affine
    x, y, z = grid.xyz
    axes32 = axes.astype(np.float32)
    rel = [x - np.float32(apex[0]), y - np.float32(apex[1]), z - np.float32(apex[2])]
    local = [rel[0] * ax[0] + rel[1] * ax[1] + rel[2] * ax[2] for ax in axes32]  # (w, s, t)
    times, phases = phase_times
    n_frames = len(shapes)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    out = _Frames([], [], [], {})
    keys = ("lv_blood_ml", "lv_myocardium_ml", "rv_blood_ml")
    volumes: dict[str, list[float]] = {k: [] for k in keys}
    soft: dict[str, list[float]] = {k: [] for k in keys}
    for k, h in enumerate(shapes):
        canvas = _Canvas(static.copy())
        _paint_heart(canvas, h, grid, local, apex, axes)
        fractions = canvas.fractions
        clean = np.tensordot(tissue_signal, fractions, axes=1) * bias
        magnitude = rician(rng, clean.astype(np.float32, copy=False), sigma)

        lvb, lvm, rvb = canvas.tracked["lv_blood"], canvas.tracked["lv_myo"], canvas.tracked["rv"]
        label = np.argmax(np.stack([1.0 - lvb - lvm - rvb, lvb, lvm, rvb]), axis=0).astype(np.uint8)
        tissue = np.argmax(fractions, axis=0).astype(np.uint8)
        for key, cls, cover in zip(keys, (1, 2, 3), (lvb, lvm, rvb)):
            volumes[key].append(float(np.count_nonzero(label == cls)) * voxel_ml)
            soft[key].append(float(cover.sum(dtype=np.float64)) * voxel_ml)

        frame_meta = {"time_ms": times[k], "phase": _phase_name(k, n_frames), "contraction": phases[k]}
        frame_meta["simulated"] = True
        out.frames.append(Image(magnitude, affine.copy(), dict(frame_meta, units="a.u.")))
        out.labels.append(Image(label, affine.copy(), dict(frame_meta, labels=HEART_LABELS)))
        out.tissues.append(Image(tissue, affine.copy(), dict(frame_meta, labels=TISSUE_LABELS)))
    out.measured = _measured(volumes, soft)
    return out


def _measured(volumes: dict[str, list[float]], soft: dict[str, list[float]]) -> dict[str, Any]:
    """The volumes per frame and the ejection fractions, as the label maps give them."""
    lv, rv, myo = volumes["lv_blood_ml"], volumes["rv_blood_ml"], volumes["lv_myocardium_ml"]
    return {
        "source": "label maps (voxel counts); soft_* from the partial-volume fractions",
        **volumes,
        **{f"soft_{k}": v for k, v in soft.items()},
        "lv_edv_ml": lv[0],
        "lv_esv_ml": lv[-1],
        "lv_ejection_fraction": (lv[0] - lv[-1]) / lv[0] if lv[0] > 0 else None,
        "rv_ejection_fraction": (rv[0] - rv[-1]) / rv[0] if rv[0] > 0 else None,
        "lv_myocardial_volume_drift": (max(myo) - min(myo)) / myo[0] if myo[0] > 0 else None,
    }


def _anatomy_meta(
    axes: np.ndarray, apex: np.ndarray, lv_centre: np.ndarray, view: _View, chest: _Thorax, shapes: list[_Shape]
) -> dict[str, Any]:
    """Where everything is: the heart's axes and apex, the field of view, the chest, each frame's shape."""
    return {
        "long_axis_apex_to_base": axes[0].tolist(),
        "septal_direction": axes[1].tolist(),
        "apex_mm": apex.tolist(),
        "lv_centre_mm": lv_centre.tolist(),
        "fov_centre_mm": view.fov_centre.tolist(),
        "lv_inside_fov": view.lv_inside,
        **chest.describe(),
        "frames": [sh.describe() for sh in shapes],
    }


def _acquisition_meta(
    p: dict[str, Any], tissues: dict[str, Any], gain: float, sigma: float, coils: Any, bias_range: list[float]
) -> dict[str, Any]:
    """The sequence, the tissues' parameters, the noise and the receive field, as simulated."""
    return {
        "sequence": {
            "name": "balanced SSFP cine",
            "field_strength_T": 1.5,
            "flip_angle_deg": p["flip_angle_deg"],
            "repetition_time_ms": 3.0,
            "echo_time_ms": 1.5,
            "signal_equation": "S = PD sin(a) / ((T1/T2 + 1) - cos(a) (T1/T2 - 1)), TE = TR/2, TR << T2",
            "receiver_gain": gain,
        },
        "tissues": tissues,
        "noise": {
            "model": "Rician (magnitude of complex Gaussian)",
            "sigma": sigma,
            "snr_myocardium": p["snr_myocardium"],
        },
        "bias_field": {
            "model": "root-sum-of-squares of 12 loop-coil profiles (rho^2 / (rho^2 + r^2))^1.5, "
            "raised to (1 - normalisation); 1 at the LV centre",
            "coils_mm": coils,
            "normalisation": p["intensity_normalisation"],
            "range": bias_range,
        },
    }


def _model_meta(p: dict[str, Any], shapes: list[_Shape]) -> dict[str, Any]:
    """What the motion model intended (the label maps measure what came out)."""
    return {
        "edv_ml": shapes[0].edv / 1000.0,
        "esv_ml": shapes[-1].cavity_volume / 1000.0,
        "ejection_fraction": p["ejection_fraction"],
        "myocardial_volume_ml": shapes[0].myocardial_volume / 1000.0,
        "wall_thickness_ed_mm": shapes[0].wall_thickness(),
        "wall_thickness_es_mm": shapes[-1].wall_thickness(),
        "time_course": "raised cosine s(t) = (1 - cos(pi t / T_es)) / 2",
        "end_systole_ms": p["end_systole_ms"],
        "heart_rate_bpm": p["heart_rate_bpm"],
        "rr_interval_ms": 60000.0 / p["heart_rate_bpm"],
    }


def _frame_times(end_systole_ms: float, n_frames: int) -> tuple[list[float], list[float]]:
    """Evenly spaced frame times from ED (0 ms) to ES, and the contraction phase of each:
    the raised cosine ``s = (1 - cos(pi t / T_es)) / 2``, smooth (zero velocity) at both ends."""
    times = [end_systole_ms * k / (n_frames - 1) for k in range(n_frames)]
    phases = [0.5 * (1.0 - math.cos(math.pi * k / (n_frames - 1))) for k in range(n_frames)]
    return times, phases


def _broadcast(field_: _Field, shape: tuple[int, int, int]) -> _Field:
    """Expand a field computed on a 2D (x, y) slab to the whole grid."""
    return _Field(np.broadcast_to(field_.d, shape), np.broadcast_to(field_.width, shape))


def _paint_heart(
    canvas: _Canvas, h: _Shape, grid: _Grid, local: list[np.ndarray], apex: np.ndarray, axes: np.ndarray
) -> None:
    """Paint the heart at one phase, back to front: RV, right atrium, left atrium, LV.

    The LV is painted last, so its myocardium carves the septum out of the RV ellipsoid
    (leaving the RV cavity as a crescent) and the atria stop at the valve planes.
    """
    e_l = axes[0]

    def layer(tissue: int, centre: list[float], semi: list[float], level: float, below: bool, track: str | None = None):
        world = apex + centre[0] * axes[0] + centre[1] * axes[1] + centre[2] * axes[2]
        box = grid.box(world, semi, axes)
        if box is None:
            if track is not None:
                canvas.tracked[track] = np.zeros(grid.shape, np.float32)
            return
        coords = [c[box] for c in local]
        field_ = _ellipsoid(coords, centre, semi, axes, grid.spacing)
        field_ = field_ & _half_space(coords[0], level, below, e_l, grid.spacing)
        canvas.paint(tissue, field_, box, track)

    rv_c = [h.rv_centre, h.rv_offset, 0.0]
    wall = h.rv_wall
    layer(_MYO, rv_c, [h.rv_l + wall, h.rv_a + wall, h.rv_b + wall], h.rv_base, True)
    layer(_BLOOD, rv_c, [h.rv_l, h.rv_a, h.rv_b], h.rv_base, True, track="rv")
    ra_c = [h.ra_centre, h.ra_offset, 0.0]
    layer(_MYO, ra_c, [h.ra_l + 2.0, h.ra_r + 2.0, h.ra_r + 2.0], h.rv_base, False)
    layer(_BLOOD, ra_c, [h.ra_l, h.ra_r, h.ra_r], h.rv_base, False)
    la_c = [h.la_centre, h.la_offset, 0.0]
    layer(_MYO, la_c, [h.la_l + 2.0, h.la_r + 2.0, h.la_r + 2.0], h.base, False)
    layer(_BLOOD, la_c, [h.la_l, h.la_r, h.la_r], h.base, False)
    layer(_MYO, [h.epi_centre, 0.0, 0.0], [h.l_epi, h.r_epi, h.r_epi], h.base, True, track="lv_myo")
    layer(_BLOOD, [h.endo_centre, 0.0, 0.0], [h.l_endo, h.r_endo, h.r_endo], h.base, True, track="lv_blood")


#: Radius of one receive loop (mm): 10-12 cm elements are typical of cardiac arrays.
_COIL_RADIUS_MM = 55.0


def _coil_field(
    p: dict[str, Any], grid: _Grid, centre: np.ndarray, body_semi: list[float], thorax_y: float
) -> tuple[np.ndarray, list[list[float]]]:
    """Receive field of a 12-element chest array: six loops on the front, six on the back.

    A loop of radius ``rho`` sees, along its axis at distance ``r``, a field proportional to
    ``rho^2 / (rho^2 + r^2)^(3/2)`` (Biot-Savart); here ``r`` is the distance to the loop's
    centre. The elements are combined by root-sum-of-squares and the result is partly
    flattened, ``b^(1 - eta)``, as the vendors' surface-coil intensity normalisation does
    (``eta`` = ``p["intensity_normalisation"]``). Normalised to 1 at the LV centre.

    Returns:
        The field (float32, grid shape) and the coil centres (mm).
    """
    x, y, z = grid.xyz
    a, b = body_semi
    rho2 = _COIL_RADIUS_MM**2
    coils = []
    total = np.zeros(grid.shape, np.float32)
    ref = 0.0
    jitter = np.asarray(p["coil_jitter_mm"])
    index = 0
    for side in (1.0, -1.0):
        for dz in (-55.0, 55.0):
            for dx in (-70.0, 0.0, 70.0):
                cx = float(centre[0] + dx + jitter[index, 0])
                surface = b * math.sqrt(max(0.0, 1.0 - (cx / a) ** 2))
                cy = float(thorax_y + side * (surface + 8.0) + jitter[index, 1])
                cz = float(centre[2] + dz + jitter[index, 2])
                index += 1
                coils.append([cx, cy, cz])
                r2 = (x - np.float32(cx)) ** 2 + (y - np.float32(cy)) ** 2 + (z - np.float32(cz)) ** 2
                total += (np.float32(rho2) / (np.float32(rho2) + r2)) ** 3  # squared sensitivity
                ref += (rho2 / (rho2 + float(np.sum((centre - [cx, cy, cz]) ** 2)))) ** 3
    rss = np.sqrt(total / np.float32(ref))
    return (rss ** np.float32(1.0 - p["intensity_normalisation"])).astype(np.float32), coils


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

_SUBJECT_ID = re.compile(r"^[A-Za-z0-9]+$")


def write_heart(cine: HeartCine, out_dir: str | Path, subject_id: str) -> list[Path]:
    """Write a cine as NIfTI frames and label maps, a JSON sidecar and a manifest.

    Layout (``NN`` is the zero-padded frame index)::

        out_dir/sub-<id>/cine/sub-<id>_frame-<NN>_bssfp.nii.gz   (float32)
        out_dir/sub-<id>/cine/sub-<id>_frame-<NN>_dseg.nii.gz    (uint8, HEART_LABELS)
        out_dir/sub-<id>/cine/sub-<id>_cine.json                 (times, phases, EF, sequence)
        out_dir/sub-<id>/cine/manifest.tsv                       (file, time_ms, phase, labels)

    The manifest's paths are relative to its folder and its rows are in frame order. Every
    file is written atomically.

    Args:
        cine: from :func:`simulate_heart`.
        out_dir: the dataset folder (created if needed).
        subject_id: letters and digits (a leading ``sub-`` is dropped).

    Returns:
        The files written: frame and labels of each time point in order, then the JSON and
        the manifest.

    Raises:
        InputError: an invalid subject id, or a cine whose lists disagree in length.
    """
    sid = str(subject_id)
    sid = sid[4:] if sid.startswith("sub-") else sid
    if not _SUBJECT_ID.match(sid):
        raise InputError(subject_id, "a subject id must be letters and digits only (BIDS label)")
    n = len(cine.frames)
    if n == 0 or len(cine.labels) != n or len(cine.times_ms) != n:
        raise InputError(
            f"sub-{sid} cine",
            f"{n} frames, {len(cine.labels)} label maps and {len(cine.times_ms)} times; "
            "they must match and be non-zero",
        )
    folder = Path(out_dir) / f"sub-{sid}" / "cine"
    digits = max(2, len(str(n - 1)))
    phases = cine.phases
    written: list[Path] = []
    rows: list[tuple[str, str, str, str]] = []
    for k, (frame, label) in enumerate(zip(cine.frames, cine.labels)):
        stem = f"sub-{sid}_frame-{k:0{digits}d}"
        image_path = save_image(
            frame, folder / f"{stem}_bssfp.nii.gz", dtype=np.float32, description=SIMULATED_NIFTI_DESCRIPTION
        )
        label_path = save_image(
            label, folder / f"{stem}_dseg.nii.gz", dtype=np.uint8, description=SIMULATED_NIFTI_DESCRIPTION
        )
        written += [image_path, label_path]
        rows.append((image_path.name, f"{cine.times_ms[k]:.1f}", phases[k], label_path.name))

    written.append(write_json(folder / f"sub-{sid}_cine.json", _cine_sidecar(cine, rows)))
    written.append(_write_manifest(folder / "manifest.tsv", rows))
    return written


def _cine_sidecar(cine: HeartCine, rows: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """The cine's JSON sidecar: BIDS-like acquisition fields, the measured volumes, one entry
    per frame (``rows``: image file, time, phase, label file) and the whole simulation."""
    meta = cine.meta
    measured = meta.get("measured", {})
    sequence = meta.get("sequence", {})
    return {
        "Simulated": True,
        "Description": meta.get("description", "Simulated beating-heart phantom; not patient data."),
        "Generator": meta.get("generator", "LongitudinalDiffusionLib.demo.heart.simulate_heart"),
        "Modality": "MR",
        "PulseSequenceType": "balanced SSFP (bSSFP) cine",
        "MagneticFieldStrength": sequence.get("field_strength_T"),
        "FlipAngle": sequence.get("flip_angle_deg"),
        "RepetitionTime": _seconds(sequence.get("repetition_time_ms")),
        "EchoTime": _seconds(sequence.get("echo_time_ms")),
        "FrameTimes_ms": list(cine.times_ms),
        "Phases": cine.phases,
        "Contraction": meta.get("contraction"),
        "EjectionFraction": meta.get("ejection_fraction"),
        "HeartRate_bpm": meta.get("model", {}).get("heart_rate_bpm"),
        "LVEndDiastolicVolume_ml": measured.get("lv_edv_ml"),
        "LVEndSystolicVolume_ml": measured.get("lv_esv_ml"),
        "LVMyocardialVolume_ml": measured.get("lv_myocardium_ml"),
        "RVEjectionFraction": measured.get("rv_ejection_fraction"),
        "Labels": {str(k): v for k, v in HEART_LABELS.items()},
        "Files": [
            {"bssfp": r[0], "dseg": r[3], "time_ms": cine.times_ms[i], "phase": r[2]} for i, r in enumerate(rows)
        ],
        "Simulation": meta,
    }


def _write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """``manifest.tsv``: one row per frame (file, time_ms, phase, labels), written atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write("file\ttime_ms\tphase\tlabels\n")
            for row in rows:
                fh.write("\t".join(row) + "\n")

    return atomic_write(path, _write)


def _seconds(ms: Any) -> float | None:
    return None if ms is None else float(ms) / 1000.0
