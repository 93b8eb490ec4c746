"""Entry point of `python -m sim.plan` (see :mod:`sim.plan.cli`)."""

import sys

from .cli import main

sys.exit(main())
