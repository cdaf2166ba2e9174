"""What a user asks for, on real volumes: complete missing ages, synthesise a missing
modality, interpolate the frames between two scans.

Each task takes images on their own geometry, puts them on the model's grid (the card's
:class:`~..grid.ModelGrid`), runs the method, and brings every output back onto the input's
exact geometry and intensity units. It returns a :class:`~..result.Result` (its own module,
:mod:`..result`, also importable from here) and never touches a GUI or the disk;
:meth:`Result.save` writes it (atomically: a finished folder or nothing).

``n_samples=K`` draws K samples (seeds ``seed`` .. ``seed+K-1``) and returns their mean as
the result plus a voxel-wise standard-deviation map, so a user sees where a generated
image is uncertain.

One module per task - :mod:`.missing_ages`, :mod:`.missing_modality`, :mod:`.frames` - and
what they share in :mod:`.common`; the public names are imported here.
"""

from __future__ import annotations

from ..result import SAME_AGE, FrameSeries, Result, ResultImage
from .common import RunOptions
from .frames import interpolate_frames
from .missing_ages import complete_ages
from .missing_modality import synthesize_modality

__all__ = [  # Result and its parts live in ..result; imported from here too
    "SAME_AGE",
    "TASKS",
    "FrameSeries",
    "Result",
    "ResultImage",
    "RunOptions",
    "complete_ages",
    "interpolate_frames",
    "synthesize_modality",
]

TASKS = ("complete-ages", "synthesize-modality", "interpolate")
