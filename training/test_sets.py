"""Untouched test sets for the demo models: new simulated subjects, in distribution and shifted.

``python -m training.test_sets --out testsets`` writes four cohorts (BIDS subjects plus
``cardiac/`` hearts, the layout ``training/evaluate.py`` reads) of the **same** new subjects:

* ``in-distribution``: the simulator, seed and scan settings of the demo models' cohort
  (``longdiff demo-data cohort5 --subjects 16 --hearts 6 --seed 11 --spacing 5 --fov 160 200 160``),
  but subjects with indices that cohort never drew: subject ``k`` of a seed is drawn from
  ``numpy.random.default_rng([seed, k])`` (``LongitudinalDiffusionLib.demo.cohort``), so
  ``sub-017`` ... are new people, and hearts ``sub-heart07`` ... new hearts (seeded by
  ``[seed, 1_000_000 + k]``);
* ``4mm``: the same subjects scanned at 4 mm isotropic (the hearts too);
* ``aniso``: scanned at 1 x 1 x 4 mm (thick slices along the last axis; hearts likewise);
* ``variety``: the same subjects at 5 mm, each further from the template (``variety`` 2.5 of
  :func:`LongitudinalDiffusionLib.demo.brain.draw_subject`: head size, ventricle, pose and
  relaxation deviations x 2.5 and a coarse 24 mm-scale deformation added; the displacement
  from the template grows from 1.25 to 3.5 mm RMS, 3.3 to 8.2 mm at most, with no folding);
  no hearts;
* ``site-b``: the same subjects at 5 mm on another "site": other repetition, echo and
  inversion times (T1w/T1ce TR 450 ms TE 20 ms, T2w TR 3500 ms TE 90 ms, FLAIR TR 7000 ms
  TE 90 ms, TI nulling CSF) through the same signal equations, and half the SNR (more
  Rician noise added to the magnitude images), at 3 T. No hearts (the cine phantom has
  one bSSFP sequence);
* ``site-c``: the same subjects at 5 mm on a 1.5 T scanner with site A's protocol: every
  tissue's T1 at 1.5 T (:func:`LongitudinalDiffusionLib.demo.physics.t1_at_field`; white
  matter about 890 -> 670 ms, grey matter 1300 -> 1010 ms, CSF unchanged, so FLAIR's TI
  still nulls it) and half the SNR (SNR grows about linearly with the field). No hearts;
* ``motion``: the same subjects at 5 mm on site A, where half the scans (drawn per scan) moved
  during the acquisition: :func:`move_during_scan`, two rigid movements of up to 5 degrees and
  5 mm per axis at random moments, k-space lines acquired after a movement coming from the
  moved head (ghosts along the phase-encoding axis, blur, a shifted centre). The ground-truth
  labels are those of the head before it moved. No hearts.

Each cohort's ``dataset_description.json`` records the simulator seed, the subject indices
and the scan settings under ``SimulationParameters`` (``test_split``, ``site``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from LongitudinalDiffusionLib.demo import brain, physics
from LongitudinalDiffusionLib.demo import cohort as sim
from LongitudinalDiffusionLib.imaging import Image, write_json

FOV_MM = (160.0, 200.0, 160.0)  # the demo cohort's brain field of view
HEART_FOV_MM = (128.0, 128.0, 120.0)  # the cine phantom's default field of view

#: name -> (brain spacing, heart spacing or None for the phantom's default / False for none,
#: site, anatomical variety, fraction of scans with motion)
SETS = {
    "in-distribution": ((5.0, 5.0, 5.0), None, "A", 1.0, 0.0),
    "4mm": ((4.0, 4.0, 4.0), (4.0, 4.0, 4.0), "A", 1.0, 0.0),
    "aniso": ((1.0, 1.0, 4.0), (1.0, 1.0, 4.0), "A", 1.0, 0.0),
    "site-b": ((5.0, 5.0, 5.0), False, "B", 1.0, 0.0),
    "variety": ((5.0, 5.0, 5.0), False, "A", 2.5, 0.0),
    "site-c": ((5.0, 5.0, 5.0), False, "C", 1.0, 0.0),
    "motion": ((5.0, 5.0, 5.0), False, "A", 1.0, 0.5),
}
#: the motion set's movements: how many per scan, and their largest rotation (degrees) and
#: translation (mm) about / along each axis
MOTION_MOVES, MOTION_DEGREES, MOTION_MM = 2, 5.0, 5.0

SITE_B = {
    "T1w": physics.Sequence("T1w", "spin_echo", tr=450.0, te=20.0),
    "T1ce": physics.Sequence("T1ce", "spin_echo", tr=450.0, te=20.0, contrast=True),
    "T2w": physics.Sequence("T2w", "spin_echo", tr=3500.0, te=90.0),
    "FLAIR": physics.Sequence("FLAIR", "inversion_recovery", tr=7000.0, te=90.0, ti=round(physics.csf_null_ti(7000.0))),
}
SITE_C = {name: replace(seq, field_t=1.5) for name, seq in physics.SEQUENCES.items()}
#: site -> (its sequences, the divisor of the simulated SNR)
SITES = {"B": (SITE_B, 2.0), "C": (SITE_C, 2.0)}


@contextlib.contextmanager
def _site(site: str):
    """The scanner settings of a site while its scans are simulated."""
    if site == "A":
        yield
        return
    saved = dict(physics.SEQUENCES)
    physics.SEQUENCES.update(SITES[site][0])
    try:
        yield
    finally:
        physics.SEQUENCES.clear()
        physics.SEQUENCES.update(saved)


def _shape(fov: tuple[float, ...], spacing: tuple[float, ...]) -> tuple[int, int, int]:
    return tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing))  # type: ignore[return-value]


def write_test_set(
    out: Path,
    *,
    seed: int,
    first: int,
    n_subjects: int,
    first_heart: int,
    n_hearts: int,
    spacing: tuple[float, float, float],
    heart_spacing: tuple[float, float, float] | None | bool,
    site: str,
    heart_frames: int = 10,
    variety: float = 1.0,
    motion: float = 0.0,
) -> Path:
    """Subjects ``first`` .. ``first + n_subjects - 1`` of ``seed`` (and hearts likewise) at
    ``spacing`` on ``site``, as one cohort folder at ``out`` (must not exist); ``motion`` is
    the chance that a scan moved during its acquisition."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another folder")
    if site != "A" and site not in SITES:
        raise ValueError(f"unknown site {site!r}; known: A, {', '.join(SITES)}")
    if not 0.0 <= motion <= 1.0:
        raise ValueError(f"motion is the chance that a scan moved, in [0, 1], got {motion}")
    spec = sim.CohortSpec(
        n_subjects=first + n_subjects, seed=seed, shape=_shape(FOV_MM, spacing), spacing=spacing, variety=variety
    )
    spec = replace(spec, n_hearts=max(1, first_heart + n_hearts))
    subjects = [sim._draw(spec, i) for i in range(first, first + n_subjects)]
    work = out.with_name(f".{out.name}.partial")
    work.mkdir(parents=True)
    sim._write_top_level(work, spec, subjects)
    description = work / "dataset_description.json"
    import json

    meta = json.loads(description.read_text(encoding="utf-8"))
    meta["Name"] += " - test split"
    meta["SimulationParameters"]["test_split"] = {
        "subject_indices": list(range(first, first + n_subjects)),
        "subjects": [f"sub-{s.subject_id}" for s in subjects],
        "heart_indices": list(range(first_heart, first_heart + n_hearts)) if heart_spacing is not False else [],
    }
    meta["SimulationParameters"]["site"] = site
    meta["SimulationParameters"]["variety"] = variety
    if motion:
        meta["SimulationParameters"]["motion"] = {
            "chance_per_scan": motion,
            "movements": MOTION_MOVES,
            "max_degrees": MOTION_DEGREES,
            "max_mm": MOTION_MM,
        }
    meta["SimulationParameters"]["deformation_from_template"] = {
        f"sub-{s.subject_id}": {k: round(v, 3) for k, v in brain.deformation_stats(s).items()} for s in subjects
    }
    write_json(description, meta)
    with _site(site):
        for subj in subjects:
            _write_subject(work, spec, subj, site, motion)
    if heart_spacing is not False:
        from LongitudinalDiffusionLib.demo.heart import simulate_heart, write_heart

        kwargs = {}
        if heart_spacing is not None:
            kwargs = {"spacing": tuple(heart_spacing), "shape": _shape(HEART_FOV_MM, heart_spacing)}
        for k in range(first_heart, first_heart + n_hearts):
            cine = simulate_heart(np.random.default_rng([seed, 1_000_000 + k]), n_frames=heart_frames, **kwargs)
            write_heart(cine, work / "cardiac", f"heart{k + 1:02d}")
    work.rename(out)
    return out


def _write_subject(root: Path, spec: sim.CohortSpec, subj: brain.BrainSubject, site: str, motion: float) -> None:
    """As the simulator writes a subject (same per-session seeds), plus a site's extra noise
    and, with chance ``motion`` per scan, movement during the scan."""
    sessions = []
    for k, age in enumerate(subj.ages):
        ses = f"{k + 1:02d}"
        rng = np.random.default_rng([spec.seed, int(subj.subject_id), k, 7])
        session = brain.simulate_session(subj, age, rng, shape=spec.shape, spacing=spec.spacing)
        if site != "A":
            divisor = SITES[site][1]
            noise = np.random.default_rng([spec.seed, int(subj.subject_id), k, 99])
            for name, image in list(session.images.items()):
                snr = session.meta["scans"][name]["SimulatedSNR"]
                # Rician magnitude with per-channel sigma s has total sigma s; adding complex noise of
                # sigma s * sqrt(d^2 - 1) makes it s * d, i.e. the SNR divided by d.
                extra = (1000.0 / snr) * np.sqrt(divisor**2 - 1.0)
                noisy = physics.rician(noise, image.array.astype(np.float32), extra)
                session.images[name] = Image(noisy.astype(np.float32), image.affine)
                session.meta["scans"][name]["SimulatedSNR"] = round(snr / divisor, 2)
        if motion:
            moves = np.random.default_rng([spec.seed, int(subj.subject_id), k, 131])
            for name in sorted(session.images):
                if moves.random() < motion:
                    moved, record = move_during_scan(session.images[name], moves)
                    session.images[name] = moved
                    session.meta["scans"][name]["SimulatedMotion"] = record
        sim._write_session(root, subj, ses, session)
        sessions.append({"session_id": f"ses-{ses}", "age": age})
    sub_dir = root / f"sub-{subj.subject_id}"
    sim._write_tsv(sub_dir / f"sub-{subj.subject_id}_sessions.tsv", sessions, ["session_id", "age"])
    write_json(
        sub_dir / f"sub-{subj.subject_id}_sessions.json",
        {"age": {"Description": "age at scan (postnatal, simulated)", "Units": "months"}},
    )


def move_during_scan(image: Image, rng: np.random.Generator, axis: int = 1) -> tuple[Image, dict]:
    """``image`` as if the head moved rigidly during the acquisition.

    The k-space model of motion artefacts (Shaw et al., MIDL 2019): phase-encoding lines
    along ``axis`` are acquired in order; at :data:`MOTION_MOVES` random moments (drawn in
    20-80 % of the scan) the head takes a new pose (rotations up to :data:`MOTION_DEGREES`
    about each axis through the volume's centre, translations up to :data:`MOTION_MM`), and
    the lines acquired from then on are those of the moved head. The image is the magnitude
    of the inverse transform. (TorchIO's ``Motion`` implements the same model but returns the
    real part of that inverse, not the magnitude a scanner shows, and would add ten packages
    to the test environment; this is the model in numpy and scipy.)

    Returns:
        The moved image (same grid, float32, non-negative) and a record of the movements
        (for the scan's sidecar).
    """
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    array = np.asarray(image.array, dtype=np.float64)
    spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
    times = np.sort(rng.uniform(0.2, 0.8, MOTION_MOVES))
    degrees = rng.uniform(-MOTION_DEGREES, MOTION_DEGREES, (MOTION_MOVES, 3))
    shifts_mm = rng.uniform(-MOTION_MM, MOTION_MM, (MOTION_MOVES, 3))
    centre = (np.asarray(array.shape, dtype=np.float64) - 1.0) / 2.0
    spectrum = np.fft.fftshift(np.fft.fftn(array))
    n_lines = array.shape[axis]
    starts = [int(round(t * n_lines)) for t in times] + [n_lines]
    for move in range(MOTION_MOVES):
        # the pose in voxel units: rotate the physical (mm) frame, then shift
        rot = Rotation.from_euler("xyz", degrees[move], degrees=True).as_matrix()
        matrix = np.diag(1.0 / spacing) @ rot.T @ np.diag(spacing)  # output voxel -> input voxel
        offset = centre - matrix @ centre - shifts_mm[move] / spacing
        moved = ndimage.affine_transform(array, matrix, offset=offset, order=1, mode="constant", cval=0.0)
        lines = [slice(None)] * array.ndim
        lines[axis] = slice(starts[move], starts[move + 1])
        spectrum[tuple(lines)] = np.fft.fftshift(np.fft.fftn(moved))[tuple(lines)]
    out = np.abs(np.fft.ifftn(np.fft.ifftshift(spectrum))).astype(np.float32)
    record = {
        "PhaseEncodingAxis": axis,
        "MomentsFractionOfScan": [round(float(t), 3) for t in times],
        "RotationDegrees": np.round(degrees, 2).tolist(),
        "TranslationMm": np.round(shifts_mm, 2).tolist(),
    }
    return Image(out, np.asarray(image.affine).copy()), record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.test_sets", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to create the test cohorts in")
    parser.add_argument("--seed", type=int, default=11, help="simulator seed of the demo cohort (default 11)")
    parser.add_argument("--first", type=int, default=16, help="first new subject index (default 16: sub-017)")
    parser.add_argument("--subjects", type=int, default=6, help="new subjects (default 6)")
    parser.add_argument("--first-heart", type=int, default=6, help="first new heart index (default 6: sub-heart07)")
    parser.add_argument("--hearts", type=int, default=3, help="new hearts (default 3)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="which sets (default all)")
    args = parser.parse_args(argv)
    for name in args.sets:
        spacing, heart_spacing, site, variety, motion = SETS[name]
        path = write_test_set(
            Path(args.out) / name,
            seed=args.seed,
            first=args.first,
            n_subjects=args.subjects,
            first_heart=args.first_heart,
            n_hearts=args.hearts,
            spacing=spacing,
            heart_spacing=heart_spacing,
            site=site,
            variety=variety,
            motion=motion,
        )
        print(f"{name}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
