"""Device choice, mixed precision and memory layout: one code path, the device decides.

``resolve_device("auto")`` takes the first CUDA GPU when there is one, else the CPU.
On CUDA, and only there:

- mixed precision: network forwards run under float16 autocast (unless a model's sampler
  settings say ``amp: false``); the sampler's own arithmetic stays in float32, and the
  network output is cast back to float32, so the update rules are exact whatever the
  network runs in;
- memory layout: 5-D tensors (Conv3d kernels, volumes) are kept channels-last-3d (NDHWC),
  the layout in which cuDNN's 3D convolutions, float16 tensor-core ones above all, are
  fastest (:func:`memory_format`, :func:`prepare_network`).

On the CPU nothing of this applies: float32, default (contiguous) layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

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


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout for 5-D tensors on ``device``: channels-last-3d on CUDA, contiguous elsewhere."""
    return torch.channels_last_3d if torch.device(device).type == "cuda" else torch.contiguous_format


def to_memory_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` in layout ``fmt`` if it is 5-D (a no-op when it already is); anything else as is.

    The default layout changes nothing at all, so the CPU path is untouched.
    """
    if fmt == torch.contiguous_format or x.dim() != 5:
        return x
    return x.contiguous(memory_format=fmt)


def set_memory_format(module: nn.Module, fmt: torch.memory_format) -> nn.Module:
    """Put the 5-D parameters and buffers of ``module`` (Conv3d kernels) in layout ``fmt``, in place.

    Unlike ``module.to(memory_format=...)`` this leaves tensors of other ranks alone (a 4-D
    position table would make that call fail for channels-last-3d).
    """
    if fmt != torch.contiguous_format:
        module._apply(lambda t: to_memory_format(t, fmt))
    return module


def prepare_network(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Ready a network for sampling on ``device``: moved there, in eval mode and, on CUDA, with
    its Conv3d kernels channels-last-3d (:func:`memory_format`). On the CPU this is exactly
    ``module.to(device).eval()``. Returns the same module, changed in place (as ``.to`` does).
    """
    device = torch.device(device)
    return set_memory_format(module.to(device), memory_format(device)).eval()


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
