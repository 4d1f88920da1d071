"""``python -m bitwidth`` is the ``bitwidth`` command."""

import sys

from .cli import main

sys.exit(main())
