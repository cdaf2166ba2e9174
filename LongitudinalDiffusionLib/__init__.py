"""LongitudinalDiffusionLib: the pure-Python core of the LongitudinalDiffusion extension.

It fills the gaps in a subject's longitudinal MRI history (missing ages, missing
modalities, frames between two scans) with diffusion models. It never imports
``slicer``, ``qt`` or ``vtk``: the Slicer module, the ``longdiff`` command line, the
remote worker and the training code all call into it.
"""

__version__ = "0.1.0"
