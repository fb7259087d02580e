"""``python -m kdcore``: the same as the ``kdcore`` command."""

import sys

from kdcore.cli import main

sys.exit(main())
