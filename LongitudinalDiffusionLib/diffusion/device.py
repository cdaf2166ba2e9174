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

On the CPU nothing of this applies: float32, default (contiguous) layout. What the CPU
gets instead is a choice of convolution kernel (:func:`use_onednn_convolutions`): PyTorch
runs a float32 3D convolution of a batch of 1 with N*C*D*H <= 20480 (every level of the
demo networks, and the deep levels of larger ones) on its native ``slow_conv3d`` kernel,
about 3-4 times slower per sampling step here than oneDNN, which it uses for larger batches
(docs/performance.md). :func:`prepare_network` therefore routes the Conv3d layers of a
network prepared for the CPU through oneDNN for inference; the environment variable
``LONGDIFF_CPU_ONEDNN=0`` (read when a network is prepared) keeps PyTorch's own choice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import LongitudinalDiffusionError

DEVICES = ("auto", "cpu", "cuda")

#: "0" (or "false", "no", "off") keeps PyTorch's own choice of CPU convolution kernel
CPU_ONEDNN_ENV = "LONGDIFF_CPU_ONEDNN"


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


class OneDNNConv3d(nn.Conv3d):
    """A ``Conv3d`` whose inference forwards on the CPU run on oneDNN whatever the batch size.

    PyTorch (``ConvParams::use_mkldnn``, aten/src/ATen/native/Convolution.cpp) sends a
    float32 CPU convolution to oneDNN only if the batch is larger than 1, or N*C*D*H >
    20480, or the kernel is larger than 3x3 (or grouped), though on one thread never for an
    unstrided 1x1 kernel; otherwise to its native ``slow_conv3d``. Here a float32,
    zero-padded forward on the CPU with gradients off calls ``aten.mkldnn_convolution``
    directly: the same convolution (equal up to float32 round-off), on the kernel PyTorch
    itself picks for a batch of 2. Anything else (training,
    other devices or dtypes, other padding modes, a PyTorch without oneDNN or with
    ``torch.backends.mkldnn.enabled`` off) takes ``Conv3d``'s own path. Parameters, state
    dict and the type checks of ``Conv3d`` are unchanged; :func:`use_onednn_convolutions`
    switches a layer in and out of this class.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            not torch.is_grad_enabled()
            and input.device.type == "cpu"
            and input.dtype == torch.float32
            and weight.dtype == torch.float32
            and self.padding_mode == "zeros"
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
        ):
            return torch.ops.aten.mkldnn_convolution(
                input, weight, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
            )
        return super()._conv_forward(input, weight, bias)

    def _get_name(self) -> str:  # printed as the Conv3d it is
        return "Conv3d"


def cpu_onednn_enabled() -> bool:
    """Whether :func:`prepare_network` routes CPU convolutions through oneDNN (environment
    variable ``LONGDIFF_CPU_ONEDNN``; on unless it says 0, false, no or off)."""
    return os.environ.get(CPU_ONEDNN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def use_onednn_convolutions(module: nn.Module, enabled: bool = True) -> int:
    """Route the ``nn.Conv3d`` layers of ``module`` through oneDNN for CPU inference
    (:class:`OneDNNConv3d`), or with ``enabled=False`` back to PyTorch's own choice; in place.

    Layers of other (sub)classes, and those with string padding ("same"), are left alone.
    Returns the number of layers switched.
    """
    count = 0
    for m in module.modules():
        if enabled and type(m) is nn.Conv3d and not isinstance(m.padding, str):
            m.__class__ = OneDNNConv3d
        elif not enabled and type(m) is OneDNNConv3d:
            # back to the plain class, same parameters: a class swap, not an assignment mypy can follow
            m.__class__ = nn.Conv3d  # type: ignore[assignment]
        else:
            continue
        count += 1
    return count


def prepare_network(module: nn.Module, device: torch.device | str, onednn: bool | None = None) -> nn.Module:
    """Ready a network for sampling on ``device``: moved there, in eval mode and, on CUDA, with
    its Conv3d kernels channels-last-3d (:func:`memory_format`). On the CPU its Conv3d layers
    are routed through oneDNN for inference (:func:`use_onednn_convolutions`; ``onednn``
    overrides the environment switch :func:`cpu_onednn_enabled`); weights and layout are
    left as they are. Returns the same module, changed in place (as ``.to`` does).
    """
    device = torch.device(device)
    if onednn is None:
        onednn = cpu_onednn_enabled()
    use_onednn_convolutions(module, enabled=device.type == "cpu" and onednn)
    return set_memory_format(module.to(device), memory_format(device)).eval()


#: Allocation failures torch reports as a plain RuntimeError, with no type of their own: the
#: CPU allocator, and cuDNN / cuBLAS when their workspace does not fit. Their message is the
#: only sign, so these (and only these) are recognised by it.
UNTYPED_OUT_OF_MEMORY = (
    "DefaultCPUAllocator: can't allocate memory",
    "CUDNN_STATUS_NOT_ENOUGH_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory: torch's ``OutOfMemoryError`` (CUDA,
    and MPS in torch 2.x), Python's ``MemoryError``, or one of :data:`UNTYPED_OUT_OF_MEMORY`."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in UNTYPED_OUT_OF_MEMORY)


def describe_device(device: torch.device) -> str:
    """Human description for logs and the panel: 'CPU (torch 2.13.0)' or the GPU name and memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} ({props.total_memory / 2**30:.1f} GB, CUDA {torch.version.cuda}, torch {torch.__version__})"
        )
    return f"CPU ({torch.get_num_threads()} threads, torch {torch.__version__})"
