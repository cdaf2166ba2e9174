"""The module file itself, headless: ``LongitudinalDiffusion.py`` imported with stand-ins for
the parts of the Slicer application that PyPI slicer-core lacks (``slicer.app``,
``slicer.i18n``, the ``ScriptedLoadableModule`` base classes, ``qt``; see
``mrml_harness.installSlicerApplicationStandIns``), on a real MRML scene.

* Its self-test (``LongitudinalDiffusionTest.runTest``) runs as Slicer would run it: the
  sample subject into the scene, then the bundled demo model end to end through the module's
  logic in blocking mode, asserting the outputs are in the scene.
* Dependencies on first use (``dependencies.ensureDependencies``, the real function): what
  gets installed and how, consent declined installs nothing, the messages. Only what needs the
  application is faked: ``slicer.util``'s dialog and pip, ``pip_ensure``, the PyTorch extension.
  A fake "installation" writes real package metadata, so the check after it is real.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import logging
import types
from pathlib import Path

import pytest
import requires

requires.slicer()

import mrml_harness
import slicer
import torch
from LongitudinalDiffusionSlicer import dependencies, mrml, results, sampledata

from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MODULE_REQUIREMENTS = ROOT / "LongitudinalDiffusion" / "Resources" / "requirements.txt"


# ------------------------------------------------------------------------------ self-test


def test_the_modules_self_test_runs_the_demo_model_end_to_end(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the bundled demo models only
    monkeypatch.delenv("LONGDIFF_MODELS", raising=False)
    mrml_harness.installSlicerApplicationStandIns(monkeypatch, tmp_path / "cache")
    # Speed: the sample subject, simulated into Slicer's cache on first use, is put there
    # beforehand at a coarse grid (8 mm instead of 2 mm); the self-test loads it from the cache
    # exactly as it loads the full-size one in Slicer.
    sample = tmp_path / "cache" / "LongitudinalDiffusion" / f"demo-cohort-seed{sampledata.SAMPLE_SEED}"
    write_cohort(sample, CohortSpec(n_subjects=1, seed=sampledata.SAMPLE_SEED, heart=False, shape=(20, 24, 20),
                                    spacing=(8, 8, 8)))  # fmt: skip
    assert sampledata.sampleSubjectFolder(tmp_path / "cache") == sample / "sub-001"
    headless = mrml_harness.bootstrapScene()
    try:
        module = mrml_harness.importModuleFile()
        test = module.LongitudinalDiffusionTest()
        with caplog.at_level(logging.INFO):
            test.runTest()  # unittest assertions inside; raises on the first failure
        assert caplog.text.count("Test passed") == 2
        # what the self-test left in the scene: the subject, the generated volume, the timeline
        scene = headless.scene
        assert len(mrml.subjectVolumes(scene)) == 28 + 2  # the scans, the generated volume, its uncertainty
        assert scene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode") is not None
        assert results.resultNodeIds(scene)
    finally:
        headless.close()


# ---------------------------------------------------------------------------- dependencies


def fakeInstall(site: Path, requirement: str) -> None:
    """What pip leaves behind: a package's metadata on sys.path (enough for importlib.metadata)."""
    name = requirement.split(">=")[0].split("==")[0].strip()
    version = requirement.split(">=")[1] if ">=" in requirement else "1.0"
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A requirements file with one package that is not installed, a folder on sys.path that
    the fake pip installs into, and a record of every dialog and installation."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# the module's needs\nnibabel>=5.0\nlongdiff-test-missing-pkg>=2.0\n")
    calls: list[tuple] = []
    answers = {"confirm": True, "pip_ensure": True, "torch": True}

    def confirmOkCancelDisplay(text, windowTitle=None, **kwargs):
        calls.append(("confirm", text))
        return answers["confirm"]

    def pip_install(requirements):
        calls.append(("pip_install", list(requirements)))
        args = list(requirements)
        while args[:1] == ["-c"]:  # pip's constraints option and its file
            calls.append(("constraints", Path(args[1]).read_text()))
            args = args[2:]
        for requirement in args:
            fakeInstall(site, requirement)

    util = types.SimpleNamespace(confirmOkCancelDisplay=confirmOkCancelDisplay, pip_install=pip_install)
    oldSlicer = types.SimpleNamespace(util=util)  # Slicer 5.10: no pip_ensure

    def pip_ensure(requirements, constraints=None, skip_packages=None, requester=None, **kwargs):
        calls.append(("pip_ensure", [str(r) for r in requirements], requester))
        answers["constraints"], answers["skip"] = Path(constraints).read_text(), skip_packages
        if not answers["pip_ensure"]:
            raise RuntimeError("the user declined the installation")
        for requirement in requirements:
            if not dependencies.isSatisfied(str(requirement)):
                fakeInstall(site, str(requirement))

    def load_requirements(path):
        from packaging.requirements import Requirement

        return [Requirement(line) for line in dependencies.readRequirements(path)]

    packaging = types.SimpleNamespace(pip_ensure=pip_ensure, load_requirements=load_requirements)
    newSlicer = types.SimpleNamespace(util=util, packaging=packaging)  # Slicer 5.12 and newer

    class FakePyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            calls.append(("installTorch", askConfirmation, torchVersionRequirement))
            if not answers["torch"]:
                return None
            fakeInstall(site, "longdiff-test-torch" + (torchVersionRequirement or ""))
            return object()

    pyTorchUtils = types.SimpleNamespace(PyTorchUtilsLogic=FakePyTorchUtilsLogic)
    return types.SimpleNamespace(
        requirements=requirements, calls=calls, answers=answers, old=oldSlicer, new=newSlicer,
        pyTorchUtils=pyTorchUtils, monkeypatch=monkeypatch,
    )  # fmt: skip


def test_the_module_requirements_cover_what_the_library_needs_at_run_time():
    import tomllib
    from packaging.requirements import Requirement

    wanted = {
        Requirement(r).name.lower()
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    listed = {Requirement(r).name.lower() for r in dependencies.readRequirements(MODULE_REQUIREMENTS)}
    # numpy and SimpleITK are Slicer's own, torch comes from the PyTorch extension; tqdm,
    # matplotlib and statsmodels only the command line uses
    assert wanted - listed <= {"numpy", "simpleitk", "torch", "tqdm", "matplotlib", "statsmodels"}
    assert not listed & {"numpy", "simpleitk", "torch", "tqdm", "matplotlib", "statsmodels", "pydeps"}
    assert "httpx" in listed  # the remote worker's client
    assert dependencies.ensureDependencies(MODULE_REQUIREMENTS, types.SimpleNamespace()).ok  # all here: nothing asked


def test_nothing_missing_asks_nothing(env):
    env.requirements.write_text("nibabel>=5.0\n")
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="torch>=2.1")
    assert report.ok and report.installed == [] and env.calls == []


def test_slicer_5_12_installs_through_pip_ensure_keeping_torch_numpy_and_simpleitk(env):
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="torch>=2.1")
    assert env.calls == [("pip_ensure", ["nibabel>=5.0", "longdiff-test-missing-pkg>=2.0"], "LongitudinalDiffusion")]
    assert report.ok and report.installed == ["longdiff-test-missing-pkg>=2.0"] and report.message == ""
    # the installed versions are constraints pip must keep, and pip_ensure skips them
    assert f"torch=={torch.__version__.split('+')[0]}" in env.answers["constraints"].replace("+cpu", "")
    assert f"numpy=={__import__('numpy').__version__}" in env.answers["constraints"]
    assert set(env.answers["skip"]) == {"torch", "numpy", "SimpleITK"}


def test_slicer_never_had_pydeps_in_a_release():
    source = (ROOT / "LongitudinalDiffusion" / "LongitudinalDiffusionSlicer" / "dependencies.py").read_text()
    assert "pydeps" not in source


def test_slicer_5_12_declined_installs_nothing(env):
    env.answers["pip_ensure"] = False
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="torch>=2.1")
    assert not report.ok and report.installed == [] and report.missing == ["longdiff-test-missing-pkg>=2.0"]
    assert "declined" in report.message and "longdiff-test-missing-pkg>=2.0" in report.message and report.declined
    assert dependencies.missingRequirements(env.requirements) == ["longdiff-test-missing-pkg>=2.0"]


def test_slicer_5_8_and_5_10_ask_then_use_pip_install_with_constraints(env):
    report = dependencies.ensureDependencies(env.requirements, env.old, torchRequirement="torch>=2.1")
    assert [c[0] for c in env.calls] == ["confirm", "pip_install", "constraints"]
    assert "longdiff-test-missing-pkg>=2.0" in env.calls[0][1] and "nibabel" not in env.calls[0][1]
    assert env.calls[1][1][0] == "-c" and env.calls[1][1][2:] == ["longdiff-test-missing-pkg>=2.0"]
    assert "torch==" in env.calls[2][1] and "numpy==" in env.calls[2][1]
    assert report.ok and report.installed == ["longdiff-test-missing-pkg>=2.0"]


def test_slicer_5_10_declined_installs_nothing(env):
    env.answers["confirm"] = False
    report = dependencies.ensureDependencies(env.requirements, env.old, torchRequirement="torch>=2.1")
    assert [c[0] for c in env.calls] == ["confirm"]  # no pip_install
    assert not report.ok and "declined" in report.message and report.installed == []


def test_torch_comes_from_the_pytorch_extension_first(env):
    env.monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils", env.pyTorchUtils)
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="longdiff-test-torch>=2.1")
    assert [c[0] for c in env.calls] == ["installTorch", "pip_ensure"]
    assert env.calls[0] == ("installTorch", True, ">=2.1")  # the extension asks the user
    assert report.ok and report.installed == ["longdiff-test-torch>=2.1", "longdiff-test-missing-pkg>=2.0"]


def test_torch_declined_installs_nothing_else(env):
    env.monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils", env.pyTorchUtils)
    env.answers["torch"] = False
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="longdiff-test-torch>=2.1")
    assert [c[0] for c in env.calls] == ["installTorch"]
    assert not report.ok and "declined the PyTorch installation" in report.message
    assert report.missing == ["longdiff-test-torch>=2.1", "longdiff-test-missing-pkg>=2.0"]


def test_torch_without_the_pytorch_extension_says_what_to_do(env):
    env.monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils", None)  # import fails
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="longdiff-test-torch>=2.1")
    assert env.calls == [] and not report.ok
    assert "PyTorch extension is not installed" in report.message and "Extensions Manager" in report.message


def test_a_failed_installation_is_reported(env):
    env.new.packaging.pip_ensure = lambda requirements, **kwargs: env.calls.append(("pip_ensure",))  # installs nothing
    report = dependencies.ensureDependencies(env.requirements, env.new, torchRequirement="torch>=2.1")
    assert not report.ok and "still missing" in report.message and report.missing == ["longdiff-test-missing-pkg>=2.0"]


def test_an_installation_that_raises_is_a_report_with_its_message(env):
    def broken(requirements):
        raise OSError("pip: No matching distribution found for longdiff-test-missing-pkg>=2.0 (offline)")

    env.old.util.pip_install = broken
    report = dependencies.ensureDependencies(env.requirements, env.old, torchRequirement="torch>=2.1")
    assert not report.ok and not report.declined
    assert "failed" in report.message and "No matching distribution" in report.message
    assert report.missing == ["longdiff-test-missing-pkg>=2.0"]


def test_the_module_logic_reports_what_is_missing(monkeypatch, tmp_path, env):
    mrml_harness.installSlicerApplicationStandIns(monkeypatch, tmp_path / "cache")
    module = mrml_harness.importModuleFile()
    monkeypatch.setattr(slicer, "util", types.SimpleNamespace(**{**vars(slicer.util), **vars(env.old.util)}))
    logic = module.LongitudinalDiffusionLogic()
    monkeypatch.setattr(logic, "requirementsPath", lambda: str(env.requirements))
    env.answers["confirm"] = False
    assert logic.ensureDependencies() is False
    assert "longdiff-test-missing-pkg>=2.0" in logic.dependencyReport.message
    env.answers["confirm"] = True
    assert logic.ensureDependencies() is True


def test_the_module_runs_without_the_command_line_only_packages():
    """tqdm, matplotlib and statsmodels are not in the module's requirements: nothing the module
    imports for a run may need them (they stay lazy in the library's command-line code)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('tqdm', 'matplotlib', 'statsmodels'):\n"
        "    sys.modules[name] = None\n"
        "import LongitudinalDiffusionLib.tasks, LongitudinalDiffusionLib.jobs, LongitudinalDiffusionLib.backends\n"
        "import LongitudinalDiffusionLib.segmentation, LongitudinalDiffusionLib.catalog\n"
        "import LongitudinalDiffusionLib.weights\n"
        "from LongitudinalDiffusionSlicer import panel, run, logic, results, mrml, dependencies, sampledata\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'LongitudinalDiffusion'}"},
        timeout=300,
    )
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
