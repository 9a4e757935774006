"""Choosing the reactor a blocking-style ``serve_forever()`` runs.

Twisted reactors cannot be restarted, but socketserver lets ``serve_forever()`` be called
again after ``shutdown()``.  So the first run uses the installed global reactor (installing
the default one if none is), which is what handler code importing
``twisted.internet.reactor`` expects; a later run gets a fresh instance of the same class.
"""

_ran = set()


def reactor_for_serving():
    """Return a reactor that has never run, preferring the installed global one."""
    from twisted.internet import reactor

    if id(reactor) not in _ran and not getattr(reactor, "running", False):
        return reactor
    if getattr(reactor, "running", False):
        raise RuntimeError(
            "serve_forever() cannot run inside a running reactor: listen with "
            "server.protocol_factory() on an endpoint instead"
        )
    return type(reactor)()


def mark_ran(reactor):
    """Remember that ``reactor`` has been run (and so cannot run again)."""
    _ran.add(id(reactor))
