"""Forwards against the CPU's peak: each demo network's fraction of the attainable
single-thread float32 matmul rate, measured in the same run, on each route of its kernels.

    python bench/peak.py [--rounds 5] [--no-compile] [--quick]

* **peak**: the best of several 1024x1024x1024 float32 ``torch.mm`` on one thread (GFLOP/s),
  taken before and after the networks, so that the load of a shared machine shows;
* **FLOPs** of one forward: ``torch.utils.flop_counter.FlopCounterMode`` (convolutions,
  transposed convolutions, matrix products and attention; element-wise work is not counted,
  so the fraction is that of the arithmetic that can run at the peak);
* **routes**, timed in interleaved rounds, one forward each: ``PyTorch default`` (the kernel
  PyTorch picks for a batch of 1: its native ``slow_conv3d`` at these grids), ``library``
  (``prepare_network``: Conv3d through oneDNN), and ``compiled`` (``torch.compile``, inductor
  on the CPU with weight freezing, which hands convolutions to oneDNN itself); the compile
  time is printed with the number of forwards it takes to pay for itself. Outputs of every
  route are compared with the library's (max |diff| relative to the output's largest value).
* a ``torch.profiler`` table per network on the library's route: the share of the forward
  in convolutions, attention, normalisation, SiLU and the rest.

``--quick``: tiny networks, 2 rounds, no compile.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import convolutions, interleaved, machine, median, method_case, method_config  # noqa: E402

NETWORKS = (("interval", "generator"), ("sadm", "generator"), ("cwdm", "generator"),
            ("cas-diffcom", "generator"), ("cas-diffcom", "refiner"))  # fmt: skip
GROUPS = {
    "convolution": ("conv", "mkldnn_convolution"),
    "attention": ("scaled_dot_product", "bmm", "softmax", "baddbmm"),
    "normalisation": ("group_norm", "native_group_norm", "layer_norm"),
    "SiLU": ("silu",),
}


def peak_gflops(repeats: int = 5, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(*args)
    return counter.get_total_flops()


def profile_shares(fn, *args) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    total, shares = 0.0, dict.fromkeys([*GROUPS, "other"], 0.0)
    for ev in prof.key_averages():
        self_us = ev.self_cpu_time_total
        total += self_us
        name = ev.key.removeprefix("aten::")
        group = next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other")
        shares[group] += self_us
    return {k: v / total for k, v in shares.items()} if total else shares


def compiled_denoiser(case):
    """``case``'s denoiser on a copy of its network compiled by inductor (plain Conv3d layers,
    frozen weights), and the compile time (first call)."""
    import types

    import torch._inductor.config as inductor

    from LongitudinalDiffusionLib.diffusion.device import use_onednn_convolutions

    inductor.freezing = True
    model = copy.deepcopy(case.model)
    use_onednn_convolutions(model, enabled=False)
    original = case.denoiser
    if hasattr(original, "__self__"):  # a bound method of the network (cas-diffcom's denoise)
        fn = getattr(model, original.__name__)
    else:  # a function closing over the network
        cells = tuple(
            types.CellType(model if c.cell_contents is case.model else c.cell_contents)
            for c in (original.__closure__ or ())
        )
        fn = types.FunctionType(original.__code__, original.__globals__, original.__name__, None, cells)
    fn = torch.compile(fn)
    x, t, cond = case.forward_inputs()
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(x, t, cond)
    return fn, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (minutes per network)")
    parser.add_argument("--steps", type=int, default=20, help="forwards of a typical run, for the compile's balance")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="networks by name, e.g. interval cwdm")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 2 if args.quick else args.rounds
    compile_too = not (args.quick or args.no_compile)
    scale = "tiny" if args.quick else "demo"
    print(machine())
    peaks = [peak_gflops()]
    print(f"peak (1 thread, float32 matmul 1024^3): {peaks[0]:.1f} GFLOP/s", flush=True)
    rows = []
    for method, stage in NETWORKS:
        if args.only and method not in args.only and f"{method}-{stage}" not in args.only:
            continue
        case = method_case(method, method_config(method, scale), stage=stage)
        x, t, cond = case.forward_inputs()
        with convolutions(case.model, False):  # counted on aten.convolution (no formula for oneDNN's op)
            work = flops(case.denoiser, x, t, cond)
        with torch.inference_mode():
            ref = case.denoiser(x, t, cond)

        def run(fn=case.denoiser, x=x, t=t, cond=cond):
            with torch.inference_mode():
                return fn(x, t, cond)

        def default(case=case, run=run):
            with convolutions(case.model, False):
                return run()

        fns = {"PyTorch default": default, "library": run}
        diffs = {"PyTorch default": default(), "library": ref}
        compile_s = None
        if compile_too:
            try:
                fn, compile_s = compiled_denoiser(case)
            except Exception as exc:  # report, keep measuring the rest
                print(f"compile failed for {case.name}: {type(exc).__name__}: {str(exc)[:200]}")
            else:
                fns["compiled"] = lambda fn=fn, run=run: run(fn)
                diffs["compiled"] = fns["compiled"]()
        times = interleaved(fns, rounds)
        peak = peak_gflops(3)
        peaks.append(peak)
        shares = profile_shares(case.denoiser, x, t, cond)
        scale_ref = float(ref.abs().max())
        for route, ts in times.items():
            sec = median(ts)
            frac = work / sec / 1e9 / peak
            diff = float((diffs[route] - ref).abs().max()) / scale_ref
            rows.append((case.name, case.input_desc, work, route, sec, frac, diff))
            print(
                f"fraction of peak, {case.name}, {route}: {frac:.3f} ({sec * 1e3:.1f} ms per forward, "
                f"{work / 1e9:.2f} GFLOP, max rel diff {diff:.1e})",
                flush=True,
            )
        if "compiled" in times:
            gain = median(times["library"]) - median(times["compiled"])
            even = compile_s / gain if gain > 0 else float("inf")
            print(
                f"compile {case.name}: {compile_s:.1f} s, saves {gain * 1e3:.1f} ms per forward: pays for itself "
                f"after {even:.0f} forwards (a run of {args.steps}: {args.steps * gain - compile_s:+.1f} s)"
            )
        print(
            f"profile {case.name} (library): " + ", ".join(f"{k} {v * 100:.0f} %" for k, v in shares.items()),
            flush=True,
        )
    print()
    print(f"peak over the run: {min(peaks):.1f}-{max(peaks):.1f} GFLOP/s (median {statistics.median(peaks):.1f})")
    print("| network | input | GFLOP per forward | route | per forward | fraction of peak | max rel. diff |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, desc, work, route, sec, frac, diff in rows:
        print(f"| {name} | {desc} | {work / 1e9:.2f} | {route} | {sec * 1e3:.1f} ms | {frac:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
