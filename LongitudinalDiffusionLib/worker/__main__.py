"""``python -m LongitudinalDiffusionLib.worker`` is ``longdiff-worker``."""

import sys

from .cli import main

sys.exit(main())
