"""Full resolution within memory: one denoising step at the papers' grids, whole-volume
against patch-wise (``diffusion.patches.patch_denoiser``), peak memory and seam error.

    python bench/full_resolution.py [--width-divisor 4] [--quick]

Cases: cWDM at 224x224x160 (its network works on the 8 wavelet subbands, 112x112x80,
windows of 64^3) and the Cas-DiffCom refiner at 160x192x160 (windows of 96^3), with 25 %
overlap and Gaussian blending. Each step runs in a fresh process (as bench/memory.py): the
peak is the increase of the resident set's high-water mark (VmHWM reset just before the
step) over the resident size before it. Both modes draw the same noise, so the difference
of their outputs is the seam error of patch-wise inference (max and mean |diff|, relative to
the whole-volume output's mean |value|).

One paper-width step takes one to two minutes on an idle 2-core CPU and several times that
on a busy one; ``--width-divisor N`` divides every channel count by N (group and head sizes
follow) so that the comparison runs in minutes: activation memory scales about linearly
with the width, the ratio patched / whole is what this measures (the paper-width whole-volume
figures are bench/memory.py's). ``--quick``: demo grids, tiny windows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory import MB, _reset_peak, _status_kb  # noqa: E402

#: name -> (method, stage, window on the network's grid, quick grid, quick window)
CASES = {
    "cwdm": ("cwdm", "generator", (64, 64, 64), [32, 32, 32], (12, 12, 12)),
    "cas-diffcom-refiner": ("cas-diffcom", "refiner", (96, 96, 96), [32, 40, 32], (20, 20, 20)),
}


def narrowed(method: str, config: dict, divisor: int) -> dict:
    """``config`` with every channel count divided by ``divisor`` (groups and heads follow)."""
    if divisor == 1:
        return config
    net = json.loads(json.dumps(config["network"]))
    if method == "cwdm":
        net["model_channels"] = max(8, net["model_channels"] // divisor)
        net["num_groups"] = min(net["num_groups"], 8)
    else:
        ref = net["refiner"]
        ref["channels"] = [max(8, c // divisor) for c in ref["channels"]]
        ref["up_channels"] = max(2, ref["up_channels"] // divisor)
        ref["norm_num_groups"] = min(ref["norm_num_groups"], 8)
        ref["num_head_channels"] = max(8, ref["num_head_channels"] // divisor)
    return {**config, "network": net}


def child(name: str, mode: str, quick: bool, divisor: int, out: Path) -> dict:
    import torch
    from common import method_case

    from LongitudinalDiffusionLib.diffusion.patches import patch_denoiser
    from LongitudinalDiffusionLib.models import default_config

    method, stage, roi, small, small_roi = CASES[name]
    config = narrowed(method, default_config(method, "demo" if quick else "paper"), divisor)
    case = method_case(method, config, image_size=small if quick else None, stage=stage)
    window = small_roi if quick else roi
    denoiser = patch_denoiser(case.denoiser, window, overlap=0.25) if mode == "patched" else None
    before = (_status_kb("VmRSS") or 0) * 1024
    reset = _reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        result = case.sample(1, denoiser=denoiser)
    seconds = time.perf_counter() - t0
    peak = (_status_kb("VmHWM") or 0) * 1024 if reset else 0
    torch.save(result.sample, out)
    return {
        "case": name,
        "mode": mode,
        "input": "x".join(map(str, case.shape)),
        "window": "x".join(map(str, window)) if mode == "patched" else "whole",
        "seconds": seconds,
        "peak_mb": (peak - before) / MB if reset else float("nan"),
        "params": sum(p.numel() for p in case.model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width-divisor", type=int, default=4, help="channel counts divided by this (1: paper)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, mode, out = args.child
        print(json.dumps(child(name, mode, args.quick, args.width_divisor, Path(out))))
        return 0
    import torch

    divisor = 1 if args.quick else args.width_divisor
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            got = {}
            for mode in ("whole", "patched"):
                out = Path(tmp) / f"{name}-{mode}.pt"
                cmd = [sys.executable, __file__, "--width-divisor", str(divisor), "--child", name, mode, str(out)]
                done = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name} {mode} failed:\n{done.stderr[-2000:]}")
                    return 1
                got[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                got[mode]["x"] = torch.load(out)
                print(
                    f"{name}, {mode}: {got[mode]['input']}, window {got[mode]['window']}: "
                    f"peak {got[mode]['peak_mb']:.0f} MB, {got[mode]['seconds']:.1f} s",
                    flush=True,
                )
            whole, patched = got["whole"]["x"], got["patched"]["x"]
            diff = (patched - whole).abs()
            scale = float(whole.abs().mean())
            ratio = got["patched"]["peak_mb"] / got["whole"]["peak_mb"]
            print(
                f"ratio peak patched/whole {name}: {ratio:.2f}; seam error max {float(diff.max()) / scale:.2e}, "
                f"mean {float(diff.mean()) / scale:.2e} (relative to the mean |output|)",
                flush=True,
            )
            rows.append((name, got, ratio, float(diff.max()) / scale, float(diff.mean()) / scale))
    width = "demo grids (quick)" if args.quick else f"paper grids, channels / {divisor}"
    print(f"\n{width}")
    print("| case | network input | parameters | whole: peak, time | patched (window): peak, time | "
          "peak ratio | seam error max / mean |")  # fmt: skip
    print("|---|---|---:|---|---|---:|---|")
    for name, got, ratio, emax, emean in rows:
        w, p = got["whole"], got["patched"]
        print(
            f"| {name} | {w['input']} | {w['params'] / 1e6:.2f} M | {w['peak_mb']:.0f} MB, {w['seconds']:.1f} s | "
            f"{p['window']}: {p['peak_mb']:.0f} MB, {p['seconds']:.1f} s | {ratio:.2f} | {emax:.2e} / {emean:.2e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
