"""``python -m blip2``: the same as the ``blip2`` command."""

import sys

from .cli import main

sys.exit(main())
