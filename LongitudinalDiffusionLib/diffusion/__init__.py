"""Diffusion engine: noise schedules, samplers, guidance, progress and cancellation."""

from .device import autocast, describe_device, resolve_device
from .sampling import (
    SAMPLERS,
    Intermediate,
    SampleOutput,
    SamplerSettings,
    make_generator,
    sample,
    timesteps,
)
from .schedule import PREDICTIONS, Schedule

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "Intermediate",
    "SampleOutput",
    "SamplerSettings",
    "Schedule",
    "autocast",
    "describe_device",
    "make_generator",
    "resolve_device",
    "sample",
    "timesteps",
]
