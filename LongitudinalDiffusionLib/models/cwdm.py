"""cWDM: conditional wavelet diffusion for cross-modality 3D MRI synthesis.

Friedrich, Durrer, Wolleb, Cattin 2024, "cWDM: Conditional Wavelet Diffusion Models for
Cross-Modality 3D Medical Image Synthesis", arXiv 2411.17203. One missing BraTS contrast is
generated from the three available ones (paper section 3): the diffusion runs on the eight
Haar subbands of the target volume (:mod:`.wavelets`, section 2), the subbands of the
conditions are concatenated to the noisy input, the network predicts x0, and every
predicted x0 is clipped in image space (IDWT, clamp to [0, 1], DWT).

Upstream facts (pfriedri/cwdm @1e4a1e5; summarised in docs/methods.md) that this
module reproduces:

- network: guided-diffusion ``UNetModel`` with dims=3, 64 base channels, channel_mult
  (1, 2, 2, 4, 4), two residual blocks per level, residual-block up/down-sampling on all
  three axes (``resample_2d=False``), scale-shift norm off, GroupNorm(32), no attention
  anywhere, concatenating skips, 32 input (8 noisy + 3 x 8 condition subbands) and 8
  output channels; parameter names as upstream so that the published checkpoints
  (huggingface pfriedri/cwdm ``t1_gen.pt``, ``t1ce_gen.pt``, ``t2_gen.pt``, ``flair_gen.pt``)
  load key for key (:func:`import_upstream_checkpoint`). What each scale of
  :func:`default_config` builds (target T1w; Testing/test_configs.py checks these lines):

  - paper: 224x224x160; 81.5 M parameters
  - demo: 5 mm 32x40x32; 1.16 M parameters
  - tiny: 16x16x8; 0.13 M parameters

- schedule linear beta 1e-4 -> 0.02, T = 1000, x0 prediction, DDPM over all 1000 steps with
  the FIXED_LARGE variance, no guidance, timesteps fed unscaled (0..999).
- loss: MSE between predicted and true (LLL/3-scaled) subbands at a uniform random t.
- condition order: for a target, the other three contrasts in the upstream order
  t1n, t1c, t2w, t2f, i.e. T1w, T1ce, T2w, FLAIR here (upstream ``scripts/sample.py``).
- BraTS preprocessing (``bratsloader.py``): clip at the 0.1 / 99.9 percentiles, min-max to
  [0, 1], 240x240x155 -> zero-pad the last axis to 160 -> crop 8 voxels from both ends of
  the first two axes -> 224x224x160; after sampling values <= 0.04 become 0 and the volume
  is padded back to 240x240x155 (``scripts/sample_auto.py``).

Choices:

- The U-Net is written here rather than taken from MONAI's ``DiffusionModelUNet``: the
  upstream weights must load key for key, and MONAI's middle block always has attention
  (MONAI 1.6). Attention is left out entirely since upstream uses none.
- Noise is drawn directly in wavelet space, in training and in sampling. Upstream samples
  the same way; only its training draws the noise in image space and takes its DWT. The
  Haar DWT is orthonormal, so both are i.i.d. standard normal.
- "Any missing" mode (beyond upstream; the paper, section 4.1.2, names a single model as
  the more scalable option): one network sees the subbands of all four contrasts, the
  missing one zeroed, plus four constant availability maps (1 available, 0 missing) at
  wavelet resolution: 8 + 4 x 8 + 4 = 44 input channels.
- The paper-scale sampler runs in float32 (``amp: False``) as upstream (``use_fp16=False``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import SampleOutput, SamplerSettings, Schedule, prepare_network, sample
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback
from . import check_weights
from .config import MethodConfig, Prediction, nested, optional
from .layers import sinusoidal_embedding
from .wavelets import from_wavelet, to_wavelet

METHOD = "cwdm"
TASK = "synthesize-modality"
MODALITIES = ("T1w", "T1ce", "T2w", "FLAIR")
UPSTREAM_CONTRASTS = {"T1w": "t1n", "T1ce": "t1c", "T2w": "t2w", "FLAIR": "t2f"}
UPSTREAM_CHECKPOINTS = {"t1_gen.pt": "T1w", "t1ce_gen.pt": "T1ce", "t2_gen.pt": "T2w", "flair_gen.pt": "FLAIR"}
BRATS_SHAPE = (240, 240, 155)
BRATS_GRID = (224, 224, 160)
BRATS_CROP = 8
BACKGROUND_THRESHOLD = 0.04
SUBBANDS_PER_IMAGE = 8


# --------------------------------------------------------------------------------------
# Network: guided-diffusion UNetModel for dims=3 (Dhariwal & Nichol 2021, as forked by WDM)
# --------------------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (guided-diffusion ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer (the last conv of every residual branch and of the output)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2)


class Downsample(nn.Module):
    """Strided 3x3x3 conv (``op``), used when ``resblock_updown`` is off."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = _conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3x3 conv (``conv``), used when ``resblock_updown`` is off."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the step embedding, optionally resampling by 2.

    GroupNorm-SiLU-conv, plus the projected embedding (added, or as FiLM scale/shift of the
    second norm when ``use_scale_shift_norm``), GroupNorm-SiLU-dropout-zero conv, plus the
    skip (identity, or a 1x1x1 conv when the width changes). With ``up``/``down`` both paths
    are resampled (nearest x2 / 2x2x2 average pooling) between the first norm and conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        num_groups: int = 32,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = "up" if up else "down" if down else None
        self.in_layers = nn.Sequential(GroupNorm32(num_groups, channels), nn.SiLU(), _conv(channels, out_channels))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(num_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(_conv(out_channels, out_channels)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else _conv(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool3d(x, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample:
            h = self._resample(self.in_layers[:-1](x))
            x = self._resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class EmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the step embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class WaveletUNet(nn.Module):
    """The cWDM denoiser: guided-diffusion's 3D U-Net without attention (pfriedri/cwdm).

    Module names follow guided-diffusion (``time_embed``, ``input_blocks``, ``middle_block``,
    ``output_blocks``, ``out``) so upstream state dicts load unchanged.

    Args:
        in_channels: 8 noisy subbands + the condition channels (32 upstream).
        out_channels: predicted subbands (8).
        model_channels: base width (64 upstream); the step embedding is 4x wider.
        channel_mult: width multiplier per level; ``len - 1`` down-samplings by 2.
        num_res_blocks: residual blocks per level (the decoder has one more per level).
        num_groups: GroupNorm groups (32 upstream); every width must be a multiple.
        dropout: dropout in the residual blocks (0 upstream).
        resblock_updown: resample with residual blocks (upstream) instead of ``op``/``conv`` layers.
        use_scale_shift_norm: FiLM-style embedding injection (off upstream).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 8,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        num_groups: int = 32,
        dropout: float = 0.0,
        resblock_updown: bool = True,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be positive, not {value}")
        if not channel_mult or num_res_blocks < 1:
            raise ValueError("channel_mult must be non-empty and num_res_blocks at least 1")
        bad = [model_channels * m for m in channel_mult if (model_channels * m) % num_groups]
        if bad:
            raise ValueError(
                f"num_groups={num_groups} does not divide the widths {bad} (model_channels x channel_mult)"
            )
        self.model_channels = model_channels
        self.levels = len(channel_mult)
        emb = 4 * model_channels
        block: dict[str, Any] = dict(dropout=dropout, num_groups=num_groups, use_scale_shift_norm=use_scale_shift_norm)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([EmbedSequential(_conv(in_channels, model_channels))])
        skip_widths = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(EmbedSequential(ResBlock(ch, emb, model_channels * mult, **block)))
                ch = model_channels * mult
                skip_widths.append(ch)
            if level < len(channel_mult) - 1:
                down = ResBlock(ch, emb, ch, down=True, **block) if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_widths.append(ch)

        self.middle_block = EmbedSequential(ResBlock(ch, emb, **block), ResBlock(ch, emb, **block))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skip_widths.pop(), emb, model_channels * mult, **block)]
                ch = model_channels * mult
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, up=True, **block) if resblock_updown else Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(num_groups, ch), nn.SiLU(), _zero(_conv(model_channels, out_channels)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Predict the clean subbands.

        Args:
            x: (N, in_channels, d, h, w), each of d, h, w divisible by 2 ** (levels - 1).
            timesteps: (N,) diffusion steps, unscaled (0 .. T-1).

        Returns:
            (N, out_channels, d, h, w).
        """
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise InputError("U-Net input", f"spatial size {tuple(x.shape[2:])} is not divisible by {factor}")
        emb = self.time_embed(sinusoidal_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# --------------------------------------------------------------------------------------
# Configuration and the module contract
# --------------------------------------------------------------------------------------
_SCALES: dict[str, tuple[dict[str, Any], list[int], dict[str, Any]]] = {
    # network, image_size, sampler overrides
    "paper": (
        dict(model_channels=64, channel_mult=[1, 2, 2, 4, 4], num_res_blocks=2, num_groups=32),
        list(BRATS_GRID),
        dict(name="ddpm", steps=None, variance="fixed_large", seed=42, amp=False),
    ),
    "demo": (
        dict(model_channels=16, channel_mult=[1, 2, 2], num_res_blocks=2, num_groups=8),
        [32, 40, 32],
        dict(name="ddim", steps=50, eta=0.0, variance="fixed_large", seed=42),
    ),
    "tiny": (
        dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, num_groups=4),
        [16, 16, 8],
        dict(name="ddim", steps=4, eta=0.0, variance="fixed_large", seed=0),
    ),
}


def upstream_conditions(target: str) -> list[str]:
    """The conditioning contrasts for ``target`` in upstream order (T1w, T1ce, T2w, FLAIR minus the target)."""
    if target not in MODALITIES:
        raise InputError("cWDM config", f"unknown target modality '{target}' (expected one of {', '.join(MODALITIES)})")
    return [m for m in MODALITIES if m != target]


def _in_channels(conditions: Sequence[str], any_missing: bool) -> int:
    return SUBBANDS_PER_IMAGE * (1 + len(conditions)) + (len(conditions) if any_missing else 0)


def default_config(scale: str = "paper", *, target: str = "T1w", any_missing: bool = False) -> dict:
    """The configuration at a scale: "paper" (upstream sizes), "demo" (CPU, 32x40x32 at 5 mm) or "tiny" (tests).

    With ``any_missing`` one network synthesises whichever of the four contrasts is missing
    (``target`` is then None and ``conditions`` lists all four).
    """
    if scale not in _SCALES:
        raise InputError("cWDM config", f"unknown scale '{scale}' (expected one of {', '.join(_SCALES)})")
    network, image_size, sampler = _SCALES[scale]
    conditions = list(MODALITIES) if any_missing else upstream_conditions(target)
    return {
        "method": METHOD,
        "scale": scale,
        "network": {
            "in_channels": _in_channels(conditions, any_missing),
            "out_channels": SUBBANDS_PER_IMAGE,
            **network,
            "dropout": 0.0,
            "resblock_updown": True,
            "use_scale_shift_norm": False,
        },
        "schedule": {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000},
        "prediction": "sample",
        "sampler": SamplerSettings(**sampler).to_dict(),
        "image_size": list(image_size),
        **({"spacing_mm": [5.0, 5.0, 5.0]} if scale == "demo" else {}),
        "intensity": {"percentiles": [0.1, 99.9], "range": [0.0, 1.0]},
        "modalities": list(MODALITIES),
        "any_missing": any_missing,
        "target": None if any_missing else target,
        "conditions": conditions,
    }


def _check_config(config: Mapping[str, Any]) -> None:
    conditions = list(config.get("conditions") or [])
    if config.get("any_missing"):
        if conditions != list(config.get("modalities") or []) or len(conditions) < 2:
            raise InputError("cWDM config", "any_missing needs 'conditions' equal to the (at least two) 'modalities'")
    elif config.get("target") in conditions or not conditions:
        raise InputError("cWDM config", f"target {config.get('target')!r} with conditions {conditions} is not valid")
    expected = _in_channels(conditions, bool(config.get("any_missing")))
    got = config["network"].get("in_channels")
    if got != expected:
        raise InputError(
            "cWDM config", f"network.in_channels is {got} but {len(conditions)} conditions need {expected}"
        )


@dataclass(frozen=True)
class WaveletUNetConfig(MethodConfig):
    """The arguments of :class:`WaveletUNet` (see there for what each means)."""

    in_channels: int
    out_channels: int = 8
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    num_res_blocks: int = 2
    num_groups: int = 32
    dropout: float = 0.0
    resblock_updown: bool = True
    use_scale_shift_norm: bool = False


@dataclass(frozen=True)
class CWDMConfig(MethodConfig):
    """cWDM's configuration, as the model card stores it under ``config``.

    Attributes:
        method, scale: the method's name and the scale the config was made at (records).
        network: the wavelet U-Net.
        schedule: the noise schedule (``Schedule.from_config``).
        prediction: what the network predicts (x0 upstream).
        sampler: default sampler settings (``SamplerSettings`` fields).
        image_size: the model grid (voxels); spacing_mm: its voxel size, if fixed.
        intensity: the intensity normalisation (``percentiles`` clipped, min-max to ``range``).
        modalities: the contrasts the model knows.
        any_missing: one network for whichever contrast is missing (``target`` then None).
        target: the contrast synthesised.
        conditions: the contrasts it is synthesised from, in channel order.
        preprocessing: "brats" for upstream checkpoints (upstream's own BraTS pipeline).
    """

    network: WaveletUNetConfig = nested(WaveletUNetConfig)
    schedule: dict[str, Any] = field(default_factory=dict)
    prediction: Prediction = Prediction.SAMPLE
    sampler: dict[str, Any] = field(default_factory=dict)
    image_size: list[int] = field(default_factory=list)
    intensity: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    any_missing: bool = False
    target: str | None = None
    conditions: list[str] = field(default_factory=list)
    method: str | None = optional()
    scale: str | None = optional()
    spacing_mm: list[float] | None = optional()
    preprocessing: str | None = optional()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))


CONFIG = CWDMConfig


def build(config: CWDMConfig | Mapping[str, Any]) -> WaveletUNet:
    """The cWDM network for ``config`` (all learned parts of the method)."""
    cfg = CWDMConfig.from_dict(config)
    _check_config(cfg.to_dict())
    return WaveletUNet(**cfg.network.to_dict())


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_images(images: torch.Tensor, what: str, count: int, config: Mapping[str, Any]) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or not images.is_floating_point():
        raise InputError(what, "expected a floating-point (N, C, D, H, W) tensor")
    size = list(config["image_size"])
    if images.shape[1] != count or list(images.shape[2:]) != size:
        raise InputError(what, f"shape {tuple(images.shape)} does not match (N, {count}, {', '.join(map(str, size))})")


def _check_mask(mask: torch.Tensor | None, n: int, config: Mapping[str, Any]) -> torch.Tensor:
    names = config["conditions"]
    if mask is None:
        raise InputError("availability mask", f"any_missing needs a mask (N, {len(names)}) over {names}")
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != (n, len(names)):
        raise InputError("availability mask", f"shape {tuple(mask.shape)} is not (N={n}, {len(names)})")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("availability mask", "values must be 1 (available) or 0 (missing)")
    missing = (mask == 0).sum(dim=1)
    if not bool((missing == 1).all()):
        rows = [int(i) for i in torch.nonzero(missing != 1).flatten()]
        raise InputError("availability mask", f"exactly one modality must be missing per case (rows {rows} are not)")
    return mask.float()


def condition_channels(
    conditions: torch.Tensor, config: Mapping[str, Any], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The condition input of the network, computed once per sample.

    Args:
        conditions: (N, n_cond, D, H, W) images in [0, 1] on the model grid.
        mask: (N, n_cond) availability (any_missing mode only), exactly one 0 per row.

    Returns:
        (N, 8 * n_cond [+ n_cond], D/2, H/2, W/2): the cWDM subbands of each image in turn
        (missing image zeroed), then the availability maps in any_missing mode.
    """
    names = config["conditions"]
    _check_images(conditions, "conditions", len(names), config)
    if not config.get("any_missing"):
        if mask is not None:
            raise InputError("availability mask", "a mask is only used by an any_missing model")
        return to_wavelet(conditions)
    mask = _check_mask(mask, conditions.shape[0], config).to(conditions.device, conditions.dtype)
    coeffs = to_wavelet(conditions * mask[:, :, None, None, None])
    maps = mask[:, :, None, None, None].expand(-1, -1, *coeffs.shape[2:])
    return torch.cat([coeffs, maps], dim=1)


def clip_in_image_space(x0: torch.Tensor) -> torch.Tensor:
    """Upstream clipping of a predicted x0: IDWT, clamp to [0, 1], DWT (with the LLL/3 convention)."""
    return to_wavelet(from_wavelet(x0).clamp(0.0, 1.0))


def loss(model: nn.Module, batch: dict, config: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between predicted and true subbands of x0 at a uniform random step (upstream ``mse_wav``).

    Args:
        batch: ``"target"`` (N, 1, D, H, W) and ``"conditions"`` (N, n_cond, D, H, W), in [0, 1].
            In any_missing mode ``"conditions"`` holds all modalities; ``"mask"`` (N, n_cond)
            marks the missing one (drawn uniformly per case when absent) and ``"target"``
            defaults to the masked-out image.
        generator: CPU generator for the step, the noise and any drawn mask.
    """
    device = _device_of(model)
    schedule = Schedule.from_config(config["schedule"])
    conditions = batch["conditions"].to(device)
    mask = batch.get("mask")
    target = batch.get("target")
    if config.get("any_missing"):
        n, m = conditions.shape[:2]
        if mask is None:
            missing = torch.randint(0, m, (n,), generator=generator)
            mask = torch.ones(n, m).index_put_((torch.arange(n), missing), torch.zeros(n))
        mask = _check_mask(mask, n, config)
        if target is None:
            target = conditions[torch.arange(n, device=device), mask.argmin(dim=1).to(device)].unsqueeze(1)
    if target is None:
        raise InputError("training batch", "a 'target' image (N, 1, D, H, W) is needed")
    _check_images(target, "target", 1, config)
    x0 = to_wavelet(target.to(device))
    cond = condition_channels(conditions, config, mask)
    t = schedule.random_steps(x0.shape[0], generator, device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    prediction = model(torch.cat([schedule.q_sample(x0, t, noise), cond], dim=1), t)
    return F.mse_loss(prediction, schedule.training_target(config["prediction"], x0, noise, t))


def synthesize(
    model: nn.Module,
    conditions: torch.Tensor,
    *,
    config: dict,
    settings: SamplerSettings | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SampleOutput:
    """Synthesise the missing contrast (paper Algorithm 1) with the shared sampler.

    The condition subbands are computed once; the engine samples the 8 target subbands with
    every predicted x0 clipped in image space. The result and captured intermediates are
    returned in image space. The model is moved to ``device`` (default: where it is) and
    put in eval mode.

    Args:
        conditions: (N, n_cond, D, H, W) in [0, 1] on the model grid (``config["image_size"]``),
            in the order of ``config["conditions"]``; any_missing: all modalities (the missing
            one may hold anything, it is zeroed).
        mask: (N, n_cond), any_missing only: 1 available, 0 missing, exactly one 0 per row.
        settings: sampler settings (default: ``config["sampler"]``, upstream 1000-step DDPM).

    Returns:
        SampleOutput with ``sample`` (N, 1, D, H, W) float32 in [0, 1] and intermediates whose
        ``x_t`` and ``x0`` are images (N, 1, D, H, W).
    """
    device = torch.device(device) if device is not None else _device_of(model)
    prepare_network(model, device)
    settings = settings or SamplerSettings.from_dict(config["sampler"])
    cond = condition_channels(conditions.float(), config, mask)
    shape = (conditions.shape[0], SUBBANDS_PER_IMAGE, *cond.shape[2:])

    def denoiser(x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model(torch.cat([x_t, c.to(x_t.dtype)], dim=1), t)

    out = sample(
        denoiser,
        shape,
        Schedule.from_config(config["schedule"]),
        config["prediction"],
        settings,
        cond=cond,
        clip_x0=clip_in_image_space,
        generator=generator,
        device=device,
        progress=progress,
        cancel=cancel,
        stage="synthesize",
    )
    return dataclasses.replace(
        out,
        sample=from_wavelet(out.sample).clamp(0.0, 1.0),
        intermediates=[
            dataclasses.replace(i, x_t=from_wavelet(i.x_t), x0=from_wavelet(i.x0)) for i in out.intermediates
        ],
    )


# --------------------------------------------------------------------------------------
# Published checkpoints
# --------------------------------------------------------------------------------------
def import_upstream_checkpoint(path: str | os.PathLike, config: dict | None = None) -> tuple[WaveletUNet, dict]:
    """Load an upstream cWDM checkpoint (e.g. huggingface pfriedri/cwdm ``t2_gen.pt``).

    The file is read with ``torch.load(weights_only=True)``; a bare state dict or one nested
    under ``"state_dict"`` / ``"model"`` is accepted and a ``"module."`` prefix stripped.
    Every key and shape must match the network of ``config`` (default: the paper config,
    with the target taken from the upstream file name when it is one of the four).

    Returns:
        The model (CPU, eval mode) and a report: path, target, tensors, parameters,
        nested_under, prefix_stripped, target_source.

    Raises:
        InputError(path, ...): unreadable file, or missing / unexpected / mis-shaped keys.
    """
    name = os.path.basename(os.fspath(path))
    if config is None:
        target = UPSTREAM_CHECKPOINTS.get(name)
        source = "file name" if target else "default (file name not recognised)"
        # Upstream weights learnt BraTS arrays as stored: tasks must use the BraTS pre- and
        # post-processing, not a resampling grid.
        config = {**default_config("paper", target=target or "T1w"), "preprocessing": "brats"}
    else:
        source = "config"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and I/O errors all mean "cannot use this file"
        raise InputError(path, f"not a readable weights-only PyTorch checkpoint ({exc})") from exc
    nested = None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state, nested = state[key], key
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    stripped = bool(state) and all(str(k).startswith("module.") for k in state)
    if stripped:
        state = {k[len("module.") :]: v for k, v in state.items()}

    model = build(config)
    net = config["network"]
    check_weights(
        model.state_dict(),
        state,
        path,
        f"does not match the cWDM U-Net (in_channels={net['in_channels']}, "
        f"model_channels={net['model_channels']}, channel_mult={net['channel_mult']})",
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    report = {
        "path": os.fspath(path),
        "target": config.get("target"),
        "target_source": source,
        "tensors": len(state),
        "parameters": sum(p.numel() for p in model.parameters()),
        "nested_under": nested,
        "prefix_stripped": stripped,
        "config": config,
    }
    return model, report


# --------------------------------------------------------------------------------------
# BraTS pre- and post-processing (upstream bratsloader.py / sample_auto.py)
# --------------------------------------------------------------------------------------
def normalise_percentiles(volume: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray:
    """Clip at the ``low`` / ``high`` percentiles and min-max scale to [0, 1] (float32).

    A volume that is constant after clipping maps to zeros.
    """
    v = np.asarray(volume, dtype=np.float64)
    lo, hi = np.percentile(v, [low, high])
    v = np.clip(v, lo, hi)
    span = v.max() - v.min()
    return ((v - v.min()) / span if span > 0 else np.zeros_like(v)).astype(np.float32)


def preprocess_brats(volume: np.ndarray) -> tuple[np.ndarray, dict]:
    """A BraTS volume (240, 240, 155) -> the cWDM grid (224, 224, 160) in [0, 1], plus a record.

    Percentile normalisation, zero-pad the last axis from 155 to 160 at its end, crop 8
    voxels from both ends of the first two axes. Array axes are kept as stored (nibabel
    order), the first being the network's D axis, as upstream.
    """
    volume = np.asarray(volume)
    if volume.shape != BRATS_SHAPE:
        raise InputError("BraTS volume", f"shape {volume.shape} is not {BRATS_SHAPE}")
    lo, hi = np.percentile(volume.astype(np.float64), [0.1, 99.9])
    padded = np.zeros(BRATS_SHAPE[:2] + (BRATS_GRID[2],), dtype=np.float32)
    padded[..., : BRATS_SHAPE[2]] = normalise_percentiles(volume)
    c = BRATS_CROP
    record = {
        "input_shape": list(BRATS_SHAPE),
        "crop": c,
        "depth_pad": BRATS_GRID[2] - BRATS_SHAPE[2],
        "percentiles": [0.1, 99.9],
        "clip_values": [float(lo), float(hi)],
    }
    return padded[c:-c, c:-c, :], record


def postprocess_brats(array: np.ndarray, record: Mapping[str, Any]) -> np.ndarray:
    """Back from the cWDM grid: values <= 0.04 become 0, pad in-plane, drop the depth padding.

    Args:
        array: (224, 224, 160) synthesised image in [0, 1].
        record: the record of :func:`preprocess_brats`.

    Returns:
        (240, 240, 155) float32.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.shape != BRATS_GRID:
        raise InputError("cWDM output", f"shape {array.shape} is not {BRATS_GRID}")
    c = int(record["crop"])
    out = np.where(array <= BACKGROUND_THRESHOLD, 0.0, array).astype(np.float32)
    out = np.pad(out, ((c, c), (c, c), (0, 0)))
    return out[..., : record["input_shape"][2]]
