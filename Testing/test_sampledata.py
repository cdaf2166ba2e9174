"""The demo subject simulated in the background: a real child process, its progress read by
a real Qt timer (PySide6 offscreen), the event loop kept turning meanwhile; a failure and
missing packages reported with their reason. Torch-free (Testing/torchfree.txt)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
import time
from pathlib import Path

import pytest
from PySide6 import QtCore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LongitudinalDiffusion"))
import qt_shim
from LongitudinalDiffusionSlicer import sampledata

from LongitudinalDiffusionLib.subject import load_subject


@pytest.fixture
def qt(monkeypatch):
    return qt_shim.installQtModule(monkeypatch)


def test_the_simulation_runs_in_the_background_with_progress(qtbot, qt, tmp_path):
    progress, finished = [], []
    simulation = sampledata.SampleSimulation(
        tmp_path / "cache",
        qt,
        onProgress=lambda done, total, text: progress.append((done, total, text)),
        onFinished=lambda folder, error: finished.append((folder, error)),
        python=sys.executable,
        pollIntervalMs=20,
        coarse=True,
    )
    ticks = []
    heartbeat = QtCore.QTimer()
    heartbeat.timeout.connect(lambda: ticks.append(time.monotonic()))
    heartbeat.start(10)
    started = time.monotonic()
    simulation.start()
    assert simulation.isRunning() and simulation.process.pid != os.getpid()
    qtbot.waitUntil(lambda: bool(finished), timeout=120000)
    heartbeat.stop()
    elapsed = time.monotonic() - started
    folder, error = finished[0]
    assert error == "" and folder == tmp_path / "cache" / "LongitudinalDiffusion" / "demo-cohort-seed0" / "sub-001"
    assert len(load_subject(folder).timepoints) == 28
    # progress: from the start line to every session, in order, ending complete
    counts = [(d, t) for d, t, _text in progress[1:]]
    assert progress[0][2] == "starting the simulation" and counts and counts == sorted(counts)
    assert counts[-1][0] == counts[-1][1] == 7
    # the event loop kept turning: a 10 ms timer fired all along (no gap of a second)
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > elapsed / 0.1 and max(gaps) < 1.0, (len(ticks), elapsed, max(gaps))
    assert not simulation.isRunning() and not simulation.progressFile.exists()

    # the second time it comes from the cache at once, no process
    again = []
    cached = sampledata.SampleSimulation(tmp_path / "cache", qt, lambda *a: None, lambda f, e: again.append((f, e)))
    cached.start()
    assert again == [(folder, "")] and cached.process is None


def test_a_failed_simulation_says_why(qtbot, qt, tmp_path):
    cache = tmp_path / "cache"
    (cache / "LongitudinalDiffusion").mkdir(parents=True)
    (cache / "LongitudinalDiffusion" / "demo-cohort-seed0").write_text("a file where the cohort goes")
    finished = []
    simulation = sampledata.SampleSimulation(
        cache, qt, lambda *a: None, lambda f, e: finished.append((f, e)), python=sys.executable, pollIntervalMs=20
    )
    simulation.start()
    qtbot.waitUntil(lambda: bool(finished), timeout=60000)
    folder, error = finished[0]
    assert folder is None and error.startswith("The demo subject could not be simulated:")
    assert (cache / "LongitudinalDiffusion" / "demo-cohort-seed0").read_text() == "a file where the cohort goes"


def test_missing_packages_are_named_before_anything_runs(monkeypatch, capsys, tmp_path):
    assert sampledata.missingPackages() == []
    monkeypatch.setitem(sys.modules, "nibabel", None)
    assert sampledata.missingPackages() == ["nibabel>=5.0"]
    assert sampledata.main([str(tmp_path)]) == 3
    assert "needs these Python packages: nibabel>=5.0" in capsys.readouterr().out
    assert not (tmp_path / "LongitudinalDiffusion").exists()
