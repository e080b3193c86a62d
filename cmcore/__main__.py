"""``python -m cmcore``: the command line of cmcore.cli."""

import sys

from cmcore.cli import main

sys.exit(main())
