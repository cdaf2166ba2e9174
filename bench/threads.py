"""Threads on purpose: a forward with 1 thread, with every core, and with the library's choice
(``diffusion.threads``), on the machine as it is and with a competing process spinning on
the other core(s).

    python bench/threads.py [--rounds 7] [--quick]

For the interval and cWDM demo networks (untrained, prepared as the library prepares
them), per condition: ``quiet`` (nothing started by the bench) and ``busy`` (the bench starts
one process spinning in a loop per core but one, and waits a second for it to run), the
forward's wall time is measured in interleaved rounds with each thread count; the policy's
choice is made at the start of each condition as a job would make it (``choose_threads``
with no request and neither OMP_NUM_THREADS nor LONGDIFF_THREADS set). Prints the median
time per forward, its ratio to one thread (median of per-round ratios and their spread),
and the policy's choice. ``--quick``: a tiny network, 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import interleaved, median, method_case, method_config  # noqa: E402

from LongitudinalDiffusionLib.diffusion import threads  # noqa: E402

SPIN = "import time\nwhile True:\n    pass\n"


def competitors(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    time.sleep(1.0)
    return procs


def policy_choice() -> tuple[int, str]:
    saved = {k: os.environ.pop(k) for k in ("OMP_NUM_THREADS", threads.THREADS_ENV) if k in os.environ}
    try:
        return threads.choose_threads(None, concurrent=1)
    finally:
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cores = threads.usable_cores()
    rounds = 2 if args.quick else args.rounds
    scale = "tiny" if args.quick else "demo"
    cases = [method_case(m, method_config(m, scale)) for m in (("interval",) if args.quick else ("interval", "cwdm"))]
    print(f"{cores} usable core(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for condition in ("quiet", "busy"):
        procs = competitors(max(1, cores - 1)) if condition == "busy" else []
        try:
            chosen, why = policy_choice()
            load = os.getloadavg()[0]
            counts = sorted({1, cores, chosen})
            for case in cases:
                x, t, cond = case.forward_inputs()

                def forward(n: int, case=case, x=x, t=t, cond=cond):
                    def run() -> None:
                        torch.set_num_threads(n)
                        with torch.inference_mode():
                            case.denoiser(x, t, cond)

                    return run

                times = interleaved({f"{n} thread(s)": forward(n) for n in counts}, rounds)
                one = times["1 thread(s)"]
                for n in counts:
                    mine = times[f"{n} thread(s)"]
                    ratios = [b / a for a, b in zip(mine, one)]
                    rows.append((condition, case.name, n, n == chosen, median(mine), ratios, load, why))
                    print(
                        f"speed-up vs 1 thread, {condition}, {case.name}, {n} thread(s)"
                        f"{' (policy)' if n == chosen else ''}: {median(ratios):.2f}x "
                        f"(spread {min(ratios):.2f}-{max(ratios):.2f}; {median(mine) * 1e3:.0f} ms per forward)",
                        flush=True,
                    )
        finally:
            for p in procs:
                p.kill()
                p.wait()
    print()
    print("| machine | network | threads | per forward | speed-up vs 1 thread (spread) | policy chose |")
    print("|---|---|---:|---:|---|---|")
    for condition, name, n, is_policy, t, ratios, load, why in rows:
        what = f"quiet (load {load:.1f})" if condition == "quiet" else f"busy: {max(1, cores - 1)} spinner(s)"
        print(
            f"| {what} | {name} | {n} | {t * 1e3:.0f} ms | {median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {'**yes** (' + why + ')' if is_policy else ''} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
