"""Entry point of `python -m sim.bench` (see :mod:`sim.bench.runner`)."""

import sys

from .runner import main

sys.exit(main())
