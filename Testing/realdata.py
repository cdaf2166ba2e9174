"""Real scans the project never trained on, for the tests (``shared/notes/data.md``).

They come from system packages that ``scripts/setup_tools.sh`` installs (Debian's
``mricron-data`` and ``insighttoolkit5-examples``) and from pydicom's own test files, so
nothing is copied into the repository and each keeps its package's licence:

* Colin27 (``ch2.nii.gz`` with skull, ``ch2bet.nii.gz`` brain only), 181x217x181 at 1 mm,
  BSD-3 (mricron-data);
* ITK's head T1 (``KmeansTest_T1UCharRaw.nii.gz``), a real acquisition 128x128x62 at
  2x2x3 mm, Apache-2.0 (ITK example data);
* a real echocardiography cine (``examples_ybr_color.dcm``), 30 frames 240x320, MIT (pydicom).

``real_scan(name)`` returns the path, or skips the test when the package is missing; with
``LONGDIFF_REQUIRE_TOOLS=1`` (CI) a missing scan is a failure instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_MRICRON = Path("/usr/share/mricron/templates")
_ITK = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")

REAL_SCANS = {
    "colin27": (_MRICRON / "ch2.nii.gz", "Debian package mricron-data"),
    "colin27-brain": (_MRICRON / "ch2bet.nii.gz", "Debian package mricron-data"),
    "itk-head-t1": (_ITK / "KmeansTest_T1UCharRaw.nii.gz", "Debian package insighttoolkit5-examples"),
    "itk-head-t1-brain": (_ITK / "KmeansTest_T1RawSkullStrip.nii.gz", "Debian package insighttoolkit5-examples"),
}


def _echo() -> Path | None:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return None
    found = get_testdata_file("examples_ybr_color.dcm")
    return Path(found) if found else None


def real_scan(name: str) -> Path:
    """The path of a real scan, or skip (fail under ``LONGDIFF_REQUIRE_TOOLS=1``)."""
    if name == "echo":
        path, origin = _echo(), "pydicom's test files"
    else:
        path, origin = REAL_SCANS[name]
    if path is not None and Path(path).is_file():
        return Path(path)
    reason = f"real scan '{name}' not installed ({origin}; scripts/setup_tools.sh installs it)"
    if os.environ.get("LONGDIFF_REQUIRE_TOOLS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
