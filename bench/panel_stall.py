"""Responsiveness of the Slicer panel: the longest stall of the Qt event loop while a local job runs.

    python bench/panel_stall.py [--model interval-demo] [--age 7.5] [--steps 10] [--quick]

Builds the panel the way the run tests do (``Testing/mrml_harness.panelOnScene``: the real
.ui offscreen through PySide6, the real ``RunLogic`` on a real MRML scene from slicer-core,
the real local backend on a background thread, the bundled tissue segmenter), loads the
sample subject of the Slicer module (simulated once into a cache folder: one subject, 7
ages x 4 contrasts, 80x96x80 voxels of 2 mm), completes one age with a demo model from the
Apply button, and ticks a 5 ms ``QTimer`` for the whole run. Each gap between two ticks is
a time the event loop could not run (the panel could not repaint or take a click); it is
counted in the phase it overlaps most:

* **job**: from Apply until the backend reports the job done (it runs on the local
  backend's thread; the panel drains its events every 20 ms);
* **segmenting**: until the run reports done: the tissue segmentation of the results, on a
  background thread of the run (none where placing segments on the main thread);
* **placing**: until the panel reports the run finished: the results go into the scene
  (volumes, segmentations, frame sequences, the tissue volume chart).

Prints, per phase, the longest gap, the 99th percentile and the number of gaps over
100 ms (the target: none). ``--quick`` uses the tests' tiny subject (20x24x20 voxels of
8 mm) and 2 sampler steps. ``--blocking`` places the results the way the panel did before
the segmentation moved to a background thread and placing was split into steps: in one
call on the main thread, segmenting there (for comparison).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "LongitudinalDiffusion", ROOT / "Testing"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

TICK_MS = 5
LIMIT_MS = 100.0
PHASES = ("job", "segmenting", "placing")
FINAL = ("done", "failed", "cancelled")


class EventLoopProbe:
    """Ticks a precise ``QTimer`` every ``TICK_MS`` and keeps the tick times."""

    def __init__(self, QtCore: Any) -> None:
        self.ticks: list[float] = []
        self.timer = QtCore.QTimer()
        self.timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def start(self) -> None:
        self.ticks.append(time.perf_counter())
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()
        self.ticks.append(time.perf_counter())

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of every interval between two ticks."""
        return list(zip(self.ticks[:-1], self.ticks[1:]))


class QtBotStandIn:
    """The two things ``panelOnScene`` asks of pytest-qt's ``qtbot``, outside pytest."""

    def __init__(self, QtCore: Any) -> None:
        self.QtCore = QtCore
        self.widgets: list[Any] = []

    def addWidget(self, widget: Any) -> None:
        self.widgets.append(widget)

    def waitUntil(self, condition: Any, timeout: int = 5000) -> None:
        deadline = time.monotonic() + timeout / 1000
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            self.QtCore.QCoreApplication.processEvents(self.QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 20)
            time.sleep(0.005)


def subjectFolder(quick: bool, cache: Path) -> Path:
    """The subject to load: the Slicer module's sample subject, or the tests' tiny one."""
    if not quick:
        from LongitudinalDiffusionSlicer import sampledata

        return sampledata.sampleSubjectFolder(cache)
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    root = cache / "LongitudinalDiffusion" / "bench-panel-tiny"
    if not (root / "sub-001" / "sub-001_sessions.tsv").is_file():
        write_cohort(root, CohortSpec(n_subjects=1, heart=False, shape=(20, 24, 20), spacing=(8, 8, 8)), overwrite=True)
    return root / "sub-001"


def summarise(gaps_ms: list[float]) -> dict[str, float]:
    if not gaps_ms:
        return {"ticks": 0, "longest": float("nan"), "p99": float("nan"), "over": 0, "seconds": 0.0}
    g = np.asarray(gaps_ms)
    return {
        "ticks": int(g.size),
        "longest": float(g.max()),
        "p99": float(np.percentile(g, 99)),
        "over": int((g > LIMIT_MS).sum()),
        "seconds": float(g.sum() / 1000),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One run from the panel on a real scene: the event loop's gaps, split by phase."""
    import mrml_harness
    import pytest
    import torch
    from LongitudinalDiffusionSlicer import results
    from PySide6 import QtCore, QtWidgets

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])  # noqa: F841 (kept alive)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = subjectFolder(args.quick, cache)
    monkeypatch = pytest.MonkeyPatch()
    qtbot = QtBotStandIn(QtCore)
    segmenter = results.TissueSegmenter("tissue-seg-brain-demo")
    timer = RunTimer()
    timer.install(monkeypatch, blocking=args.blocking)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with mrml_harness.panelOnScene(
                qtbot, monkeypatch, Path(tmp) / "home", segmenter, consentAnswer=False
            ) as gui:
                probe, summary = runFromPanel(gui, folder, segmenter, args, timer.marks, QtCore)
        finally:
            monkeypatch.undo()
    marks = timer.marks
    jobs = min(marks.get("jobs", marks["done"]), marks["done"])
    windows = {
        "job": (marks["apply"], jobs),
        "segmenting": (jobs, marks["done"]),
        "placing": (marks["done"], marks["finished"]),
    }
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for start, end in probe.gaps():
        overlap = {p: min(end, hi) - max(start, lo) for p, (lo, hi) in windows.items()}
        phase = max(overlap, key=lambda p: overlap[p])
        if overlap[phase] > 0:
            phases[phase].append((end - start) * 1000)
    return {
        "phases": {p: summarise(g) for p, g in phases.items()},
        "durations": {p: hi - lo for p, (lo, hi) in windows.items()},
        "summary": summary,
        "folder": folder,
        "steps": [t * 1000 for t in timer.stepTimes],
    }


class RunTimer:
    """Hooks on the panel's run logic: when the jobs are all final and when the run has
    finished (``marks``), and how long each placement step took (``stepTimes``, s)."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.stepTimes: list[float] = []

    def install(self, monkeypatch: Any, blocking: bool) -> None:
        """Wrap ``RunLogic.startRun`` and ``placeRunSteps``; ``blocking``: as before the
        background preparation existed - nothing prepared, placing in one call."""
        from LongitudinalDiffusionSlicer import results
        from LongitudinalDiffusionSlicer.logic import RunLogic

        marks, stepTimes = self.marks, self.stepTimes
        startRun, placeRunSteps = RunLogic.startRun, RunLogic.placeRunSteps

        def timedStartRun(logic: Any, request: Any) -> Any:
            """The logic's startRun; the run notes when it first reports its jobs finished."""
            run = startRun(logic, request)
            poll = run.poll

            def timedPoll() -> Any:
                update = poll()
                now = time.perf_counter()
                if "jobs" not in marks and all(run.backend.status(j) in FINAL for j in run.jobIds):
                    marks["jobs"] = now
                if update.finished and "done" not in marks:
                    marks["done"] = now
                return update

            run.poll = timedPoll
            return run

        def timedPlaceRunSteps(logic: Any, run: Any) -> Any:
            """The logic's placement steps, each one timed."""
            steps = placeRunSteps(logic, run)
            while True:
                t0 = time.perf_counter()
                try:
                    next(steps)
                except StopIteration as end:
                    stepTimes.append(time.perf_counter() - t0)
                    return end.value
                stepTimes.append(time.perf_counter() - t0)
                yield

        monkeypatch.setattr(RunLogic, "startRun", timedStartRun)
        monkeypatch.setattr(RunLogic, "placeRunSteps", timedPlaceRunSteps)
        if blocking:
            monkeypatch.setattr(
                results, "prepareSegmentations", lambda res, subj, seg, **kw: results.PreparedSegmentations(seg)
            )
            monkeypatch.setattr(
                RunLogic, "placeRunSteps", lambda logic, run: results.runSteps(placeRunSteps(logic, run))
            )


def runFromPanel(
    gui: Any, folder: Path, segmenter: Any, args: argparse.Namespace, marks: dict[str, float], QtCore: Any
) -> tuple[EventLoopProbe, Any]:
    """Load the subject, choose the model, press Apply and run the event loop (probed) until
    the run has finished and a few ticks more; the probe and the results' summary."""
    ui, panel = gui.ui, gui.panel
    if panel.loadSubjectFrom(folder) is None:
        raise SystemExit(f"panel-stall: could not load {folder}: {ui.statusLabel.text()}")
    names = [card.name for card in panel.models()]
    if args.model not in names:
        raise SystemExit(f"panel-stall: model {args.model} is not installed ({', '.join(names)})")
    ui.modelComboBox.setCurrentIndex(names.index(args.model))
    ui.agesLineEdit.setText(f"{args.age:g}")
    ui.stepsSpinBox.setValue(args.steps)
    ui.samplesSpinBox.setValue(args.samples)
    if not ui.applyButton.isEnabled():
        raise SystemExit(f"panel-stall: Apply is disabled: {ui.statusLabel.text()}")
    _ = segmenter.classes  # loads the tissue model now: once per session, not part of a run

    probe = EventLoopProbe(QtCore)
    loop = QtCore.QEventLoop()
    states: list[tuple[str, str]] = []

    def finished(state: str, error: str) -> None:
        marks["finished"] = time.perf_counter()
        states.append((state, error))
        QtCore.QTimer.singleShot(300, loop.quit)  # a few more ticks after the end

    def apply() -> None:
        marks["apply"] = time.perf_counter()
        ui.applyButton.click()

    panel.runFinished.connect(finished)
    QtCore.QTimer.singleShot(200, apply)
    QtCore.QTimer.singleShot(int(args.timeout * 1000), loop.quit)
    probe.start()
    loop.exec()
    probe.stop()
    if not states:
        raise SystemExit(f"panel-stall: the run did not finish within {args.timeout:g} s")
    if states[-1][0] != "done":
        raise SystemExit(f"panel-stall: the run ended {states[-1]}: {ui.logTextEdit.toPlainText()}")
    return probe, panel.results().summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="interval-demo", help="a bundled complete-ages model (default interval-demo)"
    )
    parser.add_argument("--age", type=float, default=7.5, help="the age to complete, months (default 7.5)")
    parser.add_argument("--steps", type=int, help="sampler steps (default 10; 2 with --quick)")
    parser.add_argument(
        "--samples", type=int, default=1, help="samples averaged (default 1; 2 adds an uncertainty map)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--quick", action="store_true", help="the tests' tiny subject and 2 sampler steps")
    parser.add_argument(
        "--blocking",
        action="store_true",
        help="for comparison: place the results in one call on the main thread, segmenting them there",
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 10)
    t0 = time.perf_counter()
    out = measure(args)
    how = "in one call (--blocking)" if args.blocking else "in steps"
    print(f"Subject {out['folder']}; {args.model}, age {args.age:g} mo, {args.steps} steps, {args.samples} sample(s)")
    print(f"Results placed {how}")
    print(f"Placed: {out['summary']}")
    print(f"Event loop ticked every {TICK_MS} ms; gaps between ticks per phase (target: none over {LIMIT_MS:g} ms):")
    print("| phase | duration (s) | ticks | longest gap (ms) | 99th percentile (ms) | gaps over 100 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase in PHASES:
        s = out["phases"][phase]
        print(f"| {phase} | {out['durations'][phase]:.2f} | {s['ticks']} | {s['longest']:.1f} | {s['p99']:.1f} | "
              f"{s['over']} |")  # fmt: skip
    steps = out["steps"]
    if steps:
        print(
            f"Placing ran in {len(steps)} steps of {np.median(steps):.1f} ms (median), "
            f"{max(steps):.1f} ms at most (step {int(np.argmax(steps)) + 1})"
        )
    for phase in PHASES:
        s = out["phases"][phase]
        if not s["ticks"]:
            print(f"panel-stall {phase}: no time spent in this phase")
            continue
        verdict = "OK" if s["over"] == 0 else "STALLS"
        print(f"panel-stall {phase}: longest {s['longest']:.1f} ms, p99 {s['p99']:.1f} ms, "
              f"{s['over']} over {LIMIT_MS:g} ms: {verdict}")  # fmt: skip
    print(f"panel-stall: measured in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
