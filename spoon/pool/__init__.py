"""The pre-fork pool: a supervisor that forks workers serving one shared socket.

- :mod:`spoon.pool.target`: the interfaces between the pool and what it serves;
- :mod:`spoon.pool.supervisor`: the master loop (signals, reap, respawn, heartbeat,
  resize, rolling restart, stop);
- :mod:`spoon.pool.worker`: a forked worker's life;
- :mod:`spoon.pool.reactor`: the workers' reactor, and whether this process may fork;
- :mod:`spoon.pool.factory`: any Twisted factory as a pool target;
- :mod:`spoon.pool.proctitle`: process titles;
- :mod:`spoon.pool.upgrade`: zero-downtime code upgrade (USR2), old and new generation;
- :mod:`spoon.pool.cli`: ``python -m spoon.pool`` (``python -m spoon.prefork``).

Nothing here imports :mod:`spoon.server`: the server classes implement the pool's target
interface and import the pool.
"""
