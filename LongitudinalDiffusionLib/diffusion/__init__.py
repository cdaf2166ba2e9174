"""Diffusion engine: noise schedules, samplers, guidance, progress and cancellation."""

from .device import (
    autocast,
    cpu_onednn_enabled,
    describe_device,
    memory_format,
    prepare_network,
    resolve_device,
    use_onednn_convolutions,
)
from .sampling import (
    SAMPLERS,
    Intermediate,
    SampleOutput,
    SamplerSettings,
    make_generator,
    residual_target,
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
    "cpu_onednn_enabled",
    "describe_device",
    "make_generator",
    "memory_format",
    "prepare_network",
    "residual_target",
    "resolve_device",
    "sample",
    "timesteps",
    "use_onednn_convolutions",
]
