"""The whole performance suite in one command: every benchmark of ``bench/``, one after the other.

    python bench/run_all.py [--quick] [--only NAME ...] [--data COHORT]

Each benchmark runs in its own process with one thread per process (``OMP_NUM_THREADS=1``
unless set), Qt offscreen and matplotlib's Agg backend; its output streams through as it
comes, and a summary at the end lists every benchmark with its exit status and duration.
The figures and the commands behind them are in docs/performance.md.

* full (about 2.5 hours on 2 CPU cores, most of it the full DDPM chains of
  ``fewer_steps.py``): rewrites docs/images/perf_scaling.png, docs/images/perf_steps.png
  and docs/performance_steps.csv;
* ``--quick``: every benchmark's smoke-test form (tiny networks, grids or cases; a few
  minutes), nothing under docs/ is written;
* ``--data``: the simulated cohort for ``fewer_steps.py`` and ``sample_spread.py``
  (default: simulated once into a cache folder).

Exit status: 0 when every benchmark ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (arguments of the full run, arguments of the quick run); "--data" is added where it applies
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "loop_overhead": ([], ["--quick"]),
    "work_once": ([], ["--quick"]),
    "memory": ([], ["--quick"]),
    "scaling": ([], ["--quick"]),
    "fewer_steps": ([], ["--quick"]),
    "sample_spread": ([], ["--quick"]),
    "panel_stall": ([], ["--quick"]),
    "remote_overhead": ([], ["--repeats", "1", "--steps", "1"]),
    "peak": ([], ["--quick"]),
    "full_resolution": ([], ["--quick"]),
    "gpu": ([], ["--quick"]),
    "warm_runs": ([], ["--quick"]),
    "threads": ([], ["--quick"]),
    "gil_starvation": ([], ["--quick"]),
    "worker_hostile": ([], ["--quick"]),
    "preprocess_real": ([], ["--quick"]),
}
TAKES_DATA = ("fewer_steps", "sample_spread")


def command(name: str, quick: bool, data: Path | None) -> list[str]:
    full, fast = BENCHMARKS[name]
    args = list(fast if quick else full)
    if data is not None and name in TAKES_DATA:
        args += ["--data", str(data)]
    return [sys.executable, str(HERE / f"{name}.py"), *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's smoke-test form (minutes)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run only these")
    parser.add_argument("--data", type=Path, help="simulated cohort for fewer_steps and sample_spread")
    args = parser.parse_args(argv)
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen"), "MPLBACKEND": "Agg"}
    env.setdefault("OMP_NUM_THREADS", "1")
    names = args.only or list(BENCHMARKS)
    done: list[tuple[str, int, float]] = []
    for name in names:
        cmd = command(name, args.quick, args.data)
        print(f"\n=== {name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
        t0 = time.perf_counter()
        status = subprocess.run(cmd, env=env, check=False).returncode
        done.append((name, status, time.perf_counter() - t0))
    print("\n| benchmark | status | seconds |\n|---|---|---:|")
    for name, status, seconds in done:
        print(f"| {name} | {'ok' if status == 0 else f'FAILED (exit {status})'} | {seconds:.0f} |")
    failed = [name for name, status, _ in done if status]
    print(
        f"bench suite: {len(done) - len(failed)} of {len(done)} benchmarks ran"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
