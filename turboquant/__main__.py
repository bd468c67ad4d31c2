"""``python -m turboquant {demo,quality,codebooks}``."""

import sys

from .cli import main

sys.exit(main())
