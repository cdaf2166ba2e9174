"""Peak memory of one denoising step at full resolution, on the CPU.

    python bench/memory.py [--quick] [--device cpu|cuda]

Cases (paper configurations, untrained networks):

- cWDM: a 224x224x160 image, i.e. its wavelet-domain input of 8 noisy subbands at
  112x112x80 plus 24 condition subbands (32 channels), 81.5 M parameters, float32 (the
  paper config samples without autocast, as upstream).
- Cas-DiffCom super-resolution: the refiner at 160x192x160 (x_t plus the 8-channel learned
  up-sampling of the 80x96x80 stage-1 output), 17 M parameters.

Each case runs in a fresh subprocess: build the network and the step's inputs (noise,
condition), then one ``diffusion.sample`` step (one network evaluation in inference mode plus
the update and x0 clipping). The peak resident set size of the step is read from the
kernel's high-water mark (``VmHWM``, reset just before the step through
``/proc/self/clear_refs``; ``ru_maxrss`` where that is not available) and reported as the
increase over the resident size before the step; parameter and input memory are listed
beside it. One step takes a minute or more and several GB on a CPU; ``--quick`` runs the
same cases on demo-size grids (seconds). ``--device cuda`` measures
``torch.cuda.max_memory_allocated`` instead, on the CUDA path of the library (inference
mode, channels-last-3d, float16 autocast where the config allows it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20
CASES = {
    # name: (method, stage, scale of the config, grid override in --quick)
    "cwdm": ("cwdm", "generator", "paper", [32, 32, 32]),
    "cas-diffcom-refiner": ("cas-diffcom", "refiner", "paper", [32, 40, 32]),
}
CUDA_NOTE = (
    "CUDA path (same code, selected by the device): torch.inference_mode (no autograd state), Conv3d kernels and "
    "volumes channels-last-3d, network forwards under float16 autocast when the sampler's amp is on (Cas-DiffCom: "
    "yes, activations in half precision; cWDM paper config: amp false, float32 as upstream), sampler arithmetic "
    "and outputs float32."
)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(name: str, quick: bool, device: str) -> dict:
    """Measure one case in this (fresh) process; returns the figures as a dict."""
    import torch
    from common import method_case, nbytes, params

    from LongitudinalDiffusionLib.diffusion import prepare_network
    from LongitudinalDiffusionLib.models import default_config

    method, stage, scale, small = CASES[name]
    config = default_config(method, scale)
    case = method_case(method, config, image_size=small if quick else None, stage=stage)
    prepare_network(case.model, device)
    inputs = nbytes([case.cond, case.reference]) + 4 * torch.Size(case.shape).numel()
    result = {
        "case": name,
        "grid": "x".join(map(str, case.shape[2:])),
        "input": "x".join(map(str, case.shape)),
        "params": params(case.model),
        "param_mb": nbytes(list(case.model.parameters())) / MB,
        "input_mb": inputs / MB,
        "amp": case.amp,
        "device": device,
    }
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        case.sample(1, device=device)
        torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - t0
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / MB
        result["method"] = "torch.cuda.max_memory_allocated"
        return result
    before = (_status_kb("VmRSS") or 0) * 1024
    reset = _reset_peak()
    t0 = time.perf_counter()
    case.sample(1)
    result["seconds"] = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    peak = hwm * 1024 if reset and hwm is not None else _maxrss_bytes()
    result["peak_mb"] = (peak - before) / MB
    result["rss_before_mb"] = before / MB
    result["method"] = "VmHWM (reset)" if reset and hwm is not None else "ru_maxrss"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same cases on demo-size grids (seconds)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--case", choices=tuple(CASES), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(args.case, args.quick, args.device)))
        return 0

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"peak memory of one denoising step, {args.device.upper()}, fresh process per case (OMP_NUM_THREADS={threads})"
    )
    header = f"{'case':<22} {'input (N,C,D,H,W)':>20} {'params':>16} {'inputs':>9} {'step peak':>10} {'step':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for name in CASES:
        cmd = [sys.executable, __file__, "--case", name, "--device", args.device] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            return done.returncode
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        params = f"{r['params'] / 1e6:.1f}M {r['param_mb']:.0f}MB"
        print(
            f"{name:<22} {r['input']:>20} {params:>16} {r['input_mb']:>7.0f}MB {r['peak_mb']:>8.0f}MB "
            f"{r['seconds']:>7.1f}s"
        )
    print(f"(step peak: increase of the peak {results[0]['method']} over the size before the step; inputs: noise,")
    print(" condition and residual reference; float32 everywhere on the CPU)")
    print()
    for r in results:
        ratio = r["peak_mb"] / r["param_mb"]
        print(f"ratio step peak / parameter memory {r['case']}: {ratio:.1f} ({r['peak_mb'] / 1024:.2f} GB)")
    print(CUDA_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
