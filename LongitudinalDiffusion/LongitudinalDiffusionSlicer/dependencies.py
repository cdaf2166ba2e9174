"""The module's Python dependencies: installed on first use, after the user agrees.

Never at import time: :func:`ensureDependencies` runs when the panel is first opened (or a
script asks for it), and decides what to install:

1. nothing, when every requirement of ``Resources/requirements.txt`` and PyTorch are there;
2. PyTorch, when it is missing, through the PyTorch extension (``PyTorchUtils``, declared in
   ``EXTENSION_DEPENDS``): it asks the user itself and picks the build that fits the GPU.
   Without that extension nothing is installed and the message says to install it. torch
   comes first, so pip later sees it satisfied and leaves it alone;
3. the other packages: on Slicer 5.11 and newer with ``pip_ensure`` (``slicer.pydeps``, or
   ``slicer.packaging`` where that is its name), which asks before installing and offers a
   restart when needed; before 5.11 the module asks (``confirmOkCancelDisplay``) and calls
   ``slicer.util.pip_install`` with the missing requirements.

A declined question installs nothing more and is reported with what is missing; the caller
shows :attr:`DependencyReport.message`.
"""

from __future__ import annotations

import importlib
import logging
import sys
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
    """

    ok: bool
    installed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    message: str = ""


def _pipEnsureModule(slicerModule: Any) -> Any:
    """Slicer's module with ``pip_ensure`` and ``load_requirements`` (5.11 and newer), or None."""
    for name in ("pydeps", "packaging"):
        module = getattr(slicerModule, name, None)
        if module is None and getattr(slicerModule, "__name__", None):
            try:
                module = importlib.import_module(f"{slicerModule.__name__}.{name}")
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


def ensureDependencies(
    requirementsPath: str | Path,
    slicerModule: Any,
    *,
    requester: str = REQUESTER,
    torchRequirement: str = TORCH_REQUIREMENT,
) -> DependencyReport:
    """Install what the module lacks, with the user's consent (see the module doc).

    Args:
        requirementsPath: the module's ``Resources/requirements.txt``.
        slicerModule: Slicer's ``slicer`` module (its ``util`` and, from 5.11, ``pip_ensure``).
        requester: the name Slicer's install dialog shows.
        torchRequirement: the PyTorch version the library needs.

    Returns:
        a :class:`DependencyReport`; it never raises for a declined installation.
    """
    missing = missingRequirements(requirementsPath)
    torchMissing = not isSatisfied(torchRequirement)
    if not missing and not torchMissing:
        return DependencyReport(True)
    wanted = ([torchRequirement] if torchMissing else []) + missing
    installed: list[str] = []

    def refused(reason: str) -> DependencyReport:
        message = f"{reason} Not installed: {', '.join(wanted)}. The module cannot run without them."
        logger.warning("%s", message)
        return DependencyReport(False, installed, wanted, message)

    if torchMissing:
        utils = _pyTorchUtils()
        if utils is None:
            return refused(
                "PyTorch is missing and the PyTorch extension is not installed: install it from the "
                "Extensions Manager (it chooses the PyTorch build for your GPU), restart Slicer, and open this "
                "module again."
            )
        version = torchRequirement[len(Requirement(torchRequirement).name) :].strip()
        torch = utils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=version)
        if torch is None:
            return refused("You declined the PyTorch installation.")
        installed.append(torchRequirement)
        wanted.remove(torchRequirement)

    if missing:
        pydeps = _pipEnsureModule(slicerModule)
        if pydeps is not None:
            try:
                pydeps.pip_ensure(pydeps.load_requirements(str(requirementsPath)), requester=requester)
            except RuntimeError as exc:  # pip_ensure's way of saying the user declined
                return refused(f"The installation was declined ({exc}).")
        else:
            question = (
                f"{requester} needs these Python packages:\n\n{chr(10).join(missing)}\n\n"
                "Download and install them now (from the Python Package Index)?"
            )
            if not slicerModule.util.confirmOkCancelDisplay(question, windowTitle=f"{requester}: install packages"):
                return refused("You declined the installation.")
            slicerModule.util.pip_install(missing)
        installed.extend(missing)

    still = missingRequirements(requirementsPath) + ([] if isSatisfied(torchRequirement) else [torchRequirement])
    if still:
        message = (
            f"These packages are still missing after the installation: {', '.join(still)} "
            "(see the Python console for pip's output)."
        )
        logger.error("%s", message)
        return DependencyReport(False, installed, still, message)
    logger.info("installed %s", ", ".join(installed))
    return DependencyReport(True, installed)
