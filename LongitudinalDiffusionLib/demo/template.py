"""The anatomy the simulated cohort is built on: ICBM 2009a tissue maps (see NOTICE.txt).

Everything here lives in template (MNI) space at 1 mm and is computed once per process:
tissue probabilities (grey matter, white matter, CSF = clip(mask - GM - WM)), the distance
outside the brain (for the extra-axial CSF, dura, skull and scalp shells), a lateral-ventricle
mask and the smooth outward field used to make ventricles larger or smaller, and a
maturation coordinate that orders white matter by when it myelinates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

#: The embedded maps (package data, installed with the library).
DATA = Path(__file__).resolve().parent / "data" / "icbm2009a"


@dataclass(frozen=True)
class Template:
    """Tissue maps in template space; all arrays share ``affine`` (voxel -> MNI mm).

    Attributes:
        gm, wm, csf, brain: float32 probabilities / soft mask in [0, 1].
        outside_mm: distance (mm) from the brain surface for voxels outside it, 0 inside.
        ventricles: bool mask of the lateral ventricles.
        ventricle_push: (3, I, J, K) unit-scaled field pointing into the ventricles; sampling
            the template at ``x + d * push(x)`` grows the ventricles by about ``d`` mm.
        white_matter_push: (3, I, J, K) the same for white matter, largest at the grey/white
            interface: sampling at ``x + d * push(x)`` moves the interface outwards (thinner
            cortex) by about ``d`` mm.
        maturation: in [0, 1]; 0 myelinates first (deep, posterior, inferior white matter),
            1 last (frontal, subcortical): the central-to-peripheral, posterior-to-anterior
            order of infant myelination.
        centre_mm: centroid of the brain in MNI mm (the point growth scales about).
    """

    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    outside_mm: np.ndarray
    ventricles: np.ndarray
    ventricle_push: np.ndarray
    white_matter_push: np.ndarray
    maturation: np.ndarray
    centre_mm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape

    @functools.cached_property
    def tissue_ml(self) -> float:
        """Grey plus white matter volume of the template (ml)."""
        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        return float((self.gm.sum(dtype=np.float64) + self.wm.sum(dtype=np.float64)) * voxel_ml)

    @functools.cached_property
    def lesion_sites(self) -> np.ndarray:
        """(N, 3) voxel indices where a lesion may be centred: deep white matter, more
        than 22 mm from the brain surface and 6 mm from the ventricles."""
        ok = (self.wm > 0.9) & ~ndimage.binary_dilation(self.ventricles, iterations=6)
        ok &= ndimage.distance_transform_edt(self.brain > 0.5) > 22
        return np.argwhere(ok)

    def world_to_voxel(self, points_mm: np.ndarray) -> np.ndarray:
        """(3, N) MNI mm -> (3, N) template voxel coordinates."""
        inv = np.linalg.inv(self.affine)
        return inv[:3, :3] @ points_mm + inv[:3, 3:4]


def _read(name: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.Nifti1Image.from_filename(str(DATA / f"icbm2009a_{name}.nii.gz"))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _voxel_mm(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ ijk + affine[:3, 3:4]


def _unit_push(indicator: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gradient of a blurred indicator, scaled so that its strongest point has length 1."""
    push = np.stack(np.gradient(ndimage.gaussian_filter(indicator, sigma_mm))).astype(np.float32)
    push /= max(float(np.sqrt((push**2).sum(0)).max()), 1e-6)
    return push


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load and derive the template maps (about 2 s, then cached for the process)."""
    gm_u8, affine = _read("gm")
    wm_u8, _ = _read("wm")
    mask_u8, _ = _read("brainmask")
    gm = gm_u8.astype(np.float32) / 255.0
    wm = wm_u8.astype(np.float32) / 255.0
    # Soften the binary brain support by one voxel so that resampled edges are partial volumes.
    brain = ndimage.gaussian_filter(mask_u8.astype(np.float32), 0.7)
    brain = np.maximum(brain, np.clip(gm + wm, 0, 1))
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    outside_mm = ndimage.distance_transform_edt(mask_u8 == 0).astype(np.float32)

    ijk = np.indices(gm.shape).reshape(3, -1).astype(np.float64)
    mm = _voxel_mm(affine, ijk).reshape((3,) + gm.shape)
    centre = (mm.reshape(3, -1) * brain.reshape(-1)).sum(1) / brain.sum()

    # Lateral ventricles: the large CSF components in the central box of the brain.
    x, y, z = mm
    central = (np.abs(x) < 30) & (y > -55) & (y < 30) & (z > -5) & (z < 40)
    cand = (csf > 0.55) & central & (outside_mm == 0)
    lab, n = ndimage.label(cand)
    ventricles = np.zeros(gm.shape, bool)
    if n:
        sizes = ndimage.sum(cand, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
        ventricles = np.isin(lab, keep)
    push = _unit_push(ventricles.astype(np.float32), 2.5)
    wm_push = _unit_push(wm, 1.5)

    # Maturation coordinate: depth below the cortex, anterior position, inferior position.
    depth = ndimage.distance_transform_edt(mask_u8 > 0)
    deep = np.clip(depth / 25.0, 0, 1)
    anterior = np.clip((y + 100.0) / 170.0, 0, 1)
    inferior = np.clip((15.0 - z) / 60.0, 0, 1)
    maturation = np.clip(0.55 * (1 - deep) + 0.5 * anterior - 0.45 * inferior + 0.05, 0, 1).astype(np.float32)

    return Template(
        affine=affine,
        gm=gm,
        wm=wm,
        csf=csf.astype(np.float32),
        brain=brain.astype(np.float32),
        outside_mm=outside_mm,
        ventricles=ventricles,
        ventricle_push=push,
        white_matter_push=wm_push,
        maturation=maturation,
        centre_mm=centre,
    )
