"""``python -m spinedet.cli``: the same as the ``spinedet`` command."""

import sys

from . import main

sys.exit(main())
