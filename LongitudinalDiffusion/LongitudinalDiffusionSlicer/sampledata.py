"""The simulated demo subject, offered in Slicer's Sample Data module and by the panel's
"Load sample subject".

Nothing is downloaded: the subject is simulated on this computer by the library (the same
code as ``longdiff demo-data``), once, into Slicer's cache folder, then loaded into the
scene with its subject hierarchy and labels.

The simulation takes about 20 s, so the panel runs it in the background
(:class:`SampleSimulation`): a child Python process (PythonSlicer inside Slicer) writes the
subject and reports its progress in a small JSON file that a timer reads, so Slicer stays
responsive (a Python thread would crawl: Slicer's main thread holds the GIL while idle).
The simulator needs only numpy, scipy and nibabel, no torch: :func:`missingPackages` says
which of them are missing, before anything starts (:data:`SAMPLE_REQUIREMENTS`).

Command line of the child (also usable by hand)::

    python -m LongitudinalDiffusionSlicer.sampledata CACHE_DIR [--progress FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

#: Sample Data category and sample name.
SAMPLE_CATEGORY = "Longitudinal Diffusion"
SAMPLE_NAME = "LongitudinalDiffusionDemoSubject"
#: The demo cohort the sample comes from: one subject, seed 0, 2 mm, no heart.
SAMPLE_SEED = 0
#: What the simulator imports (no torch): requirement lines, as in Resources/requirements.txt.
SAMPLE_REQUIREMENTS = ("numpy>=1.24", "scipy>=1.10", "nibabel>=5.0")


def sampleRoot(cacheDir: str | os.PathLike) -> Path:
    return Path(cacheDir) / "LongitudinalDiffusion" / f"demo-cohort-seed{SAMPLE_SEED}"


def sampleReady(cacheDir: str | os.PathLike) -> Path | None:
    """The cached subject's folder when it has been simulated already, else None."""
    subject = sampleRoot(cacheDir) / "sub-001"
    return subject if (subject / "sub-001_sessions.tsv").is_file() else None


def missingPackages() -> list[str]:
    """The simulator's requirements (:data:`SAMPLE_REQUIREMENTS`) this Python lacks."""
    missing = []
    for line in SAMPLE_REQUIREMENTS:
        try:
            found = importlib.util.find_spec(line.split(">=")[0]) is not None
        except (ImportError, ValueError):  # a module entry of None: blocked or broken
            found = False
        if not found:
            missing.append(line)
    return missing


def sampleSubjectFolder(cacheDir, progress: Callable[[str, int, int], Any] | None = None, coarse: bool = False):
    """Simulate the demo subject into ``cacheDir`` unless it is there already; return its
    ``sub-001`` folder (a BIDS subject, loadable with ``load_subject``). Blocking: for scripts
    and the self-test; the panel uses :class:`SampleSimulation`."""
    from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

    ready = sampleReady(cacheDir)
    if ready is not None:
        return ready
    root = sampleRoot(cacheDir)
    logging.info("Simulating the LongitudinalDiffusion demo subject into %s", root)
    grid = {"shape": (20, 24, 20), "spacing": (8, 8, 8)} if coarse else {}
    spec = CohortSpec(n_subjects=1, seed=SAMPLE_SEED, heart=False, **grid)
    write_cohort(root, spec, overwrite=True, progress=progress)
    return root / "sub-001"


Progress = Callable[[int, int, str], Any]
Finished = Callable[[Optional[Path], str], Any]


class SampleSimulation:
    """The demo subject simulated in a child process, its progress read by a Qt timer.

    Args:
        cacheDir: Slicer's cache folder (``slicer.app.cachePath``).
        qt: the ``qt`` module (its ``QTimer``).
        onProgress: ``onProgress(done, total, text)`` on the main thread.
        onFinished: ``onFinished(folder, error)``: the subject folder and "" when done, or
            None and the reason (the child's last error lines) when it failed.
        python: the interpreter (default: PythonSlicer inside Slicer, else this Python).
        pollIntervalMs: how often the progress file is read.
        coarse: simulate on an 8 mm grid (20 x 24 x 20 voxels; tests) instead of 2 mm.
    """

    def __init__(
        self,
        cacheDir: str | os.PathLike,
        qt: Any,
        onProgress: Progress,
        onFinished: Finished,
        python: str | None = None,
        pollIntervalMs: int = 200,
        coarse: bool = False,
    ) -> None:
        self.cacheDir = Path(cacheDir)
        self.coarse = coarse
        self._onProgress, self._onFinished = onProgress, onFinished
        self._python = python
        self.process: subprocess.Popen | None = None
        self._timer = qt.QTimer()
        self._timer.setInterval(int(pollIntervalMs))
        self._timer.timeout.connect(self.poll)
        root = sampleRoot(self.cacheDir)
        root.parent.mkdir(parents=True, exist_ok=True)
        self.progressFile = root.parent / f"{root.name}.progress.json"
        self.logFile = root.parent / f"{root.name}.log"

    def start(self) -> None:
        """Start the child (or report at once when the subject is cached already)."""
        ready = sampleReady(self.cacheDir)
        if ready is not None:
            self._onFinished(ready, "")
            return
        if self.process is not None:
            return
        python = self._python
        if python is None:
            from LongitudinalDiffusionLib.backends.process import find_python

            python = find_python()
        libSpec = importlib.util.find_spec("LongitudinalDiffusionLib")
        paths = [str(Path(libSpec.origin).parent.parent), str(Path(__file__).resolve().parent.parent)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("OMP_NUM_THREADS", "1")
        self.progressFile.unlink(missing_ok=True)
        self._log = open(self.logFile, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [
                python,
                "-m",
                "LongitudinalDiffusionSlicer.sampledata",
                str(self.cacheDir),
                "--progress",
                str(self.progressFile),
            ]
            + (["--coarse"] if self.coarse else []),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._onProgress(0, 1, "starting the simulation")
        self._timer.start()

    def isRunning(self) -> bool:
        return self.process is not None

    def poll(self, *_args: Any) -> None:
        """Read the progress file; report the end (the timer calls it)."""
        if self.process is None:
            self._timer.stop()
            return
        try:
            state = json.loads(self.progressFile.read_text(encoding="utf-8"))
            self._onProgress(int(state["done"]), int(state["total"]), str(state.get("what", "")))
        except (OSError, ValueError, KeyError):
            pass  # not written yet, or being replaced
        code = self.process.poll()
        if code is None:
            return
        self._end()
        ready = sampleReady(self.cacheDir)
        if code == 0 and ready is not None:
            self._onFinished(ready, "")
            return
        tail = [
            line for line in self.logFile.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
        reason = tail[-1] if tail else f"the simulation process ended with code {code}"
        self._onFinished(None, reason)

    def cancel(self) -> None:
        """Stop the simulation (nothing half-made is left: the cohort is written atomically)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self._end()

    def _end(self) -> None:
        self._timer.stop()
        self.process = None
        self._log.close()
        self.progressFile.unlink(missing_ok=True)


def registerSampleData(thumbnailPath, loadSample):
    """Add the demo subject to the Sample Data module (real Slicer only).

    Args:
        thumbnailPath: the picture shown on the Sample Data button.
        loadSample: called (with the sample source) when the user clicks it.
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        nodeNames=["sub-001"],
        thumbnailFileName=os.fspath(thumbnailPath),
        customDownloader=loadSample,
    )


def main(argv: list[str] | None = None) -> int:
    """The child process: simulate into the cache, writing progress as JSON after each session."""
    parser = argparse.ArgumentParser(prog="python -m LongitudinalDiffusionSlicer.sampledata")
    parser.add_argument("cache_dir", help="the cache folder (the subject goes to LongitudinalDiffusion/ in it)")
    parser.add_argument("--progress", help="a JSON file rewritten after each session: {what, done, total}")
    parser.add_argument("--coarse", action="store_true", help="an 8 mm grid (tests), not 2 mm")
    args = parser.parse_args(argv)
    missing = missingPackages()
    if missing:
        print(f"The demo subject needs these Python packages: {', '.join(missing)}", flush=True)
        return 3

    def progress(what: str, done: int, total: int) -> None:
        if args.progress:
            tmp = Path(args.progress + ".tmp")
            tmp.write_text(json.dumps({"what": what, "done": done, "total": total}), encoding="utf-8")
            os.replace(tmp, args.progress)

    try:
        folder = sampleSubjectFolder(args.cache_dir, progress=progress, coarse=args.coarse)
    except Exception as exc:  # the parent shows the last line; the traceback goes to the log before it
        traceback.print_exc(file=sys.stdout)
        print(f"The demo subject could not be simulated: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print(folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
