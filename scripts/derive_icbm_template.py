"""Derive the embedded ICBM 2009a tissue maps from the copy that ships inside nilearn.

Run once by a developer (``pip install nilearn`` first); the outputs are committed under
``LongitudinalDiffusionLib/demo/data/icbm2009a/`` together with the MNI notice. It crops the
1 mm maps to the head's bounding box (plus a margin) and keeps them as uint8 probabilities,
so the files stay small and the simulator never needs nilearn at run time.

    python scripts/derive_icbm_template.py
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.datasets import load_mni152_gm_template

SRC = Path(load_mni152_gm_template.__code__.co_filename).parent / "data"
OUT = Path(__file__).resolve().parents[1] / "LongitudinalDiffusionLib" / "demo" / "data" / "icbm2009a"
MARGIN = 4


def main() -> None:
    maps = {
        name: nib.load(SRC / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz") for name in ("t1", "gm", "wm")
    }
    affine = maps["t1"].affine
    brain = np.asarray(maps["t1"].dataobj) > 0
    idx = np.argwhere(brain | (np.asarray(maps["gm"].dataobj) > 0) | (np.asarray(maps["wm"].dataobj) > 0))
    lo = np.maximum(idx.min(0) - MARGIN, 0)
    hi = np.minimum(idx.max(0) + MARGIN + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("gm", "wm"):
        arr = np.asarray(maps[name].dataobj)[crop].astype(np.uint8)
        nib.save(nib.Nifti1Image(arr, new_affine), OUT / f"icbm2009a_{name}.nii.gz")
    nib.save(nib.Nifti1Image(brain[crop].astype(np.uint8), new_affine), OUT / "icbm2009a_brainmask.nii.gz")
    print(f"cropped {brain.shape} -> {brain[crop].shape} at voxel offset {lo.tolist()}; wrote {OUT}")


if __name__ == "__main__":
    main()
