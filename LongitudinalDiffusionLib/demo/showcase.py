"""The full demo (``longdiff demo``): one simulated subject through all three tasks with the
demo models, on the CPU, in a few minutes.

1. **Missing age**: a visit of the subject is hidden and generated from the rest (the
   time-interval model by default: of the demo missing-age models it is the one that beats
   linear interpolation, docs/evaluation); the simulator's real scan is kept to compare with.
2. **Missing modality**: one contrast of a session is hidden and synthesised from the
   others (cWDM).
3. **Frames between two scans**: the heart phantom from end-diastole to end-systole (DDM),
   with its labels carried along the deformation.
4. **Tissue volumes by age**: every real T1w scan of the cohort and the generated one are
   segmented (the tissue segmentation model) and the volumes plotted against age with
   log-linear mixed-effects fits, real-only versus real plus generated.

Everything is written under OUT: ``results/<task>/`` (NIfTI + provenance, as the task
commands write them) and ``figures/*.png``. Because the data are simulated, the truth is
known: the figures put each generated image beside the real one it stands in for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..imaging import Image
from ..progress import ProgressCallback, Stage
from ..subject import Subject, Timepoint, load_bids_subject

log = logging.getLogger(__name__)

#: the bundled demo models used for each step (names in the model catalog)
DEMO_MODELS = {
    "complete-ages": "interval-demo",
    "synthesize-modality": "cwdm-demo",
    "interpolate": "ddm-demo-2mm",
    "segment-brain": "tissue-seg-brain-demo",
}


@dataclass
class Showcase:
    """What the demo made: the results folders, the figures and one line per step."""

    results: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    #: for a Slicer scene of the demo (``longdiff demo --scene``): (result, subject) pairs and subjects
    scene_results: list[tuple[Any, Subject | None]] = field(default_factory=list)
    scene_subjects: list[Subject] = field(default_factory=list)


def _interior_visit(subject: Subject, near: float) -> float:
    """The age of the visit nearest ``near`` months that has visits before and after it."""
    ages = subject.ages()
    interior = ages[1:-1] or ages
    return min(interior, key=lambda a: abs(a - near))


def _without(subject: Subject, keep: Callable[[Timepoint], bool]) -> Subject:
    return Subject(subject.subject_id, [tp for tp in subject.timepoints if keep(tp)], subject.source, subject.meta)


def run_showcase(
    cohort: str | Path,
    out: str | Path,
    *,
    models: dict[str, Any] | None = None,
    subject_id: str = "001",
    missing_age_near: float = 9.0,
    modality_session_near: float = 12.0,
    frames: int = 8,
    device: str = "auto",
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> Showcase:
    """Run the three tasks and the trajectory plot on a simulated cohort (see the module doc).

    ``models`` maps the keys of :data:`DEMO_MODELS` to model names, card paths or loaded
    models; missing keys take the bundled demo models.
    """
    from .. import outputs

    cohort, out = Path(cohort), Path(out)
    # The output rule before any compute: each result folder is new, empty or an earlier
    # result of longdiff, and holds no input; a figure replaces only a figure longdiff wrote.
    for task in ("missing-age", "missing-modality", "frames"):
        outputs.check_output(out / "results" / task, inputs=[cohort], overwrite=True)
    figures = [out / "figures" / f"{name}.png" for name in FIGURES]
    for png in figures:
        outputs.check_replaceable(png)
    try:
        return _showcase(cohort, out, models, subject_id, missing_age_near, modality_session_near, frames, device,
                         seed, progress)  # fmt: skip
    finally:
        written = [p for p in figures if p.exists()]
        if written:
            outputs.claim(out / "figures", written, kind="figures")


#: the figures :func:`run_showcase` draws, in ``OUT/figures/<name>.png``
FIGURES = ("missing_age", "missing_modality", "frames", "tissue_volumes")


def _showcase(cohort, out, models, subject_id, missing_age_near, modality_session_near, frames, device, seed, progress):
    from ..figures import frames_montage, subject_montage
    from ..tasks import complete_ages, interpolate_frames, synthesize_modality

    chosen = {**DEMO_MODELS, **(models or {})}
    show = Showcase()
    subject = load_bids_subject(cohort, subject=subject_id)
    common = {"device": device, "seed": seed, "progress": progress}

    # 1. missing age
    age = _interior_visit(subject, missing_age_near)
    hidden = [tp for tp in subject.timepoints if abs(tp.age - age) < 0.05]
    without = _without(subject, lambda tp: tp not in hidden)
    result = complete_ages(without, [age], chosen["complete-ages"], **common)
    show.results["missing-age"] = result.save(out / "results" / "missing-age", overwrite=True)[0].parent
    show.scene_subjects.append(without)
    show.scene_results.append((result, without))
    generated_age = result.image("generated", age)
    modality = next(r.modality for r in result.images if r.kind == "generated")
    real_row = {tp.age: tp.volume() for tp in subject.timepoints if tp.modality.value == modality}
    show.figures["missing-age"] = subject_montage(
        {f"{modality} real": real_row, f"{modality} generated": {age: generated_age}},
        out / "figures" / "missing_age.png",
        title=f"{subject.subject_id}: the {age:.1f}-month visit hidden and generated ({result.provenance.model})",
        simulated=True,
        empty_text={f"{modality} generated": ""},
    )
    show.lines.append(f"missing age: {subject.subject_id} at {age:.1f} months generated from the other visits")

    # 2. missing modality
    session_age = _interior_visit(subject, modality_session_near)
    visit = [tp for tp in subject.timepoints if abs(tp.age - session_age) < 0.05]
    from ..catalog import LoadedModel, load_model

    cwdm = chosen["synthesize-modality"]
    cwdm = cwdm if isinstance(cwdm, LoadedModel) else load_model(cwdm)
    target = cwdm.config.get("target") or "FLAIR"
    truth = next(tp for tp in visit if tp.modality.value == target)
    result = synthesize_modality(
        _without(subject, lambda tp: tp is not truth), visit[0].session or session_age, target, cwdm, **common
    )
    show.results["missing-modality"] = result.save(out / "results" / "missing-modality", overwrite=True)[0].parent
    show.scene_results.append((result, None))
    rows = {tp.modality.value: {session_age: tp.volume()} for tp in visit}
    rows[f"{target} generated"] = {session_age: result.image("generated")}
    show.figures["missing-modality"] = subject_montage(
        rows,
        out / "figures" / "missing_modality.png",
        title=f"{subject.subject_id}, {session_age:.1f} months: {target} hidden and synthesised",
        simulated=True,
    )
    show.lines.append(f"missing modality: {target} at {session_age:.1f} months synthesised from the other contrasts")

    # 3. frames between two scans
    hearts = sorted((cohort / "cardiac").glob("sub-*/cine/manifest.tsv"))
    if hearts:
        cine = hearts[0].parent
        rows = [line.split("\t") for line in hearts[0].read_text(encoding="utf-8").splitlines()[1:]]
        source, target_frame, labels = cine / rows[0][0], cine / rows[-1][0], cine / rows[0][3]
        result = interpolate_frames(source, target_frame, frames, chosen["interpolate"], source_labels=labels, **common)
        show.results["frames"] = result.save(out / "results" / "frames", overwrite=True)[0].parent
        show.scene_results.append((result, None))
        series = result.series[0]
        percent = [100.0 * g for g in series.times]  # columns: % of the way from end-diastole to end-systole
        show.figures["frames"] = frames_montage(
            dict(zip(percent, series.frames)),
            dict(zip(percent, series.labels)) if series.labels else None,
            out / "figures" / "frames.png",
            title=f"{cine.parent.name}: {frames} frames from end-diastole to end-systole ({result.provenance.model})",
            unit="%",
            row="generated",
        )
        show.lines.append(f"frames: {frames} frames between end-diastole and end-systole with labels carried along")

    # 4. tissue volumes by age
    show.figures["tissue-volumes"] = _trajectories(
        cohort, {(subject.subject_id, age): generated_age}, chosen["segment-brain"], out, device, progress
    )
    show.lines.append("tissue volumes: every real T1w scan and the generated one segmented and plotted by age")
    return show


def _trajectories(
    cohort: Path,
    generated: dict[tuple[str, float], Image],
    model: Any,
    out: Path,
    device: str,
    progress: ProgressCallback | None,
) -> Path:
    """Segment the cohort's real T1w scans and the generated ones; plot volumes against age."""
    from ..catalog import LoadedModel, load_model
    from ..diffusion import resolve_device
    from ..segmentation import segment
    from ..trajectory import fit_trajectories, plot_trajectories, volume_rows

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    scans: list[tuple[str, float, Image, bool]] = []
    for sub in sorted(p.name for p in cohort.glob("sub-*") if p.is_dir()):
        for tp in load_bids_subject(cohort, subject=sub.removeprefix("sub-")).timepoints:
            if tp.modality.value == "T1w":
                scans.append((sub, tp.age, tp.volume(), False))
    scans += [(sid, age, image, True) for (sid, age), image in generated.items()]
    rows = []
    grid, run_on = loaded.card.card.get("grid"), resolve_device(device)
    classes = dict(enumerate(loaded.config["classes"]))
    stage = Stage("segment", len(scans), progress).start()
    for sid, age, image, is_generated in scans:
        labels = segment(loaded.network, image, config=loaded.config, grid=grid, device=run_on)
        rows += volume_rows(sid, age, labels, classes, generated=is_generated)
        stage.advance()
    fits = fit_trajectories(rows)
    return plot_trajectories(
        rows, fits, out / "figures" / "tissue_volumes.png", title="Tissue volumes by age", simulated=True
    )
