"""Slicer-side code of the LongitudinalDiffusion module: the glue between MRML and the library.

``LongitudinalDiffusionLib`` never imports ``slicer``, ``qt`` or ``vtk``; everything that
touches the MRML scene lives here. :mod:`.mrml` converts library images and subjects to and
from scene nodes (volumes, segmentations, subject hierarchy) and saves and reads scene
bundles (``.mrb``). It runs inside 3D Slicer and, for tests and batch use, on PyPI
``slicer-core`` without the application.
"""
