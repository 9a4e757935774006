"""Compatibility entry: ``python -m spoon.prefork`` and the names other modules imported
from here live in :mod:`spoon.pool` now (:mod:`spoon.pool.cli`,
:mod:`spoon.pool.supervisor`)."""

import sys

from spoon.pool.cli import PRELOAD_BEFORE_SWITCH, main, switch_user, user_ids
from spoon.pool.supervisor import Supervisor

__all__ = ["Supervisor", "main", "switch_user", "user_ids", "PRELOAD_BEFORE_SWITCH"]

#: The former name of :func:`spoon.pool.cli.user_ids`.
_user_ids = user_ids

if __name__ == "__main__":
    sys.exit(main())
