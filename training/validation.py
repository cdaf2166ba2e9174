"""Validation during training: each method's inference on a held-out item, and its scores.

:data:`PREDICTORS` run the method's own inference with a short DDIM sampler (DDM warps the
source fully); :data:`SCORERS` score the prediction against the truth (PSNR and SSIM by
default, mean Dice for the tissue model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings


def _val_settings(config: dict[str, Any], key: str, steps: int, seed: int) -> SamplerSettings:
    base = SamplerSettings.from_dict(config.get(key) or {})
    return base.merged(name="ddim", steps=steps, eta=0.0, capture=0, seed=seed)


def _predict_interval(model, batch, config, steps, generator):
    from LongitudinalDiffusionLib.models import interval

    settings = _val_settings(config, "sampler", steps, 0)
    out = interval.generate(model, batch["source"], batch["interval"], config=config, settings=settings,
                            generator=generator)  # fmt: skip
    return out.sample, batch["target"]


def _predict_cas_diffcom(model, batch, config, steps, generator):
    from LongitudinalDiffusionLib.models import cas_diffcom

    if batch["stage"] == "generator":
        settings = _val_settings(config, "sampler", steps, 0)
        cascade = cas_diffcom.complete(model, batch["guidance_lr"], batch["guidance_age"], batch["target_age"],
                                       config=config, settings=settings, refine=False, generator=generator)  # fmt: skip
        return cascade.low_res, batch["target_lr"]
    # the refiner from the real low-resolution scan (the stage on its own, as it is trained)
    settings = _val_settings(config, "refine_sampler", steps, 0)
    out = cas_diffcom.super_resolve(model, batch["low_res"], config=config, settings=settings, generator=generator)
    return out.sample, batch["target_hr"]


def _predict_sadm(model, batch, config, steps, generator):
    from LongitudinalDiffusionLib.models import sadm

    # One item at a time: the timeline up to its last present frame (context on both sides of
    # the target), the target hidden; missing frames before it are filled first, as in use.
    k = int(batch["target_index"][0])
    last = max(k, int(batch["present"][0].nonzero().max()))
    frames, ages, present = (batch[key][:, : last + 1] for key in ("frames", "ages", "present"))
    present = present.clone()
    present[:, k] = False
    out = sadm.fill_sequence(model, frames, ages, present, config=config,
                             settings=_val_settings(config, "sampler", steps, 0), generator=generator)  # fmt: skip
    return out.frames[:, k], frames[:, k]


def _predict_cwdm(model, batch, config, steps, generator):
    from LongitudinalDiffusionLib.models import cwdm

    conditions, mask, target = batch["conditions"], batch.get("mask"), batch.get("target")
    if config.get("any_missing") and mask is None:  # hide each contrast in turn over the cases
        n, m = conditions.shape[:2]
        hidden = int(batch["case"]) % m
        mask = torch.ones(n, m)
        mask[:, hidden] = 0
        target = conditions[:, hidden : hidden + 1]
    settings = _val_settings(config, "sampler", steps, 0)
    out = cwdm.synthesize(model, conditions, config=config, settings=settings, mask=mask, generator=generator)
    return out.sample, target


def _predict_ddm(model, batch, config, steps, generator):
    from LongitudinalDiffusionLib.models import ddm

    out = ddm.interpolate(model, batch["source"], batch["target"], gammas=[1.0], config=config)
    return out.frames, batch["target"].cpu()


def _predict_tissue_seg(model, batch, config, steps, generator):
    from LongitudinalDiffusionLib.segmentation import segment_tensor

    return segment_tensor(model, batch["image"]), batch["labels"]


#: method -> (model, batch of one item, method config, sampler steps, generator) -> (prediction, truth)
PREDICTORS: dict[str, Callable] = {
    "interval": _predict_interval,
    "cas-diffcom": _predict_cas_diffcom,
    "sadm": _predict_sadm,
    "cwdm": _predict_cwdm,
    "ddm": _predict_ddm,
    "tissue-seg": _predict_tissue_seg,
}


def image_scores(prediction: torch.Tensor, truth: torch.Tensor, grid: dict, config: dict) -> dict[str, float]:
    """PSNR (dB) and 3D SSIM of two (N, 1, D, H, W) volumes over the grid's intensity range
    (MONAI's metrics; SSIM window 11 voxels or the largest odd size that fits)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    low, high = grid["value_range"]
    span = float(high - low)
    p, t = prediction.detach().float().cpu(), truth.detach().float().cpu()
    shortest = min(t.shape[2:])
    win = min(11, shortest if shortest % 2 else shortest - 1)
    # MONAI's metrics return a tensor for tensor inputs (their annotations also allow lists)
    psnr = float(cast(torch.Tensor, PSNRMetric(max_val=span)(p, t)).mean())
    if win < 3:
        return {"psnr": psnr, "ssim": math.nan}
    ssim = float(cast(torch.Tensor, SSIMMetric(spatial_dims=3, data_range=span, win_size=win)(p, t)).mean())
    return {"psnr": psnr, "ssim": ssim}


def label_scores(prediction: torch.Tensor, truth: torch.Tensor, grid: dict, config: dict) -> dict[str, float]:
    """Mean Dice over the foreground classes present in the truth or the prediction."""
    from LongitudinalDiffusionLib.segmentation import dice_per_class

    classes = range(len(config["classes"]))
    dice = [v for v in dice_per_class(prediction.cpu().numpy(), truth.cpu().numpy(), classes).values() if v == v]
    return {"dice": float(np.mean(dice)) if dice else math.nan}


#: method -> (prediction, truth, grid, method config) -> {metric: value}; PSNR and SSIM by default
SCORERS: dict[str, Callable] = {"tissue-seg": label_scores}
