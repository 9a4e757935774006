"""Lifecycle hooks: methods of the server class the pool calls at fixed points, each in
the process named below, so that user code can act there (reconnect a database after
fork, flush a cache before a worker exits, alert when a worker crashes).

A target that does not provide :class:`IPoolHooks` (a plain Twisted factory) has none.
An exception raised by a hook is logged with the hook's name and otherwise ignored, except
in ``post_fork``: a worker that could not prepare itself must not serve, so its boot fails
(and counts towards the supervisor's crash-loop back-off).
"""

from zope.interface import Interface

__all__ = ["IPoolHooks", "call_hook", "HookFailed"]


class IPoolHooks(Interface):
    """The hooks of a pool target (spoon's server classes provide them as no-ops)."""

    def when_ready():
        """Supervisor: the pool serves (every wanted worker has reported ready), once per
        pool start."""

    def pre_fork(number):
        """Supervisor: worker ``number`` is about to be forked."""

    def post_fork(number):
        """Worker ``number``, just forked, before it serves.  Raising fails its boot."""

    def worker_exit(number):
        """Worker ``number``, on its way out (its reactor has stopped)."""

    def child_exit(pid, cause):
        """Supervisor: the worker ``pid`` has ended; ``cause`` is one of
        :data:`spoon.pool.stats.EXIT_CAUSES`."""

    def on_reload():
        """Supervisor: a reload (USR1) or replacement of the workers (HUP) begins."""


class HookFailed(Exception):
    """A hook whose failure must stop what called it (``post_fork``) raised."""


def call_hook(target, name, log, *args, fatal=False):
    """Call hook ``name`` of ``target`` (if it provides :class:`IPoolHooks`) with
    ``args``; log an exception with the hook's name, and with ``fatal`` raise
    :class:`HookFailed` after logging it."""
    hooks = IPoolHooks(target, None)
    if hooks is None:
        return
    try:
        getattr(hooks, name)(*args)
    except Exception as e:
        log.exception("Hook %s() failed", name)
        if fatal:
            raise HookFailed("hook %s() failed: %s" % (name, e)) from e
