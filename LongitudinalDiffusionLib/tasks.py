"""What a user asks for, on real volumes: complete missing ages, synthesise a missing
modality, interpolate the frames between two scans.

Each task takes images on their own geometry, puts them on the model's grid (the card's
:class:`~.grid.ModelGrid`), runs the method, and brings every output back onto the input's
exact geometry and intensity units. It returns a :class:`~.result.Result` (its own module,
:mod:`.result`, also importable from here) and never touches a GUI or the disk;
:meth:`Result.save` writes it (atomically: a finished folder or nothing).

``n_samples=K`` draws K samples (seeds ``seed`` .. ``seed+K-1``) and returns their mean as
the result plus a voxel-wise standard-deviation map, so a user sees where a generated
image is uncertain.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import __version__
from .ages import parse_age
from .catalog import LoadedModel, load_model
from .diffusion import SamplerSettings, resolve_device
from .domain import DomainReport, check_aligned_box, check_images, check_request, fit_grid
from .errors import InputError, LongitudinalDiffusionError
from .grid import GridRecord, ModelGrid, resample_to
from .imaging import Image, load_image
from .modality import Modality, parse_modality
from .models import method_module, method_task, paper_name
from .progress import CancelToken, ProgressCallback, ProgressEvent
from .provenance import Provenance
from .result import SAME_AGE, FrameSeries, Result, ResultImage
from .timepoints import Subject, Timepoint

log = logging.getLogger(__name__)

__all__ = [  # Result and its parts live in .result; imported from here too
    "SAME_AGE",
    "TASKS",
    "FrameSeries",
    "Result",
    "ResultImage",
    "RunOptions",
    "complete_ages",
    "interpolate_frames",
    "synthesize_modality",
]

TASKS = ("complete-ages", "synthesize-modality", "interpolate")


# ----------------------------------------------------------------------------- options


@dataclass
class RunOptions:
    """How to run any task; ``None`` fields take the model card's defaults.

    ``two_sided``: where a missing age has real scans on both sides, single-source models
    (Cas-DiffCom, time-interval) run from each neighbour and the two predictions are blended
    with the linear-interpolation weights (docs/methods.md); False uses the nearest scan only,
    as the papers do.

    ``preprocess``: bring the scans into the model's space as its card's ``"preprocessing"``
    says (bias field, brain extraction, alignment to the atlas: :mod:`.preprocess`) and the
    results back onto each input's grid. None (the default) does it when the card asks for
    it and a scan is not already in the model's space (the simulated cohort is); True
    forces it, False never does it.
    """

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    guidance: float | None = None
    seed: int | None = 0
    capture: int = 0
    n_samples: int = 1
    two_sided: bool = True
    preprocess: bool | None = None
    device: str = "auto"
    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    #: CPU threads of the network forwards; None: the policy of ``diffusion.threads``
    threads: int | None = None

    def settings(self, loaded: LoadedModel, key: str = "sampler") -> SamplerSettings:
        base = SamplerSettings.from_dict(loaded.config.get(key))
        return base.merged(name=self.sampler, steps=self.steps, eta=self.eta, guidance=self.guidance).merged(
            capture=self.capture
        )


def _options(options: RunOptions | None, kwargs: dict[str, Any]) -> RunOptions:
    opts = dataclasses.replace(options or RunOptions(), **kwargs)
    if opts.n_samples < 1:
        raise LongitudinalDiffusionError(f"n_samples must be at least 1, not {opts.n_samples}")
    from .diffusion.threads import use_threads

    use_threads(opts.threads)  # on the thread that runs the task (docs/performance.md)
    return opts


def _prefixed(progress: ProgressCallback | None, prefix: str) -> ProgressCallback | None:
    if progress is None or not prefix:
        return progress
    return lambda e: progress(dataclasses.replace(e, stage=f"{prefix}{e.stage}"))


def _load(model: str | os.PathLike | LoadedModel, device: torch.device, task: str) -> LoadedModel:
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    loaded.network.to(device)
    if method_task(loaded.method) != task:
        raise LongitudinalDiffusionError(
            f"model '{loaded.card.name}' is a {paper_name(loaded.method)} model for "
            f"'{method_task(loaded.method)}', not for '{task}'"
        )
    return loaded


def _grid(loaded: LoadedModel, key: str = "grid") -> ModelGrid:
    spec = loaded.card.card.get(key)
    if not spec:
        raise InputError(loaded.card.path, f"model card has no '{key}' (the model's grid)")
    return ModelGrid.from_dict(spec)


def _image(tp: Timepoint) -> Image:
    if tp.image is not None:
        return tp.image
    if tp.source is None:
        raise InputError(None, f"{tp.describe()}: no image, and no file to read it from")
    return load_image(tp.source)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)[None, None]


def _units_only(record: GridRecord) -> GridRecord:
    """A record that maps a spread (std) back without the offset of the intensity map."""
    b0, b1 = record.value_range
    if record.lo is None or record.hi is None:  # a label map's record: it has no spread to map
        raise ValueError("a label map has no intensity units to take a spread back to")
    return dataclasses.replace(record, lo=0.0, hi=float(record.hi - record.lo), value_range=(0.0, float(b1 - b0)))


def _identity_units(record: GridRecord) -> GridRecord:
    return dataclasses.replace(record, lo=0.0, hi=1.0, value_range=(0.0, 1.0))


def _provenance(loaded: LoadedModel, task: str, settings: SamplerSettings, inputs: list[Timepoint], **extra: Any):
    card = loaded.card.card
    return Provenance(
        model=loaded.card.name,
        model_version=str(card.get("version", "")),
        method=paper_name(loaded.method),
        seed=settings.seed,
        steps=settings.steps,
        sampler=settings.name,
        inputs=Provenance.inputs_from(inputs),
        task=task,
        simulated_inputs=any("SIMULATED" in str(_image_meta(tp)) for tp in inputs),
        extra={"trained_on": card.get("trained_on"), "library": __version__, **extra},
    )


def _image_meta(tp: Timepoint) -> Any:
    return tp.image.meta if tp.image is not None else {}


def _samples(
    opts: RunOptions, run: Callable[[int | None, ProgressCallback | None], list[np.ndarray]]
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Run ``run(seed, progress)`` n_samples times; mean (and std) of each output array."""
    draws = []
    for k in range(opts.n_samples):
        seed = None if opts.seed is None else opts.seed + k
        prefix = f"sample {k + 1}/{opts.n_samples}: " if opts.n_samples > 1 else ""
        draws.append(run(seed, _prefixed(opts.progress, prefix)))
    if opts.n_samples == 1:
        return draws[0], None
    stacks = [np.stack([d[i] for d in draws]) for i in range(len(draws[0]))]
    return [s.mean(axis=0) for s in stacks], [s.std(axis=0) for s in stacks]


def _emit_done(opts: RunOptions, stage: str, t0: float) -> None:
    if opts.progress is not None:
        opts.progress(ProgressEvent(stage, 1, 1, time.perf_counter() - t0, 0.0, "done"))


# ----------------------------------------------------------------------------- complete ages


def complete_ages(
    subject: Subject,
    ages: Sequence[float],
    model: str | os.PathLike | LoadedModel,
    *,
    modality: str | Modality | None = None,
    options: RunOptions | None = None,
    **kwargs: Any,
) -> Result:
    """Generate ``subject``'s images at ``ages`` (months) it was not scanned at.

    The modality defaults to the model's (its card's first modality). Cas-DiffCom and the
    time-interval model are guided by the subject's scan nearest in age - or, between two
    scans, by both neighbours, blended by age (``RunOptions.two_sided``); SADM reads the
    whole timeline and fills the gaps in age order. Outputs land on the geometry of the
    nearest real scan.
    """
    opts = _options(options, kwargs)
    targets = sorted({parse_age(a, "months", "--ages") for a in ages})
    if not targets:
        raise LongitudinalDiffusionError("no ages to generate were given")
    device = resolve_device(opts.device)
    loaded = _load(model, device, "complete-ages")
    mod = parse_modality(modality or (loaded.card.card.get("modalities") or ["T1w"])[0], "modality")
    real = sorted((tp for tp in subject.timepoints if tp.modality == mod), key=lambda tp: tp.age)
    if not real:
        have = ", ".join(m.value for m in subject.modalities()) or "none"
        raise InputError(subject.source, f"{subject.subject_id} has no {mod.value} scan to start from (has: {have})")
    for age in targets:
        if any(abs(tp.age - age) < SAME_AGE for tp in real):
            raise InputError(subject.source, f"{subject.subject_id} already has a {mod.value} scan at {age:g} months")
    report = DomainReport(loaded.card.name)
    check_request(loaded.card.card, report, target_ages=targets, input_ages=[tp.age for tp in real])
    names = [_scan_name(tp) for tp in real]
    _checked_content(loaded, real, names, report, opts, labels=[f"{tp.age:g} months" for tp in real])
    prep, real, prep_note = _preprocessed(loaded, real, opts)
    keys = ("grid", "sr_grid") if loaded.method == "cas-diffcom" else ("grid",)
    grids = _checked_grids(loaded, [_image(tp) for tp in real], names, report, opts, keys, prep)
    t0 = time.perf_counter()
    runner = {"cas-diffcom": _complete_cascade, "interval": _complete_interval, "sadm": _complete_sadm}
    images, series, settings, extra = runner[loaded.method](
        _AgeRun(loaded, real, targets, mod, opts, device, subject.subject_id, grids)
    )
    if prep is not None:  # each output onto its nearest scan's own grid, series onto the first's
        images, series = _back_to_inputs(prep, images, series, lambda age: real.index(_nearest(real, age)))
    extra.update(target_ages=targets, n_samples=opts.n_samples, warnings=report.warnings, preprocessing=prep_note)
    prov = _provenance(loaded, "complete-ages", settings, real, **extra)
    _emit_done(opts, "complete-ages", t0)
    timings = {"total_s": time.perf_counter() - t0}
    return Result("complete-ages", images, series, prov, timings, _transforms(prep))


def _scan_name(tp: Timepoint) -> str:
    """How a message names a scan: its file name, else its modality and age."""
    if tp.source is not None:
        return Path(tp.source).name
    return f"the {tp.modality.value} scan at {tp.age:g} months"


def _checked_content(
    loaded: LoadedModel,
    timepoints: list[Timepoint],
    names: list[str],
    report: DomainReport,
    opts: RunOptions,
    *,
    labels: Sequence[str] | None = None,
    distinct: bool = False,
) -> None:
    """The domain checks of the scans as given (:mod:`.domain`, ``content``), before
    preprocessing spends time on them: a refusal stops here, with every warning so far."""
    images = [_image(tp) for tp in timepoints]
    check_images(loaded.card.card, images, report, names=names, labels=labels, distinct=distinct, space=False)
    if report.refusals:
        report.announce(opts.progress)
        report.raise_if_refused()


def _checked_grids(
    loaded: LoadedModel,
    images: list[Image],
    names: list[str],
    report: DomainReport,
    opts: RunOptions,
    keys: Sequence[str] = ("grid",),
    prep: Any = None,
) -> dict[str, ModelGrid]:
    """The domain checks of the scans the model will read (:mod:`.domain`, ``space``: after
    preprocessing, when it ran), refusing before any network runs; the warnings announced;
    the card's grids fitted to the scans (re-centred where that keeps the head inside the
    model's box)."""
    card = loaded.card.card
    check_images(card, images, report, names=names, content=False)
    if prep is not None and prep.spec.align != "none":
        ones = [Image(np.ones(s.image.shape[:3], np.float32), s.image.affine) for s in prep.scans]
        supports = [prep.back_to_input(one, i).array > 0.5 for i, one in enumerate(ones)]
        check_aligned_box(prep.originals, supports, report, names=names, extent_mm=_grid(loaded).extent_mm)
    strict = bool(card.get("domain"))  # a card that states its domain is held to its box
    grids = {key: fit_grid(_grid(loaded, key), images, report, names, strict=strict) for key in keys}
    report.announce(opts.progress)  # the warnings too, when it refuses: every doubt at once
    report.raise_if_refused()
    return grids


def _nearest(real: list[Timepoint], age: float) -> Timepoint:
    return min(real, key=lambda tp: (abs(tp.age - age), tp.age))


def _sources(real: list[Timepoint], age: float, two_sided: bool) -> list[tuple[Timepoint, float]]:
    """The scans a single-source model starts from and their blending weights, nearest first:
    the nearest scan alone, or (``two_sided`` and scans on both sides) the two neighbours
    with the linear-interpolation weights."""
    near = _nearest(real, age)
    before = [tp for tp in real if tp.age < age]
    after = [tp for tp in real if tp.age > age]
    if not (two_sided and before and after):
        return [(near, 1.0)]
    a, b = before[-1], after[0]
    w_a = (b.age - age) / (b.age - a.age)
    pair = [(a, w_a), (b, 1.0 - w_a)]
    return pair if near is a else pair[::-1]


def _blend(runs: list[tuple[float, Callable[[], np.ndarray]]]) -> np.ndarray:
    """The weighted sum of the outputs of ``runs`` ((weight, run) pairs)."""
    total: np.ndarray | None = None
    for w, run in runs:
        out = w * run()
        total = out if total is None else total + out
    if total is None:
        raise ValueError("nothing to blend")  # the callers always pass one run or more
    return total


def _age_outputs(
    subject_id: str, mod: Modality, age: float, mean: Image, std: Image | None, kind: str = "generated"
) -> list[ResultImage]:
    stem = f"{subject_id}_age-{age:05.1f}mo_{mod.value}"
    kind = kind if std is None else "mean"
    out = [ResultImage(f"{stem}_{kind}", mean, kind, age, mod.value)]
    if std is not None:
        out.append(ResultImage(f"{stem}_std", std, "std", age, mod.value))
    return out


def _denoising_series(
    name: str, grid: ModelGrid | _SynthesisGrid, record: Any, intermediates: list
) -> FrameSeries | None:
    if not intermediates:
        return None
    frames = [grid.inverse(it.x0[0, 0].numpy(), record) for it in intermediates]
    return FrameSeries(name, frames, [float(it.t) for it in intermediates], "step")


@dataclass
class _AgeRun:
    """What a missing-age run works on: the model, the subject's real scans of the modality
    (age order), the ages to generate, the options and the model's grids (``"grid"``, and
    Cas-DiffCom's ``"sr_grid"``)."""

    loaded: LoadedModel
    real: list[Timepoint]
    targets: list[float]
    modality: Modality
    opts: RunOptions
    device: torch.device
    subject_id: str
    grids: dict[str, ModelGrid]

    def call(
        self,
        fn: Callable[..., Any],
        on_grid: np.ndarray,
        ages: list[list[float]],
        settings: SamplerSettings,
        seed: int | None,
        progress: ProgressCallback | None,
        **extra: Any,
    ) -> Any:
        """``fn(network, image, *ages, ...)``: a model's sampling function on one scan, with
        the run's network, device and cancel token, and ``settings`` at ``seed``."""
        return fn(
            self.loaded.network,
            _tensor(on_grid, self.device),
            *(torch.tensor(a, dtype=torch.float32) for a in ages),
            config=self.loaded.config,
            settings=settings.merged(seed=seed),
            device=self.device,
            progress=progress,
            cancel=self.opts.cancel,
            **extra,
        )


class _FromScan(Protocol):
    """How a single-source model makes one target from one scan: the output on the output
    grid, and the captured intermediates by stage."""

    def __call__(
        self, tp: Timepoint, on_grid: np.ndarray, age: float, seed: int | None, progress: ProgressCallback | None
    ) -> tuple[np.ndarray, dict[str, list]]: ...


def _complete_from_sources(
    run: _AgeRun, from_scan: _FromScan, out_key: str, stages: Sequence[tuple[str, str, str]], ages_key: str
) -> tuple[list[ResultImage], list[FrameSeries], dict[str, Any]]:
    """Each target from its nearest scan, or blended from the scans on both sides
    (:func:`_sources`), by a single-source model (Cas-DiffCom, the time-interval model).

    ``out_key`` names the grid the outputs come on; ``stages`` the denoising series to keep:
    (stage of the intermediates, series name with ``{age}``, grid key); ``ages_key`` the
    provenance entry listing each target's source ages.
    """
    grid, out_grid = run.grids["grid"], run.grids[out_key]
    images: list[ResultImage] = []
    series: list[FrameSeries] = []
    used = []
    for age in run.targets:
        sources = _sources(run.real, age, run.opts.two_sided)
        used.append([tp.age for tp, _ in sources])
        near = sources[0][0]
        ref = grid.forward(_image(near))
        out_ref = ref if out_key == "grid" else out_grid.forward(_image(near))
        fwds = [ref] + [grid.forward(_image(tp), reference=ref.record) for tp, _ in sources[1:]]
        captured: dict[str, list] = {}

        def sample(seed, progress, age=age, sources=sources, fwds=fwds, captured=captured):
            def one(tp: Timepoint, fwd: Any, first: bool) -> np.ndarray:
                prefixed = _prefixed(progress, _source_prefix(age, tp, len(sources)))
                out, intermediates = from_scan(tp, fwd.array, age, seed, prefixed)
                if first:
                    captured.update(intermediates)
                return out

            return [_blend([(w, partial(one, tp, fwd, i == 0)) for i, ((tp, w), fwd) in enumerate(zip(sources, fwds))])]

        mean, std = _samples(run.opts, sample)
        image = out_grid.inverse(mean[0], out_ref.record)
        spread = out_grid.inverse(std[0], _units_only(out_ref.record)) if std else None
        images += _age_outputs(run.subject_id, run.modality, age, image, spread)
        records = {"grid": ref.record, out_key: out_ref.record}
        for stage, name, key in stages:
            s = _denoising_series(name.format(age=age), run.grids[key], records[key], captured.get(stage, []))
            if s:
                series.append(s)
    series.insert(0, _timeline(run.real, images))
    return images, series, {ages_key: used, "two_sided": run.opts.two_sided}


def _complete_cascade(run: _AgeRun) -> tuple[list[ResultImage], list[FrameSeries], SamplerSettings, dict[str, Any]]:
    mod_cas = method_module("cas-diffcom")
    settings = run.opts.settings(run.loaded)
    refine_settings = run.opts.settings(run.loaded, "refine_sampler")

    def from_scan(
        tp: Timepoint, on_grid: np.ndarray, age: float, seed: int | None, progress: ProgressCallback | None
    ) -> tuple[np.ndarray, dict[str, list]]:
        refine = refine_settings.merged(seed=None if seed is None else seed + 1)
        ages = [[tp.age], [age]]  # the source's age, the target's
        out = run.call(mod_cas.complete, on_grid, ages, settings, seed, progress, refine_settings=refine)
        return out.high_res[0, 0].numpy(), out.intermediates

    stages = [("generate", "denoising-generate-{age:g}mo", "grid"), ("refine", "denoising-refine-{age:g}mo", "sr_grid")]
    images, series, extra = _complete_from_sources(run, from_scan, "sr_grid", stages, "guidance_ages")
    return images, series, settings, extra


def _source_prefix(age: float, source: Timepoint, n_sources: int) -> str:
    return f"{age:g} mo from {source.age:g} mo: " if n_sources > 1 else f"{age:g} mo: "


def _complete_interval(run: _AgeRun) -> tuple[list[ResultImage], list[FrameSeries], SamplerSettings, dict[str, Any]]:
    mod_int = method_module("interval")
    settings = run.opts.settings(run.loaded)

    def from_scan(
        tp: Timepoint, on_grid: np.ndarray, age: float, seed: int | None, progress: ProgressCallback | None
    ) -> tuple[np.ndarray, dict[str, list]]:
        out = run.call(mod_int.generate, on_grid, [[age - tp.age]], settings, seed, progress)
        return out.sample[0, 0].numpy(), {"sample": out.intermediates}

    stages = [("sample", "denoising-{age:g}mo", "grid")]
    images, series, extra = _complete_from_sources(run, from_scan, "grid", stages, "source_ages")
    return images, series, settings, extra


def _complete_sadm(run: _AgeRun) -> tuple[list[ResultImage], list[FrameSeries], SamplerSettings, dict[str, Any]]:
    """SADM reads the timeline around each missing age and generates it (paper Alg. 2, with
    context on both sides). A model holds ``max_frames`` slots, so each target sees the
    ``max_frames - 1`` timepoints nearest in age (:func:`_window`), real or generated earlier
    in this run."""
    loaded, real, targets, mod, opts = run.loaded, run.real, run.targets, run.modality, run.opts
    device, sid, grids = run.device, run.subject_id, run.grids
    mod_sadm = method_module("sadm")
    grid = grids["grid"]
    settings = opts.settings(loaded)
    ref = grid.forward(_image(real[0]))
    if targets[0] < real[0].age - SAME_AGE:
        raise LongitudinalDiffusionError(
            f"SADM generates forward in time: {targets[0]:g} months is before the first scan ({real[0].age:g} months); "
            "use Cas-DiffCom or the time-interval model for earlier ages"
        )
    capacity = int(loaded.config.get("max_frames", 12))
    # every scan on the first one's grid placement; each keeps its own record (geometry and
    # intensity units), so an output goes back onto the nearest real scan, as documented
    forwards = {
        tp.age: (ref if i == 0 else grid.forward(_image(tp), reference=ref.record)) for i, tp in enumerate(real)
    }
    on_grid = {age: torch.as_tensor(f.array) for age, f in forwards.items()}
    captured: dict[float, list] = {}

    def sample(seed, progress):
        timeline = dict(on_grid)
        generator = None
        outputs = []
        for age in targets:
            window = _window(timeline, age, capacity)
            frames = torch.zeros((1, len(window), 1, *grid.shape))
            present = torch.zeros((1, len(window)), dtype=torch.bool)
            k = window.index(age)
            for i, a in enumerate(window):
                if i != k:
                    frames[0, i, 0], present[0, i] = timeline[a], True
            if generator is None:
                generator = _generator(seed)
            out = mod_sadm.fill_sequence(
                loaded.network,
                frames,
                torch.tensor([window], dtype=torch.float32),
                present,
                config=loaded.config,
                settings=settings.merged(seed=seed),
                generator=generator,
                device=device,
                progress=_prefixed(progress, f"{age:g} mo: "),
                cancel=opts.cancel,
            )
            timeline[age] = out.frames[0, k, 0]
            captured[age] = out.intermediates.get(k, [])
            outputs.append(timeline[age].numpy())
        return outputs

    mean, std = _samples(opts, sample)
    images, series = [], []
    for i, age in enumerate(targets):
        near = forwards[_nearest(real, age).age].record
        image = grid.inverse(mean[i], near)
        spread = grid.inverse(std[i], _units_only(near)) if std else None
        images += _age_outputs(sid, mod, age, image, spread)
        s = _denoising_series(f"denoising-{age:g}mo", grid, near, captured.get(age, []))
        if s:
            series.append(s)
    series.insert(0, _timeline(real, images))
    return images, series, settings, {"max_frames": capacity}


def _window(timeline: dict[float, Any], age: float, capacity: int) -> list[float]:
    """The ages SADM sees when generating ``age``: the ``capacity - 1`` known frames nearest in
    age (always including the latest one before it, so the window starts with a known frame),
    and the target, in age order."""
    known = sorted(timeline, key=lambda a: (abs(a - age), a))
    latest_before = max(a for a in timeline if a < age)
    chosen = [latest_before] + [a for a in known if a != latest_before][: capacity - 2]
    return sorted(chosen + [age])


def _generator(seed: int | None) -> torch.Generator:
    from .diffusion import make_generator

    return make_generator(seed)[0]


def _timeline(real: list[Timepoint], images: list[ResultImage]) -> FrameSeries:
    """Real and generated scans in age order, the subject's completed history."""
    items = [(tp.age, _image(tp), False) for tp in real]
    items += [(r.age, r.image, True) for r in images if r.kind in ("generated", "mean") and r.age is not None]
    items.sort(key=lambda x: x[0])
    ref = items[0][1]
    frames = [img if img.same_geometry(ref) else resample_to(img, ref.affine, ref.shape) for _, img, _ in items]
    return FrameSeries("timeline", frames, [a for a, _, _ in items], "months", generated=[g for _, _, g in items])


# ----------------------------------------------------------------------------- missing modality


def synthesize_modality(
    subject: Subject,
    session: str | float,
    modality: str | Modality,
    model: str | os.PathLike | LoadedModel,
    *,
    options: RunOptions | None = None,
    **kwargs: Any,
) -> Result:
    """Generate ``modality`` of one session (a session label or an age in months) from the
    modalities that session has (cWDM). The output lands on the session's geometry."""
    opts = _options(options, kwargs)
    target = parse_modality(modality, "--modality")
    visit = _session_timepoints(subject, session)
    device = resolve_device(opts.device)
    loaded = _load(model, device, "synthesize-modality")
    have = {tp.modality: tp for tp in visit}
    cond_mods = _condition_modalities(loaded, subject, session, target, have)
    report = DomainReport(loaded.card.name)
    check_request(loaded.card.card, report, input_ages=[have[m].age for m in cond_mods])
    names = [_scan_name(have[m]) for m in cond_mods]
    contrasts = [m.value for m in cond_mods]
    _checked_content(loaded, [have[m] for m in cond_mods], names, report, opts, labels=contrasts, distinct=True)
    grid, prep, prep_note, have = _synthesis_grid(loaded, have, cond_mods, names, report, opts)
    first = grid.forward(_image(have[cond_mods[0]]))
    on_grid = [first] + [grid.forward(_image(have[m]), reference=first.record) for m in cond_mods[1:]]
    settings = opts.settings(loaded)
    mod_cwdm = method_module("cwdm")
    t0 = time.perf_counter()
    captured: list = []
    conditions, mask = _condition_stack(loaded.config, grid, on_grid, cond_mods, target)
    conditions = conditions.to(device)

    def run(seed: int | None, progress: ProgressCallback | None) -> list[np.ndarray]:
        out = mod_cwdm.synthesize(
            loaded.network,
            conditions,
            config=loaded.config,
            settings=settings.merged(seed=seed),
            mask=mask,
            device=device,
            progress=progress,
            cancel=opts.cancel,
        )
        captured[:] = out.intermediates
        return [out.sample[0, 0].numpy()]

    mean, std = _samples(opts, run)
    # The result takes the intensity scale of the first condition's percentile range:
    # a synthetic modality has no units of its own.
    record = first.record
    image, spread = _synthesis_back(grid, record, mean[0], None if std is None else std[0])
    images = _age_outputs(subject.subject_id, target, visit[0].age, image, spread, kind="generated")
    series = [s for s in [_denoising_series("denoising", grid, record, captured)] if s]
    if prep is not None:  # onto the first condition's own grid
        images, series = _back_to_inputs(prep, images, series, lambda age: 0)
    prov = _provenance(
        loaded,
        "synthesize-modality",
        settings,
        [have[m] for m in cond_mods],
        target=target.value,
        session=str(session),
        warnings=report.warnings,
        preprocessing=prep_note,
    )
    _emit_done(opts, "synthesize-modality", t0)
    timings = {"total_s": time.perf_counter() - t0}
    return Result("synthesize-modality", images, series, prov, timings, _transforms(prep))


def _condition_modalities(
    loaded: LoadedModel, subject: Subject, session: str | float, target: Modality, have: dict[Modality, Timepoint]
) -> list[Modality]:
    """The modalities the model reads to make ``target``, all present in the session.

    Raises:
        InputError: the session already has ``target``, or lacks one the model needs.
        LongitudinalDiffusionError: the model does not make ``target``.
    """
    if target in have:
        raise InputError(subject.source, f"session {session} already has a {target.value} scan")
    cfg = loaded.config
    if cfg.get("any_missing"):
        needed = [parse_modality(m) for m in cfg["modalities"]]
        if target not in needed:
            raise LongitudinalDiffusionError(f"model '{loaded.card.name}' does not synthesise {target.value}")
        cond_mods = [m for m in needed if m != target]
    else:
        if parse_modality(cfg["target"]) != target:
            raise LongitudinalDiffusionError(
                f"model '{loaded.card.name}' synthesises {cfg['target']}, not {target.value}"
            )
        cond_mods = [parse_modality(m) for m in cfg["conditions"]]
    missing = [m.value for m in cond_mods if m not in have]
    if missing:
        raise InputError(
            subject.source,
            f"session {session} lacks {', '.join(missing)}, which model '{loaded.card.name}' needs as input",
        )
    return cond_mods


class _SynthesisGrid(Protocol):
    """What synthesis needs of a grid: a :class:`~.grid.ModelGrid`, or :class:`_BratsGrid`."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def forward(self, image: Image, *, reference: Any = None) -> Any: ...

    def inverse(self, array: Any, record: Any) -> Image: ...


def _synthesis_grid(
    loaded: LoadedModel,
    have: dict[Modality, Timepoint],
    cond_mods: list[Modality],
    names: list[str],
    report: DomainReport,
    opts: RunOptions,
) -> tuple[_SynthesisGrid, Any, Any, dict[Modality, Timepoint]]:
    """The grid the conditions go onto, after the preprocessing the card asks for.

    Returns:
        ``(grid, prep, prep_note, have)``: ``prep`` leads back to the inputs (None when
        nothing was done) and ``have`` holds the conditions as preprocessed.
    """
    prep, prep_note = None, None
    if loaded.config.get("preprocessing") == "brats":  # upstream BraTS weights bring their own preprocessing
        grid = _BratsGrid([_image(have[m]) for m in cond_mods])
        check_images(loaded.card.card, [_image(have[m]) for m in cond_mods], report, names=names, content=False)
        report.announce(opts.progress)
        report.raise_if_refused()
        return grid, prep, prep_note, have
    prep, conds, prep_note = _preprocessed(loaded, [have[m] for m in cond_mods], opts)
    have = {**have, **dict(zip(cond_mods, conds))}
    model_grid = _checked_grids(loaded, [_image(have[m]) for m in cond_mods], names, report, opts, prep=prep)["grid"]
    return model_grid, prep, prep_note, have


def _condition_stack(
    cfg: dict[str, Any], grid: _SynthesisGrid, on_grid: list[Any], cond_mods: list[Modality], target: Modality
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conditions as one (1, C, I, J, K) tensor, and the availability mask of an
    any-missing model (the missing contrast's channel left at zero; None otherwise)."""
    if cfg.get("any_missing"):
        order = [parse_modality(m) for m in cfg["modalities"]]
        stack = np.zeros((len(order), *grid.shape), np.float32)
        for m, sample in zip(cond_mods, on_grid):
            stack[order.index(m)] = sample.array
        mask = torch.tensor([[0.0 if m == target else 1.0 for m in order]])
        return torch.as_tensor(stack)[None], mask
    stack = np.stack([s.array for s in on_grid]).astype(np.float32)
    return torch.as_tensor(stack)[None], None


def _synthesis_back(
    grid: _SynthesisGrid, record: Any, mean: np.ndarray, std: np.ndarray | None
) -> tuple[Image, Image | None]:
    """The synthesised image and its spread (None for one sample) back on the input's grid."""
    image = grid.inverse(mean, record)
    if std is None:
        return image, None
    if isinstance(grid, _BratsGrid):
        return image, grid.inverse(std, record, spread=True)
    return image, grid.inverse(std, _units_only(record))


class _BratsGrid:
    """The upstream cWDM preprocessing in the role of a model grid: BraTS arrays as stored
    (240x240x155), percentile-normalised, cropped/padded to 224x224x160; the way back sets
    values <= 0.04 to 0 and restores the shape. Outputs stay in [0, 1] as upstream's do."""

    def __init__(self, images: list[Image]) -> None:
        from .models.cwdm import BRATS_GRID, BRATS_SHAPE

        first = images[0]
        for img in images:
            if img.shape != BRATS_SHAPE or not img.same_geometry(first):
                raise InputError(
                    img.meta.get("source"),
                    f"upstream cWDM weights need BraTS volumes of {BRATS_SHAPE} voxels sharing one geometry "
                    f"(this one is {img.shape})",
                )
        self.affine = first.affine
        self.shape: tuple[int, int, int] = BRATS_GRID  # the cropped/padded array the network sees

    def forward(self, image: Image, reference: Any = None) -> Any:
        from .models.cwdm import preprocess_brats

        array, record = preprocess_brats(np.asarray(image.array))
        return dataclasses.make_dataclass("BratsSample", ["array", "record"])(array, record)

    def inverse(self, array: Any, record: Any, *, spread: bool = False) -> Image:
        """Back onto the BraTS array; ``spread`` maps a standard-deviation map (no threshold)."""
        from .models.cwdm import postprocess_brats

        if spread:
            c = int(record["crop"])
            out = np.pad(np.asarray(array, np.float32), ((c, c), (c, c), (0, 0)))[..., : record["input_shape"][2]]
            return Image(out, self.affine)
        return Image(postprocess_brats(np.asarray(array), record), self.affine)


def _session_timepoints(subject: Subject, session: str | float) -> list[Timepoint]:
    visit = [tp for tp in subject.timepoints if tp.session is not None and tp.session == str(session)]
    if not visit:
        try:
            age = float(session)
        except (TypeError, ValueError):
            age = None
        if age is not None:
            visit = [tp for tp in subject.timepoints if abs(tp.age - age) < SAME_AGE]
    if not visit:
        sessions = ", ".join(subject.sessions()) or "none"
        ages = ", ".join(f"{a:.1f}" for a in subject.ages())
        raise LongitudinalDiffusionError(
            f"--session {session}: not a session of {subject.subject_id} (sessions: {sessions}; ages in months: {ages})"
        )
    return visit


# ----------------------------------------------------------------------------- frames between scans


def interpolate_frames(
    source: Image | Timepoint | str | os.PathLike,
    target: Image | Timepoint | str | os.PathLike,
    n_frames: int,
    model: str | os.PathLike | LoadedModel,
    *,
    source_labels: Image | str | os.PathLike | None = None,
    options: RunOptions | None = None,
    **kwargs: Any,
) -> Result:
    """``n_frames`` frames from ``source`` (gamma 0) to ``target`` (gamma 1) with DDM, each
    with its displacement field; ``source_labels`` are carried along the deformation.
    Frames land on the source's geometry (the target is resampled onto it)."""
    opts = _options(options, kwargs)
    if int(n_frames) < 2:
        raise LongitudinalDiffusionError(f"at least 2 frames are needed (source and target), not {n_frames}")
    device = resolve_device(opts.device)
    loaded = _load(model, device, "interpolate")
    src_in, tgt_img = (_as_image(x) for x in (source, target))
    pair = [Timepoint(0.0, Modality.T1W, img, _path_of(x)) for img, x in ((src_in, source), (tgt_img, target))]
    report = DomainReport(loaded.card.name)
    names = [
        p.name if p is not None else what for p, what in ((_path_of(source), "source"), (_path_of(target), "target"))
    ]
    _checked_content(loaded, pair, names, report, opts)
    prep, pair, prep_note = _preprocessed(loaded, pair, opts)
    src_img, tgt_img = (tp.image for tp in pair)
    grid = _checked_grids(loaded, [src_img, tgt_img], names, report, opts, prep=prep)["grid"]
    src = grid.forward(src_img)
    tgt = grid.forward(tgt_img, reference=src.record)
    labels = None
    if source_labels is not None:
        lab_img = source_labels if isinstance(source_labels, Image) else load_image(source_labels, dtype=np.int16)
        if not lab_img.same_geometry(src_in):
            raise InputError(
                getattr(source_labels, "meta", {}).get("source"), "labels do not match the source's geometry"
            )
        if prep is not None:
            lab_img = prep.to_model(lab_img, 0, labels=True)
        labels = _tensor(grid.forward(lab_img, labels=True, reference=src.record).array, device)
    gammas = torch.linspace(0.0, 1.0, int(n_frames))
    t0 = time.perf_counter()
    out = method_module("ddm").interpolate(
        loaded.network,
        _tensor(src.array, device),
        _tensor(tgt.array, device),
        gammas,
        config=loaded.config,
        source_labels=labels,
        device=device,
        progress=opts.progress,
        cancel=opts.cancel,
    )
    frames = [grid.inverse(out.frames[i, 0].cpu().numpy(), src.record) for i in range(len(gammas))]
    frame_labels = None
    if out.labels is not None:
        frame_labels = [
            grid.inverse(out.labels[i, 0].cpu().numpy(), src.record, labels=True) for i in range(len(gammas))
        ]
    fields = [_displacement_mm(out.fields[i].cpu().numpy(), grid, src.record) for i in range(len(gammas))]
    series = FrameSeries("frames", frames, [float(g) for g in gammas], "gamma", frame_labels, fields=fields)
    if prep is not None:  # onto the source's own grid
        _, (series,) = _back_to_inputs(prep, [], [series], lambda age: 0)
        frames, frame_labels = series.frames, series.labels
    settings = SamplerSettings(name="ddim", steps=1, seed=None)
    prov = _provenance(
        loaded, "interpolate", settings, pair, n_frames=int(n_frames), warnings=report.warnings, preprocessing=prep_note
    )
    prov.inputs = [{"file": None if p is None else str(p)} for p in (_path_of(source), _path_of(target))]
    _emit_done(opts, "interpolate", t0)
    images = [ResultImage("frame-last", frames[-1], "generated")]
    if frame_labels is not None:
        images.append(ResultImage("frame-last_labels", frame_labels[-1], "labels"))
    return Result("interpolate", images, [series], prov, {"total_s": time.perf_counter() - t0}, _transforms(prep))


# ----------------------------------------------------------------------------- preprocessing


def _preprocessed(loaded: LoadedModel, timepoints: list[Timepoint], opts: RunOptions):
    """The scans in the model's space as its card says (``RunOptions.preprocess``), the
    :class:`~.preprocess.PreprocessResult` that leads back (None when nothing was done), and
    a note for the provenance saying what was done or why not."""
    from . import preprocess as pp

    try:
        spec = pp.PreprocessSpec.from_card(loaded.card.card)
    except ValueError as exc:
        raise InputError(loaded.card.path, f"model card: {exc}") from exc
    if opts.preprocess is False:
        return None, timepoints, {"applied": False, "reason": "switched off (--no-preprocess)"}
    if not spec.active:
        return None, timepoints, {"applied": False, "reason": "the model card asks for none"}
    images = [_image(tp) for tp in timepoints]
    if opts.preprocess is None and all(pp.in_model_space(img, tp.source) for img, tp in zip(images, timepoints)):
        return None, timepoints, {"applied": False, "reason": "the scans are already in the model's space"}
    names: list[str] = []
    for i, tp in enumerate(timepoints):
        stem = tp.source.name.split(".")[0] if tp.source is not None else f"input-{i}"
        names.append(stem if stem not in names else f"{stem}-{i}")
    t0 = time.perf_counter()
    if opts.progress is not None:
        opts.progress(ProgressEvent("preprocess", 0, 1, 0.0, None, ", ".join(names)))
    prep = pp.preprocess_for(loaded.card.card, images, spec=spec, names=names)
    if opts.progress is not None:
        opts.progress(ProgressEvent("preprocess", 1, 1, time.perf_counter() - t0, 0.0, "done"))
    log.info("preprocessed %d scan(s) for %s in %.1f s", len(images), loaded.card.name, time.perf_counter() - t0)
    moved = [dataclasses.replace(tp, image=img) for tp, img in zip(timepoints, prep.images)]
    return prep, moved, {"applied": True, **prep.describe()}


def _back_to_inputs(prep: Any, images: list[ResultImage], series: list[FrameSeries], which: Callable[[Any], int]):
    """Outputs of the model's space back on the inputs' own grids: each image on input
    ``which(age)``'s, every series on the first input's (real timeline frames are the
    original scans, aligned onto it in one interpolation)."""
    images = [
        dataclasses.replace(r, image=prep.back_to_input(r.image, which(r.age), labels=r.kind == "labels"))
        for r in images
    ]
    out = []
    for s in series:
        frames = []
        for k, frame in enumerate(s.frames):
            if s.generated is not None and not s.generated[k]:
                i = which(s.times[k])
                frames.append(prep.input_on(prep.originals[i], i, 0))
            else:
                frames.append(prep.back_to_input(frame, 0))
        labels = None if s.labels is None else [prep.back_to_input(x, 0, labels=True) for x in s.labels]
        fields = None if s.fields is None else [prep.vectors_back_to_input(x, 0) for x in s.fields]
        out.append(dataclasses.replace(s, frames=frames, labels=labels, fields=fields))
    return images, out


def _transforms(prep: Any) -> list[Any]:
    return [] if prep is None else prep.transforms()


def _as_image(x: Image | Timepoint | str | os.PathLike) -> Image:
    if isinstance(x, Image):
        return x
    if isinstance(x, Timepoint):
        return _image(x)
    return load_image(x)


def _path_of(x: Any) -> Path | None:
    if isinstance(x, Timepoint):
        return x.source
    if isinstance(x, (str, os.PathLike)):
        return Path(x)
    return None


def _displacement_mm(field_vox: np.ndarray, grid: ModelGrid, record: GridRecord) -> Image:
    """A grid displacement (3, I, J, K) in grid voxels -> (I, J, K, 3) in RAS mm on the input's geometry."""
    mm = np.einsum("ab,bijk->aijk", record.grid_affine[:3, :3], field_vox)
    comps = [grid.inverse(mm[a], _identity_units(record)).array for a in range(3)]
    return Image(np.stack(comps, axis=-1).astype(np.float32), record.affine)
