"""Complete missing ages: Cas-DiffCom, the time-interval model (one scan at a time, blended
from both sides) and SADM (the whole sequence)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from ..ages import parse_age
from ..catalog import LoadedModel
from ..diffusion import SamplerSettings, resolve_device
from ..domain import DomainReport, check_request
from ..errors import InputError, LongitudinalDiffusionError
from ..grid import ModelGrid, resample_to
from ..modality import Modality, parse_modality
from ..models import method_module
from ..progress import ProgressCallback
from ..result import SAME_AGE, FrameSeries, Result, ResultImage
from ..timepoints import Subject, Timepoint
from .common import (
    RunOptions,
    _age_outputs,
    _back_to_inputs,
    _checked_content,
    _checked_grids,
    _denoising_series,
    _emit_done,
    _load,
    _options,
    _prefixed,
    _preprocessed,
    _provenance,
    _samples,
    _scan_name,
    _tensor,
    _transforms,
    _units_only,
)

log = logging.getLogger(__name__)


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
    grids = _checked_grids(loaded, [tp.volume() for tp in real], names, report, opts, keys, prep)
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
        ref = grid.forward(near.volume())
        out_ref = ref if out_key == "grid" else out_grid.forward(near.volume())
        fwds = [ref] + [grid.forward(tp.volume(), reference=ref.record) for tp, _ in sources[1:]]
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
    ref = grid.forward(real[0].volume())
    if targets[0] < real[0].age - SAME_AGE:
        raise LongitudinalDiffusionError(
            f"SADM generates forward in time: {targets[0]:g} months is before the first scan ({real[0].age:g} months); "
            "use Cas-DiffCom or the time-interval model for earlier ages"
        )
    capacity = int(loaded.config.get("max_frames", 12))
    # every scan on the first one's grid placement; each keeps its own record (geometry and
    # intensity units), so an output goes back onto the nearest real scan, as documented
    forwards = {
        tp.age: (ref if i == 0 else grid.forward(tp.volume(), reference=ref.record)) for i, tp in enumerate(real)
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
    from ..diffusion import make_generator

    return make_generator(seed)[0]


def _timeline(real: list[Timepoint], images: list[ResultImage]) -> FrameSeries:
    """Real and generated scans in age order, the subject's completed history."""
    items = [(tp.age, tp.volume(), False) for tp in real]
    items += [(r.age, r.image, True) for r in images if r.kind in ("generated", "mean") and r.age is not None]
    items.sort(key=lambda x: x[0])
    ref = items[0][1]
    frames = [img if img.same_geometry(ref) else resample_to(img, ref.affine, ref.shape) for _, img, _ in items]
    return FrameSeries("timeline", frames, [a for a, _, _ in items], "months", generated=[g for _, _, g in items])
