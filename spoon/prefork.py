"""``python -m spoon.prefork``: the pool's command line (:mod:`spoon.pool.cli`), under the
name the README, twistd's service and existing deployments use."""

import sys

from spoon.pool.cli import main

if __name__ == "__main__":
    sys.exit(main())
