"""The module's Python dependencies: installed on first use, after the user agrees.

Never at import time. Slicer 5.11 and newer do it with ``slicer.packaging.pip_ensure``
(one confirmation dialog, restart offered when needed); on Slicer 5.10 the module asks
with a dialog and calls ``slicer.util.pip_install`` for what :func:`missingRequirements`
reports. torch is not listed: the PyTorch extension installs the build that fits the GPU.
"""

from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement


def readRequirements(path):
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def missingRequirements(path):
    """The requirements of ``path`` that the running Python does not satisfy.

    A package that is not installed, or installed in a version outside the requirement's
    range, is missing. Returns the requirement strings, ready for ``pip install``.
    """
    missing = []
    for line in readRequirements(path):
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise ValueError(f"{path}: {line!r} is not a valid requirement ({exc})") from None
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing
