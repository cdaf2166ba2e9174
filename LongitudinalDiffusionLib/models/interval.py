"""Time-interval conditional diffusion model for longitudinal MRI ("Conditional Diffusion Model
for Longitudinal Medical Image Generation", arXiv 2411.05860).

The target scan is generated from a source scan S of the same subject and the time interval
Delta between the two visits: S and Delta are injected into eps_theta(x_t, t, S, Delta) of an
attention U-Net (Method Summary; Mechanisms 1-2), trained with the eps loss, linear beta
1e-4..0.02 over T=1000 steps, Adam lr 1e-3, batch 1 (Mechanism 3), at 128x160x128. No code was
published (docs/methods.md), so the architecture is ours where the paper is silent:

* The U-Net is MONAI's ``DiffusionModelUNet`` with attention at the
  deeper levels (and its mid block), fed ``[x_t, S]`` concatenated on the channel axis.
* Delta (months; negative = backwards in time, towards an earlier visit) is embedded by
  :class:`~.layers.ScalarEmbedding` and *added* to the timestep embedding ("We aggregate
  these conditions through addition operation").

Choice (how the interval reaches the timestep embedding): MONAI's U-Net already adds
``class_embedding(class_labels)`` to ``time_embed(t)`` before any block uses it; we build it
class-conditional and replace its integer ``nn.Embedding`` by the continuous
``ScalarEmbedding``, then pass the interval as ``class_labels``. That is stateless (no hook
holding a per-call value), batch-correct by construction (each row gets its own interval,
so the engine's [cond, uncond] batching for guidance works) and needs no copy of MONAI's
``forward``.

Choice (sampling): DDIM, 50 steps, eta 0, predicted x0 clipped to the intensity range [-1, 1].

Option ``"residual": true`` (the demo models; off at paper scale): the chain generates the
change ``target - source`` instead of the target, so an untrained network already returns
the source and minutes of CPU training are spent on what changes with age (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ..diffusion import SampleOutput, SamplerSettings, Schedule, prepare_network, residual_target, sample
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback
from .config import MethodConfig, Prediction, UNetConfig, nested, optional
from .layers import ScalarEmbedding

METHOD = "interval"
TASK = "complete-ages"


class IntervalDiffusion(nn.Module):
    """eps_theta(x_t, t, source, interval): a MONAI attention U-Net on ``[x_t, source]`` whose
    timestep embedding is summed with a learned embedding of the interval (module docstring).

    Args:
        interval_scale: ``ScalarEmbedding`` scale for intervals in months.
        **unet: ``DiffusionModelUNet`` arguments (``channels``, ``attention_levels``,
            ``num_res_blocks``, ``norm_num_groups``, ``num_head_channels``, ...).
    """

    def __init__(self, interval_scale: float = 10.0, **unet: Any) -> None:
        super().__init__()
        self.unet = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=1, num_class_embeds=1, **unet)
        # MONAI adds class_embedding(class_labels) to the timestep embedding: make it continuous.
        width = int(self.unet.time_embed[-1].out_features)  # type: ignore[arg-type]  # an nn.Linear
        self.unet.class_embedding = ScalarEmbedding(width, scale=interval_scale)  # type: ignore[assignment]

    @property
    def interval_embedding(self) -> ScalarEmbedding:
        return self.unet.class_embedding  # type: ignore[return-value]  # set in __init__

    @property
    def factor(self) -> int:
        """Spatial sizes must be multiples of this (the U-Net's down-sampling)."""
        return 2 ** (len(self.unet.block_out_channels) - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, source: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
        """Args: x_t and source (N, 1, D, H, W); t (N,) steps; interval (N,) months."""
        x = torch.cat([x_t, source.to(x_t.dtype)], dim=1)
        return self.unet(x, t, class_labels=interval.reshape(-1).float())


def default_config(scale: str = "paper") -> dict:
    """Configuration at ``scale`` in {"paper", "demo", "tiny"}.

    "paper": 128x160x128 (the paper's size), schedule and optimiser as published; widths are
    not published (Choice: channels (32, 64, 128, 128, 256), 2 res-blocks per level, attention
    at the two deepest levels, i.e. 16x20x16 and 8x10x8, plus the mid block; memory-efficient
    attention). "demo": the demo cohort's grid, so a 2-core CPU trains it in minutes. "tiny":
    for tests. What each scale builds (Testing/test_configs.py checks these lines):

    - paper: 128x160x128; 48.5 M parameters
    - demo: 5 mm 32x40x32; 0.74 M parameters
    - tiny: 8x8x8; 0.11 M parameters
    """
    if scale == "paper":
        net = {
            "channels": [32, 64, 128, 128, 256],
            "attention_levels": [False, False, False, True, True],
            "num_res_blocks": 2,
            "norm_num_groups": 32,
            "num_head_channels": 32,
            "use_flash_attention": True,
        }
        size = [128, 160, 128]
    elif scale == "demo":
        net = {
            "channels": [16, 32, 32],
            "attention_levels": [False, False, True],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "num_head_channels": 16,
            "use_flash_attention": True,
        }
        size = [32, 40, 32]
    elif scale == "tiny":
        net = {
            "channels": [8, 16],
            "attention_levels": [False, True],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "num_head_channels": 8,
        }
        size = [8, 8, 8]
    else:
        raise ValueError(f"unknown scale '{scale}' (expected paper, demo or tiny)")
    return {
        "network": {"interval_scale": 10.0, **net},
        "schedule": {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000},
        "prediction": "epsilon",
        "sampler": {"name": "ddim", "steps": 5 if scale == "tiny" else 50, "eta": 0.0, "seed": 0},
        "image_size": size,
        **({"spacing_mm": [5.0, 5.0, 5.0]} if scale == "demo" else {}),
        "intensity_range": [-1.0, 1.0],
        "interval_unit": "months",
        "optimizer": {"name": "adam", "lr": 1e-3, "batch_size": 1},
    }


@dataclass(frozen=True)
class IntervalNetwork(UNetConfig):
    """The U-Net (:class:`~.config.UNetConfig`) and ``interval_scale``, the
    ``ScalarEmbedding`` scale of intervals in months."""

    interval_scale: float = 10.0


@dataclass(frozen=True)
class IntervalConfig(MethodConfig):
    """The time-interval model's configuration, as the model card stores it under ``config``.

    Attributes:
        network: the U-Net and the interval embedding.
        schedule: the noise schedule (``Schedule.from_config``).
        prediction: what the denoiser predicts.
        sampler: default sampler settings (``SamplerSettings`` fields).
        image_size: the model grid (voxels); spacing_mm: its voxel size, if fixed.
        intensity_range: the model's intensities; predicted x0 is clipped to them.
        interval_unit: the unit of intervals ("months").
        optimizer: training optimizer (name, lr, batch_size).
        residual: generate the change from the source scan (docs/methods.md).
    """

    network: IntervalNetwork = nested(IntervalNetwork)
    schedule: dict[str, Any] = field(default_factory=dict)
    prediction: Prediction = Prediction.EPSILON
    sampler: dict[str, Any] = field(default_factory=dict)
    image_size: list[int] = field(default_factory=list)
    spacing_mm: list[float] | None = optional()
    intensity_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    interval_unit: str = "months"
    optimizer: dict[str, Any] = field(default_factory=dict)
    residual: bool | None = optional()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))


CONFIG = IntervalConfig


def build(config: IntervalConfig | Mapping[str, Any]) -> IntervalDiffusion:
    """The network of ``config.network`` (a card's JSON is read first)."""
    return IntervalDiffusion(**IntervalConfig.from_dict(config).network.to_dict())


def loss(model: IntervalDiffusion, batch: dict, config: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The eps-MSE at uniform random steps (paper, Mechanism 3); of the change from the source
    when ``config["residual"]``.

    Args:
        batch: ``{"source", "target"}`` (N, 1, *image_size) and ``"interval"`` (N,) months from
            the source visit to the target visit.
        generator: CPU generator for the steps and noise (reproducible losses).
    """
    schedule = Schedule.from_config(config["schedule"])
    x0 = residual_target(batch["target"], batch["source"] if config.get("residual") else None)
    t = schedule.random_steps(x0.shape[0], generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    out = model(schedule.q_sample(x0, t, noise), t, batch["source"], batch["interval"])
    return F.mse_loss(out, schedule.training_target(config["prediction"], x0, noise, t))


def generate(
    model: IntervalDiffusion,
    source: torch.Tensor,
    interval: float | Sequence[float] | torch.Tensor,
    *,
    config: dict,
    settings: SamplerSettings | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SampleOutput:
    """The subject ``interval`` months after (before, if negative) the ``source`` scan.

    Args:
        source: (N, 1, *image_size), intensities in ``config["intensity_range"]``.
        interval: (N,) months, or one number for all.
        device: where to run (the model is moved there); default: the model's device.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prepare_network(model, device)
    if source.ndim != 5 or source.shape[1] != 1:
        raise InputError("source", f"expected a (N, 1, D, H, W) tensor, got shape {tuple(source.shape)}")
    if any(s % model.factor for s in source.shape[2:]):
        raise InputError("source", f"spatial size {tuple(source.shape[2:])} must be a multiple of {model.factor}")
    n = source.shape[0]
    interval = torch.as_tensor(interval, dtype=torch.float32).reshape(-1)
    if interval.numel() == 1:
        interval = interval.expand(n)
    if interval.numel() != n or not bool(torch.isfinite(interval).all()):
        raise InputError("interval", f"expected {n} finite intervals in months, got {interval.tolist()}")
    cond = {"source": source.float(), "interval": interval}
    return sample(
        lambda x, t, c: model(x, t, c["source"], c["interval"]),
        tuple(source.shape),
        Schedule.from_config(config["schedule"]),
        config["prediction"],
        settings or SamplerSettings.from_dict(config["sampler"]),
        cond=cond,
        clip_x0=tuple(config.get("intensity_range", (-1.0, 1.0))),
        reference=cond["source"] if config.get("residual") else None,
        generator=generator,
        device=device,
        progress=progress,
        cancel=cancel,
        stage="generate",
    )
