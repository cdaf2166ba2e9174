"""Device choice and mixed precision: one code path, the device decides.

``resolve_device("auto")`` takes the first CUDA GPU when there is one, else the CPU.
Mixed precision (float16 autocast) is used on CUDA only; the sampler's own arithmetic
stays in float32 so the update rules are exact whatever the network runs in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import LongitudinalDiffusionError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a device that exists here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LongitudinalDiffusionError(
                f"device '{spec}' was asked for but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu (or auto)"
            )
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LongitudinalDiffusionError(f"device '{spec}' does not exist: {torch.cuda.device_count()} GPU(s) here")
        return device
    raise LongitudinalDiffusionError(f"unknown device '{spec}' (expected auto, cpu, cuda or cuda:N)")


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """float16 autocast around network forwards on CUDA; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def describe_device(device: torch.device) -> str:
    """Human description for logs and the panel: 'CPU (torch 2.13.0)' or the GPU name and memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} ({props.total_memory / 2**30:.1f} GB, CUDA {torch.version.cuda}, torch {torch.__version__})"
        )
    return f"CPU ({torch.get_num_threads()} threads, torch {torch.__version__})"
