"""DDM: the diffusion deformable model for frames between two scans (Kim & Ye, MICCAI 2022;
upstream code torchDDM/DDM @1d3a92b, read but not copied;
see docs/methods.md).

Two modules trained end to end (paper sec. 2.1, Fig. 1):

* the **diffusion module** ``denoise_fn`` (:class:`DiffusionUNet`, an SR3-style U-Net, upstream
  ``model/ddpm_modules/unet.py``) reads ``[S, T, x_t]`` and the step t and outputs the latent
  code c, trained as an eps predictor on the perturbed target x_t (eqs. 3 and 5);
* the **deformation module** ``field_fn`` (:class:`RegistrationUNet`, VoxelMorph-1 style,
  upstream ``model/my_voxelmorph.py``) reads ``[S, c]`` and outputs a displacement field in
  voxels, channel order (D, H, W), which warps S with trilinear interpolation (MONAI ``Warp``).

Training (:func:`loss`, eqs. 4-6 and upstream ``p_losses``):
``L = MSE(c, eps) + lambda * (-LNCC(S(phi), T) + lambda_R * smoothness(phi))`` with lambda = 20
(sec. 3) and lambda_R = 1 (sec. 2.2: "We set lambda_R = 1"). Upstream multiplies both
deformation terms by ``loss_lambda`` = 20, which is the same thing. The LNCC is the squared
local NCC over 9^3 windows; the smoothness is the mean squared forward difference of the field.

Inference (:func:`interpolate`, sec. 2.3, eqs. 7-8): ONE pass of the diffusion module at t = 0
with x_t = T gives c; each frame is S warped by ``field_fn([S, gamma * c])``. There is no reverse
chain, hence no engine sampler (``config["sampler"]`` is None).

Intensities are in [-1, 1] (sec. 3, ``config["normalisation"] == "minmax_pm1"``). Images are
warped in [0, 1] as upstream does (it warps ``(S + 1) / 2``), so voxels pulled from outside the
field of view become the background rather than mid-grey; the LNCC compares the [0, 1] images,
exactly as upstream (it is invariant to this affine map up to its epsilon). Choice: the frames
are then mapped back to [-1, 1], the model's range; upstream never maps them back (its frames
stay in [0, 1]).

Checkpoints of the upstream code load with :func:`import_upstream_checkpoint`; the module names
here follow upstream's where they are readable, and :data:`UPSTREAM_KEY_RULES` maps the rest.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from torch import nn

from ..diffusion import Schedule, prepare_network
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, Stage
from . import check_weights
from .config import MethodConfig, Prediction, nested
from .layers import sinusoidal_embedding

METHOD = "ddm"
TASK = "interpolate"


# -- the diffusion module: an SR3-style U-Net -----------------------------------------------------
class ConvBlock(nn.Module):
    """GroupNorm -> SiLU -> Dropout -> 3x3x3 conv (SR3's ``Block``; Swish is SiLU)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, in_channels)
        self.drop = nn.Dropout(dropout)
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(F.silu(self.norm(x))))


class LinearAttention(nn.Module):
    """Residual linear attention over all voxels (upstream ``SelfAttention``, despite its name).

    Per head: keys are soft-maxed over the voxels, ``context = k v^T`` and ``out = context^T q``;
    queries are not normalised or scaled (as upstream). Channels split as (q|k|v, head, dim).
    """

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, -1).unbind(1)
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(x.shape)
        return self.out(out) + x


class ResBlock(nn.Module):
    """Two :class:`ConvBlock` with the step embedding added between them, a residual path and
    optional :class:`LinearAttention` after it (SR3's ``ResnetBlocWithAttn``, flattened)."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float, heads: int = 0
    ) -> None:
        super().__init__()
        self.time_proj = nn.Linear(emb_dim, out_channels)
        self.block1 = ConvBlock(in_channels, out_channels, groups)
        self.block2 = ConvBlock(out_channels, out_channels, groups, dropout)
        self.res_conv = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attn = LinearAttention(out_channels, heads, groups) if heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.time_proj(F.silu(emb))[:, :, None, None, None]
        h = self.block2(h) + self.res_conv(x)
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DiffusionUNet(nn.Module):
    """The diffusion module (paper sec. 3 "the network designed in DDPM ... 8, 16, 32, and 32
    channels"; upstream ``UNet`` with inner_channel 8, channel_multiplier (1, 2, 4, 4),
    res_blocks 1, GroupNorm(4)).

    Layout (SR3): ``downs`` = [input conv, then per level ``res_blocks`` :class:`ResBlock` and a
    strided-conv :class:`Downsample` except at the last level]; ``mid`` = [ResBlock with 4-head
    :class:`LinearAttention`, ResBlock]; ``ups`` = per level (deepest first) ``res_blocks + 1``
    ResBlocks each reading the concatenated skip, and a nearest :class:`Upsample` except at the
    top; ``final_conv`` a :class:`ConvBlock` to ``out_channels``. Every saved activation of
    ``downs`` is a skip. The step embedding is the sinusoid of the integer step (sin half first,
    as upstream) through Linear(c, 4c) - SiLU - Linear(4c, c).

    Choice: attention in the middle block only. Upstream's ``attn_res [10]`` never equals a level
    size (128, 64, 32, 16), so its level attention is dead configuration and is not offered here.
    Spatial sizes must be multiples of 2 ** (levels - 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        inner_channel: int = 8,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        res_blocks: int = 1,
        norm_groups: int = 4,
        attention_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [inner_channel * m for m in channel_mults]
        if any(w % norm_groups for w in [inner_channel, *widths]):
            raise ValueError(f"every width {[inner_channel, *widths]} must be divisible by norm_groups={norm_groups}")
        self.inner_channel = inner_channel
        self.factor = 2 ** (len(widths) - 1)
        emb, g = inner_channel, norm_groups
        self.time_mlp = nn.Sequential(nn.Linear(emb, 4 * emb), nn.SiLU(), nn.Linear(4 * emb, emb))

        downs: list[nn.Module] = [nn.Conv3d(in_channels, inner_channel, 3, padding=1)]
        skips, width = [inner_channel], inner_channel
        for level, out in enumerate(widths):
            for _ in range(res_blocks):
                downs.append(ResBlock(width, out, emb, g, dropout))
                width = out
                skips.append(width)
            if level < len(widths) - 1:
                downs.append(Downsample(width))
                skips.append(width)
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList(
            [ResBlock(width, width, emb, g, dropout, heads=attention_heads), ResBlock(width, width, emb, g, dropout)]
        )
        ups: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(res_blocks + 1):
                ups.append(ResBlock(width + skips.pop(), widths[level], emb, g, dropout))
                width = widths[level]
            if level > 0:
                ups.append(Upsample(width))
        self.ups = nn.ModuleList(ups)
        self.final_conv = ConvBlock(width, out_channels, g)

    def step_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) steps -> (N, inner_channel): [sin, cos] of t * 10000^(-2k/dim) (upstream order)."""
        cos_sin = sinusoidal_embedding(t, self.inner_channel)
        half = self.inner_channel // 2
        return torch.cat([cos_sin[:, half:], cos_sin[:, :half]], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C_in, D, H, W); t: (N,) integer steps. Returns (N, C_out, D, H, W)."""
        emb = self.time_mlp(self.step_embedding(t))
        skips = []
        for layer in self.downs:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
            skips.append(x)
        for layer in self.mid:
            x = layer(x, emb)
        for layer in self.ups:
            x = layer(torch.cat([x, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(x)
        return self.final_conv(x)


# -- the deformation module: a VoxelMorph-1 style registration U-Net -----------------------------
class ConvAct(nn.Module):
    """3x3x3 conv (stride 1 or 2) -> LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.2)


class UpBlock(nn.Module):
    """Transposed conv (x2, same channels), concatenate [skip, up], then conv -> LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upconv = nn.ConvTranspose3d(in_channels, in_channels, 3, stride=2, padding=1, output_padding=1)
        self.conv = nn.Conv3d(in_channels + skip_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(torch.cat([skip, self.upconv(x)], dim=1)), 0.2)


class RegistrationUNet(nn.Module):
    """The deformation module (paper sec. 2.1 and sec. 3 "the architecture of VoxelMorph-1";
    upstream ``registUnetBlock`` with encoder (16, 32, 32, 32, 32), decoder (32, 32, 32, 8, 8, 3)).

    ``inconv`` and four stride-2 ``downconv1..4``; ``upconv1..3`` back to half resolution, a
    ``keepblock`` conv, ``upconv4`` to full resolution, and a linear ``outconv`` giving the
    displacement in voxels, channels (D, H, W). Not diffeomorphic (as upstream). MONAI's
    ``VoxelMorphUNet`` lays its decoder out differently, so upstream weights would not fit it.
    Spatial sizes must be multiples of 16.
    """

    def __init__(
        self,
        in_channels: int = 2,
        encoder_channels: Sequence[int] = (16, 32, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 8, 8, 3),
    ) -> None:
        super().__init__()
        e, d = list(encoder_channels), list(decoder_channels)
        if len(e) != 5 or len(d) != 6 or d[-1] != 3:
            raise ValueError(f"need 5 encoder and 6 decoder widths ending in 3, got {e} and {d}")
        self.factor = 16
        self.inconv = ConvAct(in_channels, e[0])
        self.downconv1 = ConvAct(e[0], e[1], stride=2)
        self.downconv2 = ConvAct(e[1], e[2], stride=2)
        self.downconv3 = ConvAct(e[2], e[3], stride=2)
        self.downconv4 = ConvAct(e[3], e[4], stride=2)
        self.upconv1 = UpBlock(e[4], e[3], d[0])
        self.upconv2 = UpBlock(d[0], e[2], d[1])
        self.upconv3 = UpBlock(d[1], e[1], d[2])
        self.keepblock = ConvAct(d[2], d[3])
        self.upconv4 = UpBlock(d[3], e[0], d[4])
        self.outconv = nn.Conv3d(d[4], d[5], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, 2, D, H, W) = [S, code]. Returns the displacement (N, 3, D, H, W) in voxels."""
        x1 = self.inconv(x)
        x2 = self.downconv1(x1)
        x3 = self.downconv2(x2)
        x4 = self.downconv3(x3)
        y = self.upconv1(self.downconv4(x4), x4)
        y = self.upconv3(self.upconv2(y, x3), x2)
        return self.outconv(self.upconv4(self.keepblock(y), x1))


def _warp(warper: Warp, image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    # MONAI's Warp caches its reference grid by shape only; drop it when device or dtype changed.
    grid = warper.ref_grid
    if grid is not None and (grid.device != field.device or grid.dtype != field.dtype):
        warper.ref_grid = None
    return warper(image, field)


class DDM(nn.Module):
    """Every learned part of DDM: ``denoise_fn`` and ``field_fn`` (upstream's names, so the
    state dict keys start as in upstream checkpoints). The two ``Warp`` blocks hold no weights."""

    def __init__(self, denoise_fn: DiffusionUNet, field_fn: RegistrationUNet) -> None:
        super().__init__()
        self.denoise_fn = denoise_fn
        self.field_fn = field_fn
        with warnings.catch_warnings():  # MONAI announces its choice of PyTorch's grid_sample: not news to a user
            warnings.filterwarnings("ignore", message=".*native grid_sample", category=UserWarning)
            self.warp_image = Warp(mode="bilinear", padding_mode="zeros")
            self.warp_labels = Warp(mode="nearest", padding_mode="zeros")

    @property
    def factor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return max(self.denoise_fn.factor, self.field_fn.factor)

    def code(self, source: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latent code c = G_diffuse(x_t, t; S, T), (N, 1, D, H, W) (eq. 5)."""
        return self.denoise_fn(torch.cat([source, target, x_t], dim=1), t)

    def field(self, source: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """The displacement phi = G_deform(S, c), (N, 3, D, H, W) voxels, (D, H, W) order (eq. 8)."""
        return self.field_fn(torch.cat([source, code], dim=1))

    def warp_unit(self, image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """``(image + 1) / 2`` warped trilinearly, zero outside: the [0, 1] image upstream scores."""
        return _warp(self.warp_image, (image + 1) / 2, field)

    def warp(self, image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """A [-1, 1] image warped by ``field``; outside the field of view becomes -1."""
        return 2 * self.warp_unit(image, field) - 1

    def warp_label_map(self, labels: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """An integer label map warped with nearest-neighbour sampling (0 outside), as long."""
        return _warp(self.warp_labels, labels.to(field.dtype), field).round().long()


# -- the method contract ---------------------------------------------------------------------------
def default_config(scale: str = "paper") -> dict:
    """The method's configuration at ``scale`` in {"paper", "demo", "tiny"}.

    "paper": upstream ``config/DDM_train.json`` (networks above, linear beta 1e-6..1e-2 over 2000
    steps, lambda 20, Adam 2e-4, batch 1, 800 epochs) on the ACDC grid 128x128x32 at
    1.5x1.5x3.15 mm, stored on the model grid's (I, J, K) = (R, A, S) axes as 128x128x32 with
    the slices along K (the networks are fully convolutional: the axis order only places the
    grid). "demo" keeps the
    paper's networks (they are small, as upstream's) on a 32^3 grid at 4 mm (Choice: the heart
    phantom fits, and a training step takes about 0.5 s on 2 CPU cores); "tiny" (100 steps)
    is for tests. What each scale builds (Testing/test_configs.py checks these lines):

    - paper: 128x128x32; 1.08 M parameters
    - demo: 4 mm 32x32x32; 1.08 M parameters
    - tiny: 4 mm 16x16x16; 0.2 M parameters
    ``num_frames`` (Choice: 8) is the default number of gammas, evenly spaced in [0, 1].
    """
    denoiser = {"in_channels": 3, "out_channels": 1, "inner_channel": 8, "channel_mults": [1, 2, 4, 4],
                "res_blocks": 1, "norm_groups": 4, "attention_heads": 4, "dropout": 0.0}  # fmt: skip
    field = {"in_channels": 2, "encoder_channels": [16, 32, 32, 32, 32], "decoder_channels": [32, 32, 32, 8, 8, 3]}
    steps = 2000
    if scale == "paper":
        size, spacing = [128, 128, 32], [1.5, 1.5, 3.15]
    elif scale == "demo":
        size, spacing = [32, 32, 32], [4.0, 4.0, 4.0]
    elif scale == "tiny":
        denoiser["inner_channel"] = 4
        field = {"in_channels": 2, "encoder_channels": [4, 8, 8, 8, 8], "decoder_channels": [8, 8, 8, 4, 4, 3]}
        size, spacing, steps = [16, 16, 16], [4.0, 4.0, 4.0], 100
    else:
        raise ValueError(f"unknown scale '{scale}' (expected paper, demo or tiny)")
    return {
        "network": {"denoiser": denoiser, "field": field},
        "schedule": {"kind": "linear", "beta_start": 1e-6, "beta_end": 1e-2, "num_steps": steps},
        "prediction": "epsilon",
        "sampler": None,
        "image_size": size,
        "spacing_mm": spacing,
        "normalisation": "minmax_pm1",
        "intensity_range": [-1.0, 1.0],
        "loss": {"lambda": 20.0, "lambda_R": 1.0, "ncc_window": 9},
        "num_frames": 8,
        "optimizer": {"name": "adam", "lr": 2e-4, "batch_size": 1, "epochs": 800},
    }


def _init_weights(model: DDM) -> None:
    """Upstream's training init: orthogonal conv/linear weights in the diffusion module, N(0, 0.02)
    in the deformation module (small initial fields), zero biases; norms keep their defaults."""

    def small_normal(w: torch.Tensor) -> None:
        nn.init.normal_(w, 0.0, 0.02)

    for part, init in ((model.denoise_fn, nn.init.orthogonal_), (model.field_fn, small_normal)):
        for m in part.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class DenoiserConfig(MethodConfig):
    """The diffusion module (:class:`DiffusionUNet`, upstream's SR3-style U-Net)."""

    in_channels: int = 3
    out_channels: int = 1
    inner_channel: int = 8
    channel_mults: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 4])
    res_blocks: int = 1
    norm_groups: int = 4
    attention_heads: int = 4
    dropout: float = 0.0


@dataclass(frozen=True)
class FieldConfig(MethodConfig):
    """The deformation module (:class:`RegistrationUNet`): encoder and decoder widths."""

    in_channels: int = 2
    encoder_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 32, 32, 32])
    decoder_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 32, 32, 8, 8, 3])


@dataclass(frozen=True)
class DDMNetworks(MethodConfig):
    """The diffusion module and the deformation module."""

    denoiser: DenoiserConfig = nested(DenoiserConfig)
    field: FieldConfig = nested(FieldConfig)


@dataclass(frozen=True)
class DDMConfig(MethodConfig):
    """DDM's configuration, as the model card stores it under ``config``.

    Attributes:
        network: the diffusion and deformation modules.
        schedule: the noise schedule (``Schedule.from_config``).
        prediction: what the diffusion module predicts (eps).
        sampler: None (DDM samples no chain: one pass at t = 0 gives the code).
        image_size, spacing_mm: the model grid and its voxel size.
        normalisation: how intensities are scaled ("minmax_pm1": min-max to [-1, 1]).
        intensity_range: the model's intensities.
        loss: training loss weights (lambda, lambda_R) and the NCC window.
        num_frames: the default number of frames (gammas evenly spaced in [0, 1]).
        optimizer: training optimizer (name, lr, batch_size, epochs).
    """

    network: DDMNetworks = nested(DDMNetworks)
    schedule: dict[str, Any] = dataclasses.field(default_factory=dict)
    prediction: Prediction = Prediction.EPSILON
    sampler: dict[str, Any] | None = None
    image_size: list[int] = dataclasses.field(default_factory=list)
    spacing_mm: list[float] = dataclasses.field(default_factory=list)
    normalisation: str = "minmax_pm1"
    intensity_range: list[float] = dataclasses.field(default_factory=lambda: [-1.0, 1.0])
    loss: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_frames: int = 8
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))


CONFIG = DDMConfig


def build(config: DDMConfig | Mapping[str, Any]) -> DDM:
    """The model described by ``config.network``, initialised as upstream trains it."""
    net = DDMConfig.from_dict(config).network
    model = DDM(DiffusionUNet(**net.denoiser.to_dict()), RegistrationUNet(**net.field.to_dict()))
    _init_weights(model)
    return model


def smoothness(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a (N, 3, D, H, W) field along D, H and W, averaged over
    the three axes (upstream ``gradientLoss("l2")``; MONAI's DiffusionLoss uses central ones)."""
    dd = field[:, :, 1:] - field[:, :, :-1]
    dh = field[:, :, :, 1:] - field[:, :, :, :-1]
    dw = field[..., 1:] - field[..., :-1]
    return (dd.square().mean() + dh.square().mean() + dw.square().mean()) / 3


def _check_volume(name: str, x: torch.Tensor, factor: int) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise InputError(name, f"expected a (N, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
    if any(s % factor for s in x.shape[2:]):
        raise InputError(name, f"spatial size {tuple(x.shape[2:])} must be a multiple of {factor} for this network")


def loss(
    model: DDM,
    batch: dict,
    config: dict,
    generator: torch.Generator | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DDM training loss (eqs. 4-6): ``diffuse + lambda * (ncc + lambda_R * smooth)``.

    ``diffuse`` is the MSE between the code and the noise at a uniform random step (eq. 5;
    upstream ``l_pix``, an L2 sum over voxels divided by their number); ``ncc`` is MONAI's
    ``LocalNormalizedCrossCorrelationLoss`` (squared local NCC, negated, ``ncc_window``^3
    rectangular windows) between ``(S + 1) / 2`` warped by ``field_fn([S, c])`` and ``(T + 1) / 2``;
    ``smooth`` is :func:`smoothness` of the field.

    Args:
        batch: ``{"source", "target"}``, (N, 1, D, H, W) in [-1, 1].
        generator: CPU generator for the steps and noise (reproducible losses).
        return_parts: also return ``{"diffuse", "ncc", "smooth", "total"}`` (detached).
    """
    source, target = batch["source"], batch["target"]
    _check_volume("source", source, model.factor)
    if target.shape != source.shape:
        raise InputError("target", f"shape {tuple(target.shape)} differs from the source's {tuple(source.shape)}")
    weights = config["loss"]
    schedule = Schedule.from_config(config["schedule"])
    t = schedule.random_steps(target.shape[0], generator=generator, device=target.device)
    noise = torch.randn(target.shape, generator=generator).to(target.device, target.dtype)
    code = model.code(source, target, schedule.q_sample(target, t, noise), t)
    field = model.field(source, code)
    ncc_loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=int(weights["ncc_window"]))
    parts = {
        "diffuse": F.mse_loss(code, noise),
        "ncc": ncc_loss(model.warp_unit(source, field), (target + 1) / 2),
        "smooth": smoothness(field),
    }
    total = parts["diffuse"] + weights["lambda"] * (parts["ncc"] + weights["lambda_R"] * parts["smooth"])
    if not return_parts:
        return total
    return total, {**{k: v.detach() for k, v in parts.items()}, "total": total.detach()}


# -- inference --------------------------------------------------------------------------------------
@dataclass
class DDMFrames:
    """Result of :func:`interpolate` (CPU tensors, one row per gamma).

    Attributes:
        frames: (G, 1, D, H, W) float32 warped sources in [-1, 1].
        fields: (G, 3, D, H, W) float32 displacements in voxels, channels (D, H, W).
        labels: (G, 1, D, H, W) long warped source labels, or None.
        gammas: (G,) float32 code scales.
        code: (1, 1, D, H, W) float32 latent code c.
    """

    frames: torch.Tensor
    fields: torch.Tensor
    labels: torch.Tensor | None
    gammas: torch.Tensor
    code: torch.Tensor


def _as_volume(name: str, x: torch.Tensor, factor: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim in (3, 4, 5) and all(s == 1 for s in x.shape[: x.ndim - 3]):
        x = x.reshape(1, 1, *x.shape[-3:])
    _check_volume(name, x, factor)
    return x


def interpolate(
    model: DDM,
    source: torch.Tensor,
    target: torch.Tensor,
    gammas: Sequence[float] | torch.Tensor | None = None,
    *,
    config: dict,
    source_labels: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> DDMFrames:
    """Frames from ``source`` towards ``target`` (paper sec. 2.3, eqs. 7-8; upstream ``p_sample_loop``).

    The code c comes from one diffusion-module pass at t = 0 with x_t = T; frame g is the source
    warped by ``field_fn([S, gamma_g * c])`` (the source's labels likewise, nearest-neighbour).
    Progress: stage "interpolate", ``len(gammas)`` steps (one event at start, one per frame);
    ``cancel`` is honoured between frames. Runs in float32 (no autocast: the network is small).

    Args:
        source, target: one volume each on the model grid, (D, H, W), (1, D, H, W) or
            (1, 1, D, H, W), intensities in [-1, 1].
        gammas: code scales in [0, 1] (default: ``config["num_frames"]`` evenly spaced).
        source_labels: optional integer label map of the source, same grid.
        device: where to run (the model is moved there); default: the model's device.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    source = _as_volume("source", source, model.factor)
    target = _as_volume("target", target, model.factor)
    if target.shape != source.shape:
        raise InputError("target", f"shape {tuple(target.shape[2:])} differs from the source's")
    labels = None if source_labels is None else _as_volume("source_labels", source_labels, model.factor)
    if labels is not None:
        if labels.shape != source.shape:
            raise InputError("source_labels", f"shape {tuple(labels.shape[2:])} differs from the source's")
        if labels.is_floating_point() and bool((labels != labels.round()).any()):
            raise InputError("source_labels", "must hold integer labels")
    if gammas is None:
        gammas = torch.linspace(0, 1, int(config.get("num_frames", 8)))
    gammas = torch.as_tensor(gammas, dtype=torch.float32).reshape(-1)
    if gammas.numel() < 1 or not bool(torch.isfinite(gammas).all()):
        raise InputError("gammas", f"expected one or more finite code scales, got {gammas.tolist()}")

    stage = Stage("interpolate", gammas.numel(), progress, cancel).start()
    was_training = model.training
    prepare_network(model, device)
    s, t = source.to(device, torch.float32), target.to(device, torch.float32)
    frames, fields, warped_labels = [], [], []
    try:
        with torch.no_grad():
            code = model.code(s, t, t, torch.zeros(1, dtype=torch.long, device=device))
            for g in gammas.tolist():
                field = model.field(s, g * code)
                frames.append(model.warp(s, field).cpu())
                fields.append(field.cpu())
                if labels is not None:
                    warped_labels.append(model.warp_label_map(labels.to(device), field).cpu())
                stage.advance(message=f"gamma={g:.3f}")
    finally:
        model.train(was_training)
    warped = torch.cat(warped_labels) if labels is not None else None
    return DDMFrames(torch.cat(frames), torch.cat(fields), warped, gammas, code.cpu())


# -- upstream checkpoints ---------------------------------------------------------------------------
#: Upstream (torchDDM/DDM ``I{iter}_E{ep}_gen_G.pth``) key -> key here, one rule a line, first match
#: wins, both directions. ``{name}`` stands for one dotted segment (or part of one), ``{rest}`` for
#: everything after; keys matching no rule are the same on both sides (``downs.0`` the input conv,
#: ``downs.k.conv``/``ups.k.conv`` the down/up-sampling convs, ``*.attn.{norm,qkv,out}``,
#: ``upconvN.upconv``). Upstream wraps modules in ``nn.Sequential`` (Block = GroupNorm, Swish,
#: Identity, Conv) and in ``ResnetBlocWithAttn.res_block``; those wrappers are flattened here.
UPSTREAM_KEY_RULES: list[tuple[str, str]] = [
    ("denoise_fn.time_mlp.1.{rest}", "denoise_fn.time_mlp.0.{rest}"),
    ("denoise_fn.time_mlp.3.{rest}", "denoise_fn.time_mlp.2.{rest}"),
    ("denoise_fn.{list}.{i}.res_block.mlp.1.{rest}", "denoise_fn.{list}.{i}.time_proj.{rest}"),
    ("denoise_fn.{list}.{i}.res_block.block{j}.block.0.{rest}", "denoise_fn.{list}.{i}.block{j}.norm.{rest}"),
    ("denoise_fn.{list}.{i}.res_block.block{j}.block.3.{rest}", "denoise_fn.{list}.{i}.block{j}.conv.{rest}"),
    ("denoise_fn.{list}.{i}.res_block.res_conv.{rest}", "denoise_fn.{list}.{i}.res_conv.{rest}"),
    ("denoise_fn.final_conv.block.0.{rest}", "denoise_fn.final_conv.norm.{rest}"),
    ("denoise_fn.final_conv.block.3.{rest}", "denoise_fn.final_conv.conv.{rest}"),
    ("field_fn.keepblock.block.0.{rest}", "field_fn.keepblock.conv.{rest}"),
    ("field_fn.{module}.block.block.0.{rest}", "field_fn.{module}.conv.{rest}"),
    ("field_fn.outconv.block.{rest}", "field_fn.outconv.{rest}"),
]
#: Upstream buffers that are not weights: the step embedding's frequencies (recomputed here).
UPSTREAM_DROPPED = ("denoise_fn.time_mlp.0.inv_freq",)
#: Upstream ``GaussianDiffusion`` schedule buffers (read for the report, not loaded).
UPSTREAM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


@cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P<{part}>.+)" if part == "rest" else f"(?P<{part}>[^.]+)")
    return re.compile("".join(out) + "$")


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        match = _template_regex(pattern).match(key)
        if match:
            return replacement.format(**match.groupdict())
    return key


def upstream_to_key(key: str) -> str:
    """The key here of an upstream state-dict key."""
    return _rename(key, UPSTREAM_KEY_RULES)


def key_to_upstream(key: str) -> str:
    """The upstream key of a state-dict key here (inverse of :func:`upstream_to_key`)."""
    return _rename(key, [(ours, theirs) for theirs, ours in UPSTREAM_KEY_RULES])


def _schedule_report(buffers: Mapping[str, torch.Tensor], config: dict) -> dict[str, Any]:
    betas = buffers.get("betas")
    if betas is None:
        return {"buffers": sorted(buffers), "num_steps": None, "matches_config": None}
    betas = betas.double().flatten()
    ours = Schedule.from_config(config["schedule"]).betas
    matches = ours.numel() == betas.numel() and torch.allclose(ours, betas, rtol=1e-5, atol=1e-10)
    return {
        "buffers": sorted(buffers),
        "num_steps": int(betas.numel()),
        "beta_start": float(betas[0]),
        "beta_end": float(betas[-1]),
        "matches_config": bool(matches),
    }


def import_upstream_checkpoint(path: str | os.PathLike, config: dict | None = None) -> tuple[DDM, dict[str, Any]]:
    """Load an upstream torchDDM/DDM generator checkpoint (``*_gen_G.pth``, a plain state dict).

    Only ``denoise_fn.*`` and ``field_fn.*`` become weights (renamed by :data:`UPSTREAM_KEY_RULES`);
    the schedule buffers (``betas``, ``alphas_cumprod``, ...) are compared with
    ``config["schedule"]`` in the report; other keys are listed as ignored. Every weight here must
    come from the file with the same shape.

    Args:
        path: the ``.pth`` file; read with ``torch.load(weights_only=True)``.
        config: the configuration to build (default: ``default_config("paper")``, upstream's).

    Returns:
        ``(model, report)``; report keys: ``path``, ``loaded`` (number of tensors), ``renamed``
        (upstream -> here, for keys that differ), ``dropped``, ``ignored``, ``schedule``.

    Raises:
        InputError: unreadable file, or missing, unexpected or mis-shaped weights (named).
    """
    config = config or default_config("paper")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle is a bad input file
        raise InputError(path, f"cannot be read as a PyTorch state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "is not a state dict of tensors (expected upstream's *_gen_G.pth)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build(config)
    expected = model.state_dict()

    weights: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # key here -> upstream key
    dropped, ignored, schedule = [], [], {}
    for key, value in state.items():
        if key in UPSTREAM_DROPPED:
            dropped.append(key)
        elif key.startswith(("denoise_fn.", "field_fn.")):
            ours = upstream_to_key(key)
            weights[ours], origin[ours] = value, key
        elif key in UPSTREAM_SCHEDULE_BUFFERS:
            schedule[key] = value
        else:
            ignored.append(key)

    check_weights(
        expected,
        weights,
        path,
        "does not fit the DDM network of this config",
        show_expected=lambda k: f"{k} (upstream {key_to_upstream(k)})",
        show_given=lambda k: origin[k],
        limit=8,
    )
    model.load_state_dict(weights, strict=True)
    report = {
        "path": str(path),
        "loaded": len(weights),
        "renamed": {theirs: ours for ours, theirs in origin.items() if ours != theirs},
        "dropped": dropped,
        "ignored": ignored,
        "schedule": _schedule_report(schedule, config),
    }
    return model, report
