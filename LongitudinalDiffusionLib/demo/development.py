"""Infant brain development from birth to 24 months: size, ventricles, relaxation times.

The numbers are round figures from the developmental MRI literature, chosen so that the
simulated images follow the known course of infant MRI contrast; they are a model, not a
measurement, and every image made from them is labelled simulated.

* **Brain volume** roughly doubles in the first year and grows ~15 % in the second
  (Knickmeyer et al., J. Neurosci. 2008): about 36 % of adult volume at birth, 72 % at
  12 months, 82 % at 24 months. Linear size scales with the cube root.
* **Ventricles** are relatively large in the newborn and shrink relative to the brain.
* **Relaxation** (3 T): newborn white matter is mostly water (T1 ~3000 ms, T2 ~260 ms, PD
  ~0.92) and becomes adult-like (T1 ~900 ms, T2 ~70 ms, PD ~0.69) as it myelinates; grey
  matter shortens more gently (T1 ~2100 -> ~1450 ms, T2 ~160 -> ~95 ms) (Deoni et al.,
  J. Neurosci. 2011; Dubois et al., Neuroscience 2014; Williams et al., Radiology 2005).
* **Myelination** spreads from deep to superficial and from posterior to anterior white
  matter (Barkovich et al., Radiology 1988). T1 shortening (lipids, cholesterol) leads the
  T2 shortening (compaction of the sheath) by a few months.

With spin-echo T1w imaging this yields the three classic phases without painting them:
infantile (WM darker than GM on T1w, brighter on T2w; first months), isointense (about
6-12 months, little WM/GM contrast, regionally mixed) and early adult-like (after ~12
months, WM brighter than GM on T1w and darker on T2w).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_AGE_MONTHS = 24.0


def brain_volume_fraction(age_months) -> np.ndarray:
    """Brain volume as a fraction of the adult template's (0.36 at birth, ~0.82 at 24 mo)."""
    a = np.asarray(age_months, dtype=np.float64)
    return 0.36 + 0.50 * (1.0 - np.exp(-a / 9.4))


#: Grey plus white matter of a typical adult brain (ml). The ICBM template's probability
#: maps sum to more (about 1680 ml: it is an average of brains normalised to a large
#: space, and its GM map is generous), so template sizes are scaled down to this first.
ADULT_TISSUE_ML = 1150.0


def brain_scale(age_months, size_factor: float = 1.0, template_tissue_ml: float = ADULT_TISSUE_ML) -> np.ndarray:
    """Linear scale that takes the template's brain to a typical brain at ``age_months``.

    With the template's own tissue volume given, the newborn brain comes out at about
    500 ml of grey and white matter, 930 ml at 12 months and 1060 ml at 24 months, close to
    the 458, 900 and 1034 ml of Knickmeyer et al. (2008).
    """
    relative = brain_volume_fraction(age_months) * ADULT_TISSUE_ML / template_tissue_ml
    return size_factor * relative ** (1.0 / 3.0)


def ventricle_excess_mm(age_months, subject_offset: float = 0.0) -> np.ndarray:
    """How far (template mm) ventricle walls sit outside the template's: 1.6 at birth -> 0.4."""
    a = np.asarray(age_months, dtype=np.float64)
    return 0.4 + 1.2 * np.exp(-a / 8.0) + subject_offset


def white_matter_excess_mm(age_months) -> np.ndarray:
    """How far (template mm) the grey/white interface sits outside the template's.

    The newborn cortex is thin relative to the white matter; grey matter then grows much
    faster than white matter in the first year (Knickmeyer et al. 2008; Gilmore et al.,
    Cereb. Cortex 2012), so the interface moves inwards: 2 mm at birth, 0.14 mm at 24 mo.
    Grey matter then grows by about 100 % in the first year and white matter by 65 %.
    """
    a = np.asarray(age_months, dtype=np.float64)
    return 2.0 * np.exp(-a / 9.0)


def extra_axial_csf_mm(age_months) -> np.ndarray:
    """Width of the subarachnoid CSF shell outside the template brain (wider in infancy)."""
    a = np.asarray(age_months, dtype=np.float64)
    return 1.5 + 1.5 * np.exp(-a / 10.0)


def myelination(maturation: np.ndarray, age_months: float, rate: float = 1.0, lag: float = 0.0) -> np.ndarray:
    """Fraction (0..1) of adult myelin at each voxel.

    Args:
        maturation: the template's maturation coordinate (0 = first to myelinate).
        age_months: age at scan.
        rate: subject maturation speed (1 = typical; 1.1 = 10 % ahead).
        lag: months added to the onset (T2 shortening lags T1 shortening).
    """
    onset = 4.0 + 12.0 * maturation + lag  # months at which a voxel is half way
    width = 1.5 + 0.25 * lag
    return 1.0 / (1.0 + np.exp(-(age_months * rate - onset) / width))


@dataclass(frozen=True)
class Tissue:
    """Relaxation parameters of one tissue: T1 and T2 in ms, proton density in [0, 1]."""

    t1: float
    t2: float
    pd: float


#: Tissues whose parameters do not change with age (3 T).
CSF = Tissue(4300.0, 2000.0, 1.00)
DURA = Tissue(1100.0, 60.0, 0.55)  # dura and meningeal vessels: enhance with gadolinium
BONE = Tissue(1500.0, 10.0, 0.06)  # cortical bone: almost no mobile protons
SCALP = Tissue(380.0, 110.0, 0.90)  # subcutaneous fat: short T1, bright on T1w
MUSCLE = Tissue(1400.0, 45.0, 0.75)
NECROSIS = Tissue(2600.0, 400.0, 0.95)  # fluid-filled necrotic core
TUMOUR = Tissue(1650.0, 110.0, 0.86)  # viable, enhancing tumour rim

WM_UNMYELINATED = Tissue(3000.0, 260.0, 0.92)
WM_MYELINATED = Tissue(900.0, 70.0, 0.69)
GM_NEWBORN = Tissue(2100.0, 160.0, 0.90)
GM_ADULT = Tissue(1450.0, 95.0, 0.82)

#: Gadolinium concentration (mM) reached where the blood-brain barrier is absent or broken.
GD_TUMOUR_MM = 0.45
GD_DURA_MM = 0.25


def grey_matter(age_months: float) -> Tissue:
    """Grey matter at ``age_months``: exponential approach to adult values (tau 10 months)."""
    w = float(np.exp(-age_months / 10.0))
    return Tissue(
        GM_ADULT.t1 + (GM_NEWBORN.t1 - GM_ADULT.t1) * w,
        GM_ADULT.t2 + (GM_NEWBORN.t2 - GM_ADULT.t2) * w,
        GM_ADULT.pd + (GM_NEWBORN.pd - GM_ADULT.pd) * w,
    )


def white_matter(m_t1: np.ndarray, m_t2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-voxel white-matter (T1, T2, PD) for myelination fractions ``m_t1`` and ``m_t2``.

    Relaxation *rates* mix linearly between the unmyelinated and myelinated states (water
    in fast exchange between compartments); PD mixes linearly.
    """
    u, m = WM_UNMYELINATED, WM_MYELINATED
    r1 = (1.0 - m_t1) / u.t1 + m_t1 / m.t1
    r2 = (1.0 - m_t2) / u.t2 + m_t2 / m.t2
    pd = (1.0 - m_t1) * u.pd + m_t1 * m.pd
    return 1.0 / r1, 1.0 / r2, pd


def oedema(t1, t2, pd):
    """Vasogenic oedema: extra extracellular water lengthens T1 and T2 and raises PD."""
    return np.asarray(t1) * 1.35, np.minimum(np.asarray(t2) * 1.8, 600.0), np.minimum(np.asarray(pd) * 1.08, 0.98)
