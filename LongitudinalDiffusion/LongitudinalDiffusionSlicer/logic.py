"""The module's run logic: a panel request to backend jobs, and their results into the scene.

:class:`RunLogic` is what the module's ``LongitudinalDiffusionLogic`` delegates to, and what
a script uses without the panel:

* :meth:`RunLogic.startRun` turns a :class:`~.panel.RunRequest` into job specs, submits them
  to the backend (a :class:`~LongitudinalDiffusionLib.backends.local.LocalBackend`: a warm
  job process, or the remote worker's client) and returns the :class:`~.run.Run`;
  the panel drains it with a timer. Inputs are watched: a subject volume removed from the
  scene during the run stops it.
* :meth:`RunLogic.placeRun` puts a finished run's results into the scene under the subject
  (:func:`.results.placeResult` for each; all or nothing) and returns a
  :class:`~.results.SceneResults` view; :meth:`RunLogic.placeRunSteps` does the same in
  steps of tens of milliseconds, for the panel, which lets Qt's event loop run in between.
  The tissue segmentation of the results - the slow part of placing them - is done before,
  in the job process (driven from a background thread), while the run still shows as running
  (:func:`.results.prepareSegmentations`, the run's ``prepare`` step).
* :meth:`RunLogic.run` does both and blocks: the scripting form.

Example (Slicer Python console)::

    from LongitudinalDiffusionSlicer.logic import RunLogic
    from LongitudinalDiffusionSlicer.panel import RunRequest
    from LongitudinalDiffusionLib.catalog import find_model
    logic = RunLogic()
    request = RunRequest("complete-ages", subject, find_model("cas-diffcom-demo"), ages=(7.5,), steps=10)
    view = logic.run(request)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

from LongitudinalDiffusionLib.catalog import find_model
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError

from . import mrml, results
from .run import Run, childSegmenter, jobSpecsFromRequest, stagingFolder

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SEGMENTER", "RunLogic"]

#: The catalog model that labels generated brains (overlays and the tissue volume chart).
DEFAULT_SEGMENTER = "tissue-seg-brain-demo"


class RunLogic:
    """Runs panel requests on a backend and places the results (see the module doc).

    Args:
        scene: the scene results go to (default ``slicer.mrmlScene`` at each call).
        backendFactory: ``backendFactory(request)`` returns the backend for a request; by
            default one local backend (created on first use, reused) or, for remote
            requests, the worker's client.
        segmenter: labels generated images: a callable ``Image -> labels Image`` with
            ``classes``; by default the catalog's :data:`DEFAULT_SEGMENTER` when installed.
            Pass ``False`` for none.
        options: extra sampling options for every job (``RunOptions`` JSON fields).
    """

    def __init__(
        self,
        scene: Any = None,
        *,
        backendFactory: Callable[[Any], Any] | None = None,
        segmenter: Any = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self._scene = scene
        self._backendFactory = backendFactory
        self._localBackend: Any = None
        self._segmenter = segmenter
        self.options = dict(options or {})

    @property
    def scene(self) -> Any:
        return mrml._scene(self._scene)

    # ------------------------------------------------------------------ backends

    def backendFor(self, request: Any) -> Any:
        if self._backendFactory is not None:
            return self._backendFactory(request)
        if getattr(request, "backend", "local") == "remote":
            try:
                from LongitudinalDiffusionLib.backends import RemoteBackend
            except (ImportError, AttributeError) as exc:
                raise LongitudinalDiffusionError(f"remote servers are not available here ({exc})") from None
            return RemoteBackend(request.serverUrl, token=request.token or None)
        if self._localBackend is None:
            from LongitudinalDiffusionLib.backends.local import LocalBackend

            self._localBackend = LocalBackend(progress_interval=0.1)
        return self._localBackend

    def testConnection(self, url: str, token: str = "", modelName: str | None = None) -> str:
        """Ask a worker for its health and description ("Test connection"); nothing is uploaded.

        Returns:
            a one-line summary: version, API, devices, number of models (and whether it has
            ``modelName``).

        Raises:
            LongitudinalDiffusionError: unreachable, refused token, or another API version
                (the message says which).
        """
        from LongitudinalDiffusionLib.backends.remote import RemoteBackend

        backend = RemoteBackend(url, token or None, retries=0, timeout=10.0)
        try:
            health = backend.check()
            info = backend.info()
        finally:
            backend.close()
        devices = [d.get("description") or d.get("device", "?") for d in info.get("devices", [])]
        gpus = [f"{g.get('name')} ({g.get('memory_free_mb')} MB free)" for g in info.get("gpus", [])]
        models = [m.get("name") for m in info.get("models", [])]
        summary = (
            f"longdiff-worker {health.get('version')} (API {health.get('api_version')}) at {backend.url}; "
            f"{', '.join(gpus or devices) or 'no device listed'}; {len(models)} model(s)"
        )
        if modelName:
            summary += f"; {modelName} " + ("available" if modelName in models else "NOT available on this worker")
        return summary

    def close(self) -> None:
        """Stop the local backend (cancelling what runs on it)."""
        if self._localBackend is not None:
            self._localBackend.close()
            self._localBackend = None

    # ------------------------------------------------------------------ segmenter

    def segmenter(self) -> Any:
        """The tissue segmenter, or None (no model installed, or switched off)."""
        if self._segmenter is False:
            return None
        if self._segmenter is None:
            try:
                find_model(DEFAULT_SEGMENTER)
            except InputError:
                logger.info("no %s model installed: results are not segmented", DEFAULT_SEGMENTER)
                self._segmenter = False
                return None
            self._segmenter = results.TissueSegmenter(DEFAULT_SEGMENTER)
        return self._segmenter

    # ------------------------------------------------------------------ subjects

    def loadSubject(self, path: Any) -> Any:
        """Read a subject (BIDS subject or dataset folder, manifest .tsv), load it into the
        scene under its subject item, and return it with its scene volumes' IDs in
        ``meta["scene_nodes"]`` (a run watches them)."""
        from LongitudinalDiffusionLib.subject import Subject, load_subject

        subject = load_subject(path)
        loaded = mrml.loadSubjectIntoScene(subject, self.scene)
        meta = {**subject.meta, "scene_nodes": [node.GetID() for node in loaded.volumeNodes]}
        return Subject(subject.subject_id, subject.timepoints, subject.source, meta)

    # ------------------------------------------------------------------ runs

    def inputProblem(self, request: Any) -> str:
        """Why the request's scene inputs cannot be used any more ("" when they can)."""
        scene = self.scene
        ids = (getattr(request.subject, "meta", None) or {}).get("scene_nodes", [])
        gone = [i for i in ids if scene.GetNodeByID(i) is None]
        if not gone:
            return ""
        return (
            f"the input volume(s) {', '.join(gone)} were removed from the scene during the run; "
            "the run was stopped (load the subject again to run it)"
        )

    def startRun(self, request: Any) -> Run:
        """Submit ``request``'s jobs and return the run (not waiting for it)."""
        if not request.subject.timepoints:
            raise InputError(f"subject {request.subject.subject_id}", "has no scans")
        staging, removeStaging = stagingFolder()
        backend = None
        ownClient = self._backendFactory is None and getattr(request, "backend", "local") == "remote"

        def cleanup() -> None:
            removeStaging()
            if backend is not None and ownClient:
                backend.close()  # the remote client made for this run: its event streams end with it

        try:
            specs = jobSpecsFromRequest(request, staging, self.options)
            backend = self.backendFor(request)
            segmenter = childSegmenter(backend, self.segmenter())  # the network runs in the job process
            prepare = None
            if segmenter is not None:

                def prepare(runResults: list[Any], progress: Any, cancel: Any) -> results.PreparedSegmentations:
                    return results.prepareSegmentations(
                        runResults, request.subject, segmenter, progress=progress, cancel=cancel
                    )

            return Run(
                backend,
                specs,
                request,
                inputCheck=lambda: self.inputProblem(request),
                cleanup=cleanup,
                prepare=prepare,
            )
        except BaseException:
            cleanup()
            raise

    def placeRun(self, run: Run) -> results.SceneResults:
        """Put a finished run's results into the scene (all or nothing) and return the view."""
        return results.runSteps(self.placeRunSteps(run))

    def placeRunSteps(self, run: Run) -> Generator[None, None, results.SceneResults]:
        """:meth:`placeRun` in steps: a generator that yields between units of work (a volume,
        a frame, the chart; see :func:`.results.placeResultSteps`) and returns the view.
        Closing it before its end takes out what it placed."""
        request = run.request
        scene = self.scene
        problem = self.inputProblem(request) if request is not None else ""
        if problem:
            raise LongitudinalDiffusionError(problem)
        subject = getattr(request, "subject", None)
        labelNames = None
        segmenter = run.prepared if getattr(run, "prepared", None) is not None else self.segmenter()
        if getattr(request, "task", "") == "interpolate":
            first = request.scans[0]
            if first.labels is not None:
                labelNames = results.labelNamesFor(first.labels)
        placed: list[results.PlacedResult] = []
        try:
            for result in run.results:
                steps = results.placeResultSteps(
                    result, scene, subject=subject, segmenter=segmenter, labelNames=labelNames
                )
                placed.append((yield from steps))
        except BaseException:  # a failure, or closed before the end
            for item in reversed(placed):
                item.remove(scene)
            raise
        return results.SceneResults(placed, scene)

    def run(self, request: Any, timeout: float | None = None) -> results.SceneResults:
        """Run ``request`` and wait for it (blocking: for scripts), then place the results.

        Raises:
            Cancelled, LongitudinalDiffusionError: the run did not finish; nothing was placed.
        """
        run = self.startRun(request)
        run.wait(timeout)
        return self.placeRun(run)
