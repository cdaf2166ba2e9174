"""``longdiff`` that also writes a 3D Slicer scene (``--scene out.mrb``).

The library (``LongitudinalDiffusionLib``) never imports the Slicer module, so its command line
cannot write scenes itself; this script, beside the module, runs the very same command with
the module's scene export plugged in::

    python LongitudinalDiffusion/longdiff_scene.py complete-ages SUBJECT --ages 24 --out OUT --scene out.mrb

Every option is ``longdiff``'s. It needs PyPI ``slicer-core`` (or Slicer's own Python). Run as
a script, Python puts this folder first on the import path, so ``LongitudinalDiffusionSlicer``
imports as it does inside Slicer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from LongitudinalDiffusionLib.cli import main as longdiff_main
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError


def write_scene(path: Path, results: list, subjects: Sequence = ()) -> Path:
    """The results (and their subjects) as an ``.mrb``, with tissue segmentations when the
    bundled tissue model is installed."""
    try:
        from LongitudinalDiffusionSlicer.results import TissueSegmenter, exportScene
    except ImportError as exc:
        raise LongitudinalDiffusionError(
            f"--scene needs 3D Slicer's Python or PyPI slicer-core ({exc}); install it with: pip install slicer-core"
        ) from exc
    from LongitudinalDiffusionLib.catalog import find_model

    try:
        find_model("tissue-seg-brain-demo")
        segmenter = TissueSegmenter("tissue-seg-brain-demo")
    except InputError:
        segmenter = None
    return exportScene(path, results, subjects=subjects, segmenter=segmenter)


def main(argv: Sequence[str] | None = None) -> int:
    return longdiff_main(argv, scene_exporter=write_scene)


if __name__ == "__main__":
    sys.exit(main())
