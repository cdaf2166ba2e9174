"""LongitudinalDiffusion: the 3D Slicer module.

Thin by design: module metadata, the panel's wiring and the scene logic. The panel's
behaviour is in ``LongitudinalDiffusionSlicer.panel``, the MRML glue in
``LongitudinalDiffusionSlicer.mrml``, and the work in the ``LongitudinalDiffusionLib`` library
(shared with the ``longdiff`` command line and the training code).
"""

import logging
import os

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

try:  # Slicer's translation functions; identity where a Slicer has none
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # pragma: no cover - every supported Slicer (5.8+) has slicer.i18n

    def _(text):
        return text

    def translate(context, text):
        return text


#: The user guide (shown as a link in the module's help).
DOCUMENTATION_URL = "https://github.com/LongitudinalDiffusion/SlicerLongitudinalDiffusion/blob/main/docs/slicer.md"


class LongitudinalDiffusion(ScriptedLoadableModule):
    """Module metadata: title, category, help and acknowledgements."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Longitudinal Diffusion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = [
            "The SlicerLongitudinalDiffusion contributors "
            "(https://github.com/LongitudinalDiffusion/SlicerLongitudinalDiffusion/graphs/contributors)"
        ]
        self.parent.helpText = _(
            "Fill the gaps in a subject's longitudinal MRI history with diffusion models: generate missing "
            "ages, a missing modality, or the frames between two scans. The same operations are available "
            "from the Python console (<code>import LongitudinalDiffusionLib</code>) and the "
            "<code>longdiff</code> command line."
        ) + _(
            ' See the <a href="{url}">user guide</a> for the workflow, the supported Slicer versions and scripting.'
        ).format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "The simulated demo cohort is built on the ICBM 2009a template tissue maps: Copyright (C) "
            "1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
            "McGill University. Demo data and demo models are simulated, not real patient data."
        )
        slicer.app.connect("startupCompleted()", self.registerSampleData)

    def registerSampleData(self):
        from LongitudinalDiffusionSlicer import sampledata

        icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "LongitudinalDiffusion.png")
        sampledata.registerSampleData(icon, self.loadSampleFromSampleData)

    def loadSampleFromSampleData(self, source=None):
        """The Sample Data button: open this module and simulate the subject in the background
        (progress in the panel) instead of blocking Slicer for ~20 s."""
        slicer.util.selectModule("LongitudinalDiffusion")
        widget = slicer.modules.longitudinaldiffusion.widgetRepresentation().self()
        widget.onLoadSample()
        return []


class LongitudinalDiffusionWidget(ScriptedLoadableModuleWidget):
    """The panel: Subject, Task, Backend, Run and Results sections (Resources/UI)."""

    def setup(self):
        """Build the panel. Installs nothing: the packages a local run needs are installed
        (after the user agrees) when the first local run starts."""
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = LongitudinalDiffusionLogic()
        self.panel = None
        try:
            from LongitudinalDiffusionSlicer import panel
        except ImportError as exc:  # the subject loaders' packages (e.g. nibabel) are missing
            self._setupInstallPrompt(exc)
            return
        self._setupPanel(panel)

    def _setupInstallPrompt(self, error):
        """Before the panel can even load: say what is missing, offer to install it (on click)."""
        self._promptWidgets = []
        label = qt.QLabel(
            _(
                "The module's panel needs Python packages that are not installed ({error}). Click the button to "
                "install them (you are asked first)."
            ).format(error=error)
        )
        label.wordWrap = True
        button = qt.QPushButton(_("Install packages"))
        button.connect("clicked()", self._installAndReload)
        for widget in (label, button):
            self.layout.addWidget(widget)
            self._promptWidgets.append(widget)

    def _installAndReload(self):
        if self.logic.ensureDependencies():
            for widget in self._promptWidgets:
                widget.setParent(None)
            from LongitudinalDiffusionSlicer import panel

            self._setupPanel(panel)
        else:
            report = self.logic.dependencyReport
            slicer.util.errorDisplay(report.message if report else _("The installation did not complete."))

    def _setupPanel(self, panel):
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LongitudinalDiffusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        panel.installTranslator(translate)
        self.panel = panel.Panel(
            self.ui,
            qt,
            subjectLoader=self.logic.loadSubject,
            runFactory=self.logic.startRun,
            resultPlacer=self.logic.placeRunSteps,
            uploadConsent=self.confirmUpload,
            connectionTester=self.testConnection,
            dependencyInstaller=self.installDependencies,
        )
        from LongitudinalDiffusionSlicer import state

        # The panel's choices live in the scene's parameter node (saved in .mrb); Close Scene
        # resets the panel, a scene read restores it.
        self.sceneBinding = state.SceneBinding(self.panel, slicer.mrmlScene)
        self.panel.sampleRequested.connect(self.onLoadSample)
        self.panel.addFromSceneRequested.connect(self.onAddFromScene)

    def enter(self):
        if getattr(self, "panel", None) is not None:
            self.panel.refreshBackendInfo()

    def cleanup(self):
        """Stop a run and a sample simulation, remove the scene observers, close the backends."""
        if getattr(self, "sampleSimulation", None) is not None:
            self.sampleSimulation.cancel()
        if getattr(self, "panel", None) is not None and self.panel.isRunning():
            self.panel.cancelRun()
        if getattr(self, "sceneBinding", None) is not None:
            self.sceneBinding.cleanup()
            self.sceneBinding = None
        self.logic.close()

    def installDependencies(self):
        """Before a local run: the missing packages, installed after the user agrees (a report).
        No wait cursor: the installers show questions (and pip's progress) themselves."""
        self.logic.ensureDependencies()
        return self.logic.dependencyReport

    def confirmUpload(self, request):
        """Tier-1 rule: nothing leaves the computer without the user's explicit consent."""
        message = _(
            "This run uploads the images of {subject} ({count} scans) to {url}.\n\n"
            "Continue only if you may share them with that server."
        ).format(subject=request.subject.subject_id, count=len(request.subject.timepoints), url=request.serverUrl)
        return slicer.util.confirmOkCancelDisplay(message, windowTitle=_("Upload images?"))

    def testConnection(self, url, token, modelName=None):
        """Health and description of the worker at ``url`` (nothing is uploaded)."""
        with slicer.util.WaitCursor():
            return self.logic.runLogic().testConnection(url, token, modelName)

    def onLoadSample(self):
        """Simulate the demo subject in a background process (progress in the panel), then load
        it; its few packages (numpy, scipy, nibabel; no torch) are installed first if missing,
        after the user agrees."""
        import tempfile

        from LongitudinalDiffusionSlicer import dependencies, sampledata

        if getattr(self, "sampleSimulation", None) is not None and self.sampleSimulation.isRunning():
            return
        missing = sampledata.missingPackages()
        if missing:
            requirements = os.path.join(tempfile.mkdtemp(prefix="longdiff-sample-"), "requirements.txt")
            with open(requirements, "w", encoding="utf-8") as handle:
                handle.write("\n".join(missing) + "\n")
            report = dependencies.ensureDependencies(requirements, slicer, torchRequirement=None)
            if not report.ok:
                self.panel.setStatus(_("The demo subject needs {packages}: {reason}").format(
                    packages=", ".join(missing), reason=report.message))  # fmt: skip
                return
        self.panel.ui.loadSampleButton.setEnabled(False)
        self.sampleSimulation = sampledata.SampleSimulation(
            slicer.app.cachePath, qt, self.onSampleProgress, self.onSampleFinished
        )
        self.sampleSimulation.start()

    def onSampleProgress(self, done, total, text):
        self.panel.setProgress(done, total)
        self.panel.ui.progressBar.setFormat(_("simulating the demo subject: %v of %m sessions"))
        self.panel.setStatus(_("Simulating the demo subject in the background ({text})...").format(text=text))

    def onSampleFinished(self, folder, error):
        self.panel.ui.loadSampleButton.setEnabled(True)
        self.panel.ui.progressBar.setFormat("")
        if error:
            message = _("The demo subject could not be simulated: {error}").format(error=error)
            self.panel.appendLog(message)
            self.panel.setStatus(message)
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the demo subject."), waitCursor=True):
            self.panel.setSubject(self.logic.loadSubject(folder))

    def onAddFromScene(self, node):
        """Ask the volume's age and modality (defaults from its DICOM tags), then add it."""
        from LongitudinalDiffusionSlicer import addvolume

        with slicer.util.tryWithErrorDisplay(_("Failed to add the volume."), waitCursor=False):
            addvolume.addSceneVolume(
                self.panel, node, qt, addvolume.dicomTagReader(slicer), parent=slicer.util.mainWindow()
            )


class LongitudinalDiffusionLogic(ScriptedLoadableModuleLogic):
    """Scene logic, usable from the Python console without the panel::

    logic = slicer.util.getModuleLogic("LongitudinalDiffusion")
    subject = logic.loadSubject("/data/cohort/sub-001")   # BIDS subject or manifest .tsv
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._runLogic = None
        self.dependencyReport = None

    def getParameterNode(self):
        """The panel's choices in the scene: the typed ``parameterNodeWrapper`` object where
        Slicer has it, else the ``vtkMRMLScriptedModuleNode`` (``LongitudinalDiffusionSlicer.state``)."""
        from LongitudinalDiffusionSlicer import state

        node = state.findOrCreateParameterNode(slicer.mrmlScene)
        wrapper = state.wrapperClass()
        return wrapper(node) if wrapper is not None else node

    def runLogic(self):
        """The run logic (``LongitudinalDiffusionSlicer.logic.RunLogic``), made on first use."""
        if self._runLogic is None:
            from LongitudinalDiffusionSlicer.logic import RunLogic

            self._runLogic = RunLogic()
        return self._runLogic

    def startRun(self, request):
        """Start a panel ``RunRequest`` on its backend; returns the run (the panel polls it)."""
        return self.runLogic().startRun(request)

    def placeRun(self, run):
        """Put a finished run's results under the subject; returns a ``SceneResults`` view."""
        return self.runLogic().placeRun(run)

    def placeRunSteps(self, run):
        """``placeRun`` in steps (a generator returning the view): the panel runs one step per
        turn of Qt's event loop, so Slicer stays responsive while the results are placed."""
        return self.runLogic().placeRunSteps(run)

    def run(self, request, timeout=None):
        """Blocking form for scripts: run ``request``, place and return its results."""
        return self.runLogic().run(request, timeout)

    def close(self):
        if self._runLogic is not None:
            self._runLogic.close()

    def requirementsPath(self):
        return os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")

    def ensureDependencies(self):
        """Install missing Python packages on the first local run, after the user agrees; True
        when all are there. Never called when the panel opens.

        ``LongitudinalDiffusionSlicer.dependencies.ensureDependencies`` decides: PyTorch only
        through the PyTorch extension (it asks), the rest with constraints that keep the
        installed torch, numpy and SimpleITK: ``slicer.packaging.pip_ensure`` on Slicer 5.12
        and newer (it asks), else ``confirmOkCancelDisplay`` then ``slicer.util.pip_install``.
        Declining installs nothing; ``self.dependencyReport`` says what is missing, whether
        the user declined, or why the installation failed (it never raises).
        """
        from LongitudinalDiffusionSlicer import dependencies

        self.dependencyReport = dependencies.ensureDependencies(self.requirementsPath(), slicer)
        if not self.dependencyReport.ok:
            logging.error("LongitudinalDiffusion: %s", self.dependencyReport.message)
        return self.dependencyReport.ok

    def loadSubject(self, path):
        """Read a subject (BIDS subject or dataset folder, manifest .tsv), show it in the
        scene under its own subject-hierarchy item, and return the library Subject."""
        subject = self.runLogic().loadSubject(path)
        firstVolume = slicer.mrmlScene.GetNodeByID(subject.meta["scene_nodes"][0])
        slicer.util.setSliceViewerLayers(background=firstVolume, fit=True)
        return subject

    def loadSampleSubject(self):
        """Simulate the demo subject (once, into Slicer's cache) and load it."""
        from LongitudinalDiffusionSlicer import sampledata

        return self.loadSubject(sampledata.sampleSubjectFolder(slicer.app.cachePath))


class LongitudinalDiffusionTest(ScriptedLoadableModuleTest):
    """Self-test for real Slicer: the sample subject into the scene, then a bundled demo model
    end to end through the module's logic (blocking mode, 2 sampler steps, on the CPU)."""

    #: The demo run: complete the 7.5-month visit with the Cas-DiffCom demo model.
    DEMO_MODEL = "cas-diffcom-demo"
    DEMO_AGE = 7.5

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleSubjectRoundTrip()
        self.setUp()
        self.test_DemoModelEndToEnd()

    def test_SampleSubjectRoundTrip(self):
        from LongitudinalDiffusionSlicer import mrml

        self.delayDisplay("Loading the simulated demo subject")
        logic = LongitudinalDiffusionLogic()
        subject = logic.loadSampleSubject()
        volumes = mrml.subjectVolumes()
        self.assertEqual(len(volumes), len(subject.timepoints))
        back = mrml.subjectFromVolumes(volumes, subject.subject_id)
        self.assertEqual(back.ages(), subject.ages())
        self.delayDisplay("Test passed")

    def test_DemoModelEndToEnd(self):
        import numpy
        from LongitudinalDiffusionSlicer import mrml, results
        from LongitudinalDiffusionSlicer.panel import RunRequest

        from LongitudinalDiffusionLib.catalog import find_model

        self.delayDisplay("Running the demo model on the sample subject")
        logic = LongitudinalDiffusionLogic()
        try:
            subject = logic.loadSampleSubject()
            scans = len(subject.timepoints)
            request = RunRequest(
                "complete-ages",
                subject,
                find_model(self.DEMO_MODEL),
                ages=(self.DEMO_AGE,),
                samples=2,
                steps=2,
                device="cpu",
            )
            view = logic.run(request, timeout=600)

            # the generated volume, under the subject, with the input's geometry and its age
            self.assertEqual(len(view.placed), 1)
            placed = view.placed[0]
            self.assertEqual(len(placed.volumeNodes), 1)
            generated = placed.volumeNodes[0]
            self.assertTrue(slicer.mrmlScene.IsNodePresent(generated))
            self.assertAlmostEqual(float(generated.GetAttribute(mrml.AGE_ATTRIBUTE)), self.DEMO_AGE)
            reference = mrml.subjectVolumes()[0]
            self.assertEqual(generated.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
            subjectVolumeIds = [node.GetID() for node in mrml.subjectVolumes()]
            self.assertIn(generated.GetID(), subjectVolumeIds)
            self.assertEqual(len(subjectVolumeIds), scans + 1 + len(placed.uncertaintyNodes))
            self.assertGreater(float(slicer.util.arrayFromVolume(generated).std()), 0.0)
            # its tissue segmentation, the uncertainty map (2 samples) and the tissue chart
            self.assertIn(generated.GetID(), placed.segmentationNodes)
            self.assertGreater(placed.segmentationNodes[generated.GetID()].GetSegmentation().GetNumberOfSegments(), 0)
            self.assertEqual(len(placed.uncertaintyNodes), 1)
            self.assertIsNotNone(placed.chartNode)
            # the completed timeline: a sequence whose browser moves the proxy volume
            self.assertTrue(placed.sequences)
            timeline = placed.sequences[0]
            frames = timeline.browser.GetNumberOfItems()
            self.assertGreater(frames, 2)
            index = timeline.generated.index(True)
            proxy = results.selectFrame(timeline.browser, index)
            self.assertEqual(timeline.browser.GetSelectedItemNumber(), index)
            self.assertTrue(
                numpy.allclose(slicer.util.arrayFromVolume(proxy), slicer.util.arrayFromVolume(generated)),
                "the proxy shows the generated frame",
            )
            self.assertIsNotNone(timeline.proxySegmentation())
            self.assertIn("generated volume", view.summary())
        finally:
            logic.close()
        self.delayDisplay("Test passed")
