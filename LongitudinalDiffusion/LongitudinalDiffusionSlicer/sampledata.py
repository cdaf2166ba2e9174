"""The simulated demo subject, offered in Slicer's Sample Data module.

Nothing is downloaded: the subject is simulated on this computer by the library (the same
code as ``longdiff demo-data``), once, into Slicer's cache folder, then loaded into the
scene with its subject hierarchy and labels.
"""

import logging
import os
from pathlib import Path

#: Sample Data category and sample name.
SAMPLE_CATEGORY = "Longitudinal Diffusion"
SAMPLE_NAME = "LongitudinalDiffusionDemoSubject"
#: The demo cohort the sample comes from: one subject, seed 0, 2 mm, no heart.
SAMPLE_SEED = 0


def sampleSubjectFolder(cacheDir):
    """Simulate the demo subject into ``cacheDir`` unless it is there already; return its
    ``sub-001`` folder (a BIDS subject, loadable with ``load_subject``)."""
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    root = Path(cacheDir) / "LongitudinalDiffusion" / f"demo-cohort-seed{SAMPLE_SEED}"
    subject = root / "sub-001"
    if not (subject / "sub-001_sessions.tsv").is_file():
        logging.info("Simulating the LongitudinalDiffusion demo subject into %s", root)
        write_cohort(root, CohortSpec(n_subjects=1, seed=SAMPLE_SEED, heart=False), overwrite=True)
    return subject


def registerSampleData(thumbnailPath, loadSample):
    """Add the demo subject to the Sample Data module (real Slicer only).

    Args:
        thumbnailPath: the picture shown on the Sample Data button.
        loadSample: called (with the sample source) when the user clicks it.
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        nodeNames=["sub-001"],
        thumbnailFileName=os.fspath(thumbnailPath),
        customDownloader=loadSample,
    )
