"""Building blocks shared by several methods: embeddings of the diffusion step and of a
continuous scalar such as an age or a time interval (MONAI has none for scalars)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sin/cos features of a (N,) tensor of real values -> (N, dim).

    Same convention as DDPM/guided-diffusion timestep embeddings (cos first), so integer
    diffusion steps and continuous ages share one function.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float().reshape(-1, 1) * freqs.reshape(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class ScalarEmbedding(nn.Module):
    """A continuous scalar (age or interval, in months) -> a learned ``dim`` vector.

    ``scale`` multiplies the value before the sinusoidal features so that one month moves
    the fastest features by a useful fraction of a period (default 10: 0.1 month resolution
    of a step embedding's 1-unit spacing), followed by the usual two-layer SiLU MLP.
    """

    def __init__(self, dim: int, hidden: int | None = None, scale: float = 10.0) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(value * self.scale, self.dim))
