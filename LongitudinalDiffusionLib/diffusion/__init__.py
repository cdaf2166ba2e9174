"""Diffusion engine: noise schedules, samplers, guidance, progress and cancellation.

Names are imported on first use (PEP 562), so that ``diffusion.samplers`` - the sampler names,
which job specs and the Slicer panel check - can be imported where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import (
        autocast,
        cpu_onednn_enabled,
        describe_device,
        memory_format,
        prepare_network,
        resolve_device,
        use_onednn_convolutions,
    )
    from .samplers import SAMPLERS, SamplerName, timesteps
    from .sampling import (
        Intermediate,
        SampleOutput,
        SamplerSettings,
        make_generator,
        residual_target,
        sample,
    )
    from .schedule import PREDICTIONS, Prediction, Schedule

#: public name -> the submodule that defines it
_HOME = {
    "autocast": "device",
    "cpu_onednn_enabled": "device",
    "describe_device": "device",
    "memory_format": "device",
    "prepare_network": "device",
    "resolve_device": "device",
    "use_onednn_convolutions": "device",
    "SAMPLERS": "samplers",
    "SamplerName": "samplers",
    "timesteps": "samplers",
    "Intermediate": "sampling",
    "SampleOutput": "sampling",
    "SamplerSettings": "sampling",
    "make_generator": "sampling",
    "residual_target": "sampling",
    "sample": "sampling",
    "PREDICTIONS": "schedule",
    "Prediction": "schedule",
    "Schedule": "schedule",
}

__all__ = [
    "Intermediate",
    "PREDICTIONS",
    "Prediction",
    "SAMPLERS",
    "SampleOutput",
    "SamplerName",
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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
