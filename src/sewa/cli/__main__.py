"""``python -m sewa.cli``."""

import sys

from . import main

sys.exit(main())
