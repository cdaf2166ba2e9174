"""``longdiff``: the LongitudinalDiffusion command line.

    longdiff demo OUT                  simulated cohort + pictures (the main job)
    longdiff demo-data OUT             simulated longitudinal cohort as a BIDS dataset
    longdiff info SUBJECT              a subject's timepoints (BIDS subject or manifest)
    longdiff models                    installed diffusion models
    longdiff complete-ages SUBJECT --ages 6 9 --model NAME --out DIR
    longdiff complete-ages SUBJECT SUBJECT... (or --cohort BIDS_ROOT) --ages 6 --model NAME --out DIR
    longdiff synthesize-modality SUBJECT --session ses-02 --modality FLAIR --model NAME --out DIR
    longdiff interpolate SOURCE TARGET --frames 8 --model NAME --out DIR
    longdiff init-model METHOD         a model with random weights, to try a pipeline
    longdiff import-model METHOD CKPT  an upstream checkpoint into the catalog

Every command explains itself with ``--help``. Errors in the input are reported as one line
naming the file and the problem, with exit status 2; nothing half-made is left on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def _variety(text: str) -> float:
    from .demo.brain import MAX_VARIETY

    value = float(text)
    if not 1.0 <= value <= MAX_VARIETY:
        raise argparse.ArgumentTypeError(f"must lie in [1, {MAX_VARIETY:g}], got {value}")
    return value


def _cohort_arguments(
    p: argparse.ArgumentParser,
    subjects: int,
    spacing: float = 2.0,
    fov: tuple[float, float, float] = (160.0, 192.0, 160.0),
) -> None:
    p.add_argument("--subjects", type=_positive_int, default=subjects, help=f"number of subjects (default {subjects})")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort (default 0)")
    p.add_argument(
        "--spacing",
        type=_positive_float,
        default=spacing,
        metavar="MM",
        help=f"isotropic voxel size in mm (default {spacing:g}; 1 gives 160x192x160)",
    )
    p.add_argument(
        "--fov",
        type=_positive_float,
        nargs=3,
        default=fov,
        metavar=("X", "Y", "Z"),
        help="field of view in mm, left-right, posterior-anterior, inferior-superior "
        f"(default {' '.join(f'{v:g}' for v in fov)})",
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
    p.add_argument(
        "--variety",
        type=_variety,
        default=1.0,
        metavar="V",
        help="anatomical variety: 1 (default) the usual population; larger draws the same subjects further "
        "from the template (2.5: 3.5 mm RMS displacement instead of 1.25; at most 4)",
    )
    p.add_argument("--no-heart", action="store_true", help="skip the beating-heart phantom")
    p.add_argument("--hearts", type=_positive_int, default=1, metavar="N", help="number of heart phantoms (default 1)")
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

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    for group in (_demo_commands, _subject_commands, _task_commands, _model_commands):
        group(add)
    return parser


#: adds one sub-command: ``add(name, help=..., description=...)`` -> its parser
_AddCommand = Callable[..., argparse.ArgumentParser]


def _demo_commands(add: _AddCommand) -> None:
    """demo, demo-data: the simulated cohort and the demo run on it."""
    p = add(
        "demo",
        help="run the demo on the embedded simulated data (the main job)",
        description="Simulate a small longitudinal cohort, then run the three tasks on it with the bundled demo "
        "models: a hidden visit generated, a hidden contrast synthesised, the heart's frames from end-diastole "
        "to end-systole, and tissue volumes by age. Writes OUT/cohort (BIDS), OUT/results/<task>/ (NIfTI with "
        "provenance) and OUT/figures/*.png.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder")
    # The demo models work on a 5 mm grid of this field of view: simulating on it costs a
    # fraction of 2 mm and needs no resampling (any other grid works; it is resampled).
    _cohort_arguments(p, subjects=4, spacing=5.0, fov=(160.0, 200.0, 160.0))
    p.add_argument("--no-models", action="store_true", help="only simulate and draw the cohort (no generation)")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N (default auto)")
    _scene_argument(p)
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


def _subject_commands(add: _AddCommand) -> None:
    """info, models: what a subject holds and which models are installed."""
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


def _task_commands(add: _AddCommand) -> None:
    """complete-ages, synthesize-modality, interpolate: the three tasks."""
    p = add(
        "complete-ages",
        help="generate a subject's missing timepoints",
        description="Generate the subject's images at ages it was not scanned. Several subjects (SUBJECT "
        "SUBJECT ..., or --cohort) run in one call with the model loaded once: one result folder per subject in "
        "OUT (OUT/<subject id>).",
    )
    p.add_argument(
        "subject",
        type=Path,
        nargs="*",
        metavar="SUBJECT",
        help="BIDS subject or dataset folder, or manifest .tsv; several may be given",
    )
    p.add_argument("--subject", dest="subject_id", metavar="ID", help="which subject, in a dataset or manifest")
    p.add_argument(
        "--cohort",
        type=Path,
        metavar="BIDS_ROOT",
        help="every subject (sub-*) of this BIDS dataset, one result folder each in OUT",
    )
    p.add_argument("--ages", type=float, nargs="+", required=True, metavar="MONTHS", help="ages to generate (months)")
    p.add_argument(
        "--one-sided",
        action="store_true",
        help="Cas-DiffCom / time-interval: start from the nearest scan only, even between two scans "
        "(default: run from both neighbours and blend them by age)",
    )
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
    p.add_argument("--labels", type=Path, help="the source's label map, carried along the deformation")
    _task_arguments(p)
    p.set_defaults(func=cmd_interpolate)


def _model_commands(add: _AddCommand) -> None:
    """evaluate (moved), init-model, import-model: making and checking models."""
    from .models import METHODS, SCALES

    p = add(
        "evaluate",
        help="moved: python -m training.evaluate (in a source checkout)",
        description="The evaluation belongs to the training code, which this library does not import: "
        "run `python -m training.evaluate` from a source checkout of LongitudinalDiffusion.",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_evaluate)

    p = add(
        "init-model",
        help="create a model with random weights (to try a pipeline)",
        description="Write a catalog entry (card + safetensors) of METHOD with random weights. Results made with "
        "it say they come from an untrained model.",
    )
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("--scale", choices=SCALES, default="tiny", help="network and grid size (default tiny)")
    p.add_argument("--name", help="model name (default METHOD-SCALE-untrained)")
    p.add_argument("--out", type=Path, default=Path("~/.longdiff/models").expanduser(), help="catalog folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)

    p = add(
        "import-model",
        help="convert an upstream research checkpoint (cWDM, DDM) into a catalog model",
        description="Read CHECKPOINT with torch.load(weights_only=True) (no pickled code runs), check every tensor "
        "against the method's architecture, and write safetensors + card with its sha256.",
    )
    p.add_argument("method", choices=["cwdm", "ddm"])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--out", type=Path, default=Path("~/.longdiff/models").expanduser(), help="catalog folder")
    p.set_defaults(func=cmd_import_model)


def _subject_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("subject", type=Path, metavar="SUBJECT", help="BIDS subject or dataset folder, or manifest .tsv")
    p.add_argument("--subject", dest="subject_id", metavar="ID", help="which subject, in a dataset or manifest")


def _task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (see `longdiff models`) or path of a model card .json")
    p.add_argument("--out", type=Path, required=True, help="output folder (written whole at the end, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    from .diffusion.samplers import SAMPLERS  # the names only: no torch

    g = p.add_argument_group("sampling (defaults from the model card)")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same result (default 0)")
    g.add_argument("--sampler", choices=SAMPLERS, help="sampler")
    g.add_argument("--steps", type=_positive_int, help="network evaluations per sample")
    g.add_argument("--eta", type=_fraction, help="DDIM stochasticity (0 deterministic, 1 DDPM-like)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (SADM)")
    g.add_argument(
        "--samples", type=_positive_int, default=1, metavar="K", help="draw K samples: mean + standard-deviation map"
    )
    g.add_argument("--capture", type=int, default=0, metavar="N", help="keep N denoising intermediates as frames")
    g.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--preprocess",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bias field, brain extraction and alignment to the model's atlas as its card says, results mapped "
        "back onto each scan's grid, transforms saved in OUT/transforms (default: when the card asks for it "
        "and a scan is not already in the model's space)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads of the network (default: $LONGDIFF_THREADS or $OMP_NUM_THREADS if set, else the cores "
        "other processes leave free; docs/performance.md)",
    )
    r = p.add_argument_group("remote worker (the inputs are uploaded to it: giving --remote is your consent)")
    r.add_argument("--remote", metavar="URL", help="run on a longdiff-worker, e.g. https://gpu.example.org:8765")
    r.add_argument("--token", help="the worker's access token (default: $LONGDIFF_WORKER_TOKEN)")
    r.add_argument("--token-file", type=Path, help="file holding the worker's access token")
    r.add_argument("--tls-ca", type=Path, metavar="PEM", help="certificate (bundle) to trust for the worker's TLS")
    _scene_argument(p)


def _scene_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scene",
        type=Path,
        metavar="MRB",
        help="also write a 3D Slicer scene (.mrb): volumes, frame sequences with their browser, segmentations "
        "and the tissue volume plot (needs slicer-core: pip install slicer-core)",
    )


#: where --scene went (the library does not import the Slicer module that writes scenes)
SCENE_MOVED = (
    "--scene is written by the Slicer module's copy of this command, which the library does not import: "
    "run `python LongitudinalDiffusion/longdiff_scene.py` with the same arguments (it needs slicer-core: "
    "pip install slicer-core)"
)


def _write_scene(args: argparse.Namespace, results: list, subjects: Sequence[Any] = ()) -> Path:
    """Hand the results to the scene exporter the caller passed to :func:`main` (the Slicer
    module's ``longdiff_scene.py`` passes its ``exportScene``; the library never imports slicer)."""
    return args.scene_exporter(args.scene, results, subjects)


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
    nx, ny, nz = (max(8, int(round(f / spacing))) for f in args.fov)  # --fov takes three numbers
    return CohortSpec(
        n_subjects=args.subjects,
        seed=args.seed,
        shape=(nx, ny, nz),
        spacing=(spacing,) * 3,
        lesion_probability=args.lesions,
        missing_visit_probability=args.missing_visits,
        variety=args.variety,
        heart=not args.no_heart,
        n_hearts=args.hearts,
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
    except (OSError, json.JSONDecodeError) as exc:  # no readable description: not marked simulated
        log.debug("%s: not read (%s); the data is not taken as simulated", desc, exc)
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
                "session": row.get("session") or "-",  # manifests without a session column
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
    """OUT is checked before anything runs (empty, or an earlier demo output with
    --overwrite) and gets the tool's marker listing what the demo wrote, even when stopped."""
    from . import outputs

    outputs.check_output(args.out, overwrite=args.overwrite, what="demo output folder")
    if args.scene is not None:
        if args.scene.suffix.lower() != ".mrb":
            raise LongitudinalDiffusionError(f"{args.scene}: a Slicer scene bundle's name must end in .mrb")
        outputs.check_file_target(args.scene, overwrite=args.overwrite, what="scene file")
    try:
        return _run_demo(args)
    finally:
        if args.out.is_dir():
            outputs.write_marker(args.out, "demo")


def _run_demo(args: argparse.Namespace) -> int:
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
    if args.no_models:
        return 0
    from .demo.showcase import run_showcase

    progress, close = _stage_bars(args)
    try:
        show = run_showcase(cohort, args.out, device=args.device, seed=args.seed, progress=progress)
    finally:
        close()
    print()
    for line in show.lines:
        print(line)
    for kind, paths in (("results", show.results), ("figure", show.figures)):
        for name, path in paths.items():
            print(f"  {kind + ' ' + name + ':':26s} {path}")
    if args.scene is not None:
        print(f"  {'scene:':18s} {_write_scene(args, show.scene_results, show.scene_subjects)}")
    made = [r for r, _ in show.scene_results]
    models = ", ".join(r.provenance.model for r in made if r.provenance is not None)
    n = sum(len(r.images) for r in made)
    sim = all(r.provenance.trained_on_simulated_data for r in made if r.provenance is not None)
    how = "trained on simulated data" if sim else "see their cards for what they learnt from"
    print(f"{n} SYNTHETIC images written to {args.out / 'results'} (models {models}, {how}): not scans")
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
    from .catalog import scan_models, search_paths

    models, broken = scan_models()
    if args.json:
        rows = [{"name": m.name, "path": str(m.path), "generates": m.what, **m.card} for m in models]
        rows += [{"name": b.name, "path": str(b.path), "broken": b.reason} for b in broken]
        print(json.dumps(rows, indent=2))
        return 0
    if not models and not broken:
        print("no models installed. Searched:")
        for p in search_paths():
            print(f"  {p}")
        return 0
    _print_table(
        [
            {
                "name": m.name,
                "method": m.method,
                "what": m.what,
                "simulated": "UNTRAINED" if not m.trained else "yes" if m.simulated else "no",
                "path": m.path,
            }
            for m in models
        ]
        + [{"name": b.name, "method": "BROKEN", "what": b.reason, "path": b.path} for b in broken],
        [
            ("name", "name"),
            ("method", "method"),
            ("what", "generates"),
            ("simulated", "trained on simulated data"),
            ("path", "card"),
        ],
    )
    return 0


def cmd_complete_ages(args: argparse.Namespace) -> int:
    from .subject import load_subject

    if args.cohort is not None or len(args.subject) > 1:
        return _complete_ages_many(args)
    if not args.subject:
        raise LongitudinalDiffusionError("complete-ages needs a SUBJECT (or several, or --cohort BIDS_ROOT)")
    args.subject = args.subject[0]
    subject = load_subject(args.subject, subject=args.subject_id)
    _check_out(args, _subject_inputs(subject))
    from .tasks import complete_ages  # after the output checks: they come before any model

    if args.remote:
        from .jobs import JobSpec

        spec = JobSpec.from_subject(subject, "complete-ages", args.model, {"ages": args.ages}, _job_options(args))
        return _report(args, _run_remote(args, spec))
    result = _with_progress(args, lambda opts: complete_ages(subject, args.ages, args.model, options=opts))
    return _report(args, result, subject)


def _batch_subjects(args: argparse.Namespace) -> list:
    """The subjects of a many-subject complete-ages: every SUBJECT, then every sub-* of
    --cohort; each read (and so checked) before any model loads. Their ids name the result
    folders, so they must differ."""
    from .subject import load_bids_subject, load_subject

    subjects = [load_subject(path, subject=args.subject_id) for path in args.subject]
    if args.cohort is not None:
        if not args.cohort.is_dir():
            raise LongitudinalDiffusionError(f"{args.cohort}: --cohort must be a BIDS dataset folder")
        labels = sorted(p.name for p in args.cohort.glob("sub-*") if p.is_dir())
        if not labels:
            raise LongitudinalDiffusionError(f"{args.cohort}: no sub-* folders (is it a BIDS dataset?)")
        subjects += [load_bids_subject(args.cohort, subject=label) for label in labels]
    seen: dict[str, object] = {}
    for s in subjects:
        if s.subject_id in seen:
            raise LongitudinalDiffusionError(
                f"subject id '{s.subject_id}' is given twice ({seen[s.subject_id]} and {s.source}); "
                "each subject's results go to OUT/<subject id>"
            )
        seen[s.subject_id] = s.source
    return subjects


def _complete_ages_many(args: argparse.Namespace) -> int:
    """complete-ages for several subjects in one process: the model is loaded once and every
    subject's result is written whole to OUT/<subject id>; a subject that fails is reported
    and the others go on (exit status 2 if any failed)."""
    from . import outputs

    if args.remote:
        raise LongitudinalDiffusionError("--remote takes one SUBJECT per call")
    subjects = _batch_subjects(args)
    inputs = [p for s in subjects for p in _subject_inputs(s)]
    _check_out(args, inputs)
    from .catalog import load_model
    from .diffusion import resolve_device
    from .tasks import complete_ages

    loaded = load_model(args.model, device=resolve_device(args.device))
    done, failed = [], []
    try:
        for i, subject in enumerate(subjects, 1):
            folder = args.out / subject.subject_id
            if not args.quiet:
                print(f"[{i}/{len(subjects)}] {subject.subject_id}", flush=True)
            try:
                result = _with_progress(args, lambda opts, s=subject: complete_ages(s, args.ages, loaded, options=opts))
                result.save(folder, overwrite=args.overwrite)
            except LongitudinalDiffusionError as exc:
                print(f"longdiff: error: {subject.subject_id}: {exc}", file=sys.stderr)
                failed.append(subject.subject_id)
                continue
            done.append((result, subject))
            print(f"  {folder / 'result.json'} ({result.timings.get('total_s', 0):.2f} s)")
    finally:
        if args.out.is_dir():
            outputs.write_marker(args.out, "results", subjects=[s.subject_id for _, s in done])
    if args.scene is not None and done:
        print(f"  {_write_scene(args, done, [s for _, s in done])}")
    if done:
        line = _synthetic_line(done[0][0], args.out)  # the same model made them all
        print(f"{len(done)} subject(s):", line.replace(str(args.out), f"{args.out}/<subject id>"))
    if failed:
        print(f"longdiff: {len(failed)} of {len(subjects)} subject(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def cmd_synthesize_modality(args: argparse.Namespace) -> int:
    from .subject import load_subject

    subject = load_subject(args.subject, subject=args.subject_id)
    _check_out(args, _subject_inputs(subject))
    from .tasks import synthesize_modality

    if args.remote:
        from .jobs import JobSpec

        params = {"target": args.modality, "session": args.session}
        spec = JobSpec.from_subject(subject, "synthesize-modality", args.model, params, _job_options(args))
        return _report(args, _run_remote(args, spec))
    result = _with_progress(
        args, lambda opts: synthesize_modality(subject, args.session, args.modality, args.model, options=opts)
    )
    return _report(args, result, subject)


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .imaging import load_image

    source, target = load_image(args.source), load_image(args.target)
    if not source.same_geometry(target):
        log.warning("source and target geometries differ; the target will be resampled onto the source")
    _check_out(args, [args.source, args.target, args.labels])
    from .tasks import interpolate_frames

    if args.remote:
        from .jobs import JobSpec

        spec = JobSpec.for_interpolation(
            args.source, args.target, args.frames, args.model, labels=args.labels, options=_job_options(args)
        )
        return _report(args, _run_remote(args, spec))
    result = _with_progress(
        args,
        lambda opts: interpolate_frames(
            args.source, args.target, args.frames, args.model, source_labels=args.labels, options=opts
        ),
    )
    return _report(args, result)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Say where the evaluation went: it belongs to the training code, which the library
    does not import (layers point down only: Testing/test_layers.py)."""
    raise LongitudinalDiffusionError(
        "longdiff evaluate has moved: the evaluation belongs to the training code; run "
        "`python -m training.evaluate " + " ".join(args.rest) + "` from a source checkout of LongitudinalDiffusion"
    )


def cmd_init_model(args: argparse.Namespace) -> int:
    from .catalog import create_untrained

    path = create_untrained(args.method, args.out, scale=args.scale, name=args.name, seed=args.seed)
    print(f"wrote {path} (random weights, {args.scale} scale: for trying the pipeline, not for use)")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from .catalog import import_checkpoint

    path = import_checkpoint(args.method, args.checkpoint, args.out, name=args.name)
    print(f"wrote {path}")
    return 0


def _subject_inputs(subject) -> list:
    """Every file a subject was read from: its manifest or folder, its images and labels."""
    paths = [subject.source]
    for tp in subject.timepoints:
        paths += [tp.source, tp.labels]
    return paths


def _check_out(args: argparse.Namespace, inputs: Sequence = ()) -> None:
    """The output rule (docs/architecture.md), before any model is loaded: OUT is no file,
    holds no input, is empty or an earlier result of longdiff (--overwrite), and writable."""
    from . import outputs

    scene = getattr(args, "scene", None)
    if scene is not None:
        if getattr(args, "scene_exporter", None) is None:
            raise LongitudinalDiffusionError(SCENE_MOVED)
        if scene.suffix.lower() != ".mrb":
            raise LongitudinalDiffusionError(f"{scene}: a Slicer scene bundle's name must end in .mrb")
        target = outputs.check_file_target(scene, overwrite=args.overwrite, what="scene file")
        if outputs.check_output(args.out, inputs=inputs, overwrite=args.overwrite) in target.parents:
            raise LongitudinalDiffusionError(f"{scene}: the scene must lie outside OUT, which is written whole")
        return
    outputs.check_output(args.out, inputs=inputs, overwrite=args.overwrite)


def _stage_bars(args: argparse.Namespace):
    """A progress callback drawing one tqdm bar per stage (stage, step/total, ETA) on stderr,
    and a function that closes the open bar."""
    bars: dict[str, Any] = {}  # tqdm bars (tqdm has no type information)

    def progress(event) -> None:
        if args.quiet or event.message == "done" or event.stage == "warning":
            return  # warnings reach the console through logging (domain checks)
        from tqdm import tqdm

        bar = bars.get(event.stage)
        if bar is None:
            close()
            bar = bars[event.stage] = tqdm(
                total=event.total, desc=event.stage, unit="step", dynamic_ncols=True, file=sys.stderr
            )
        bar.update(event.step - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()

    return progress, close


def _with_progress(args: argparse.Namespace, run):
    """Run a task with the sampling options of the command line and progress bars."""
    from .tasks import RunOptions

    progress, close = _stage_bars(args)
    opts = RunOptions(
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        guidance=args.guidance,
        seed=args.seed,
        capture=args.capture,
        n_samples=args.samples,
        two_sided=not getattr(args, "one_sided", False),
        preprocess=getattr(args, "preprocess", None),
        device=args.device,
        progress=progress,
        threads=getattr(args, "threads", None),
    )
    try:
        return run(opts)
    finally:
        close()


def _job_options(args: argparse.Namespace) -> dict:
    """The sampling options of the command line as a job spec's options (the worker picks the device)."""
    opts = {
        "sampler": args.sampler,
        "steps": args.steps,
        "eta": args.eta,
        "guidance": args.guidance,
        "seed": args.seed,
        "capture": args.capture,
        "n_samples": args.samples,
        "two_sided": not getattr(args, "one_sided", False),
        "preprocess": getattr(args, "preprocess", None),
        "threads": getattr(args, "threads", None),
    }
    return {k: v for k, v in opts.items() if v is not None}


def _run_remote(args: argparse.Namespace, spec):
    """Run a job on the worker at ``--remote`` with progress bars; Ctrl-C cancels it there."""
    import time

    from .backends.remote import RemoteBackend

    token = args.token
    if not token and args.token_file:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LongitudinalDiffusionError(f"{args.token_file}: cannot read the token ({exc.strerror})") from exc
    token = token or os.environ.get("LONGDIFF_WORKER_TOKEN", "").strip()
    if not token:
        raise LongitudinalDiffusionError(
            "--remote needs the worker's token: --token, --token-file or $LONGDIFF_WORKER_TOKEN"
        )
    progress, close = _stage_bars(args)
    backend = RemoteBackend(args.remote, token, verify=str(args.tls_ca) if args.tls_ca else True)
    try:
        job = backend.submit(spec)
        log.info("job %s queued on %s", job, args.remote)
        try:
            while True:
                events = backend.poll(job)
                for e in events:
                    if e.kind == "progress":
                        progress(e)
                    elif e.kind == "log":
                        log.info("%s", e.message)
                if any(e.final for e in events):
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:
            backend.cancel(job)
            raise
        return backend.result(job)
    finally:
        close()
        backend.close()


def _report(args: argparse.Namespace, result, subject=None) -> int:
    files = result.save(args.out, overwrite=args.overwrite)
    prov = result.provenance
    trained = (prov.extra or {}).get("trained_on") if prov else None
    print(f"{result.task}: {len(result.images)} image(s), {sum(len(s.frames) for s in result.series)} frame(s) "
          f"in {result.timings.get('total_s', 0):.2f} s with model {prov.model if prov else '?'}")  # fmt: skip
    if prov is not None and trained is None:
        print("note: the model is UNTRAINED (random weights); the images show the pipeline, not a prediction")
    for f in files:
        if f.name.endswith(".nii.gz") and "frames" not in f.parts:
            print(f"  {f}")
    print(f"  {args.out / 'result.json'}")
    if args.scene is not None:
        print(f"  {_write_scene(args, [(result, subject)], [subject] if subject is not None else [])}")
    print(_synthetic_line(result, args.out))
    return 0


def _synthetic_line(result, out: Path) -> str:
    """The last line of a task: what was written is synthetic, by which model, trained on what."""
    prov = result.provenance
    if prov is None:
        return f"{len(result.images)} SYNTHETIC images written to {out}: not scans"
    trained = (prov.extra or {}).get("trained_on")
    if prov.untrained:
        how = "UNTRAINED, random weights"
    elif prov.trained_on_simulated_data:
        how = "trained on simulated data"
    else:
        how = f"trained on {trained.get('dataset') or 'real data'}" if isinstance(trained, dict) else "trained"
    return f"{len(result.images)} SYNTHETIC images written to {out} (model {prov.model}, {how}): not scans"


def main(argv: Sequence[str] | None = None, *, scene_exporter: Callable[..., Path] | None = None) -> int:
    """Run ``longdiff`` with ``argv``. ``scene_exporter(path, results, subjects)`` writes the
    ``--scene`` bundle; the Slicer module's ``longdiff_scene.py`` passes one, plain ``longdiff``
    has none and says where --scene went."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "evaluate":  # every option belongs to training.evaluate
        args = argparse.Namespace(verbose=False, quiet=False, rest=argv[command + 1 :], func=cmd_evaluate)
    else:
        args = parser.parse_args(argv)
    args.scene_exporter = scene_exporter
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
