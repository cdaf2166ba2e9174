"""Cas-DiffCom: a cascaded diffusion model for longitudinal infant brain MRI completion
(Guo, Tao, Cai, Zhu et al., arXiv 2402.13776).

Stage 1 (``generate``, sec. 2.1, Fig. 1b) draws a low-resolution volume z0 of the subject at a
target age from a guidance image of the same subject and the two ages, with the asynchronous
multimodal (AsMM) denoiser :class:`AsMMGenerator`. Stage 2 (``refine``, sec. 2.2, Fig. 1c) is a
super-resolution diffusion model :class:`SuperResolutionRefiner` conditioned on z0 up-sampled
by a transposed convolution and concatenated with x_t. No upstream code exists (upstream
notes, sec. 1), so everything below is written from the paper; the choices where it is vague
are marked "Choice:".

Both stages predict eps (eqs. 2 and the sec. 2.2 objective) and sample with DDIM (sec. 3.2).
Schedules (sec. 3.2): generation linear beta 1e-4..5e-3 over 4000 steps; super-resolution
linear beta 1e-4..2e-2 over 1000 steps. Grids (sec. 3.1): low-res 2 mm 80x96x80, high-res
1 mm 160x192x160. Training (sec. 3.1-3.2): Adam, lr 2e-4; the guidance images (only) are
augmented by random 0-5 degree rotations about x, y and z - that belongs to the training data
pipeline, not to :func:`loss`.

Option ``"residual": true`` (the demo models; off at paper scale): each stage generates the
difference from a reference instead of the image - the generator from the guidance scan, the
refiner from the trilinear up-sampling of z0 - so minutes of CPU training go into what
changes with age and what up-sampling misses (docs/methods.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ..diffusion import Intermediate, SampleOutput, SamplerSettings, Schedule, prepare_network, residual_target, sample
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback
from .config import MethodConfig, Prediction, UNetConfig, nested, optional
from .layers import ScalarEmbedding, sinusoidal_embedding

METHOD = "cas-diffcom"
TASK = "complete-ages"
STAGES = ("generator", "refiner")
#: ages in months: one number for every sample, or one per sample
Ages = Union[float, Sequence[float], torch.Tensor]


# -- stage 1: the AsMM generator ---------------------------------------------------------------
def _groups(channels: int, groups: int) -> int:
    """The largest group count <= ``groups`` that divides ``channels`` (GroupNorm needs one)."""
    return math.gcd(channels, groups)


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-Conv3d layers with a residual path (DDPM style).

    If ``temb_dim`` is given the block is time-conditioned: the step embedding is projected
    and added between the two convolutions (paper sec. 2.1: "denoising time step t is applied
    to the residual block"). The guidance encoder uses the same block without it.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int | None = None, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels, groups), in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_channels) if temb_dim else None
        self.norm2 = nn.GroupNorm(_groups(out_channels, groups), out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb is not None:
            if temb is None:
                raise ValueError("this block adds a step embedding: temb is required")
            h = h + self.temb(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """One residual block per level with 2x average pooling between levels (paper sec. 2.1:
    "4 residual blocks which consist of 3D convolution layers and average pooling layer").

    Returns the feature map of every level, finest first; the last one is the bottleneck input.
    Choice: pooling sits *between* levels, so 4 levels pool 3 times (80x96x80 -> 10x12x10).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], temb_dim: int | None, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            ResBlock(c_in, c_out, temb_dim, groups) for c_in, c_out in zip([channels[0], *channels[:-1]], channels)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> list[torch.Tensor]:
        h = self.conv_in(x)
        features = []
        for i, block in enumerate(self.blocks):
            if i:
                h = F.avg_pool3d(h, 2)
            h = block(h, temb)
            features.append(h)
        return features


class AgeCrossAttention(nn.Module):
    """Bottleneck voxels (queries) attend to age tokens (keys/values); the result is added
    back to the features (paper sec. 2.1: "The subject's age is added to the information
    bottleneck using attention mechanism. Then age information is summed up with the image
    feature via the embedding layer").
    """

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)  # (N, voxels, C)
        out, _ = self.attn(q, context, context, need_weights=False)
        return x + out.transpose(1, 2).reshape(n, c, *spatial)


class AsMMGenerator(nn.Module):
    """Stage-1 denoiser with the asynchronous multimodal (AsMM) block (paper sec. 2.1, Fig. 1b).

    * x_t and the guidance image X_im go through two *independent* encoders (:class:`Encoder`);
      only the x_t encoder sees the step embedding, so the guidance branch does not depend on
      x_t or t and is computed once per sample (:meth:`encode_guidance`).
    * The guidance features join the decoder by skip connections (concatenation), next to the
      x_t encoder's own skips ("The subject-specific image is conditioned using a
      skip-connection by concatenating with the denoising images").
    * t is embedded by sinusoidal features + MLP and added in every residual block of the
      x_t encoder, the bottleneck and the decoder.
    * The ages X_mo enter at the bottleneck by attention. Choice: two tokens, the guidance
      image's age and the target age (months), each embedded by its own
      :class:`~.layers.ScalarEmbedding` (the paper's "3D convolution" embedding of a scalar
      is read as this learned embedding), used as keys/values of a cross-attention whose
      queries are the bottleneck voxels (:class:`AgeCrossAttention`, residual sum).
    * "Then age information is summed up with the image feature via the embedding layer":
      Choice (``age_sum``, default on): the two age embeddings, concatenated and projected,
      are summed into the step embedding that every residual block adds to its features, so
      the age pair reaches every level of the decoder, not only the bottleneck. Without it
      (attention alone) the demo generator did not learn small age gaps: after 6000 steps
      its one-sided 10 mm predictions lost to a plain copy of the guidance scan for gaps of
      2-6 months (docs/methods.md).
    * The decoder mirrors the encoder, up-sampling by stride-2 transposed convolutions; the
      output is eps (eq. 2).

    Args:
        channels: feature channels per level (4 levels in the paper).
        groups: GroupNorm groups (reduced to a divisor of each width).
        heads: heads of the age cross-attention (must divide ``channels[-1]``).
        age_scale: ``ScalarEmbedding`` scale for ages in months.
        age_sum: also sum the age embeddings into the step embedding (see above).
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 256),
        groups: int = 8,
        heads: int = 8,
        age_scale: float = 10.0,
        age_sum: bool = True,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels must list at least 2 levels, got {channels}")
        if channels[-1] % heads:
            raise ValueError(f"heads ({heads}) must divide the bottleneck width channels[-1] ({channels[-1]})")
        self.channels = channels
        temb_dim = 4 * channels[0]
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.image_encoder = Encoder(1, channels, temb_dim, groups)
        self.guidance_encoder = Encoder(1, channels, None, groups)
        self.guidance_age_embed = ScalarEmbedding(temb_dim, scale=age_scale)
        self.target_age_embed = ScalarEmbedding(temb_dim, scale=age_scale)
        self.age_to_step = nn.Sequential(nn.SiLU(), nn.Linear(2 * temb_dim, temb_dim)) if age_sum else None
        bottom = channels[-1]
        self.mid_in = ResBlock(2 * bottom, bottom, temb_dim, groups)
        self.mid_attn = AgeCrossAttention(bottom, temb_dim, heads, groups)
        self.mid_out = ResBlock(bottom, bottom, temb_dim, groups)
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], 2, stride=2) for i in range(len(channels) - 1)
        )
        self.dec = nn.ModuleList(ResBlock(3 * c, c, temb_dim, groups) for c in channels[:-1])
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(channels[0], groups), channels[0]), nn.SiLU(), nn.Conv3d(channels[0], 1, 3, padding=1)
        )

    @property
    def factor(self) -> int:
        """Spatial sizes must be multiples of this (the total pooling factor)."""
        return 2 ** (len(self.channels) - 1)

    def encode_guidance(
        self, guidance: torch.Tensor, guidance_age: torch.Tensor, target_age: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Everything the denoiser needs that depends neither on x_t nor on t.

        Args:
            guidance: the guidance image X_im, (N, 1, D, H, W) on the low-res grid.
            guidance_age: its age in months, (N,).
            target_age: the age to generate, in months, (N,).

        Returns:
            A dict of batch-first tensors: ``"guidance0"``... (one feature map per level),
            ``"ages"`` (N, 2, E) age tokens and, with ``age_sum``, ``"age_step"`` (N, E), the
            ages' share of the step embedding.
        """
        features = {f"guidance{i}": f for i, f in enumerate(self.guidance_encoder(guidance))}
        features["ages"] = torch.stack(
            [self.guidance_age_embed(guidance_age.reshape(-1)), self.target_age_embed(target_age.reshape(-1))], dim=1
        )
        if self.age_to_step is not None:
            features["age_step"] = self.age_to_step(features["ages"].flatten(1))
        return features

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """eps_theta(x_t; t, ages, X_im) from the features of :meth:`encode_guidance`.

        Args:
            x_t: (N, 1, D, H, W); t: (N,) steps; features: as returned by ``encode_guidance``.
        """
        temb = self.time_embed(sinusoidal_embedding(t, self.channels[0]).to(x_t.dtype))
        if "age_step" in features:
            temb = temb + features["age_step"].to(temb.dtype)
        skips = self.image_encoder(x_t, temb)
        guides = [features[f"guidance{i}"] for i in range(len(self.channels))]
        h = self.mid_in(torch.cat([skips[-1], guides[-1]], dim=1), temb)
        h = self.mid_attn(h, features["ages"].to(h.dtype))
        h = self.mid_out(h, temb)
        for i in reversed(range(len(self.channels) - 1)):
            h = self.ups[i](h)
            h = self.dec[i](torch.cat([h, skips[i], guides[i]], dim=1), temb)
        return self.out(h)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        guidance: torch.Tensor,
        guidance_age: torch.Tensor,
        target_age: torch.Tensor,
    ) -> torch.Tensor:
        """Training-time convenience: encode the guidance and denoise in one call."""
        return self.denoise(x_t, t, self.encode_guidance(guidance, guidance_age, target_age))


# -- stage 2: the super-resolution refiner -----------------------------------------------------
class SuperResolutionRefiner(nn.Module):
    """Stage-2 conditional 3D super-resolution denoiser (paper sec. 2.2, Fig. 1c).

    The low-res image z0 is up-sampled 2x by a learned ``ConvTranspose3d`` ("we adopt
    transposed convolution blocks instead of bilinear interpolation"), concatenated with the
    high-res x_t and denoised by a MONAI ``DiffusionModelUNet`` that
    predicts eps. :meth:`upsample` does not depend on x_t or t and runs once per sample.

    Choice: kernel 4, stride 2, padding 1 (exactly 2x, each output voxel mixes 2 input voxels
    per axis), ``up_channels`` output channels, initialised to trilinear interpolation so the
    condition starts as a plain up-sampling and is then learned. Choice: no noise
    augmentation of z0 (the paper describes none).
    """

    def __init__(self, up_channels: int = 8, **unet: Any) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(1, up_channels, kernel_size=4, stride=2, padding=1)
        with torch.no_grad():
            k = torch.tensor([0.25, 0.75, 0.75, 0.25])
            self.up.weight.copy_((k[:, None, None] * k[None, :, None] * k[None, None, :]).expand_as(self.up.weight))
            if self.up.bias is not None:
                self.up.bias.zero_()
        self.unet = DiffusionModelUNet(spatial_dims=3, in_channels=1 + up_channels, out_channels=1, **unet)

    @property
    def factor(self) -> int:
        """High-res sizes must be multiples of this (the U-Net's down-sampling)."""
        return 2 ** (len(self.unet.block_out_channels) - 1)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N, 1, d, h, w) low-res image -> (N, up_channels, 2d, 2h, 2w) condition."""
        return self.up(low_res)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t; t, up(z0)); x_t (N, 1, D, H, W), t (N,), up from :meth:`upsample`."""
        return self.unet(torch.cat([x_t, up.to(x_t.dtype)], dim=1), t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, t, self.upsample(low_res))


class CasDiffCom(nn.Module):
    """Both learned stages of the cascade (paper Fig. 1a): ``generator`` and ``refiner``."""

    def __init__(self, generator: AsMMGenerator, refiner: SuperResolutionRefiner) -> None:
        super().__init__()
        self.generator = generator
        self.refiner = refiner


# -- the method contract -----------------------------------------------------------------------
def default_config(scale: str = "paper") -> dict:
    """The method's configuration at ``scale`` in {"paper", "demo", "tiny"}.

    "paper" uses the paper's grids and schedules (sec. 3.1-3.2); the widths are not published.
    Choice: generator channels (32, 64, 128, 256); refiner U-Net channels (32, 64, 128, 128),
    2 res-blocks per level, attention at the deepest level (20x24x20 at 1 mm) and in the mid
    block, memory-efficient attention. "demo" covers the demo cohort's field of view, coarse
    enough for minutes of CPU training (train the refiner on aligned crops, e.g. 16^3 -> 32^3:
    it is convolutional apart from its deepest attention). "tiny" is for tests. The grids and
    parameter counts each scale builds (Testing/test_configs.py checks these lines against
    the code):

    - paper: 2 mm 80x96x80 -> 1 mm 160x192x160; generator 19.4 M, refiner 17.2 M parameters
    - demo: 10 mm 16x20x16 -> 5 mm 32x40x32; generator 0.57 M, refiner 0.73 M parameters
    - tiny: 4 mm 8x8x8 -> 2 mm 16x16x16; generator 0.084 M, refiner 0.11 M parameters

    Sampling (Choice): DDIM with eta 0, 100 steps for generation (of 4000) and 50 for
    super-resolution (of 1000); predicted x0 clipped to ``intensity_range`` [-1, 1].
    """
    if scale == "paper":
        gen = {"channels": [32, 64, 128, 256], "groups": 8, "heads": 8}
        ref = {
            "up_channels": 8,
            "channels": [32, 64, 128, 128],
            "attention_levels": [False, False, False, True],
            "num_res_blocks": 2,
            "norm_num_groups": 32,
            "num_head_channels": 32,
            "use_flash_attention": True,
        }
        size, sr_size = [80, 96, 80], [160, 192, 160]
    elif scale == "demo":
        gen = {"channels": [16, 32, 32], "groups": 8, "heads": 4}
        ref = {
            "up_channels": 4,
            "channels": [16, 32, 32],
            "attention_levels": [False, False, True],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "num_head_channels": 16,
            "use_flash_attention": True,
        }
        size, sr_size = [16, 20, 16], [32, 40, 32]
    elif scale == "tiny":
        gen = {"channels": [8, 16], "groups": 4, "heads": 2}
        ref = {
            "up_channels": 2,
            "channels": [8, 16],
            "attention_levels": [False, True],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "num_head_channels": 8,
        }
        size, sr_size = [8, 8, 8], [16, 16, 16]
    else:
        raise ValueError(f"unknown scale '{scale}' (expected paper, demo or tiny)")
    tiny = scale == "tiny"
    return {
        "network": {"generator": gen, "refiner": ref},
        "schedule": {"kind": "linear", "beta_start": 1e-4, "beta_end": 5e-3, "num_steps": 4000},
        "refine_schedule": {"kind": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "num_steps": 1000},
        "prediction": "epsilon",
        "sampler": {"name": "ddim", "steps": 5 if tiny else 100, "eta": 0.0, "seed": 0},
        "refine_sampler": {"name": "ddim", "steps": 5 if tiny else 50, "eta": 0.0, "seed": 0},
        "image_size": size,
        "sr_image_size": sr_size,
        "spacing_mm": {"paper": [2.0, 2.0, 2.0], "demo": [10.0, 10.0, 10.0]}.get(scale, [4.0, 4.0, 4.0]),
        "sr_spacing_mm": {"paper": [1.0, 1.0, 1.0], "demo": [5.0, 5.0, 5.0]}.get(scale, [2.0, 2.0, 2.0]),
        "intensity_range": [-1.0, 1.0],
        "age_unit": "months",
        "optimizer": {"name": "adam", "lr": 2e-4},
    }


@dataclass(frozen=True)
class GeneratorConfig(MethodConfig):
    """The AsMM generator (:class:`AsMMGenerator`).

    Attributes:
        channels: feature channels per resolution level of both encoders and the decoder.
        groups: GroupNorm groups.
        heads: attention heads of the age cross-attention at the bottleneck.
    """

    channels: list[int]
    groups: int = 8
    heads: int = 8


@dataclass(frozen=True)
class RefinerConfig(UNetConfig):
    """The super-resolution refiner (:class:`SuperResolutionRefiner`): the U-Net's options
    (:class:`~.config.UNetConfig`) and ``up_channels``, the output channels of the learned
    transposed-convolution up-sampling of z0."""

    up_channels: int = 8


@dataclass(frozen=True)
class CascadeNetworks(MethodConfig):
    """The two learned stages."""

    generator: GeneratorConfig = nested(GeneratorConfig)
    refiner: RefinerConfig = nested(RefinerConfig)


@dataclass(frozen=True)
class CasDiffComConfig(MethodConfig):
    """Cas-DiffCom's configuration, as the model card stores it under ``config``.

    Attributes:
        network: the generator's and the refiner's architecture.
        schedule, refine_schedule: noise schedules of the two stages (``Schedule.from_config``).
        prediction: what both denoisers predict.
        sampler, refine_sampler: default sampler settings of the two stages
            (``SamplerSettings`` fields; absent ones take its defaults).
        image_size, sr_image_size: the low- and high-resolution grids (voxels).
        spacing_mm, sr_spacing_mm: their voxel sizes.
        intensity_range: the model's intensity range; predicted x0 is clipped to it.
        age_unit: the unit of the ages the generator is given ("months").
        optimizer: training optimizer (name, lr).
        refiner_crop: training crops of the refiner on the low-res grid (voxels), if any.
        residual: each stage generates the difference from a reference (docs/methods.md).
        training_pairs: how training pairs of visits are drawn (``max_visit_gap``).
    """

    network: CascadeNetworks = nested(CascadeNetworks)
    schedule: dict[str, Any] = field(default_factory=dict)
    refine_schedule: dict[str, Any] = field(default_factory=dict)
    prediction: Prediction = Prediction.EPSILON
    sampler: dict[str, Any] = field(default_factory=dict)
    refine_sampler: dict[str, Any] = field(default_factory=dict)
    image_size: list[int] = field(default_factory=list)
    sr_image_size: list[int] = field(default_factory=list)
    spacing_mm: list[float] = field(default_factory=list)
    sr_spacing_mm: list[float] = field(default_factory=list)
    intensity_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    age_unit: str = "months"
    optimizer: dict[str, Any] = field(default_factory=dict)
    refiner_crop: list[int] | None = optional()
    residual: bool | None = optional()
    training_pairs: dict[str, Any] | None = optional()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))
        if [2 * v for v in self.image_size] != list(self.sr_image_size):
            raise ValueError(
                f"sr_image_size {self.sr_image_size} must be twice image_size {self.image_size} (2x cascade)"
            )


CONFIG = CasDiffComConfig


def build(config: CasDiffComConfig | Mapping[str, Any]) -> CasDiffCom:
    """The two-stage model described by ``config.network`` (a card's JSON is read first)."""
    net = CasDiffComConfig.from_dict(config).network
    gen, ref = net.generator.to_dict(), net.refiner.to_dict()
    return CasDiffCom(AsMMGenerator(**gen), SuperResolutionRefiner(**ref))


def upsampled(low_res: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """z0 trilinearly up-sampled to the high-resolution grid (the refiner's residual reference;
    both grids are cell-centred on the same field of view)."""
    return F.interpolate(low_res.float(), size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)


def _diffusion_loss(
    denoise: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    cond: Any,
    schedule: Schedule,
    prediction: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """MSE between the network output and its target at uniform random steps (eq. 2)."""
    t = schedule.random_steps(x0.shape[0], generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    return F.mse_loss(denoise(x_t, t, cond), schedule.training_target(prediction, x0, noise, t))


def loss(model: CasDiffCom, batch: dict, config: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The simplified eps loss of one stage (paper eq. 2 and sec. 2.2).

    Args:
        batch: ``{"stage": "generator", "target_lr", "guidance_lr", "guidance_age",
            "target_age"}`` (images (N, 1, *image_size), ages (N,) months) or
            ``{"stage": "refiner", "target_hr", "low_res"}`` ((N, 1, *sr_image_size) and the
            real low-res image (N, 1, *image_size)); optional ``"guidance_reference"``, the
            guidance before augmentation (the residual's reference). The stages are trained separately, as in
            the paper; the 0-5 degree rotation augmentation of the guidance image is done by
            the data pipeline before this call.
        generator: CPU generator for the steps and noise (reproducible losses).
    """
    stage = batch.get("stage")
    prediction = config["prediction"]
    if stage == "generator":
        gen = model.generator
        cond = gen.encode_guidance(batch["guidance_lr"], batch["guidance_age"], batch["target_age"])
        schedule = Schedule.from_config(config["schedule"])
        # The residual is the change from the guidance scan as acquired: the rotation that
        # augments the guidance (sec. 3.1) hardens the encoder, it is not a change to generate.
        reference = batch.get("guidance_reference", batch["guidance_lr"]) if config.get("residual") else None
        x0 = residual_target(batch["target_lr"], reference)
        return _diffusion_loss(gen.denoise, x0, cond, schedule, prediction, generator)
    if stage == "refiner":
        ref = model.refiner
        up = ref.upsample(batch["low_res"])
        schedule = Schedule.from_config(config["refine_schedule"])
        target = batch["target_hr"]
        base = upsampled(batch["low_res"], target.shape[2:]) if config.get("residual") else None
        return _diffusion_loss(ref.denoise, residual_target(target, base), up, schedule, prediction, generator)
    raise ValueError(f"batch['stage'] must be one of {STAGES}, got {stage!r}")


def super_resolve(
    model: CasDiffCom,
    low_res: torch.Tensor,
    *,
    config: dict,
    settings: SamplerSettings | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SampleOutput:
    """Stage 2 alone: the high-resolution image of ``low_res`` (N, 1, *image_size), a
    :class:`~..diffusion.SampleOutput` (stage "refine" in progress events)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    low_res = low_res.to(device, torch.float32)
    with torch.no_grad():
        up = model.refiner.upsample(low_res)
        _check_volume("up-sampled low-res image", up[:, :1], model.refiner.factor)
        return sample(
            model.refiner.denoise,
            (low_res.shape[0], 1, *up.shape[2:]),
            Schedule.from_config(config["refine_schedule"]),
            config["prediction"],
            settings or SamplerSettings.from_dict(config["refine_sampler"]),
            cond=up,
            clip_x0=tuple(config.get("intensity_range", (-1.0, 1.0))),
            reference=upsampled(low_res, up.shape[2:]) if config.get("residual") else None,
            generator=generator,
            device=device,
            progress=progress,
            cancel=cancel,
            stage="refine",
        )


@dataclass
class CascadeOutput:
    """Result of :func:`complete`: CPU float32 tensors; ``high_res`` is None without refinement."""

    low_res: torch.Tensor
    high_res: torch.Tensor | None
    intermediates: dict[str, list[Intermediate]] = field(default_factory=dict)


def _check_volume(name: str, x: torch.Tensor, factor: int) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise InputError(name, f"expected a (N, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
    if any(s % factor for s in x.shape[2:]):
        raise InputError(name, f"spatial size {tuple(x.shape[2:])} must be a multiple of {factor} for this network")


def _ages(name: str, age: Ages, n: int, device: torch.device) -> torch.Tensor:
    age = torch.as_tensor(age, dtype=torch.float32).reshape(-1)
    if age.numel() == 1:
        age = age.expand(n)
    if age.numel() != n or not bool(torch.isfinite(age).all()):
        raise InputError(name, f"expected {n} finite ages in months, got {age.tolist()}")
    return age.to(device)


def complete(
    model: CasDiffCom,
    guidance: torch.Tensor,
    guidance_age: Ages,
    target_age: Ages,
    *,
    config: dict,
    settings: SamplerSettings | None = None,
    refine_settings: SamplerSettings | None = None,
    refine: bool = True,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> CascadeOutput:
    """Generate the subject at ``target_age`` from a guidance scan, then super-resolve it.

    The guidance encoder and the up-sampling of z0 run once per sample, outside the
    denoisers handed to the engine (stages "generate" and "refine" in progress events).

    Args:
        guidance: the low-res guidance image (N, 1, *image_size), intensities in
            ``config["intensity_range"]``.
        guidance_age, target_age: ages in months, (N,) tensors (or one number for all).
        settings, refine_settings: sampler settings of the two stages (default: the config's).
        refine: run stage 2; if False ``high_res`` is None.
        device: where to run (the model is moved there); default: the model's device.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prepare_network(model, device)
    _check_volume("guidance", guidance, model.generator.factor)
    n = guidance.shape[0]
    prediction = config["prediction"]
    clip = tuple(config.get("intensity_range", (-1.0, 1.0)))
    settings = settings or SamplerSettings.from_dict(config["sampler"])
    intermediates: dict[str, list[Intermediate]] = {}
    residual = bool(config.get("residual"))
    guidance = guidance.to(device, torch.float32)
    with torch.no_grad():
        features = model.generator.encode_guidance(
            guidance,
            _ages("guidance_age", guidance_age, n, device),
            _ages("target_age", target_age, n, device),
        )
        out = sample(
            model.generator.denoise,
            tuple(guidance.shape),
            Schedule.from_config(config["schedule"]),
            prediction,
            settings,
            cond=features,
            clip_x0=clip,
            reference=guidance if residual else None,
            generator=generator,
            device=device,
            progress=progress,
            cancel=cancel,
            stage="generate",
        )
        intermediates["generate"] = list(out.intermediates)
        low_res, high_res = out.sample, None
        if refine:
            out = super_resolve(
                model,
                low_res,
                config=config,
                settings=refine_settings,
                generator=generator,
                device=device,
                progress=progress,
                cancel=cancel,
            )
            intermediates["refine"] = list(out.intermediates)
            high_res = out.sample
    return CascadeOutput(low_res, high_res, intermediates)
