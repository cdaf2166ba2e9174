"""The sampling loop: ancestral DDPM, DDIM (eta) and DPM-Solver++(2M), for eps-, x0- and
v-prediction networks, with classifier-free guidance, clipping of x0, captured
intermediates, progress events, cooperative cancellation and seeded noise.

One loop serves every sampler. At each of the chosen steps tau_0 > tau_1 > ... > tau_{n-1}=0
the network runs once (conditional and unconditional halves batched together under
guidance), its output becomes a prediction of x0 (clipped if asked), and the sampler's
``step`` moves x to the next step. The last step returns the predicted x0. The samplers
(DDPM, DDIM, DPM-Solver++(2M)) are classes in :mod:`.samplers`; this loop names none of them.

Choices: DDPM/DDIM steps are spread evenly over [T-1, 0] including both ends
("trailing" spacing), so the first step starts at the noisiest step the network was
trained on; DPM-Solver++ steps are spread evenly in log-SNR (see ``timesteps``). Noise is drawn
on a CPU generator and moved to the device, so a seed gives the same numbers on CPU and
CUDA. MONAI's schedulers were the starting point; the loop is owned here because MONAI's
inferer has no progress or cancel hook and no place for x0 clipping with a custom
transform (cWDM clips in image space, not in wavelet space).

Cost per step: the network forward plus a handful of element-wise operations on one
volume (``bench/loop_overhead.py`` measures the two against a bare forward). On a GPU the
loop never waits for the device: the schedule tables and step indices live on it, the
noise of stochastic samplers is drawn into page-locked memory and copied asynchronously,
and nothing is read back before the end (or a captured intermediate). There, volumes are
channels-last-3d and forwards run under float16 autocast (see :mod:`.device`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..errors import LongitudinalDiffusionError, OutOfMemory
from ..progress import CancelToken, ProgressCallback, Stage
from .device import autocast, is_out_of_memory, memory_format, to_memory_format
from .samplers import SAMPLERS, VARIANCES, make_sampler
from .schedule import Schedule, _check_prediction

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class SamplerSettings:
    """How to sample. ``steps=None`` means every step of the schedule.

    ``guidance`` is the classifier-free guidance scale s in eps = eps_u + s (eps_c - eps_u);
    1 switches guidance off. ``capture`` keeps that many intermediates, evenly spread.
    """

    name: str = "ddim"
    steps: int | None = 50
    eta: float = 0.0
    guidance: float = 1.0
    seed: int | None = 0
    capture: int = 0
    variance: str = "fixed_small"
    amp: bool = True

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise LongitudinalDiffusionError(f"unknown sampler '{self.name}' (expected one of {', '.join(SAMPLERS)})")
        if self.variance not in VARIANCES:
            raise LongitudinalDiffusionError(f"unknown variance '{self.variance}' (expected {', '.join(VARIANCES)})")
        if self.steps is not None and int(self.steps) < 1:
            raise LongitudinalDiffusionError(f"the number of sampling steps must be at least 1, not {self.steps}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise LongitudinalDiffusionError(f"eta must lie in [0, 1], not {self.eta}")
        if self.capture < 0:
            raise LongitudinalDiffusionError("capture must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplerSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(data or {}) - known
        if unknown:
            raise LongitudinalDiffusionError(f"unknown sampler setting(s): {', '.join(sorted(unknown))}")
        return cls(**(data or {}))

    def merged(self, **overrides: Any) -> SamplerSettings:
        """A copy with the given fields replaced (None values are ignored)."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return SamplerSettings(**data)


@dataclass
class Intermediate:
    """The state entering step ``step`` (diffusion time ``t``) and its predicted x0."""

    step: int
    t: int
    x_t: torch.Tensor
    x0: torch.Tensor


@dataclass
class SampleOutput:
    sample: torch.Tensor
    intermediates: list[Intermediate] = field(default_factory=list)
    seed: int | None = None
    evaluations: int = 0


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator and the seed it was given (a fresh random one when ``seed`` is None)."""
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen, int(seed)


_CLAMPS_SAID: set[tuple[int, int]] = set()


def _warn_clamp(asked: int, chain: int) -> None:
    """Say aloud (once per run and pair) that more steps were asked than the chain has."""
    if (asked, chain) not in _CLAMPS_SAID:
        _CLAMPS_SAID.add((asked, chain))
        log.warning(
            "%d steps asked, but the model's chain has %d: sampling with %d steps (the most it can take)",
            asked,
            chain,
            chain,
        )


def capture_indices(n: int, count: int) -> set[int]:
    if count <= 0:
        return set()
    return {int(i) for i in np.unique(np.round(np.linspace(0, n - 1, min(count, n))).astype(int))}


def _batch_pair(cond: Any, uncond: Any) -> Any:
    """[cond, uncond] concatenated along the batch axis, for tensors or dicts of tensors."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, dict):
        return {k: _batch_pair(v, uncond[k]) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_batch_pair(a, b) for a, b in zip(cond, uncond))
    if cond is None:
        return None
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__}")


def _to_device(obj: Any, device: torch.device, fmt: torch.memory_format = torch.contiguous_format) -> Any:
    """Tensors (in dicts, lists, tuples) moved to ``device``, 5-D ones in layout ``fmt``."""
    if isinstance(obj, torch.Tensor):
        return to_memory_format(obj.to(device), fmt)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, fmt) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, fmt) for v in obj)
    return obj


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``x`` that shares no memory with it."""
    x = x.detach().contiguous()
    return x.cpu() if x.device.type != "cpu" else x.clone()


def _host_noise(shape: tuple[int, ...], generator: torch.Generator, pinned: bool = False) -> torch.Tensor:
    """Standard normal float32 noise from the CPU generator, the very numbers of
    ``torch.randn(shape, generator=generator)``; in page-locked memory when ``pinned``, so
    that its copy to a GPU can be asynchronous."""
    return torch.empty(shape, dtype=torch.float32, pin_memory=pinned).normal_(generator=generator)


def _clipper(clip_x0: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if clip_x0 is None or callable(clip_x0):
        return clip_x0
    lo, hi = clip_x0
    return lambda x: x.clamp(lo, hi)


# long by its signature: 58 lines of code, the one sampling loop every method shares
def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    schedule: Schedule,
    prediction: str,
    settings: SamplerSettings | None = None,
    *,
    cond: Any = None,
    uncond: Any = None,
    clip_x0: Any = None,
    reference: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    stage: str = "sample",
) -> SampleOutput:
    """Draw samples of ``shape`` from a trained denoiser; see the module docstring.

    ``reference`` (same shape as a sample) makes this residual diffusion: the chain runs on
    ``image - reference`` (what a network trained with :func:`residual_target` predicts),
    ``clip_x0`` still applies to the image, and the returned sample and captured x0 are
    images (the reference added back).
    """
    settings = settings or SamplerSettings()
    _check_prediction(prediction)
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = settings.seed
    if generator is None:
        generator, seed = make_generator(settings.seed)
    tables = schedule.to(device)  # the schedule's tables on the device, for to_x0 / to_eps
    sampler = make_sampler(settings, schedule, tables)
    taus = sampler.timesteps(settings.steps)
    if settings.steps is not None and int(settings.steps) > schedule.num_steps:
        _warn_clamp(int(settings.steps), schedule.num_steps)
    keep = capture_indices(len(taus), settings.capture)
    guided = uncond is not None and settings.guidance != 1.0
    clip = _clipper(clip_x0)
    ref = None
    if reference is not None:
        ref = reference.to(device=device, dtype=torch.float32)
        if tuple(ref.shape) != tuple(shape):
            raise LongitudinalDiffusionError(f"reference has shape {tuple(ref.shape)}, expected {tuple(shape)}")
        image_clip, shift = clip, ref
        clip = (lambda r: image_clip(r + shift) - shift) if image_clip is not None else None
    fmt = memory_format(device)
    cuda = device.type == "cuda"

    def randn() -> torch.Tensor:
        if cuda:  # page-locked and asynchronous: the loop does not wait for the GPU
            return to_memory_format(_host_noise(shape, generator, pinned=True).to(device, non_blocking=True), fmt)
        return _host_noise(shape, generator).to(device)

    x = noise.to(device=device, dtype=torch.float32) if noise is not None else randn()
    if tuple(x.shape) != tuple(shape):
        raise LongitudinalDiffusionError(f"initial noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
    x = to_memory_format(x, fmt)
    if ref is not None:
        ref = to_memory_format(ref, fmt)
    cond_in = _to_device(_batch_pair(cond, uncond) if guided else cond, device, fmt)
    evaluate = _network_call(denoiser, cond_in, settings, device, fmt, guided=guided, stage=stage)

    steps = Stage(stage, len(taus), progress, cancel).start()
    intermediates: list[Intermediate] = []
    with torch.inference_mode():
        for i, t in enumerate(taus):
            t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            x0 = tables.to_x0(prediction, evaluate(x, t), x, t_vec)
            if clip is not None:
                x0 = clip(x0)
            if i in keep:
                shown = x0 if ref is None else x0 + ref
                intermediates.append(Intermediate(i, t, _to_host(x), _to_host(shown)))
            if i == len(taus) - 1:
                x = x0
                steps.advance()
                break
            x = sampler.step(x0, x, t, taus[i + 1], randn)
            steps.advance()
    if ref is not None:
        x = x + ref
    return SampleOutput(x.detach().float().contiguous().cpu(), intermediates, seed, len(taus))


def _network_call(
    denoiser: Denoiser,
    cond_in: Any,
    settings: SamplerSettings,
    device: torch.device,
    fmt: torch.memory_format,
    *,
    guided: bool,
    stage: str,
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The network's output at (x_t, t) in float32: both halves of a guided batch in one call,
    combined with the guidance scale; running out of device memory becomes :class:`OutOfMemory`
    naming the step and the batch."""

    def evaluate(x_t: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((x_t.shape[0] * (2 if guided else 1),), t, dtype=torch.long, device=device)
        xin = to_memory_format(torch.cat([x_t, x_t], dim=0) if guided else x_t, fmt)
        try:
            with autocast(device, settings.amp):
                out = denoiser(xin, tt, cond_in)
        except Exception as exc:  # only out of memory is translated; anything else goes on as it is
            if is_out_of_memory(exc):
                raise OutOfMemory(
                    f"{stage}: the {device.type.upper()} ran out of memory for a batch of shape {tuple(xin.shape)}",
                    "use a smaller grid, fewer samples at once, or the CPU",
                ) from exc
            raise
        out = out.float()
        if guided:
            c, u = out.chunk(2, dim=0)
            out = u + settings.guidance * (c - u)
        return out

    return evaluate


def residual_target(target: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """What a network learns to generate: ``target`` itself, or its difference from
    ``reference`` for residual diffusion (see :func:`sample`)."""
    return target if reference is None else target - reference.to(target)
