"""The module's Python dependencies: installed on the first run of a model, after the user agrees.

Never at import time, never when the panel opens: :func:`ensureDependencies` runs when a
local run is about to start (the panel's Apply; a script may call it too), and decides what
to install:

1. nothing, when every requirement of ``Resources/requirements.txt`` and PyTorch are there
   (the usual case after the first run: a metadata check, no subprocess);
2. PyTorch, when it is missing, only through the PyTorch extension (``PyTorchUtils``,
   declared in ``EXTENSION_DEPENDS``): it asks the user itself and picks the build that fits
   the GPU. Without that extension nothing is installed and the message says to install it;
3. the other packages, with a pip constraints file that pins the installed torch, numpy and
   SimpleITK (:func:`writeConstraints`), so that no dependency (``monai`` asks for a newer
   torch) replaces the PyTorch extension's torch or Slicer's own numpy and SimpleITK:
   ``slicer.packaging.pip_ensure`` where Slicer has it (5.12 and newer; it asks before
   installing and offers a restart), else one question (``confirmOkCancelDisplay``) and
   ``slicer.util.pip_install`` (Slicer 5.8 and 5.10).

A declined question installs nothing more; :attr:`DependencyReport.declined` lets the panel
offer a Retry. Any exception of an installation (pip failing, no network, a broken
PyTorch extension) becomes a report with the error's message, never a blank panel.
"""

from __future__ import annotations

import importlib
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

logger = logging.getLogger(__name__)

#: What the library needs of PyTorch (pyproject.toml); installed by the PyTorch extension.
TORCH_REQUIREMENT = "torch>=2.1"
REQUESTER = "LongitudinalDiffusion"


def readRequirements(path):
    """The requirement lines of a requirements file (comments, blank lines and pip options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def isSatisfied(line: str, where: Any = None) -> bool:
    try:
        requirement = Requirement(line)
    except InvalidRequirement as exc:
        raise ValueError(f"{where or 'requirement'}: {line!r} is not a valid requirement ({exc})") from None
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return False
    return not requirement.specifier or requirement.specifier.contains(installed, prereleases=True)


def missingRequirements(path):
    """The requirements of ``path`` that the running Python does not satisfy.

    A package that is not installed, or installed in a version outside the requirement's
    range, is missing. Returns the requirement strings, ready for ``pip install``.
    """
    importlib.invalidate_caches()
    return [line for line in readRequirements(path) if not isSatisfied(line, path)]


@dataclass
class DependencyReport:
    """What :func:`ensureDependencies` found and did.

    Attributes:
        ok: everything the module needs is installed now.
        installed: what was installed in this call (requirement strings; ``torch`` included).
        missing: what is still missing.
        message: for the user ("" when ok): what is missing and why it was not installed.
        declined: the user said no to a question (the panel then offers to ask again).
    """

    ok: bool
    installed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    message: str = ""
    declined: bool = False


#: Packages pip must never replace: the PyTorch extension's torch, Slicer's numpy and SimpleITK.
PROTECTED = ("torch", "numpy", "SimpleITK")


def writeConstraints(folder: str | Path, packages: tuple[str, ...] = PROTECTED) -> Path:
    """A pip constraints file pinning the installed versions of ``packages`` (those not
    installed are left free). Returns its path (``folder/constraints.txt``)."""
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    path = Path(folder) / "constraints.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# installed versions that this installation must keep\n" + "\n".join(lines) + "\n", "utf-8")
    return path


def _packagingModule(slicerModule: Any) -> Any:
    """Slicer's ``slicer.packaging`` when it has ``pip_ensure`` (Slicer 5.12 and newer), or None."""
    module = getattr(slicerModule, "packaging", None)
    if module is None and getattr(slicerModule, "__name__", None):
        try:
            module = importlib.import_module(f"{slicerModule.__name__}.packaging")
        except ImportError:
            module = None
    if module is not None and hasattr(module, "pip_ensure") and hasattr(module, "load_requirements"):
        return module
    return None


def _pyTorchUtils() -> Any:
    """The PyTorch extension's Python module, or None when that extension is not installed."""
    module = sys.modules.get("PyTorchUtils")
    if module is not None:
        return module
    try:
        return importlib.import_module("PyTorchUtils")
    except ImportError:
        return None


def neededRequirements(requirementsPath: str | Path, torchRequirement: str | None = TORCH_REQUIREMENT) -> list[str]:
    """What a local run still needs (torch first), without installing anything."""
    torch = [] if torchRequirement is None or isSatisfied(torchRequirement) else [torchRequirement]
    return torch + missingRequirements(requirementsPath)


def ensureDependencies(
    requirementsPath: str | Path,
    slicerModule: Any,
    *,
    requester: str = REQUESTER,
    torchRequirement: str | None = TORCH_REQUIREMENT,
    workDir: str | Path | None = None,
) -> DependencyReport:
    """Install what the module lacks, with the user's consent (see the module doc).

    Args:
        requirementsPath: the module's ``Resources/requirements.txt``.
        slicerModule: Slicer's ``slicer`` module (its ``util`` and, from 5.12, ``packaging``).
        requester: the name Slicer's install dialog shows.
        torchRequirement: the PyTorch version the library needs (None: no PyTorch, e.g. the
            demo subject's simulator).
        workDir: where the constraints file is written (default: a temporary folder).

    Returns:
        a :class:`DependencyReport`; it never raises, not even when pip or the PyTorch
        extension fails (the report's message says what happened).
    """
    try:
        return _ensure(requirementsPath, slicerModule, requester, torchRequirement, workDir)
    except Exception as exc:  # pip, the network, the PyTorch extension: say it in the panel
        logger.exception("installing the module's Python packages failed")
        try:
            still = neededRequirements(requirementsPath, torchRequirement)
        except Exception:  # the report must still be returned (this function never raises): logged
            logger.exception("listing the packages still missing failed")
            still = []
        return DependencyReport(
            False, [], still, f"The installation of the Python packages failed: {type(exc).__name__}: {exc}"
        )


def _ensure(requirementsPath, slicerModule, requester, torchRequirement, workDir) -> DependencyReport:
    missing = missingRequirements(requirementsPath)
    torchMissing = torchRequirement is not None and not isSatisfied(torchRequirement)
    if not missing and not torchMissing:
        return DependencyReport(True)
    wanted = ([torchRequirement] if torchMissing else []) + missing
    installed: list[str] = []

    def refused(reason: str, declined: bool = True) -> DependencyReport:
        message = f"{reason} Not installed: {', '.join(wanted)}. Local runs need them."
        logger.warning("%s", message)
        return DependencyReport(False, installed, wanted, message, declined)

    if torchMissing:
        utils = _pyTorchUtils()
        if utils is None:
            return refused(
                "PyTorch is missing and the PyTorch extension is not installed: install it from the "
                "Extensions Manager (it chooses the PyTorch build for your GPU), restart Slicer, and run again.",
                declined=False,
            )
        version = torchRequirement[len(Requirement(torchRequirement).name) :].strip()
        torch = utils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=version)
        if torch is None:
            return refused("You declined the PyTorch installation.")
        installed.append(torchRequirement)
        wanted.remove(torchRequirement)

    if missing:
        folder = Path(workDir) if workDir is not None else Path(tempfile.mkdtemp(prefix="longdiff-pip-"))
        constraints = writeConstraints(folder)
        packaging = _packagingModule(slicerModule)
        if packaging is not None:
            requirements = packaging.load_requirements(str(requirementsPath))
            try:
                packaging.pip_ensure(
                    requirements, constraints=str(constraints), skip_packages=list(PROTECTED), requester=requester
                )
            except TypeError:  # an earlier pip_ensure without skip_packages
                try:
                    packaging.pip_ensure(requirements, constraints=str(constraints), requester=requester)
                except RuntimeError as exc:
                    return refused(f"The installation was declined ({exc}).")
            except RuntimeError as exc:  # pip_ensure's way of saying the user declined
                return refused(f"The installation was declined ({exc}).")
        else:
            question = (
                f"{requester} needs these Python packages for local runs:\n\n{chr(10).join(missing)}\n\n"
                "Download and install them now (from the Python Package Index)? The installed PyTorch, numpy and "
                "SimpleITK are kept."
            )
            if not slicerModule.util.confirmOkCancelDisplay(question, windowTitle=f"{requester}: install packages"):
                return refused("You declined the installation.")
            slicerModule.util.pip_install(["-c", str(constraints), *missing])
        installed.extend(missing)

    still = neededRequirements(requirementsPath, torchRequirement)
    if still:
        message = (
            f"These packages are still missing after the installation: {', '.join(still)} "
            "(see the Python console for pip's output)."
        )
        logger.error("%s", message)
        return DependencyReport(False, installed, still, message)
    logger.info("installed %s", ", ".join(installed))
    return DependencyReport(True, installed)
