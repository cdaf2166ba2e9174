"""Work done once per sample, not once per step: what hoisting the condition encoders out of
the sampling loop, and batching classifier-free guidance, save.

    python bench/work_once.py [--quick] [--steps 10] [--rounds 5]

The library computes each condition encoder once per sample, outside the denoiser it hands
to ``diffusion.sample``: the Cas-DiffCom AsMM guidance encoder (``encode_guidance`` in
``cas_diffcom.complete``), the SADM attention module over the context frames (with the
residual reference; ``model.condition`` in ``sadm.fill_sequence``) and cWDM's condition
wavelets (``condition_channels`` in ``cwdm.synthesize``). Each is timed, over ``steps``
DDIM steps of the demo-scale network (untrained), against a denoiser wrapper that
recomputes the encoder at every step; both must give the same sample.

Classifier-free guidance (SADM, the method that samples with it: guidance 1.1, a zero
volume as the unconditional input): the engine's one forward of a batch of 2
([cond, uncond]) per step against two forwards of a batch of 1 per step.

Speed-up = time of the per-step variant / time of the library's, median over alternating
rounds. ``--quick`` uses the tiny networks (seconds).

The networks are prepared as the library prepares them for the CPU (``prepare_network``:
every Conv3d through oneDNN), so the guidance comparison isolates what batching itself
saves. It is repeated with PyTorch's own choice of convolution kernel, as before the
library routed them: PyTorch runs a float32 3D convolution on oneDNN only for a batch
larger than 1 or a large enough input (N*C*D*H > 20480), else on its much slower native
kernel, so at the demo grids the two forwards of a batch of 1 take the slow kernel and the
guidance batch of 2 the fast one, and batching seemed to save far more than it does.
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import interleaved, machine, median, method_case, method_config, pytorch_convolutions, ratio

from LongitudinalDiffusionLib.diffusion.device import cpu_onednn_enabled


def encoder_cases(scale: str):
    """(label, case, denoiser that recomputes the encoder every step)."""
    gen = method_case("cas-diffcom", method_config("cas-diffcom", scale))
    yield "Cas-DiffCom AsMM guidance encoder", gen, lambda x, t, c: gen.denoiser(x, t, gen.encode())

    sadm = method_case("sadm", method_config("sadm", scale))

    def sadm_per_step(x, t, c):  # the engine passes [cond, uncond]: recompute the cond half
        fresh = sadm.encode()
        return sadm.denoiser(x, t, torch.cat([fresh, torch.zeros_like(fresh)], dim=0))

    yield "SADM attention module", sadm, sadm_per_step

    cwdm = method_case("cwdm", method_config("cwdm", scale))
    yield "cWDM condition wavelets", cwdm, lambda x, t, c: cwdm.denoiser(x, t, cwdm.encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny networks, few steps (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps per timed run (default 10, quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 2)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 5)
    scale = "tiny" if args.quick else "demo"

    route = "oneDNN forced (prepare_network)" if cpu_onednn_enabled() else "PyTorch default (LONGDIFF_CPU_ONEDNN=0)"
    print(f"work done once per sample, {scale} networks, DDIM {steps} steps, CPU, Conv3d: {route}; {machine()}")
    header = f"{'what':<58} {'library':>10} {'per step':>10} {'speed-up':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    rows = []

    def report(label: str, fast, slow, what: str) -> None:
        """Time the library's way (``fast``) against the per-step way (``slow``), check equal outputs."""
        a, b = fast(), slow()
        diff = (a.sample - b.sample).abs().max().item()
        times = interleaved({"fast": fast, "slow": slow}, rounds, warmup=0)
        speedup = ratio(times, "slow", "fast")
        ms = [1e3 * median(times[k]) / steps for k in ("fast", "slow")]
        print(f"{label:<58} {ms[0]:>8.1f}ms {ms[1]:>8.1f}ms {speedup:>8.2f}x {diff:>11.1e}")
        rows.append((label, what, speedup))

    for label, case, per_step in encoder_cases(scale):
        report(label, lambda c=case: c.sample(steps), lambda c=case, d=per_step: c.sample(steps, d), "hoisted")

    sadm = method_case("sadm", method_config("sadm", scale))
    g = sadm.guidance

    def two_forwards(x, t, c):  # cond and uncond in two forwards of a batch of 1, then the same combination
        cond, uncond = sadm.denoiser(x, t, sadm.cond).float(), sadm.denoiser(x, t, sadm.uncond).float()
        return uncond + g * (cond - uncond)

    def batched() -> object:
        return sadm.sample(steps)

    def separate() -> object:
        return sadm.sample(steps, two_forwards, uncond=None, guidance=1.0)

    report(f"SADM guidance {g:g}, batch of 2", batched, separate, "batched")
    # The same with PyTorch's own choice of kernel (as before prepare_network routed Conv3d through
    # oneDNN): batch-1 float32 3D convolutions of these sizes take its slow native kernel and batch-2
    # ones oneDNN, which alone makes the batched forward cheaper than one batch-1 forward here.
    with pytorch_convolutions(sadm.model):
        report(f"SADM guidance {g:g}, batch of 2, PyTorch default convolutions", batched, separate, "batched")
    print("(times per sampling step; 'library' = as the library samples, 'per step' = encoder rerun at every step,")
    print(" or two forwards per step for guidance; max |diff| between the two samples)")
    print()
    for label, what, speedup in rows:
        print(f"speed-up {what} vs per step, {label}: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
