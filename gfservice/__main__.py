"""``python -m gfservice`` is the ``gfservice`` command."""

import sys

from gfservice.cli import main

sys.exit(main())
