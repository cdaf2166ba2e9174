"""``longdiff``: the LongitudinalDiffusion command line.

    longdiff demo OUT                  simulated cohort + pictures (the main job)
    longdiff demo-data OUT             simulated longitudinal cohort as a BIDS dataset
    longdiff info SUBJECT              a subject's timepoints (BIDS subject or manifest)
    longdiff models                    installed diffusion models
    longdiff complete-ages SUBJECT --ages 6 9 --model NAME --out DIR
    longdiff synthesize-modality SUBJECT --session ses-02 --modality FLAIR --model NAME --out DIR
    longdiff interpolate SOURCE TARGET --frames 8 --model NAME --out DIR

Every command explains itself with ``--help``. Errors in the input are reported as one line
naming the file and the problem, with exit status 2; nothing half-made is left on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import LongitudinalDiffusionError

log = logging.getLogger("longdiff")

EPILOG = """examples:
  longdiff demo demo-output                       # cohort + montage in ./demo-output
  longdiff demo-data cohort --subjects 20 --seed 1
  longdiff info cohort/sub-001 --montage sub-001.png
  longdiff info manifest.tsv
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _cohort_arguments(p: argparse.ArgumentParser, subjects: int) -> None:
    p.add_argument("--subjects", type=_positive_int, default=subjects, help=f"number of subjects (default {subjects})")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort (default 0)")
    p.add_argument(
        "--spacing",
        type=_positive_float,
        default=2.0,
        metavar="MM",
        help="isotropic voxel size in mm (default 2; 1 for 160x192x160)",
    )
    p.add_argument(
        "--fov",
        type=_positive_float,
        nargs=3,
        default=(160.0, 192.0, 160.0),
        metavar=("X", "Y", "Z"),
        help="field of view in mm, left-right, posterior-anterior, inferior-superior (default 160 192 160)",
    )
    p.add_argument(
        "--lesions",
        type=_fraction,
        default=0.3,
        metavar="P",
        help="fraction of subjects with a focal lesion (default 0.3)",
    )
    p.add_argument(
        "--missing-visits",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="probability that an intermediate visit is missed, as in real studies (default 0: every visit present)",
    )
    p.add_argument("--no-heart", action="store_true", help="skip the beating-heart phantom")
    jobs = min(4, os.cpu_count() or 1)
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=jobs,
        metavar="N",
        help=f"subjects simulated in parallel (default {jobs} here); the data do not depend on it",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longdiff",
        description="Fill the gaps in a subject's longitudinal MRI history with diffusion models: "
        "missing ages, a missing modality, or the frames between two scans.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # -v / -q work before or after the command; SUPPRESS keeps a subcommand from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, False), (common, argparse.SUPPRESS)):
        target.add_argument("-v", "--verbose", action="store_true", default=default, help="log more detail")
        target.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add(
        "demo",
        help="run the demo on the embedded simulated data (the main job)",
        description="Simulate a small longitudinal cohort, then draw one subject across ages and modalities "
        "(and the heart phantom's frames). Writes OUT/cohort (BIDS) and OUT/figures/*.png.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder")
    _cohort_arguments(p, subjects=4)
    p.set_defaults(func=cmd_demo)

    p = add(
        "demo-data",
        help="simulate a longitudinal cohort (BIDS) for demos, training and tests",
        description="Simulate infant brains from birth to 24 months (T1w, T2w, FLAIR, contrast-enhanced T1w, "
        "ground-truth labels; some subjects with a focal lesion) and a beating-heart phantom. "
        "Deterministic by seed. Everything it writes is marked as simulated.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="dataset folder to create")
    _cohort_arguments(p, subjects=8)
    p.add_argument("--montage", type=Path, metavar="PNG", help="also draw the first subject to this PNG")
    p.set_defaults(func=cmd_demo_data)

    p = add(
        "info",
        help="list a subject's timepoints",
        description="List a subject's timepoints (age, modality, shape, spacing). SUBJECT is a BIDS subject "
        "folder (sub-XX), a BIDS dataset (with --subject), or a manifest .tsv (columns file, age, modality).",
    )
    _subject_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--montage", type=Path, metavar="PNG", help="draw the subject across ages and modalities")
    p.set_defaults(func=cmd_info)

    p = add("models", help="list installed diffusion models", description="List model cards found.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = add(
        "complete-ages",
        help="generate a subject's missing timepoints",
        description="Generate the subject's images at ages it was not scanned.",
    )
    _subject_arguments(p)
    p.add_argument("--ages", type=float, nargs="+", required=True, metavar="MONTHS", help="ages to generate (months)")
    _task_arguments(p)
    p.set_defaults(func=cmd_complete_ages)

    p = add(
        "synthesize-modality",
        help="generate a missing modality of one session",
        description="Generate one modality of a session from the modalities it has.",
    )
    _subject_arguments(p)
    p.add_argument("--session", required=True, help="session (e.g. ses-02) or age in months")
    p.add_argument("--modality", required=True, help="modality to generate: T1w, T2w, FLAIR or T1ce")
    _task_arguments(p)
    p.set_defaults(func=cmd_synthesize_modality)

    p = add(
        "interpolate",
        help="generate the frames between two scans",
        description="Generate N frames between SOURCE and TARGET (e.g. end-diastole and end-systole), "
        "with the deformation of each frame.",
    )
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--frames", type=_positive_int, default=8, help="number of frames (default 8)")
    _task_arguments(p)
    p.set_defaults(func=cmd_interpolate)
    return parser


def _subject_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("subject", type=Path, metavar="SUBJECT", help="BIDS subject or dataset folder, or manifest .tsv")
    p.add_argument("--subject", dest="subject_id", metavar="ID", help="which subject, in a dataset or manifest")


def _task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (see `longdiff models`)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)


# ------------------------------------------------------------------------------ helpers


def _progress_bar(args: argparse.Namespace, desc: str):
    """A tqdm-backed ``progress(what, done, total)`` callback, and a closer."""
    if args.quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="session", dynamic_ncols=True, file=sys.stderr)

    def progress(what: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(what, refresh=False)
        bar.update(done - bar.n)

    return progress, bar.close


def _cohort_spec(args: argparse.Namespace):
    from .demo.cohort import CohortSpec

    spacing = float(args.spacing)
    shape = tuple(max(8, int(round(f / spacing))) for f in args.fov)
    return CohortSpec(
        n_subjects=args.subjects,
        seed=args.seed,
        shape=shape,
        spacing=(spacing,) * 3,
        lesion_probability=args.lesions,
        missing_visit_probability=args.missing_visits,
        heart=not args.no_heart,
    )


def _write_cohort(args: argparse.Namespace, out: Path) -> Path:
    from .demo.cohort import write_cohort

    spec = _cohort_spec(args)
    progress, close = _progress_bar(args, "simulating")
    try:
        write_cohort(out, spec, overwrite=args.overwrite, progress=progress, jobs=args.jobs)
    finally:
        close()
    return out


def _subject_montage(subject, png: Path) -> Path:
    import numpy as np

    from .figures import montage_from_timepoints
    from .imaging import load_image

    labels = {}
    for tp in subject.timepoints:
        if tp.labels is not None and tp.age not in labels:
            labels[tp.age] = load_image(tp.labels, dtype=np.int16)
    simulated = _is_simulated(subject)
    return montage_from_timepoints(
        subject.timepoints, png, title=subject.subject_id, simulated=simulated, labels=labels
    )


def _is_simulated(subject) -> bool:
    root = subject.meta.get("bids_root")
    if not root:
        return False
    desc = Path(root) / "dataset_description.json"
    try:
        return bool(json.loads(desc.read_text(encoding="utf-8")).get("Simulated", False))
    except (OSError, json.JSONDecodeError):
        return False


def _print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    cells = [[str(r.get(key, "")) for key, _ in columns] for r in rows]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


def _info_rows(subject) -> list[dict]:
    base = subject.source if subject.source is not None and Path(subject.source).is_dir() else None
    rows = []
    for row in subject.table():
        file = Path(row["file"])
        if base is not None:
            try:
                file = file.relative_to(base)
            except ValueError:
                pass
        rows.append(
            {
                **row,
                "age_months": f"{row['age_months']:.2f}",
                "shape": "x".join(str(s) for s in row["shape"]),
                "spacing": "x".join(f"{s:g}" for s in row["spacing"]),
                "file": str(file),
            }
        )
    return rows


# ----------------------------------------------------------------------------- commands


def cmd_demo_data(args: argparse.Namespace) -> int:
    out = _write_cohort(args, args.out)
    print(f"wrote a simulated cohort of {args.subjects} subjects (seed {args.seed}) to {out}")
    if args.montage:
        from .subject import load_bids_subject

        png = _subject_montage(load_bids_subject(out, subject="001"), args.montage)
        print(f"wrote {png}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .subject import load_bids_subject

    cohort = _write_cohort(args, args.out / "cohort")
    figures = args.out / "figures"
    subject = load_bids_subject(cohort, subject="001")
    png = _subject_montage(subject, figures / "sub-001_montage.png")
    print(f"cohort:  {cohort} ({args.subjects} simulated subjects, seed {args.seed})")
    print(f"montage: {png}")
    if not args.no_heart:
        from .figures import cine_montage

        heart = cine_montage(cohort / "cardiac" / "sub-heart01" / "cine", figures / "heart_frames.png")
        print(f"heart:   {heart}")
    print()
    print(f"{subject.subject_id}: {subject.summary()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .subject import load_subject

    subject = load_subject(args.subject, subject=args.subject_id)
    if args.json:
        print(json.dumps(subject.to_dict(), indent=2, default=str))
    else:
        n_sessions = len({round(tp.age, 6) for tp in subject.timepoints})
        unit = subject.meta.get("age_unit_source", "")
        print(f"{subject.subject_id}: {len(subject.timepoints)} images at {n_sessions} ages ({subject.source})")
        if unit:
            print(f"ages in months (read as {subject.meta.get('age_unit', '?')}; from {unit})")
        if _is_simulated(subject):
            print("SIMULATED DATA")
        print()
        _print_table(
            _info_rows(subject),
            [
                ("session", "session"),
                ("age_months", "age (mo)"),
                ("modality", "modality"),
                ("shape", "shape"),
                ("spacing", "spacing (mm)"),
                ("file", "file"),
            ],
        )
    if args.montage:
        print(f"\nwrote {_subject_montage(subject, args.montage)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .catalog import list_models, search_paths

    models = list_models()
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), **m.card} for m in models], indent=2))
        return 0
    if not models:
        print("no models installed. Searched:")
        for p in search_paths():
            print(f"  {p}")
        return 0
    _print_table(
        [
            {"name": m.name, "method": m.method, "simulated": "yes" if m.simulated else "no", "path": m.path}
            for m in models
        ],
        [("name", "name"), ("method", "method"), ("simulated", "trained on simulated data"), ("path", "card")],
    )
    return 0


def cmd_complete_ages(args: argparse.Namespace) -> int:
    from .subject import load_subject, parse_age

    load_subject(args.subject, subject=args.subject_id)
    for age in args.ages:
        parse_age(age, "months", "--ages")
    return _run_task(args)


def cmd_synthesize_modality(args: argparse.Namespace) -> int:
    from .subject import load_subject, parse_modality

    subject = load_subject(args.subject, subject=args.subject_id)
    parse_modality(args.modality, "--modality")
    _session_age(subject, args.session)
    return _run_task(args)


def _session_age(subject, session: str) -> float:
    """The age of ``session``, given as a session label (ses-02) or an age in months."""
    for tp in subject.timepoints:
        if tp.session == session:
            return tp.age
    try:
        age = float(session)
    except ValueError:
        age = None
    if age is not None:
        for known in subject.ages():
            if abs(known - age) < 0.05:
                return known
    ages = ", ".join(f"{a:.1f}" for a in subject.ages())
    sessions = ", ".join(subject.sessions()) or "none"
    raise LongitudinalDiffusionError(
        f"--session {session}: not a session of {subject.subject_id} (sessions: {sessions}; ages in months: {ages})"
    )


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .imaging import load_image

    source, target = load_image(args.source), load_image(args.target)
    if not source.same_geometry(target):
        log.warning("source and target geometries differ; the target will be resampled onto the source")
    return _run_task(args)


def _run_task(args: argparse.Namespace) -> int:
    """Checked input meets its model; the diffusion engine that runs it is not part of this version."""
    from .catalog import find_model

    find_model(args.model)
    raise LongitudinalDiffusionError("the diffusion engine is not installed in this version")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="longdiff: %(levelname)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LongitudinalDiffusionError as exc:
        print(f"longdiff: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `longdiff info ... | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("longdiff: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
