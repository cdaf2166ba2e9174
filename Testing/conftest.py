"""Fixtures shared by several test files (each module-scoped one is made once per file).

The helpers the tests import by name stay plain modules: ``qt_shim`` (Qt and the Slicer
widgets), ``mrml_harness`` (a real MRML scene, the panel on it) and ``worker_harness``
(tiny cohorts and models, a real worker). Imports happen inside the fixtures, so that
collecting a test file that uses none of them imports nothing more.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def subjectFolder(tmp_path_factory) -> Path:
    """A real simulated BIDS subject for the panel tests: 7 ages x 4 modalities, tiny volumes."""
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    root = tmp_path_factory.mktemp("cohort") / "cohort"
    write_cohort(root, CohortSpec(n_subjects=1, heart=False, shape=(20, 24, 20), spacing=(8, 8, 8)))
    return root / "sub-001"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The job and worker tests' one-subject cohort (``worker_harness.make_cohort``)."""
    from worker_harness import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort") / "cohort")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained models of the job and worker tests (``worker_harness.make_models``)."""
    from worker_harness import make_models

    return make_models(tmp_path_factory.mktemp("models"))
