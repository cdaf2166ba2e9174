"""Local jobs under Slicer's main thread: a thread of the application against the job process.

    python bench/gil_starvation.py [--model interval-demo] [--steps 20] [--cap 90] [--quick]

Inside Slicer the main thread holds Python's GIL while Qt's event loop idles (CTK's Python
manager does not enable PythonQt's thread support); it lets go only while it runs Python,
e.g. in a timer callback. This benchmark reproduces that condition: the main thread calls
``usleep`` through ``ctypes.PyDLL`` (a C call that keeps the GIL) for ``--hold-ms`` at a
time, then "ticks": it polls the job's events, as the panel's ``QTimer`` does. For
comparison the main thread also just sleeps between ticks ("idle": ``time.sleep`` lets the
GIL go, as PySide6's event loop and the tests do), and spins in pure Python between ticks
("spin": the interpreter makes it hand the GIL over every 5 ms, so a simulation written
that way understates Slicer's case).

The same job - one missing age completed with a bundled demo model (two-sided: two sampling
stages of ``--steps`` steps) on a simulated subject (80 x 96 x 80 voxels of 2 mm, as the
Slicer module's sample subject; ``--quick``: the tests' 32 x 40 x 32 of 5 mm) - runs on:

* **thread**: :class:`~LongitudinalDiffusionLib.backends.ThreadBackend`, the former local
  backend (``run_job`` on a thread of this process);
* **child**: :class:`~LongitudinalDiffusionLib.backends.LocalBackend`, the warm job process.

Each backend first runs the job once with an idle main thread (imports, model cached in
the child; its wall time is reported as the first run). Then one run per condition;
reported: the sampling pace (steps per second of the first stage, from the job's own
progress events), the wall time from submit to the end (a run still going after ``--cap``
seconds is cancelled and shown as "> cap"), and the slowdown against the idle main thread.
Then how long reading a result back takes in the parent: ``Result.load`` of its NIfTI
folder against ``pickle.loads`` (what the job process hands over), on the main thread and
on a thread while the main thread holds the GIL between 20 ms ticks.
POSIX only (``usleep`` from the C library).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "Testing"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


CONDITIONS = ("idle", "spin", "gil")


def gil_holder() -> Any:
    """``usleep`` through ctypes.PyDLL: blocks while keeping the GIL."""
    return ctypes.PyDLL(None).usleep


def drive(backend: Any, job: str, *, hold_ms: float, mode: str, cap: float) -> dict[str, Any]:
    """Tick the main thread until the job ends or ``cap`` seconds pass; the job's pace."""
    hold = gil_holder()
    started = time.perf_counter()
    first_stage, last, final = "", None, None
    while final is None and time.perf_counter() - started < cap:
        if mode == "gil":
            hold(int(hold_ms * 1000))
        elif mode == "spin":  # pure Python: the interpreter hands the GIL over every 5 ms
            until = time.perf_counter() + hold_ms / 1000
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(hold_ms / 1000)
        for event in backend.poll(job):  # the timer tick
            if event.kind == "progress" and event.stage.endswith("generate"):
                first_stage = first_stage or event.stage
                if event.stage == first_stage:
                    last = event
            if event.final:
                final = event
    wall = time.perf_counter() - started
    if final is None:
        backend.cancel(job)
        try:
            backend.wait(job, timeout=600)
        except Exception:  # cancelled (or whatever ended it): only the pace counts
            pass
    pace = last.step / last.elapsed if last is not None and last.elapsed > 0 else 0.0
    return {
        "finished": final is not None and final.kind == "done",
        "wall": wall,
        "steps_seen": 0 if last is None else last.step,
        "pace": pace,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from worker_harness import ages_spec

    from LongitudinalDiffusionLib.backends import LocalBackend, ThreadBackend
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    out: dict[str, Any] = {"model": args.model, "steps": args.steps, "hold_ms": args.hold_ms, "cap": args.cap}
    with tempfile.TemporaryDirectory(prefix="gil-bench-") as tmp:
        cohort = Path(tmp) / "cohort"
        shape, spacing = (32, 40, 32), (5.0, 5.0, 5.0)  # the tests' subject
        if not args.quick:
            shape, spacing = (80, 96, 80), (2.0, 2.0, 2.0)  # the geometry of the Slicer module's sample subject
        write_cohort(cohort, CohortSpec(n_subjects=1, seed=3, heart=False, shape=shape, spacing=spacing), jobs=1)

        def spec() -> Any:
            return ages_spec(cohort, args.model, steps=args.steps)

        backends = {"thread": ThreadBackend(), "child": LocalBackend()}
        try:
            for name, backend in backends.items():
                t0 = time.perf_counter()
                backend.wait(backend.submit(spec()), timeout=600)  # imports done, model cached in the child
                out[f"{name}/first"] = time.perf_counter() - t0
            for condition in CONDITIONS:  # both backends under each condition in turn: the load falls alike
                for name, backend in backends.items():
                    job = backend.submit(spec())
                    row = drive(backend, job, hold_ms=args.hold_ms, mode=condition, cap=args.cap)
                    out[f"{name}/{condition}"] = row
                    print(f"{name:6s} {condition:4s} {json.dumps(row)}", file=sys.stderr, flush=True)
            out["reading"] = reading_back(backends["child"].wait(backends["child"].submit(spec()), timeout=600))
        finally:
            for backend in backends.values():
                backend.close()
    return out


def reading_back(result: Any, hold_ms: float = 20.0) -> dict[str, Any]:
    """Reading a job's result back in the parent: ``Result.load`` of its NIfTI folder against
    ``pickle.loads`` of its pickle; on the main thread (idle), and on a thread while the main
    thread holds the GIL between ticks of ``hold_ms`` (the time until the thread is done)."""
    import pickle
    import threading

    from LongitudinalDiffusionLib.tasks import Result

    hold = gil_holder()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gil-bench-result-") as tmp:
        folder = Path(tmp) / "result"
        result.save(folder)
        blob = Path(tmp) / "result.pickle"
        blob.write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        readers = {"Result.load": lambda: Result.load(folder), "pickle": lambda: pickle.loads(blob.read_bytes())}
        for name, read in readers.items():
            read()  # warm: imports, file cache
            t0 = time.perf_counter()
            read()
            main = time.perf_counter() - t0
            done = threading.Event()
            worker = threading.Thread(target=lambda: (read(), done.set()))  # noqa: B023
            t0 = time.perf_counter()
            worker.start()
            while not done.is_set():  # each check is a tick: the only moments the thread can run
                hold(int(hold_ms * 1000))
            out[name] = {"main_ms": 1000 * main, "starved_thread_ms": 1000 * (time.perf_counter() - t0)}
            worker.join()
    return out


def table(r: dict[str, Any]) -> str:
    lines = [
        "| backend | main thread | steps/s (first stage) | slowdown against idle | wall, submit to done |",
        "|---|---|---|---|---|",
    ]
    what = {"idle": "sleeps between ticks", "spin": "busy in Python", "gil": "holds the GIL (Slicer)"}
    for name in ("thread", "child"):
        idle = r[f"{name}/idle"]
        for condition in CONDITIONS:
            row = r[f"{name}/{condition}"]
            if row["pace"] > 0:
                slowdown = f"{idle['pace'] / row['pace']:.1f}x"
            else:
                slowdown = f"> {idle['pace'] * r['cap']:.0f}x (no step in {r['cap']:g} s)"
            wall = f"{row['wall']:.1f} s" if row["finished"] else f"> {r['cap']:g} s ({row['steps_seen']} steps)"
            lines.append(f"| {name} | {what[condition]} | {row['pace']:.2f} | {slowdown} | {wall} |")
    lines += ["", "| reading the result back | on the main thread | on a thread, main thread holding the GIL |"]
    lines.append("|---|---|---|")
    for name, row in r["reading"].items():
        lines.append(f"| {name} | {row['main_ms']:.0f} ms | {row['starved_thread_ms']:.0f} ms |")
    lines.append(
        f"\nFirst run of each backend (idle main thread; the child's includes starting the process, "
        f"its imports and loading the model): thread {r['thread/first']:.1f} s, child {r['child/first']:.1f} s."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="interval-demo", help="a catalog model for complete-ages")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of each of the two stages")
    parser.add_argument("--hold-ms", type=float, default=100.0, help="main thread busy time between ticks")
    parser.add_argument("--cap", type=float, default=90.0, help="seconds a run may take before it is cancelled")
    parser.add_argument("--quick", action="store_true", help="5 steps, 20 s cap")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if os.name != "posix":
        print("needs a POSIX C library (usleep through ctypes.PyDLL)", file=sys.stderr)
        return 2
    if args.quick:
        args.steps, args.cap = 5, 20.0
    import platform

    import torch

    print(
        f"# GIL starvation: {args.model}, 2 x {args.steps} steps, main thread held {args.hold_ms:g} ms per tick; "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
        f"Python {platform.python_version()}"
    )
    result = measure(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
