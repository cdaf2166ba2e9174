"""Noise schedules: the betas of a discrete diffusion process and the quantities derived
from them (Ho et al. 2020, eq. 4; Nichol & Dhariwal 2021 for the cosine schedule).

The beta curves come from MONAI's ``NoiseSchedules`` registry (``linear_beta``,
``scaled_linear_beta``, ``sigmoid_beta``, ``cosine``), so a schedule here means exactly
what it means in MONAI's own schedulers; everything derived is kept in float64 so that
1000- or 4000-step products stay accurate, and cast to the sample's dtype on use.
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

import torch
from monai.networks.schedulers.scheduler import NoiseSchedules


class Prediction(str, Enum):
    """What a denoiser predicts: the noise, the clean image, or v (Salimans & Ho 2022)."""

    EPSILON = "epsilon"
    SAMPLE = "sample"
    V_PREDICTION = "v_prediction"


PREDICTIONS: tuple[str, ...] = tuple(p.value for p in Prediction)
_ALIASES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "sigmoid": "sigmoid_beta"}


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type '{prediction}' (expected one of {', '.join(PREDICTIONS)})")


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (N, 1, 1, ...) to broadcast over ``like``."""
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class Schedule:
    """A discrete noise schedule of ``num_steps`` betas, with the training-time algebra.

    ``config`` is the JSON form stored in model cards, e.g.
    ``{"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000}``.
    """

    def __init__(self, betas: torch.Tensor, config: dict[str, Any] | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must all lie in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.config = dict(config or {"kind": "custom", "num_steps": int(betas.numel())})

    @property
    def num_steps(self) -> int:
        return int(self.betas.numel())

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Schedule:
        args = dict(config)
        kind = str(args.pop("kind", "linear"))
        steps = int(args.pop("num_steps"))
        name = _ALIASES.get(kind, kind)
        if name not in NoiseSchedules:
            raise ValueError(f"unknown noise schedule '{kind}' (known: linear, scaled_linear, sigmoid, cosine)")
        made = NoiseSchedules[name](steps, **args)
        betas = made[0] if isinstance(made, tuple) else made
        return cls(betas, {"kind": kind, "num_steps": steps, **args})

    @classmethod
    def linear(cls, beta_start: float, beta_end: float, num_steps: int) -> Schedule:
        return cls.from_config(
            {"kind": "linear", "beta_start": beta_start, "beta_end": beta_end, "num_steps": num_steps}
        )

    @classmethod
    def cosine(cls, num_steps: int, s: float = 8e-3) -> Schedule:
        return cls.from_config({"kind": "cosine", "num_steps": num_steps, "s": s})

    def to(self, device: torch.device | str) -> Schedule:
        """This schedule with its tables on ``device`` (``self`` when they already are there).

        For the per-step look-ups of a sampling loop on a GPU: with the tables and the step
        index on the device, :meth:`to_x0` and :meth:`to_eps` copy nothing from the host, and a
        host-to-device copy would make the CPU wait for the GPU at every step. Same float64
        values, so the same results.
        """
        device = torch.device(device)
        if self.betas.device == device:
            return self
        moved = copy.copy(self)
        moved.betas, moved.alphas, moved.alphas_cumprod = (
            v.to(device) for v in (self.betas, self.alphas, self.alphas_cumprod)
        )
        return moved

    def to_config(self) -> dict[str, Any]:
        return dict(self.config)

    def __repr__(self) -> str:
        return f"Schedule({self.config})"

    # -- forward process and training targets ---------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = _per_sample(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_prediction(prediction)
        if prediction == "epsilon":
            return noise
        if prediction == "sample":
            return x0
        abar = _per_sample(self.alphas_cumprod, t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def to_x0(self, prediction: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean image implied by a model output at step t."""
        _check_prediction(prediction)
        if prediction == "sample":
            return output
        abar = _per_sample(self.alphas_cumprod, t, x_t)
        if prediction == "epsilon":
            return (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * output

    def to_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by x_t and a (possibly clipped) x0."""
        abar = _per_sample(self.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def random_steps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Uniform training steps in [0, num_steps)."""
        return torch.randint(0, self.num_steps, (n,), generator=generator).to(device or "cpu")
