"""The panel with a remote backend, for real: a ``longdiff-worker serve`` process on loopback
(``worker_harness.WorkerProcess``), the module's run logic with the library's RemoteBackend,
the real .ui offscreen and a real MRML scene.

"Test connection" reports the worker (and a refused token); with consent the job runs on the
worker and its results land in the scene; without consent nothing is uploaded (the worker has
no new job).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")


import httpx
import pytest
import requires

requires.slicer()

import mrml_harness
import torch
from LongitudinalDiffusionSlicer import mrml, results
from worker_harness import WorkerProcess

torch.set_num_threads(1)
TOKEN = "panel-remote-token-0123456789"
MODEL = "interval-demo"
# subjectFolder (a real simulated BIDS subject) is in conftest.py


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    (folder / "models").mkdir()
    with WorkerProcess(folder / "data", folder / "models", token=TOKEN) as w:
        yield w


def workerJobs(worker) -> list[dict]:
    response = httpx.get(f"{worker.url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    response.raise_for_status()
    return response.json()


@pytest.fixture
def gui(qtbot, monkeypatch, tmp_path, subjectFolder):
    with mrml_harness.panelOnScene(
        qtbot, monkeypatch, tmp_path / "home", segmenter=False, consentAnswer=True, testConnections=True
    ) as gui:
        assert gui.panel.loadSubjectFrom(subjectFolder) is not None
        gui.ui.agesLineEdit.setText("15")
        names = [card.name for card in gui.panel.models()]
        gui.ui.modelComboBox.setCurrentIndex(names.index(MODEL))
        gui.ui.stepsSpinBox.setValue(2)
        yield gui


def chooseRemote(ui, url: str, token: str) -> None:
    ui.remoteRadioButton.setChecked(True)
    ui.serverUrlLineEdit.setText(url)
    ui.tokenLineEdit.setText(token)


def test_test_connection_reports_the_worker_and_a_refused_token(gui, worker):
    ui = gui.ui
    chooseRemote(ui, worker.url, TOKEN)
    assert ui.testConnectionButton.isEnabled()
    ui.testConnectionButton.click()
    status = ui.statusLabel.text()
    assert status.startswith("Connection OK: longdiff-worker") and f"{MODEL} available" in status, status
    assert "cpu" in status.lower()
    ui.tokenLineEdit.setText("wrong-token")
    ui.testConnectionButton.click()
    assert ui.statusLabel.text().startswith("Connection failed") and "401" in ui.statusLabel.text()
    assert "Connection failed" in ui.logTextEdit.toPlainText()


def test_with_consent_the_job_runs_on_the_worker_and_the_results_land_in_the_scene(gui, worker, qtbot):
    ui, panel = gui.ui, gui.panel
    chooseRemote(ui, worker.url, TOKEN)
    before = {job["job_id"] for job in workerJobs(worker)}
    assert ui.applyButton.isEnabled(), ui.statusLabel.text()
    ui.applyButton.click()
    assert len(gui.consent["asked"]) == 1 and gui.consent["asked"][0].serverUrl == worker.url
    assert panel.isRunning() and ui.applyButton.text() == "Cancel"
    qtbot.waitUntil(lambda: bool(gui.finished), timeout=60000)
    assert gui.finished[-1] == ("done", ""), ui.logTextEdit.toPlainText()
    assert ui.progressBar.value() == 100
    new = [job for job in workerJobs(worker) if job["job_id"] not in before]
    assert len(new) == 1 and new[0]["state"] == "done"  # it ran there
    (placed,) = panel.results().placed
    (volume,) = placed.volumeNodes
    assert gui.scene.IsNodePresent(volume) and float(volume.GetAttribute(mrml.AGE_ATTRIBUTE)) == 15.0
    reference = mrml.subjectVolumes(gui.scene)[0]
    assert volume.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    assert results.resultNodeIds(gui.scene)


def test_declined_consent_uploads_nothing(gui, worker):
    ui, panel = gui.ui, gui.panel
    chooseRemote(ui, worker.url, TOKEN)
    gui.consent["answer"] = False
    before = len(workerJobs(worker))
    nodes = gui.scene.GetNumberOfNodes()
    ui.applyButton.click()
    assert len(gui.consent["asked"]) == 1
    assert not panel.isRunning() and "declined" in ui.statusLabel.text()
    assert "nothing was uploaded" in ui.logTextEdit.toPlainText()
    assert len(workerJobs(worker)) == before and gui.scene.GetNumberOfNodes() == nodes
