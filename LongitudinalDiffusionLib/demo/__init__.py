"""The simulated cohort: a longitudinal infant brain cohort and a beating-heart phantom.

Everything made here is simulated and says so in its metadata. The brain anatomy comes
from the ICBM 2009a template (see ``data/icbm2009a/NOTICE.txt``); ages, growth, myelination
and MR contrast are modelled (``development``, ``physics``), images are computed from tissue
relaxation times through the MR signal equations.
"""

#: Written into the header of every NIfTI file the simulator makes.
SIMULATED_NIFTI_DESCRIPTION = "SIMULATED data (LongitudinalDiffusion demo), not a patient"
