"""Compatibility entry: ``python -m spoon.prefork`` and ``spoon.prefork.Supervisor`` live in
:mod:`spoon.pool` now (:mod:`spoon.pool.cli`, :mod:`spoon.pool.supervisor`)."""

import sys

from spoon.pool.cli import main
from spoon.pool.supervisor import Supervisor

__all__ = ["Supervisor", "main"]

if __name__ == "__main__":
    sys.exit(main())
