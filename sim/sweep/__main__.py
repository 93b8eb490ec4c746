"""`python -m sim.sweep` (see sim.sweep.cli)."""

import sys

from .cli import main

sys.exit(main())
