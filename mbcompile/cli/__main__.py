"""``python -m mbcompile.cli``: the same as the ``mbcompile`` command."""

import sys

from mbcompile.cli import main

sys.exit(main())
