"""The tasks through the preprocessing path, end to end: scans in another head pose go into
the model's space and the result comes back onto the input's own grid, where its head is."""

from __future__ import annotations

import numpy as np
import pytest

from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.domain import foreground
from LongitudinalDiffusionLib.imaging import Image
from LongitudinalDiffusionLib.subject import Subject, Timepoint, load_subject
from LongitudinalDiffusionLib.tasks import synthesize_modality


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep") / "cohort"
    write_cohort(root, CohortSpec(n_subjects=1, heart=False, seed=5, shape=(32, 40, 32), spacing=(5.0, 5.0, 5.0)))
    return [tp for tp in load_subject(root / "sub-001").timepoints if tp.session == "ses-04"]


def _posed(tp: Timepoint, degrees: float, shift) -> Timepoint:
    """The scan as a scanner placed it: same voxels, the head turned and moved in world
    space, and no 'simulated' mark (so auto preprocessing takes it for a real scan)."""
    a = np.deg2rad(degrees)
    move = np.eye(4)
    move[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    move[:3, 3] = shift
    image = Image(np.array(tp.image.array), move @ tp.image.affine)
    return Timepoint(tp.age, tp.modality, image, None, tp.session)  # no file: its header would say SIMULATED


def test_a_missing_contrast_of_a_posed_session_lands_on_the_first_contrasts_grid(session):
    posed = [_posed(tp, 12.0, (20.0, -15.0, 8.0)) for tp in session if tp.modality.value != "FLAIR"]
    result = synthesize_modality(Subject("sub-posed", posed), "ses-04", "FLAIR", "cwdm-demo", steps=2, device="cpu")
    prov = result.provenance.extra["preprocessing"]
    assert prov["applied"] is True and prov["spec"]["align"] == "affine"
    first = next(tp for tp in posed if tp.modality.value == "T1w")
    out = result.image("generated")
    assert out.same_geometry(first.image)  # the first condition's own grid
    gap = np.linalg.norm(foreground(out).center_ras - foreground(first.image).center_ras)
    assert gap < 5.0, f"the generated head sits {gap:.1f} mm from the session's head (5 mm voxels)"
    assert [t.name for t in result.transforms]  # the way back is saved with the result
