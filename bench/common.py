"""Helpers shared by the benchmarks of the sampling engine (``loop_overhead``, ``work_once``,
``memory``, ``scaling``): interleaved timing, and untrained networks of the methods set up
exactly as the library's inference functions hand them to ``diffusion.sample``.

Networks are prepared for the CPU as the library prepares them (``prepare_network``, which
routes their Conv3d layers through oneDNN); :func:`convolutions` switches a network between
that route and PyTorch's own choice of kernel for the comparisons.

Random weights are enough for time and memory. MONAI and cWDM zero-initialise the last
convolution of every residual branch, so an untrained network ignores most of its input;
those tensors are re-drawn (as training would make them non-zero) so that comparisons of
outputs mean something.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule, prepare_network, sample  # noqa: E402
from LongitudinalDiffusionLib.diffusion.device import use_onednn_convolutions  # noqa: E402
from LongitudinalDiffusionLib.diffusion.sampling import _batch_pair  # noqa: E402
from LongitudinalDiffusionLib.models import build, default_config  # noqa: E402

#: the bundled demo models of these methods generate a residual (their cards say "residual": true)
RESIDUAL_DEMOS = ("cas-diffcom", "interval", "sadm")


def machine() -> str:
    """One line: torch version, threads, CPU."""
    cpu = platform.processor() or platform.machine()
    return f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu}, Python {platform.python_version()}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times (``time.perf_counter``) of each function over ``rounds`` rounds.

    Every function runs ``warmup`` times first; then each round runs every function once, in
    an order that alternates between rounds, so that a slow spell of a busy machine falls
    on all of them alike. Compare them by the median of per-round ratios (:func:`ratio`).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of times[num] / times[den]."""
    return median([a / b for a, b in zip(times[num], times[den])])


def randomise_zero_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def method_config(method: str, scale: str) -> dict:
    """The method's config at ``scale``; at demo scale as the bundled demo models (residual)."""
    config = default_config(method, scale)
    if scale == "demo" and method in RESIDUAL_DEMOS:
        config["residual"] = True
    return config


def untrained(method: str, config: dict, seed: int = 0) -> torch.nn.Module:
    """``method``'s network with random weights, prepared for the CPU as the library prepares
    it (``prepare_network``: eval mode, Conv3d through oneDNN unless LONGDIFF_CPU_ONEDNN=0)."""
    torch.manual_seed(seed)
    return prepare_network(randomise_zero_init(build(method, config), seed), "cpu").requires_grad_(False)


def unet_3m() -> torch.nn.Module:
    """A 2.9 M-parameter MONAI ``DiffusionModelUNet`` (channels 32-64-64, attention at the deepest level)."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(32, 64, 64),
        attention_levels=(False, False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=16,
    )
    return prepare_network(randomise_zero_init(net), "cpu").requires_grad_(False)


#: the two routes of a float32 CPU Conv3d that the benchmarks compare: label -> oneDNN forced
BACKENDS = {"PyTorch default": False, "oneDNN forced": True}


@contextlib.contextmanager
def convolutions(module: torch.nn.Module, onednn: bool) -> Iterator[None]:
    """Within the block, the Conv3d layers of ``module`` run on the CPU through oneDNN whatever
    the batch size (``onednn=True``, what ``prepare_network`` does on the CPU, see
    ``diffusion.device.OneDNNConv3d``), or take PyTorch's own choice of kernel (``False``,
    what the library did before). The previous route of each layer is restored afterwards.

    PyTorch (``ConvParams::use_mkldnn``, aten/src/ATen/native/Convolution.cpp) sends a float32
    CPU convolution to oneDNN only if the batch is larger than 1, or N*C*D*H > 20480, or the
    kernel is larger than 3x3 (or grouped), though on one thread never for an unstrided 1x1
    kernel; otherwise to its native ``slow_conv3d``. A batch of 1 on the demo grids therefore
    takes the native path, a batch of 2 (guidance) oneDNN for all but its 1x1 kernels.
    """
    before = {m: type(m) for m in module.modules() if isinstance(m, torch.nn.Conv3d)}
    use_onednn_convolutions(module, enabled=onednn)
    try:
        yield
    finally:
        for m, kind in before.items():
            m.__class__ = kind


def pytorch_convolutions(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """:func:`convolutions` with PyTorch's own choice of kernel."""
    return convolutions(module, False)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or dicts / lists of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


@dataclass
class Case:
    """One network as the library samples it: the arguments of ``diffusion.sample``.

    ``encode`` recomputes the condition from the raw inputs (what the library does once per
    sample); ``raw`` holds those inputs.
    """

    name: str
    model: torch.nn.Module
    denoiser: Callable
    shape: tuple[int, ...]
    schedule: Schedule
    prediction: str
    cond: Any = None
    uncond: Any = None
    guidance: float = 1.0
    clip: Any = None
    reference: torch.Tensor | None = None
    amp: bool = True
    encode: Callable[[], Any] | None = None

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.guidance != 1.0

    def settings(self, steps: int, **overrides: Any) -> SamplerSettings:
        base = SamplerSettings("ddim", steps, eta=0.0, guidance=self.guidance, seed=0, amp=self.amp)
        return base.merged(**overrides)

    def sample(self, steps: int, denoiser: Callable | None = None, device: str = "cpu", **kwargs: Any):
        """``diffusion.sample`` with DDIM over ``steps`` steps, as the library calls it."""
        args = dict(cond=self.cond, uncond=self.uncond, clip_x0=self.clip, reference=self.reference)
        args.update(kwargs)
        settings = self.settings(steps, guidance=args.pop("guidance", None))
        fn = denoiser or self.denoiser
        return sample(fn, self.shape, self.schedule, self.prediction, settings, device=device, **args)

    def forward_inputs(self, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The network input of one step, batched as the engine batches it (two halves under guidance)."""
        n = self.shape[0] * (2 if self.guided else 1)
        x = torch.randn((n, *self.shape[1:]), generator=torch.Generator().manual_seed(1)).to(device)
        t = torch.full((n,), self.schedule.num_steps // 2, dtype=torch.long, device=device)
        cond = _batch_pair(self.cond, self.uncond) if self.guided else self.cond
        return x, t, cond

    @property
    def input_desc(self) -> str:
        return "x".join(str(s) for s in self.shape)


def _rand(shape, seed: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo


@torch.no_grad()
def method_case(method: str, config: dict, image_size=None, stage: str = "generator") -> Case:
    """``method``'s network (untrained) and the arguments its inference function passes to
    the engine, for one case at ``image_size`` (default: the config's grid; for the
    Cas-DiffCom refiner, stage="refiner", the high-resolution grid)."""
    if image_size is not None:  # a grid of its own (SADM's attention is built for its grid)
        config = {**config, ("sr_image_size" if stage == "refiner" else "image_size"): list(image_size)}
        if "sr_image_size" in config:  # Cas-DiffCom's cascade doubles the grid: keep both stages in step
            if stage == "refiner":
                config["image_size"] = [s // 2 for s in image_size]
            else:
                config["sr_image_size"] = [2 * s for s in image_size]
    model = untrained(method, config)
    common = dict(
        schedule=Schedule.from_config(config["schedule"]),
        prediction=config["prediction"],
        amp=bool(config.get("sampler", {}).get("amp", True)),
    )
    key = (method, stage) if method == "cas-diffcom" else (method, "generator")
    if key not in _CASES:
        raise ValueError(f"no bench case for {method} / {stage}")
    return _CASES[key](model, config, common)


def _clip(config: dict) -> tuple[float, float] | None:
    return tuple(config["intensity_range"]) if config.get("intensity_range") else None


def _interval_case(model: Any, config: dict, common: dict) -> Case:
    """As ``interval.generate``: one source scan and an interval."""
    source = _rand((1, 1, *config["image_size"]), 1)
    return Case(
        "interval",
        model,
        lambda x, t, c: model(x, t, c["source"], c["interval"]),
        tuple(source.shape),
        cond={"source": source, "interval": torch.tensor([6.0])},
        clip=_clip(config),
        reference=source if config.get("residual") else None,
        **common,
    )


def _sadm_case(model: Any, config: dict, common: dict) -> Case:
    """As ``sadm.fill_sequence``: one missing frame of a four-frame timeline."""
    from LongitudinalDiffusionLib.models import sadm

    residual = bool(config.get("residual"))
    frames = _rand((1, 4, 1, *config["image_size"]), 2, 0.0, 1.0)
    ages = torch.tensor([[12.0, 18.0, 24.0, 36.0]])
    present = torch.tensor([[True, True, False, True]])
    target = torch.tensor([2])

    def encode() -> torch.Tensor:  # c (and the residual reference), once per generated frame
        c = model.condition(frames, ages, present, target)
        if residual:
            c = torch.cat([c, sadm.context_reference(frames, ages, present, target)], dim=1)
        return c

    c = encode()
    return Case(
        "sadm",
        model,
        lambda x, t, cond: model(x, t, cond),
        (1, 1, *config["image_size"]),
        cond=c,
        uncond=torch.zeros_like(c),
        guidance=float(config["sampler"].get("guidance", 1.0)),
        clip=tuple(config["clip_x0"]) if config.get("clip_x0") else None,
        reference=c[:, 1:2].clone() if residual else None,
        encode=encode,
        **common,
    )


def _cwdm_case(model: Any, config: dict, common: dict) -> Case:
    """As ``cwdm.synthesize``: the wavelet subbands of the condition contrasts."""
    from LongitudinalDiffusionLib.models import cwdm

    conditions = _rand((1, len(config["conditions"]), *config["image_size"]), 3, 0.0, 1.0)

    def encode() -> torch.Tensor:  # the condition subbands, once per sample
        return cwdm.condition_channels(conditions, config)

    c = encode()
    return Case(
        "cwdm",
        model,
        lambda x, t, cc: model(torch.cat([x, cc.to(x.dtype)], dim=1), t),
        (1, cwdm.SUBBANDS_PER_IMAGE, *c.shape[2:]),
        cond=c,
        clip=cwdm.clip_in_image_space,
        encode=encode,
        **common,
    )


def _cascade_generator_case(model: Any, config: dict, common: dict) -> Case:
    """As ``cas_diffcom.complete``, stage 1: the age-guided generator."""
    gen = model.generator
    guidance = _rand((1, 1, *config["image_size"]), 4)
    ages = torch.tensor([6.0]), torch.tensor([12.0])

    def encode() -> dict:  # the AsMM guidance encoder, once per sample
        return gen.encode_guidance(guidance, *ages)

    return Case(
        "cas-diffcom generator",
        gen,
        gen.denoise,
        tuple(guidance.shape),
        cond=encode(),
        clip=_clip(config),
        reference=guidance if config.get("residual") else None,
        encode=encode,
        **common,
    )


def _cascade_refiner_case(model: Any, config: dict, common: dict) -> Case:
    """As ``cas_diffcom.super_resolve``: stage 2 on the learned up-sampling of a low-resolution image."""
    from LongitudinalDiffusionLib.models import cas_diffcom

    ref = model.refiner
    low_res = _rand((1, 1, *[s // 2 for s in config["sr_image_size"]]), 5)

    def encode() -> torch.Tensor:  # the learned up-sampling of z0, once per sample
        return ref.upsample(low_res)

    up = encode()
    common = {
        **common,
        "schedule": Schedule.from_config(config["refine_schedule"]),
        "amp": bool(config.get("refine_sampler", {}).get("amp", True)),
    }
    return Case(
        "cas-diffcom refiner",
        ref,
        ref.denoise,
        (1, 1, *up.shape[2:]),
        cond=up,
        clip=_clip(config),
        reference=cas_diffcom.upsampled(low_res, up.shape[2:]) if config.get("residual") else None,
        encode=encode,
        **common,
    )


#: (method, stage) -> the case builder
_CASES: dict[tuple[str, str], Callable[[Any, dict, dict], Case]] = {
    ("interval", "generator"): _interval_case,
    ("sadm", "generator"): _sadm_case,
    ("cwdm", "generator"): _cwdm_case,
    ("cas-diffcom", "generator"): _cascade_generator_case,
    ("cas-diffcom", "refiner"): _cascade_refiner_case,
}


def unet_case(size: int) -> Case:
    """The 2.9 M-parameter U-Net (:func:`unet_3m`) on a ``size``^3 volume, unconditional."""
    net = unet_3m()
    return Case(
        f"U-Net 2.9M {size}^3",
        net,
        lambda x, t, c: net(x, t),
        (1, 1, size, size, size),
        Schedule.linear(1e-4, 0.02, 1000),
        "epsilon",
    )
