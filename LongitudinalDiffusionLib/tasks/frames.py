"""Interpolate the frames between two scans (DDM)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from ..catalog import LoadedModel
from ..diffusion import SamplerSettings, resolve_device
from ..domain import DomainReport
from ..errors import InputError, LongitudinalDiffusionError
from ..imaging import Image, load_image
from ..modality import Modality
from ..models import method_module
from ..result import FrameSeries, Result, ResultImage
from ..timepoints import Timepoint
from .common import (
    RunOptions,
    _as_image,
    _back_to_inputs,
    _checked_content,
    _checked_grids,
    _displacement_mm,
    _emit_done,
    _load,
    _options,
    _path_of,
    _preprocessed,
    _provenance,
    _tensor,
    _transforms,
)

log = logging.getLogger(__name__)


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
