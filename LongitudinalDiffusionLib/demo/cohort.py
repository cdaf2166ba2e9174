"""Write the simulated longitudinal cohort as a BIDS dataset.

Layout (``OUT``)::

    dataset_description.json, README.md, participants.tsv/.json, NOTICE-ICBM2009a.txt, .bidsignore
    sub-001/sub-001_sessions.tsv (+ .json: age in months)
    sub-001/ses-01/anat/sub-001_ses-01_{T1w,T2w,FLAIR}.nii.gz, sub-001_ses-01_ce-gadolinium_T1w.nii.gz (+ .json)
    derivatives/groundtruth/sub-001/ses-01/anat/sub-001_ses-01_dseg.nii.gz, dseg.tsv
    cardiac/sub-heart01/...            (the beating-heart phantom; not BIDS, listed in .bidsignore)

Every subject is drawn from ``numpy.random.default_rng([seed, index])``, so subject 3 of a
10-subject cohort is the same as subject 3 of a 50-subject one, and a cohort is identical
for a given seed on every machine. The dataset is assembled in a temporary folder beside
``OUT`` and moved into place at the end: an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..imaging import save_image, write_json
from ..subject import bids_suffix
from . import SIMULATED_NIFTI_DESCRIPTION, brain
from .template import DATA as TEMPLATE_DIR

GENERATOR = {
    "Name": "LongitudinalDiffusion simulated cohort",
    "Version": __version__,
    "Description": "Simulated: ICBM 2009a anatomy, modelled infant growth and myelination, "
    "MR signal equations; not real patient data.",
}


@dataclass(frozen=True)
class CohortSpec:
    """What to simulate. Defaults give a 2 mm, 80x96x80 (160x192x160 mm) head FOV."""

    n_subjects: int = 8
    seed: int = 0
    shape: tuple[int, int, int] = brain.DEFAULT_SHAPE
    spacing: tuple[float, float, float] = brain.DEFAULT_SPACING
    lesion_probability: float = 0.3
    missing_visit_probability: float = 0.0
    heart: bool = True
    heart_frames: int = 10
    n_hearts: int = 1
    # anatomical variety (1: the default population; see brain.draw_subject)
    variety: float = 1.0

    def __post_init__(self) -> None:
        if self.n_subjects < 1:
            raise ValueError(f"n_subjects must be at least 1, got {self.n_subjects}")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be three sizes of at least 8 voxels, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive sizes in mm, got {self.spacing}")
        if self.n_hearts < 1:
            raise ValueError(f"n_hearts must be at least 1, got {self.n_hearts}")
        if not 1.0 <= self.variety <= brain.MAX_VARIETY:
            raise ValueError(f"variety must lie in [1, {brain.MAX_VARIETY:g}], got {self.variety}")
        for name in ("lesion_probability", "missing_visit_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


def subject_id(index: int) -> str:
    return f"{index + 1:03d}"


def write_cohort(
    out: str | Path,
    spec: CohortSpec = CohortSpec(),
    *,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    jobs: int = 1,
) -> Path:
    """Simulate the cohort and write it as a BIDS dataset at ``out``.

    Args:
        out: the dataset folder to create. Must not exist (or be empty) unless ``overwrite``.
        spec: what to simulate.
        overwrite: replace an existing dataset at ``out`` (only one longdiff wrote: a
            folder holding any other file is refused, naming it).
        progress: called as ``progress(what, done, total)`` after each session (after
            each subject when ``jobs > 1``).
        jobs: worker processes; subjects are simulated in parallel when more than 1. The
            dataset is the same whatever ``jobs`` is.

    Returns:
        the dataset folder.
    """
    from .. import outputs

    out = Path(out)
    # the output rule (outputs.py): overwrite replaces only a cohort or result longdiff wrote
    outputs.check_output(out, overwrite=overwrite, what="dataset folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write(work, spec, progress, jobs)
        outputs.write_marker(work, "cohort", seed=spec.seed, subjects=spec.n_subjects)
        outputs.install(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _draw(spec: CohortSpec, index: int) -> brain.BrainSubject:
    return brain.draw_subject(
        np.random.default_rng([spec.seed, index]),
        subject_id(index),
        lesion_probability=spec.lesion_probability,
        missing_visit_probability=spec.missing_visit_probability,
        seed=(spec.seed, index),
        variety=spec.variety,
    )


def _write(root: Path, spec: CohortSpec, progress: Callable[[str, int, int], None] | None, jobs: int) -> None:
    subjects = [_draw(spec, i) for i in range(spec.n_subjects)]
    total = sum(len(s.ages) for s in subjects) + (spec.n_hearts if spec.heart else 0)
    done = 0

    def tick(what: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress:
            progress(what, done, total)

    _write_top_level(root, spec, subjects)
    if jobs > 1 and spec.n_subjects > 1:
        # Subjects are independent and seeded by index: the result does not depend on jobs.
        with ProcessPoolExecutor(max_workers=min(jobs, spec.n_subjects), mp_context=_mp_context()) as pool:
            futures = {pool.submit(_write_subject_by_index, root, spec, i): i for i in range(spec.n_subjects)}
            for future in as_completed(futures):
                subj = subjects[futures[future]]
                future.result()
                tick(f"sub-{subj.subject_id} ({len(subj.ages)} sessions)", len(subj.ages))
    else:
        for subj in subjects:
            _write_subject(root, spec, subj, tick)
    if spec.heart:
        from .heart import simulate_heart, write_heart

        for k in range(spec.n_hearts):
            # Heart k is seeded by (seed, 1_000_000 + k): heart01 is the same whatever n_hearts is.
            cine = simulate_heart(np.random.default_rng([spec.seed, 1_000_000 + k]), n_frames=spec.heart_frames)
            write_heart(cine, root / "cardiac", f"heart{k + 1:02d}")
            tick(f"cardiac phantom {k + 1}")


def _mp_context():
    import multiprocessing

    # "spawn" everywhere: forking a process that holds torch/OpenMP threads can hang.
    return multiprocessing.get_context("spawn")


def _write_subject_by_index(root: Path, spec: CohortSpec, index: int) -> None:
    _write_subject(root, spec, _draw(spec, index), None)


def _write_subject(root: Path, spec: CohortSpec, subj: brain.BrainSubject, tick: Callable[[str], None] | None) -> None:
    sessions = []
    for k, age in enumerate(subj.ages):
        ses = f"{k + 1:02d}"
        rng = np.random.default_rng([spec.seed, int(subj.subject_id), k, 7])
        session = brain.simulate_session(subj, age, rng, shape=spec.shape, spacing=spec.spacing)
        _write_session(root, subj, ses, session)
        sessions.append({"session_id": f"ses-{ses}", "age": age})
        if tick:
            tick(f"sub-{subj.subject_id} ses-{ses} ({age:g} months)")
    sub_dir = root / f"sub-{subj.subject_id}"
    _write_tsv(sub_dir / f"sub-{subj.subject_id}_sessions.tsv", sessions, ["session_id", "age"])
    write_json(
        sub_dir / f"sub-{subj.subject_id}_sessions.json",
        {"age": {"Description": "age at scan (postnatal, simulated)", "Units": "months"}},
    )


def _write_session(root: Path, subj: brain.BrainSubject, ses: str, session: brain.Session) -> None:
    sid = f"sub-{subj.subject_id}"
    anat = root / sid / f"ses-{ses}" / "anat"
    common = {
        "Simulated": True,
        "GeneratedBy": [GENERATOR],
        "AgeMonths": session.age_months,
        "SimulationSeed": list(subj.seed),
        "BrainScale": session.meta["BrainScale"],
        "MeanWhiteMatterMyelinationT1": session.meta["MeanWhiteMatterMyelinationT1"],
        "MeanWhiteMatterMyelinationT2": session.meta["MeanWhiteMatterMyelinationT2"],
    }
    for modality, image in session.images.items():
        entities, suffix = bids_suffix(modality)
        name = "_".join([sid, f"ses-{ses}", *(f"{k}-{v}" for k, v in entities.items()), suffix])
        sidecar = {**session.meta["scans"][modality], **common}
        save_image(
            image, anat / f"{name}.nii.gz", dtype=np.int16, sidecar=sidecar, description=SIMULATED_NIFTI_DESCRIPTION
        )
    deriv = root / "derivatives" / "groundtruth" / sid / f"ses-{ses}" / "anat"
    save_image(
        session.labels,
        deriv / f"{sid}_ses-{ses}_dseg.nii.gz",
        dtype=np.uint8,
        sidecar={**common, "LesionRadiusMm": session.meta["LesionRadiusMm"]},
        description=SIMULATED_NIFTI_DESCRIPTION,
    )


def _write_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        # BIDS marks a missing value "n/a", never an empty cell.
        writer = csv.DictWriter(fh, columns, delimiter="\t", extrasaction="ignore", lineterminator="\n", restval="n/a")
        writer.writeheader()
        writer.writerows(rows)


def _write_top_level(root: Path, spec: CohortSpec, subjects: list[brain.BrainSubject]) -> None:
    write_json(
        root / "dataset_description.json",
        {
            "Name": "LongitudinalDiffusion simulated infant cohort (SIMULATED DATA)",
            "BIDSVersion": "1.10.0",
            "DatasetType": "raw",
            "Authors": ["LongitudinalDiffusion simulator (simulated data, no human subjects)"],
            "License": "Simulated from the ICBM 2009a template; see NOTICE-ICBM2009a.txt",
            "GeneratedBy": [GENERATOR],
            "Simulated": True,
            "SimulationParameters": {
                "seed": spec.seed,
                "n_subjects": spec.n_subjects,
                "shape": list(spec.shape),
                "spacing_mm": list(spec.spacing),
                "lesion_probability": spec.lesion_probability,
                "missing_visit_probability": spec.missing_visit_probability,
                # recorded only off the default, so a default cohort's description is unchanged
                **({"variety": spec.variety} if spec.variety != 1.0 else {}),
            },
        },
    )
    rows = [s.describe() for s in subjects]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    _write_tsv(root / "participants.tsv", rows, columns)
    write_json(
        root / "participants.json",
        {
            "sex": {
                "Description": "sex (simulated; male heads drawn 3 % larger)",
                "Levels": {"F": "female", "M": "male"},
            },
            "size_factor": {"Description": "linear head/brain size relative to the cohort norm"},
            "maturation_rate": {"Description": "speed of myelination relative to the norm (1 = typical)"},
            "ventricle_offset_mm": {"Description": "ventricle size offset (template mm)"},
            "lesion": {"Description": "whether a tumour-like focal lesion appears", "Levels": {"yes": "", "no": ""}},
            "lesion_onset_months": {"Description": "age at which the lesion appears", "Units": "months"},
        },
    )
    _write_tsv(
        root / "derivatives" / "groundtruth" / "dseg.tsv",
        [{"index": k, "name": v} for k, v in brain.BRAIN_LABELS.items()],
        ["index", "name"],
    )
    write_json(
        root / "derivatives" / "groundtruth" / "dataset_description.json",
        {
            "Name": "Ground-truth tissue labels of the simulated cohort",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [GENERATOR],
            "Simulated": True,
        },
    )
    (root / ".bidsignore").write_text("cardiac/\nNOTICE-ICBM2009a.txt\n", encoding="utf-8")
    shutil.copyfile(TEMPLATE_DIR / "NOTICE.txt", root / "NOTICE-ICBM2009a.txt")
    (root / "README.md").write_text(_README.format(n=spec.n_subjects, seed=spec.seed), encoding="utf-8")


_README = """# Simulated infant cohort (SIMULATED DATA - not real patients)

Made by `longdiff demo-data` (LongitudinalDiffusion) with {n} subjects and seed {seed}.

* Anatomy: the ICBM 2009a template's tissue maps (see NOTICE-ICBM2009a.txt), deformed
  smoothly per subject.
* Ages: visits planned at 0.5, 3, 6, 9, 12, 18 and 24 months, scattered per subject
  (`sub-*/sub-*_sessions.tsv`, units in the `_sessions.json` sidecar: months).
* Development: brain growth, ventricles, and myelination from deep/posterior to
  superficial/anterior white matter; relaxation times change with age and contrast follows
  from the spin-echo and inversion-recovery signal equations (T1w, T2w, FLAIR,
  contrast-enhanced T1w as `ce-gadolinium_T1w`), with a coil bias field and Rician noise.
* Some subjects grow a tumour-like lesion (necrotic core, enhancing rim, oedema).
* Ground-truth labels: `derivatives/groundtruth` (`dseg.tsv` names the values).
* `cardiac/`: a beating-heart bSSFP phantom from end-diastole to end-systole.
"""
