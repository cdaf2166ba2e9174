"""What a test needs that this environment may lack (slicer-core, PySide6, trame-slicer, ...).

Locally a missing tool skips the test, with the reason. Under ``LONGDIFF_REQUIRE_TOOLS=1``
(CI, after scripts/setup_tools.sh) it fails instead, so a broken install never turns tests
into silent skips. Works at module level (collection) and inside a test.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

#: the reason every MRML test gives for slicer-core
SLICER = "needs PyPI slicer-core (real MRML)"


def required() -> bool:
    """Whether missing tools are failures here (``LONGDIFF_REQUIRE_TOOLS=1``)."""
    return os.environ.get("LONGDIFF_REQUIRE_TOOLS") == "1"


def missing(reason: str) -> None:
    """Skip for ``reason``; fail instead under ``LONGDIFF_REQUIRE_TOOLS=1``."""
    if required():
        pytest.fail(f"{reason} (required: LONGDIFF_REQUIRE_TOOLS=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def module(name: str, reason: str = "") -> ModuleType:
    """Import ``name``, or skip (fail under ``LONGDIFF_REQUIRE_TOOLS=1``) when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{reason or f'needs {name}'} ({type(exc).__name__}: {exc})")
        raise  # not reached: missing() skips or fails


def slicer() -> ModuleType:
    """slicer-core's ``slicer`` package (real MRML)."""
    return module("slicer", SLICER)
