"""Training and evaluation of the LongitudinalDiffusion models, outside Slicer.

``python -m training.train --method M --config C`` trains any of the library's methods (one
GPU, several with ``torchrun``, or the CPU) and exports the result in the catalog format, so
the weights load in the Slicer module, the ``longdiff`` command and the worker unchanged.
:mod:`training.data` turns a dataset folder into the methods' training items.
"""
