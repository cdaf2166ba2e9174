"""The GPU figures in one command, on the same code path as the CPU: time per sampling step,
peak memory, and half precision against float32, for each method's network.

    python bench/gpu.py [--scale demo|paper] [--steps 5] [--device cuda:0]

For each network (interval, SADM, cWDM, the Cas-DiffCom generator and refiner, untrained,
prepared by ``prepare_network`` for the device, sampled by ``diffusion.sample`` as the
library samples them): a DDIM sample of ``--steps`` steps in float32, under float16 autocast
and under bfloat16 autocast (the device's support permitting; float16 is the sampler's own ``amp``) - the time per step
(``torch.cuda.synchronize`` around the sample, after a warm-up), the peak of
``torch.cuda.max_memory_allocated`` over the sample, and the max |diff| of the half-precision
samples against the float32 one (same seed). Where no CUDA device is present it says so and
exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NETWORKS = (("interval", "generator"), ("sadm", "generator"), ("cwdm", "generator"),
            ("cas-diffcom", "generator"), ("cas-diffcom", "refiner"))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("tiny", "demo", "paper"), default="demo")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the same loop, times only)")
    parser.add_argument("--quick", action="store_true", help="tiny networks, 2 steps")
    args = parser.parse_args(argv)
    import torch

    cpu_check = args.device == "cpu"  # the same loop on the CPU (times only): a check of this script
    if not cpu_check and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} sees no GPU here; nothing measured (exit 0)")
        return 0
    from common import machine, method_case, method_config

    from LongitudinalDiffusionLib.diffusion import prepare_network
    from LongitudinalDiffusionLib.diffusion.device import describe_device, resolve_device

    device = resolve_device(args.device)
    scale, steps = ("tiny", 2) if args.quick else (args.scale, args.steps)
    print(machine())
    print(f"device: {describe_device(device)}; {scale} scale, DDIM {steps} steps")
    precisions = {"float32": None, "float16": torch.float16}
    if cpu_check or torch.cuda.is_bf16_supported():
        precisions["bfloat16"] = torch.bfloat16
    rows = []
    for method, stage in NETWORKS:
        case = method_case(method, method_config(method, scale), stage=stage)
        prepare_network(case.model, device)
        for name in ("cond", "uncond", "reference"):
            value = getattr(case, name)
            if isinstance(value, torch.Tensor):
                setattr(case, name, value.to(device))
            elif isinstance(value, dict):
                setattr(case, name, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
        outputs = {}
        for label, dtype in precisions.items():
            # float32: the sampler's amp off; float16: amp on (the library's own autocast);
            # bfloat16: amp off inside a bfloat16 autocast around the sample
            def run(dtype=dtype, case=case):
                case.amp = dtype is torch.float16
                bf16 = dtype is torch.bfloat16
                ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                with ctx:
                    return case.sample(steps, device=str(device)).sample

            run()  # warm-up (kernels chosen, memory pools)
            if not cpu_check:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            base = 0 if cpu_check else torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            out = run()
            if not cpu_check:
                torch.cuda.synchronize(device)
            per_step = (time.perf_counter() - t0) / steps
            peak = float("nan") if cpu_check else (torch.cuda.max_memory_allocated(device) - base) / 2**20
            outputs[label] = out.float().cpu()
            diff = float((outputs[label] - outputs["float32"]).abs().max())
            rows.append((case.name, case.input_desc, label, per_step, peak, diff))
            print(
                f"{case.name}, {label}: {per_step * 1e3:.1f} ms per step, peak {peak:.0f} MB, "
                f"max |diff| vs float32 {diff:.1e}",
                flush=True,
            )
        case.model.to("cpu")
        if not cpu_check:
            torch.cuda.empty_cache()
    print("\n| network | input | precision | per step | peak memory | max \\|diff\\| vs float32 |")
    print("|---|---|---|---:|---:|---:|")
    for name, desc, label, per_step, peak, diff in rows:
        print(f"| {name} | {desc} | {label} | {per_step * 1e3:.1f} ms | {peak:.0f} MB | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
