"""``python -m spoon.pool``: see :mod:`spoon.pool.cli`."""

import sys

from spoon.pool.cli import main

if __name__ == "__main__":
    sys.exit(main())
