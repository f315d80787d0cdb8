"""``python -m mapjax.cli``: the ``mapjax`` command without the console script."""

import sys

from mapjax.cli import main

sys.exit(main())
