"""Time per sampling step against the volume size, and the fitted exponent k of
time = a * voxels^k; and what the CPU's choice of convolution kernel costs at the demo grids.

    python bench/scaling.py [--quick] [--sizes 32 48 64 96 128] [--steps 2] [--repeats 3]
                            [--demo-steps 5] [--demo-rounds 5] [--diff-steps 50] [--plot PATH]

Every comparison runs its two routes of a float32 CPU Conv3d side by side, alternating
round by round (``common.interleaved``): PyTorch's default choice of kernel, and every
Conv3d forced onto oneDNN (what ``prepare_network`` does on the CPU, see
``diffusion.device.OneDNNConv3d``). PyTorch runs a float32 batch-1 3D convolution on oneDNN
only when N*C*D*H > 20480 (or the kernel is larger than 3x3), else on its native
``slow_conv3d`` kernel, several times slower here.

1. Demo grids: each method's demo-scale network (untrained), sampled as the library samples
   it (DDIM, the method's conditioning, guidance batch, clipping and residual reference):
   time per step with each route, the speed-up, and the largest difference between the
   samples of ``--diff-steps`` DDIM steps drawn with each route (same seed).
2. Scaling: two of them on cubes of each size:

   - the time-interval model's demo U-Net (MONAI ``DiffusionModelUNet``, 0.74 M parameters,
     self-attention at the deepest level, 1/4 of the resolution, and in the mid block);
   - cWDM's demo network (1.16 M parameters, convolutions only), on the wavelet subbands
     of the cube (half its size per axis).

   k comes from a least-squares line through (log voxels, log seconds): convolutions cost
   in proportion to the voxels (k = 1), attention over n tokens in proportion to n^2, so a
   network with attention drifts above 1 once its deepest level holds thousands of voxels;
   with PyTorch's default route the small grids run on the slow kernel and the large ones
   on oneDNN, which bends the curve the other way.

The plot (matplotlib, Agg) goes to docs/images/perf_scaling.png, or with ``--quick`` (tiny
networks at their grids, cubes of 16, 24 and 32) to a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import (
    BACKENDS,
    ROOT,
    convolutions,
    interleaved,
    machine,
    median,
    method_case,
    method_config,
    ratio,
)

NETWORKS = {"interval": "interval demo U-Net (attention)", "cwdm": "cWDM demo network (convolutions only)"}
DEMO_CASES = (
    ("interval", "generator"),
    ("sadm", "generator"),
    ("cwdm", "generator"),
    ("cas-diffcom", "generator"),
    ("cas-diffcom", "refiner"),
)
DEFAULT, ONEDNN = BACKENDS  # the labels


def fit(voxels: list[int], seconds: list[float]) -> tuple[float, float]:
    """(k, a) of the least-squares fit of log seconds = log a + k log voxels."""
    k, log_a = np.polyfit(np.log(voxels), np.log(seconds), 1)
    return float(k), float(np.exp(log_a))


def routed(case, onednn: bool, steps: int):
    """A function that samples ``case`` over ``steps`` DDIM steps with its Conv3d on one route."""

    def run():
        with convolutions(case.model, onednn):
            return case.sample(steps)

    return run


def demo_grids(scale: str, steps: int, rounds: int, diff_steps: int) -> list[tuple[str, str, float, float]]:
    """Part 1: per step at each method's demo grid, PyTorch default against oneDNN forced."""
    print(f"1. {scale} networks at their grids, DDIM {steps} steps per timed sample, {rounds} rounds")
    header = (
        f"{'network':<24} {'network input':>14} {DEFAULT + ' s/step':>23} {ONEDNN + ' s/step':>21} "
        f"{'speed-up':>9} {'fwd rel diff':>13} {'max |diff|':>11}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for method, stage in DEMO_CASES:
        case = method_case(method, method_config(method, scale), stage=stage)
        x, t, cond = case.forward_inputs()
        with torch.inference_mode():
            outs = []
            for onednn in BACKENDS.values():
                with convolutions(case.model, onednn):
                    outs.append(case.denoiser(x, t, cond).float())
        fwd_diff = ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item()
        fns = {label: routed(case, onednn, steps) for label, onednn in BACKENDS.items()}
        times = interleaved(fns, rounds)
        samples = {label: routed(case, onednn, diff_steps)().sample for label, onednn in BACKENDS.items()}
        diff = (samples[DEFAULT] - samples[ONEDNN]).abs().max().item()
        speedup = ratio(times, DEFAULT, ONEDNN)
        batch = "x".join(map(str, x.shape))
        s = [median(times[label]) / steps for label in BACKENDS]
        print(
            f"{case.name:<24} {batch:>14} {s[0]:>23.3f} {s[1]:>21.3f} {speedup:>8.2f}x {fwd_diff:>13.1e} {diff:>11.1e}",
            flush=True,
        )
        rows.append((case.name, batch, speedup, diff))
    print("(fwd rel diff: max |difference| of one network output between the routes / max |output|;")
    print(f" max |diff|: between the samples of {diff_steps} DDIM steps drawn with each route, same seed;")
    print(" cWDM's sample is its wavelet subbands; a guided SADM step is one forward of a batch of 2)")
    print()
    return rows


def cubes(sizes: list[int], steps: int, repeats: int) -> dict[tuple[str, str], tuple[list, list, float, float]]:
    """Part 2: seconds per step on cubes of each size, both routes; fitted k."""
    print(f"2. cubes {', '.join(f'{s}³' for s in sizes)}, DDIM {steps} steps per timed sample, {repeats} repeats")
    header = (
        f"{'network':<40} {'size':>6} {'voxels':>9} {DEFAULT + ' s/step':>23} {ONEDNN + ' s/step':>21} "
        f"{'speed-up':>9} {'local k':>13}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for name in NETWORKS:
        config = method_config(name, "demo")
        series: dict[str, tuple[list[int], list[float]]] = {label: ([], []) for label in BACKENDS}
        for size in sizes:
            case = method_case(name, config, image_size=[size] * 3)
            for onednn in BACKENDS.values():  # warm-up: one step on each route
                routed(case, onednn, 1)()
            fns = {label: routed(case, onednn, steps) for label, onednn in BACKENDS.items()}
            times = interleaved(fns, repeats, warmup=0)
            local = []
            for label, (voxels, seconds) in series.items():
                voxels.append(size**3)
                seconds.append(median(times[label]) / steps)
                local.append("" if len(voxels) < 2 else f"{fit(voxels[-2:], seconds[-2:])[0]:.2f}")
            s = [series[label][1][-1] for label in BACKENDS]
            print(
                f"{NETWORKS[name]:<40} {size:>5}³ {size**3:>9} {s[0]:>23.3f} {s[1]:>21.3f} "
                f"{ratio(times, DEFAULT, ONEDNN):>8.2f}x {' / '.join(local):>13}",
                flush=True,
            )
        for label, (voxels, seconds) in series.items():
            results[name, label] = (voxels, seconds, *fit(voxels, seconds))
    print(f"(local k: slope between this size and the previous one, {DEFAULT} / {ONEDNN})")
    print()
    return results


def plot(results: dict[tuple[str, str], tuple[list[int], list[float], float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 5.0), dpi=120)
    colours = dict(zip(NETWORKS, ("tab:blue", "tab:orange")))
    for (name, backend), (voxels, seconds, k, a) in results.items():
        v = np.array(voxels, dtype=float)
        style = dict(color=colours[name], marker="o" if backend == DEFAULT else "s")
        if backend != DEFAULT:
            style["markerfacecolor"] = "none"
        ax.loglog(v, seconds, linestyle="none", label=f"{NETWORKS[name]}, {backend}: k = {k:.2f}", **style)
        grid = np.geomspace(v.min(), v.max(), 50)
        ax.loglog(grid, a * grid**k, "-" if backend == DEFAULT else "--", color=colours[name], alpha=0.6)
    points = [(v, s) for vs, ss, _, _ in results.values() for v, s in zip(vs, ss)]
    v0, v1 = min(v for v, _ in points), max(v for v, _ in points)
    top = max(s for _, s in points)
    ax.loglog([v0, v1], [top * v0 / v1, top], ":", color="grey", label="slope 1 (time in proportion to voxels)")
    ax.set_xticks(sorted({v for v, _ in points}))
    ax.set_xticklabels([f"{round(v ** (1 / 3))}³\n{v:,}" for v in sorted({v for v, _ in points})], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("volume size (cube side³ and voxels of the image)")
    ax.set_ylabel("seconds per sampling step (CPU)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny networks, cubes 16, 24, 32; plot to a temp folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="cube sides (multiples of 8)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per timed sample on the cubes")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cube size (default 3, quick 1)")
    parser.add_argument("--demo-steps", type=int, default=None, help="DDIM steps per timed sample at the demo grids")
    parser.add_argument("--demo-rounds", type=int, default=None, help="timed rounds at the demo grids (default 5)")
    parser.add_argument("--diff-steps", type=int, default=None, help="DDIM steps of the compared samples (default 50)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default docs/images/perf_scaling.png)")
    args = parser.parse_args()
    sizes = args.sizes or ([16, 24, 32] if args.quick else [32, 48, 64, 96, 128])
    repeats = args.repeats or (1 if args.quick else 3)
    demo_steps = args.demo_steps or (2 if args.quick else 5)
    demo_rounds = args.demo_rounds or (2 if args.quick else 5)
    diff_steps = args.diff_steps or (3 if args.quick else 50)

    print(f"time per sampling step: PyTorch default Conv3d kernel vs oneDNN forced, CPU; {machine()}")
    print()
    rows = demo_grids("tiny" if args.quick else "demo", demo_steps, demo_rounds, diff_steps)
    results = cubes(sizes, args.steps, repeats)
    for name, batch, speedup, diff in rows:
        diffs = f"max |diff| {diff:.1e} after {diff_steps} steps"
        print(f"oneDNN speed-up per step, {name} ({batch}): {speedup:.2f}x, {diffs}")
    for (name, backend), (_, _, k, _) in results.items():
        print(f"k (time ~ voxels^k) {NETWORKS[name]}, {backend}: {k:.2f}")
    threads = machine().split(", ")[1]
    title = f"Time per DDIM step against volume size, demo networks, CPU ({threads}), {sizes[0]}³-{sizes[-1]}³"
    if args.plot is None and args.quick:  # exercise the plot, keep nothing
        with tempfile.TemporaryDirectory(prefix="longdiff-bench-") as tmp:
            out = Path(tmp) / "perf_scaling.png"
            plot(results, out, title)
            print(f"plot: {out.stat().st_size} bytes written to a temporary folder (quick run, not kept)")
        return 0
    out = args.plot or ROOT / "docs" / "images" / "perf_scaling.png"
    plot(results, out, title)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
