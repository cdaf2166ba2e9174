"""``python -m LongitudinalDiffusionLib`` runs the ``longdiff`` command line."""

import sys

from .cli import main

sys.exit(main())
