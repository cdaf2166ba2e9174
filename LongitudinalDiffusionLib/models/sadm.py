"""SADM: sequence-aware diffusion model (Yoon et al., IPMI 2023; text in shared papers/sadm.md).

A transformer attention module reads the known frames of a subject's timeline and writes
one conditioning volume ``c`` (paper sec. 3.1). A conditional eps U-Net sees ``[x_t, c]``,
with classifier-free guidance (sec. 3.2, Alg. 1). Missing and future frames are generated
one at a time in age order, each conditioned on every frame known by then: the real ones,
before and after it, and those generated earlier in the run (Alg. 2).

Upstream (ubc-tea/SADM-..., docs/methods.md) is a "minimal" version of the
paper. It uses a ViViT with patch (8, 32, 32) on 32x128x128 volumes, 11 context frames, a
BatchNorm ``ContextUnet`` (n_feat=8), linear betas 1e-4..0.02 with n_T=400, ancestral DDPM
with sigma^2 = beta_t, context dropout 0.1 and guidance w=0.2.

Choices made here, against the paper and upstream:

- Ages. Each frame's position is its age in months, embedded with
  :class:`~.layers.ScalarEmbedding`. This generalises the paper's learned index embedding
  to irregular visits. A learned *role* embedding (context, gap, target) is added, and the
  target slot (zero image, its own age) tells the network which age to produce. In the
  paper the target is only implicit in the sequence length.
- Missing frames are zero images that keep their age encoding. The paper found this
  better than masking (end of sec. 3.1).
- Context on both sides. The paper's problem setting (sec. 3) conditions missing frames
  X^M on conditioning frames X^C that may lie after them (only future frames X^F come after
  everything), and training draws conditioning, missing and future indices at random
  (sec. 4.1). So every present frame other than the target is context, wherever it sits;
  Alg. 2's age order decides only which missing frame is generated first. Padding slots
  beyond a timeline's end are masked out of the attention and the read-out.
- Residual option (``"residual": true``, the demo model; off at paper scale): the chain
  generates the difference from a reference, the age-weighted blend of the context frames
  just before and just after the target (the frame before alone for a future frame), and
  the U-Net reads that reference as a third input channel ``[x_t, c, reference]`` - ``c``
  is a coarse read-out of patch tokens and cannot carry the detail a residual is measured
  against. An untrained network therefore returns the reference (docs/methods.md).
- Blocks. ``depth`` temporal blocks (across frames, per patch) come first, then ``depth``
  spatial blocks (across patches, per frame). This is the paper's temporal encoder and
  spatial decoder, built from pre-LayerNorm multi-head self-attention (ViViT [1]; upstream
  ``ViVit/module.py``). The paper's 8:1 token merging and unmerging between blocks is left
  out: on the token grids used here (4x4x4 upstream) it would collapse the grid to one
  token.
- Read-out. The frame axis is folded into channels, as in the paper's "unflatten ...
  upsampling and a 3D convolution": a 1x1x1 conv, trilinear upsampling to the image size,
  then a 3x3x3 conv to one channel. ``max_frames`` is therefore a fixed capacity (upstream:
  11 context + 1 target = 12).
- Denoiser. MONAI ``DiffusionModelUNet`` (GroupNorm residual blocks with self-attention
  at low resolution). The paper follows the classifier-free guidance model's [9]
  architecture "modified into 3D", and this U-Net is that family. Upstream's tiny
  BatchNorm ContextUnet is not used.
- Guidance. Context dropout p_uncond = 0.1 (upstream; [9] found 0.1-0.2 best), with
  ``c`` set to zeros. Sampling uses w = 0.1 (paper sec. 4.1; upstream 0.2), i.e.
  ``guidance = 1 + w = 1.1``, with a zero volume as the unconditional input.
- Schedule. The paper uses T = 1000 with [9]'s cosine log-SNR schedule, so the ``paper``
  scale uses ``Schedule.cosine(1000)``. ``demo`` and ``tiny`` keep upstream's linear
  1e-4..0.02, 400-step schedule. Every scale predicts eps and samples with ancestral
  DDPM, variance ``fixed_large`` (sigma^2 = beta_t, upstream; the paper's variance
  interpolation v is not given). ``paper`` and ``demo`` run every step; ``tiny`` runs 8
  respaced steps. Predicted x0 is not clipped at ``paper`` scale (upstream's eps-form step
  never clips). ``demo`` and ``tiny`` clip it to the [0, 1] intensity range.
- Sizes. The ``paper`` U-Net (channels 64-128-192-256, 2 residual blocks, attention at
  the deepest level) is [9]'s 1-2-3-4 multiplier pattern at a width that fits 3D. Neither
  paper states a 3D size.
- Leading gaps. A missing frame before the first present one is refused: sampling runs
  forward in time from an observed first frame (Alg. 2 assumes c_1 = 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ..diffusion import (
    Intermediate,
    SamplerSettings,
    Schedule,
    make_generator,
    prepare_network,
    residual_target,
    sample,
)
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback
from .config import MethodConfig, Prediction, UNetConfig, nested, optional
from .layers import ScalarEmbedding

METHOD = "sadm"
TASK = "complete-ages"

#: Roles of the frame slots seen by the attention module.
CONTEXT, GAP, TARGET = 0, 1, 2


def default_config(scale: str = "paper") -> dict:
    """The method's configuration at ``"paper"``, ``"demo"`` or ``"tiny"`` size (JSON types).

    ``paper`` is the published setting: volumes 128x128x32 (I, J, K; slices along K), 12 frames,
    upstream's ViViT patch (32, 32, 8) in the same axis order, dimension 1024, 3 heads of 8 and
    depth 3, with T = 1000 and w = 0.1.
    ``demo`` trains on a 2-core CPU at 32x40x32 (5 mm), 8 frames. ``tiny`` is for tests.
    What each scale builds (Testing/test_configs.py checks these lines):

    - paper: 128x128x32, 12 frames; 93.7 M parameters
    - demo: 5 mm 32x40x32, 8 frames; 0.92 M parameters
    - tiny: 8x16x16, 4 frames; 0.12 M parameters
    """
    if scale == "paper":
        image_size, max_frames = [128, 128, 32], 12
        attention = {"patch_size": [32, 32, 8], "dim": 1024, "depth": 3, "heads": 3, "head_dim": 8, "mlp_dim": 2048}
        unet = {"channels": [64, 128, 192, 256], "attention_levels": [False, False, False, True], "num_res_blocks": 2}
        unet |= {"norm_num_groups": 32, "num_head_channels": 64}
        schedule = {"kind": "cosine", "num_steps": 1000, "s": 0.008}
        steps, clip = None, None
    elif scale == "demo":
        image_size, max_frames = [32, 40, 32], 8
        attention = {"patch_size": [8, 8, 8], "dim": 64, "depth": 2, "heads": 4, "head_dim": 16, "mlp_dim": 128}
        unet = {"channels": [16, 32, 32], "attention_levels": [False, False, True], "num_res_blocks": 1}
        unet |= {"norm_num_groups": 8, "num_head_channels": 16}
        schedule = {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 400}
        steps, clip = None, [0.0, 1.0]
    elif scale == "tiny":
        image_size, max_frames = [8, 16, 16], 4
        attention = {"patch_size": [4, 8, 8], "dim": 16, "depth": 1, "heads": 2, "head_dim": 8, "mlp_dim": 32}
        unet = {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1}
        unet |= {"norm_num_groups": 8, "num_head_channels": 8}
        schedule = {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 400}
        steps, clip = 8, [0.0, 1.0]
    else:
        raise ValueError(f"scale must be 'paper', 'demo' or 'tiny', got {scale!r}")
    attention |= {"readout_channels": 16 if scale != "tiny" else 4, "age_scale": 10.0}
    sampler = {"name": "ddpm", "steps": steps, "eta": 0.0, "guidance": 1.1, "seed": 0, "capture": 0}
    sampler["variance"] = "fixed_large"
    return {
        "network": {"attention": attention, "unet": unet},
        "schedule": schedule,
        "prediction": "epsilon",
        "sampler": sampler,
        "image_size": image_size,
        **({"spacing_mm": [5.0, 5.0, 5.0]} if scale == "demo" else {}),
        "max_frames": max_frames,
        "value_range": [0.0, 1.0],
        "p_uncond": 0.1,
        "clip_x0": clip,
    }


@dataclass(frozen=True)
class SequenceAttentionConfig(MethodConfig):
    """The ViViT-style sequence attention that summarises the known frames.

    Attributes:
        patch_size: tubelet size (I, J, K) in voxels.
        dim, depth, heads, head_dim, mlp_dim: the transformer's width, blocks, heads, head
            width and MLP width.
        readout_channels: channels of the context volume c read out for the U-Net.
        age_scale: ``ScalarEmbedding`` scale of ages in months.
    """

    patch_size: list[int] = field(default_factory=list)
    dim: int = 64
    depth: int = 2
    heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 128
    readout_channels: int = 16
    age_scale: float = 10.0


@dataclass(frozen=True)
class SADMNetworks(MethodConfig):
    """The two learned parts: the sequence attention and the denoising U-Net."""

    attention: SequenceAttentionConfig = nested(SequenceAttentionConfig)
    unet: UNetConfig = nested(UNetConfig)


@dataclass(frozen=True)
class SADMConfig(MethodConfig):
    """SADM's configuration, as the model card stores it under ``config``.

    Attributes:
        network: the sequence attention and the U-Net.
        schedule: the noise schedule (``Schedule.from_config``).
        prediction: what the denoiser predicts.
        sampler: default sampler settings (``SamplerSettings`` fields).
        image_size: the model grid (voxels); spacing_mm: its voxel size, if fixed.
        max_frames: the most frames of a timeline.
        value_range: the model's intensities.
        p_uncond: probability of dropping the context in training (classifier-free guidance).
        clip_x0: range predicted x0 is clipped to (None: no clipping).
        residual: generate the difference from the nearest context frame (docs/methods.md).
    """

    network: SADMNetworks = nested(SADMNetworks)
    schedule: dict[str, Any] = field(default_factory=dict)
    prediction: Prediction = Prediction.EPSILON
    sampler: dict[str, Any] = field(default_factory=dict)
    image_size: list[int] = field(default_factory=list)
    spacing_mm: list[float] | None = optional()
    max_frames: int = 8
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    p_uncond: float = 0.1
    clip_x0: list[float] | None = None
    residual: bool | None = optional()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))


CONFIG = SADMConfig


def build(config: SADMConfig | Mapping[str, Any]) -> SADM:
    """The SADM network described by ``config`` (see :func:`default_config`)."""
    cfg = SADMConfig.from_dict(config)
    return SADM(
        cfg.image_size,
        cfg.max_frames,
        attention=cfg.network.attention.to_dict(),
        unet=cfg.network.unet.to_dict(),
        reference_channel=bool(cfg.residual),
    )


# --------------------------------------------------------------------------- network


class TransformerBlock(nn.Module):
    """Pre-LayerNorm multi-head self-attention, then an MLP, each residual (ViViT [1]).

    Args:
        dim: token size.
        heads: number of attention heads.
        head_dim: size of each head (upstream: 8).
        mlp_dim: hidden size of the MLP.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); keys: (B, L) bool, the tokens that may be attended to (None: all)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if keys is None else keys[:, None, None, :]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(h.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm2(x))


class SequenceAttention(nn.Module):
    """The attention module A_theta (paper sec. 3.1, Fig. 3): timeline -> conditioning volume.

    Each frame is cut into non-overlapping 3D patches (temporal patch l = 1 as in the
    paper) by a strided convolution. To every token it adds a learned spatial position, its
    frame's age embedding and its frame's role. Then come ``depth`` temporal blocks (across
    frames, per patch) and ``depth`` spatial blocks (across patches, per frame). Finally the
    frame axis is folded into channels and read out to a one-channel volume of the image
    size.

    Args:
        image_size: (D, H, W) of the frames.
        max_frames: number of frame slots (timelines shorter than this are padded).
        patch_size: (d, h, w) patch size; must divide ``image_size``.
        dim: token size.
        depth: number of temporal blocks (and of spatial blocks).
        heads: attention heads per block.
        head_dim: size of each head.
        mlp_dim: hidden size of each block's MLP.
        readout_channels: channels of the read-out before the last convolution.
        age_scale: ``scale`` of the :class:`~.layers.ScalarEmbedding` of ages in months.
    """

    def __init__(
        self,
        image_size: tuple[int, int, int],
        max_frames: int,
        patch_size: tuple[int, int, int],
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        mlp_dim: int,
        readout_channels: int = 16,
        age_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size)
        patch = tuple(int(p) for p in patch_size)
        if len(self.image_size) != 3 or len(patch) != 3:
            raise ValueError(f"image_size and patch_size must have 3 entries, got {image_size!r} and {patch_size!r}")
        if any(s % p for s, p in zip(self.image_size, patch)):
            raise ValueError(f"patch_size {patch} must divide image_size {self.image_size}")
        if max_frames < 2:
            raise ValueError(f"max_frames must be at least 2 (context + target), got {max_frames}")
        self.max_frames, self.dim = int(max_frames), int(dim)
        self.grid = tuple(s // p for s, p in zip(self.image_size, patch))
        n_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = nn.Conv3d(1, dim, kernel_size=patch, stride=patch)
        self.space_pos = nn.Parameter(torch.randn(1, 1, n_patches, dim) * 0.02)
        self.age_embed = ScalarEmbedding(dim, scale=age_scale)
        self.role_embed = nn.Embedding(3, dim)
        self.temporal = nn.ModuleList(TransformerBlock(dim, heads, head_dim, mlp_dim) for _ in range(depth))
        self.spatial = nn.ModuleList(TransformerBlock(dim, heads, head_dim, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.readout = nn.Conv3d(self.max_frames * dim, readout_channels, kernel_size=1)
        self.out = nn.Conv3d(readout_channels, 1, kernel_size=3, padding=1)

    def forward(
        self, frames: torch.Tensor, ages: torch.Tensor, present: torch.Tensor, target_index: torch.Tensor
    ) -> torch.Tensor:
        """The conditioning volume for generating frame ``target_index`` of each timeline.

        Args:
            frames: (N, F, 1, D, H, W) timeline, F <= ``max_frames``; the present frames
                other than the target are read (all others count as zero images).
            ages: (N, F) age of every slot in months, missing and target slots included.
            present: (N, F) bool, the frames that hold an image.
            target_index: (N,) long, the slot to generate.

        Returns:
            c: (N, 1, D, H, W).
        """
        n, f = frames.shape[:2]
        pad = self.max_frames - f
        if pad < 0:
            raise ValueError(f"{f} frames exceed max_frames={self.max_frames}")
        if pad:
            frames = F.pad(frames, (0, 0, 0, 0, 0, 0, 0, 0, 0, pad))
            ages = F.pad(ages, (0, pad))
            present = F.pad(present, (0, pad))
        slots = torch.arange(self.max_frames, device=frames.device)[None]
        target_index = target_index.to(frames.device).reshape(-1, 1)
        visible = slots < f
        context = present.bool() & (slots != target_index) & visible
        role = torch.where(context, CONTEXT, torch.where(slots == target_index, TARGET, GAP))

        x = frames * context[..., None, None, None, None].to(frames.dtype)
        tokens = self.patch_embed(x.flatten(0, 1)).flatten(2).transpose(1, 2)  # (N*Fm, P, dim)
        p = tokens.shape[1]
        tokens = tokens.reshape(n, self.max_frames, p, self.dim) + self.space_pos
        frame_code = self.age_embed(ages.reshape(-1).float()).reshape(n, self.max_frames, self.dim)
        tokens = tokens + (frame_code + self.role_embed(role))[:, :, None]

        # Temporal encoder: attention across the visible frames, for each patch.
        h = tokens.transpose(1, 2).reshape(n * p, self.max_frames, self.dim)
        keys = visible[:, None].expand(n, p, self.max_frames).reshape(n * p, self.max_frames)
        for block in self.temporal:
            h = block(h, keys)
        # Spatial decoder: attention across the patches of each frame.
        h = h.reshape(n, p, self.max_frames, self.dim).transpose(1, 2).reshape(n * self.max_frames, p, self.dim)
        for block in self.spatial:
            h = block(h)
        h = self.norm(h).reshape(n, self.max_frames, p, self.dim) * visible[..., None, None].to(h.dtype)

        h = h.permute(0, 1, 3, 2).reshape(n, self.max_frames * self.dim, *self.grid)
        h = F.interpolate(self.readout(h), size=self.image_size, mode="trilinear", align_corners=False)
        return self.out(F.gelu(h))


def adapt_state(target: nn.Module, source: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s weights made to fit ``target`` on another image grid, for fine-tuning.

    Every layer of the network is independent of the image size except the learned position
    of each patch (:class:`SequenceAttention`'s ``space_pos``): where the two patch grids
    differ, the positions are resampled trilinearly from the source's patch grid onto the
    target's, as vision transformers are fine-tuned at another resolution (Dosovitskiy et
    al., ICLR 2021). Other mismatches are left for ``load_state_dict`` to refuse.
    """
    out = dict(state)
    for name, module in target.named_modules():
        if not isinstance(module, SequenceAttention):
            continue
        key = f"{name}.space_pos" if name else "space_pos"
        old = source.get_submodule(name)
        if not isinstance(old, SequenceAttention) or old.grid == module.grid or key not in out:
            continue
        dim = out[key].shape[-1]
        grid = out[key].reshape(*old.grid, dim).permute(3, 0, 1, 2)[None]  # (1, dim, gx, gy, gz)
        resized = nn.functional.interpolate(grid, size=module.grid, mode="trilinear", align_corners=True)
        out[key] = resized[0].permute(1, 2, 3, 0).reshape(1, 1, -1, dim).contiguous()
    return out


class SADM(nn.Module):
    """Attention module plus conditional eps U-Net (paper sec. 3; upstream ``SADM.py``).

    Args:
        image_size: (D, H, W) of the frames.
        max_frames: number of frame slots the attention module holds.
        attention: keyword arguments of :class:`SequenceAttention` (besides the two above).
        unet: keyword arguments of MONAI ``DiffusionModelUNet`` (besides ``spatial_dims``
            and the channel counts). Its input is ``[x_t, c]`` and its output is eps.
        reference_channel: the U-Net also reads the residual reference, ``[x_t, c, ref]``
            (the residual option).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        max_frames: int,
        attention: dict[str, Any],
        unet: dict[str, Any],
        reference_channel: bool = False,
    ) -> None:
        super().__init__()
        i, j, k = (int(s) for s in image_size)
        self.image_size = (i, j, k)
        self.max_frames = int(max_frames)
        self.attention = SequenceAttention(self.image_size, self.max_frames, **attention)
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=3 if reference_channel else 2, out_channels=1, **unet
        )

    def condition(
        self, frames: torch.Tensor, ages: torch.Tensor, present: torch.Tensor, target_index: torch.Tensor
    ) -> torch.Tensor:
        """c = A(known frames but the target): (N, 1, D, H, W); see :meth:`SequenceAttention.forward`."""
        return self.attention(frames, ages, present, target_index)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, c, t). x_t: (N, 1, D, H, W); c: (N, 1 or 2, D, H, W) (with the
        reference as a second channel for a residual model); t: (N,) long -> (N, 1, D, H, W)."""
        return self.unet(torch.cat([x_t, c.to(x_t.dtype)], dim=1), t)


# --------------------------------------------------------------------------- training


def context_reference(
    frames: torch.Tensor, ages: torch.Tensor, present: torch.Tensor, target_index: torch.Tensor
) -> torch.Tensor:
    """The residual reference of each timeline: the age-weighted blend of its present frames
    just before and just after the target (linear interpolation in age), or the nearest
    present frame when the target has context on one side only. (N, 1, D, H, W)."""
    rows = torch.arange(frames.shape[0], device=frames.device)
    target_index = target_index.to(frames.device).long().reshape(-1)
    slots = torch.arange(frames.shape[1], device=frames.device)[None]
    context = present.bool().to(frames.device) & (slots != target_index[:, None])
    if not bool(context.any(dim=1).all()):
        raise InputError(None, "every timeline needs a present frame besides the target")
    ages = ages.to(frames.device).float()
    delta = ages - ages[rows, target_index][:, None]  # < 0 before the target, > 0 after
    inf = torch.tensor(float("inf"), device=frames.device)
    before = torch.where(context & (delta < 0), -delta, inf)
    after = torch.where(context & (delta > 0), delta, inf)
    near = torch.where(context, delta.abs(), inf).argmin(dim=1)
    i, j = before.argmin(dim=1), after.argmin(dim=1)
    both = torch.isfinite(before.min(dim=1).values) & torch.isfinite(after.min(dim=1).values)
    d_i, d_j = before[rows, i], after[rows, j]
    w_i = torch.where(both, d_j / torch.where(both, d_i + d_j, torch.ones_like(d_i)), torch.ones_like(d_i))
    w_i = w_i.reshape(-1, 1, 1, 1, 1).to(frames.dtype)
    i = torch.where(both, i, near)
    j = torch.where(both, j, near)
    return w_i * frames[rows, i] + (1 - w_i) * frames[rows, j]


def loss(model: SADM, batch: dict, config: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The eps-MSE of Alg. 1 on the target frame, with context dropout ``p_uncond``.

    Args:
        model: a :class:`SADM`.
        batch: ``frames`` (N, F, 1, D, H, W), ``ages`` (N, F) in months, ``present`` (N, F)
            bool, ``target_index`` (N,) long. The context is the present frames before the
            target. The target frame must be present.
        config: the method config (schedule, prediction, p_uncond, residual).
        generator: CPU generator for the step, noise and dropout draws.
    """
    frames, ages, present = batch["frames"], batch["ages"], batch["present"].bool()
    target = batch["target_index"].long().to(frames.device)
    rows = torch.arange(frames.shape[0], device=frames.device)
    if not bool(present[rows, target].all()):
        raise InputError(None, "every target frame must be present (it is what the model learns to produce)")
    x0 = frames[rows, target]
    c = model.condition(frames, ages, present, target)
    if config.get("residual"):
        reference = context_reference(frames, ages, present, target)
        x0 = residual_target(x0, reference)
        c = torch.cat([c, reference.to(c)], dim=1)
    schedule = Schedule.from_config(config["schedule"])
    t = schedule.random_steps(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    keep = torch.rand(x0.shape[0], generator=generator) >= float(config.get("p_uncond", 0.1))
    c = c * keep.to(x0).reshape(-1, 1, 1, 1, 1)
    x_t = schedule.q_sample(x0, t, noise)
    prediction = config.get("prediction", "epsilon")
    return F.mse_loss(model(x_t, t, c), schedule.training_target(prediction, x0, noise, t))


# --------------------------------------------------------------------------- inference


@dataclass
class SequenceOutput:
    """Result of :func:`fill_sequence`.

    Attributes:
        frames: (N, F, 1, D, H, W), the input with every missing frame filled.
        generated: the frame indices generated, in generation order (for any row).
        intermediates: frame index -> captured states of that frame's sampling (batched over
            the rows that generated it).
        seed: the seed of the noise generator (None when a generator was passed).
    """

    frames: torch.Tensor
    generated: list[int] = field(default_factory=list)
    intermediates: dict[int, list[Intermediate]] = field(default_factory=dict)
    seed: int | None = None


def _check_sequence(model: SADM, frames: torch.Tensor, ages: torch.Tensor, present: torch.Tensor) -> None:
    if frames.ndim != 6 or frames.shape[2] != 1 or tuple(frames.shape[3:]) != model.image_size:
        grid = ", ".join(map(str, model.image_size))
        raise InputError(None, f"frames must be (N, F, 1, {grid}), got {tuple(frames.shape)}")
    n, f = frames.shape[:2]
    if tuple(ages.shape) != (n, f) or tuple(present.shape) != (n, f):
        got = f"{tuple(ages.shape)} and {tuple(present.shape)}"
        raise InputError(None, f"ages and present must be ({n}, {f}), got {got}")
    if f > model.max_frames:
        raise InputError(None, f"{f} frames given but this SADM model holds at most {model.max_frames}")
    if not bool(present.any(dim=1).all()):
        raise InputError(None, "no frame is present: SADM needs at least one observed image to start from")
    if f > 1 and not bool((ages[:, 1:] >= ages[:, :-1]).all()):
        raise InputError(None, "ages must not decrease along the frame axis (sort the timeline by age)")
    first = present.long().argmax(dim=1)
    if bool((first > 0).any()):
        row = int((first > 0).nonzero()[0, 0])
        raise InputError(
            None,
            f"frame 0 ({float(ages[row, 0]):g} mo) precedes the first present frame; SADM generates forward in "
            "time from an observed first frame",
        )


# long by its signature and docstring: 50 lines of code, one algorithm (paper Alg. 2)
def fill_sequence(
    model: SADM,
    frames: torch.Tensor,
    ages: torch.Tensor,
    present: torch.Tensor,
    *,
    config: dict,
    settings: SamplerSettings | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SequenceOutput:
    """Fill the missing and future frames of timelines autoregressively (paper Alg. 2).

    Frames are generated in age order. Each is conditioned on every known frame: the present
    ones (before and after it) and those already generated. ``c`` is computed once per frame, outside the denoiser, and
    guidance uses a zero volume as the unconditional input. Present frames are returned
    unchanged, bit for bit.

    Args:
        model: a trained :class:`SADM`; moved to ``device`` and put in eval mode.
        frames: (N, F, 1, D, H, W) on the model grid; values in missing slots are ignored.
        ages: (N, F) months, non-decreasing along F.
        present: (N, F) bool; frame 0 must be present in every row.
        config: the method config (schedule, prediction, sampler, clip_x0).
        settings: sampler settings; default ``config["sampler"]``.
        generator: CPU generator for the noise; default one seeded with ``settings.seed``.
        device: where the network runs; default the model's device.
        progress, cancel: passed to the engine. The stage of frame k is
            ``"frame k (age mo)"``, with the age of the first row that generates frame k.

    Raises:
        InputError: wrong shapes, more frames than ``max_frames``, no present frame,
            decreasing ages, or a missing first frame.
        Cancelled: ``cancel`` was set.
    """
    present = present.bool()
    _check_sequence(model, frames, ages, present)
    settings = settings or SamplerSettings.from_dict(config["sampler"])
    seed = None
    if generator is None:
        generator, seed = make_generator(settings.seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prepare_network(model, device)
    schedule = Schedule.from_config(config["schedule"])
    clip = config.get("clip_x0")
    clip = tuple(clip) if isinstance(clip, (list, tuple)) else clip

    result = frames.clone()
    timeline = frames.to(device=device, dtype=torch.float32, copy=True)
    ages_d = ages.to(device=device, dtype=torch.float32)
    known = present.to(device, copy=True)
    output = SequenceOutput(result, seed=seed)
    with torch.no_grad():
        for k in range(frames.shape[1]):
            rows = (~known[:, k]).nonzero().flatten()
            if rows.numel() == 0:
                continue
            target = torch.full((rows.numel(),), k, dtype=torch.long, device=device)
            c = model.condition(timeline[rows], ages_d[rows], known[rows], target)
            reference = None
            if config.get("residual"):
                reference = context_reference(timeline[rows], ages_d[rows], known[rows], target)
                c = torch.cat([c, reference], dim=1)
            out = sample(
                lambda x_t, t, cond: model(x_t, t, cond),
                (c.shape[0], 1, *c.shape[2:]),
                schedule,
                config.get("prediction", "epsilon"),
                settings,
                cond=c,
                uncond=torch.zeros_like(c),
                clip_x0=clip,
                reference=reference,
                generator=generator,
                device=device,
                progress=progress,
                cancel=cancel,
                stage=f"frame {k} ({float(ages[int(rows[0]), k]):g} mo)",
            )
            timeline[rows, k] = out.sample.to(device)
            known[rows, k] = True
            result[rows.to(result.device), k] = out.sample.to(result)
            output.generated.append(k)
            output.intermediates[k] = out.intermediates
    return output
