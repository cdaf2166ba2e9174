"""Synthesise a missing modality from the others of a session (cWDM)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from ..catalog import LoadedModel
from ..diffusion import resolve_device
from ..domain import DomainReport, check_images, check_request
from ..errors import InputError, LongitudinalDiffusionError
from ..imaging import Image
from ..modality import Modality, parse_modality
from ..models import method_module
from ..progress import ProgressCallback
from ..result import SAME_AGE, Result
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
    _preprocessed,
    _provenance,
    _samples,
    _scan_name,
    _SynthesisGrid,
    _transforms,
    _units_only,
)

log = logging.getLogger(__name__)


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
    first = grid.forward(have[cond_mods[0]].volume())
    on_grid = [first] + [grid.forward(have[m].volume(), reference=first.record) for m in cond_mods[1:]]
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
        grid = _BratsGrid([have[m].volume() for m in cond_mods])
        check_images(loaded.card.card, [have[m].volume() for m in cond_mods], report, names=names, content=False)
        report.announce(opts.progress)
        report.raise_if_refused()
        return grid, prep, prep_note, have
    prep, conds, prep_note = _preprocessed(loaded, [have[m] for m in cond_mods], opts)
    have = {**have, **dict(zip(cond_mods, conds))}
    model_grid = _checked_grids(loaded, [have[m].volume() for m in cond_mods], names, report, opts, prep=prep)["grid"]
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
        from ..models.cwdm import BRATS_GRID, BRATS_SHAPE

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
        from ..models.cwdm import preprocess_brats

        array, record = preprocess_brats(np.asarray(image.array))
        return dataclasses.make_dataclass("BratsSample", ["array", "record"])(array, record)

    def inverse(self, array: Any, record: Any, *, spread: bool = False) -> Image:
        """Back onto the BraTS array; ``spread`` maps a standard-deviation map (no threshold)."""
        from ..models.cwdm import postprocess_brats

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
