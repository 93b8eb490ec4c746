"""`python -m proto.bundle`: see proto.bundle.cli."""

import sys

from .cli import main

sys.exit(main())
