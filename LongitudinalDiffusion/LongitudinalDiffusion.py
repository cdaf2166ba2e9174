"""LongitudinalDiffusion: the 3D Slicer module.

This file stays thin: module metadata here; the work is done by the pure-Python library
``LongitudinalDiffusionLib``, which the module, the ``longdiff`` command line and the
training code share.
"""

from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class LongitudinalDiffusion(ScriptedLoadableModule):
    """Module metadata: title, category, help and acknowledgements."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Longitudinal Diffusion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["LongitudinalDiffusion developers"]
        self.parent.helpText = _(
            "Fill the gaps in a subject's longitudinal MRI history with diffusion models: generate missing "
            "ages, a missing modality, or the frames between two scans. The same operations are available "
            "from the Python console (<code>import LongitudinalDiffusionLib</code>) and the "
            "<code>longdiff</code> command line."
        )
        self.parent.acknowledgementText = _(
            "The simulated demo cohort is built on the ICBM 2009a template tissue maps: Copyright (C) "
            "1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
            "McGill University. Demo data and demo models are simulated, not real patient data."
        )
