"""Compatibility names: a pool worker's life is :mod:`spoon.pool.worker`, the workers'
reactor checks are :mod:`spoon.pool.reactor`."""

from spoon.pool.reactor import CannotFork, check_forkable, check_reactor_choice
from spoon.pool.worker import DUMP_SIGNAL, PRELOAD, SUPERVISOR_SIGNALS, Heartbeat, preload

__all__ = [
    "CannotFork",
    "check_forkable",
    "check_reactor_choice",
    "DUMP_SIGNAL",
    "PRELOAD",
    "SUPERVISOR_SIGNALS",
    "Heartbeat",
    "preload",
]
