"""What the three tasks share: run options, loading a model, the grid and units of its
inputs, provenance, samples, checks of the inputs, and the preprocessing round trip."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import __version__
from ..catalog import LoadedModel, load_model
from ..diffusion import SamplerSettings
from ..domain import DomainReport, check_aligned_box, check_images, fit_grid
from ..errors import InputError, LongitudinalDiffusionError
from ..grid import GridRecord, ModelGrid
from ..imaging import Image, load_image
from ..modality import Modality
from ..models import method_task, paper_name
from ..progress import CancelToken, ProgressCallback, ProgressEvent
from ..provenance import Provenance
from ..result import FrameSeries, ResultImage
from ..timepoints import Timepoint

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- options


@dataclass
class RunOptions:
    """How to run any task; ``None`` fields take the model card's defaults.

    ``two_sided``: where a missing age has real scans on both sides, single-source models
    (Cas-DiffCom, time-interval) run from each neighbour and the two predictions are blended
    with the linear-interpolation weights (docs/methods.md); False uses the nearest scan only,
    as the papers do.

    ``preprocess``: bring the scans into the model's space as its card's ``"preprocessing"``
    says (bias field, brain extraction, alignment to the atlas: :mod:`..preprocess`) and the
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
    from ..diffusion.threads import use_threads

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
    """The domain checks of the scans as given (:mod:`..domain`, ``content``), before
    preprocessing spends time on them: a refusal stops here, with every warning so far."""
    images = [tp.volume() for tp in timepoints]
    check_images(loaded.card.card, images, report, names=names, labels=labels, distinct=distinct, space=False)
    _closer_model(loaded, images, report)
    if report.refusals:
        report.announce(opts.progress)
        report.raise_if_refused()


def _output_spacing(card: dict[str, Any]) -> float | None:
    """The finest voxel size (mm) of the grid a card's model writes its output on."""
    grid = card.get("sr_grid") or card.get("grid")
    return float(min(grid["spacing"])) if isinstance(grid, dict) and grid.get("spacing") else None


def _closer_model(loaded: LoadedModel, images: list[Image], report: DomainReport) -> None:
    """Say so when another installed model of the same method works on a grid closer to the
    scans' voxel size than the chosen one (e.g. ``sadm-demo-4mm`` for 4 mm scans given to the
    5 mm ``sadm-demo``): the output grid bounds what any model can score on the scans."""
    from ..catalog import list_models

    own = _output_spacing(loaded.card.card)
    scan = max(float(max(img.spacing)) for img in images) if images else None
    if own is None or not scan:
        return
    best, best_gap = None, abs(np.log(own / scan))
    for card in list_models():
        spacing = _output_spacing(card.card)
        if card.method != loaded.method or card.name == loaded.card.name or spacing is None:
            continue
        gap = abs(np.log(spacing / scan))
        if gap < best_gap - 0.05:  # clearly closer (more than 5 % in voxel size)
            best, best_gap = (card.name, spacing), gap
    if best is not None:
        report.add(
            "warn",
            "closer-model",
            f"the scans have {scan:g} mm voxels and model '{loaded.card.name}' works at {own:g} mm; the installed "
            f"model '{best[0]}' of the same method works at {best[1]:g} mm, closer to these scans",
        )


def _checked_grids(
    loaded: LoadedModel,
    images: list[Image],
    names: list[str],
    report: DomainReport,
    opts: RunOptions,
    keys: Sequence[str] = ("grid",),
    prep: Any = None,
) -> dict[str, ModelGrid]:
    """The domain checks of the scans the model will read (:mod:`..domain`, ``space``: after
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


class _SynthesisGrid(Protocol):
    """What synthesis needs of a grid: a :class:`~..grid.ModelGrid`, or :class:`_BratsGrid`."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def forward(self, image: Image, *, reference: Any = None) -> Any: ...

    def inverse(self, array: Any, record: Any) -> Image: ...


# ----------------------------------------------------------------------------- preprocessing


def _preprocessed(loaded: LoadedModel, timepoints: list[Timepoint], opts: RunOptions):
    """The scans in the model's space as its card says (``RunOptions.preprocess``), the
    :class:`~..preprocess.PreprocessResult` that leads back (None when nothing was done), and
    a note for the provenance saying what was done or why not."""
    from .. import preprocess as pp

    try:
        spec = pp.PreprocessSpec.from_card(loaded.card.card)
    except ValueError as exc:
        raise InputError(loaded.card.path, f"model card: {exc}") from exc
    if opts.preprocess is False:
        return None, timepoints, {"applied": False, "reason": "switched off (--no-preprocess)"}
    if not spec.active:
        return None, timepoints, {"applied": False, "reason": "the model card asks for none"}
    images = [tp.volume() for tp in timepoints]
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
        return x.volume()
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
