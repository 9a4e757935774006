"""Which reactor a worker runs, and whether this process may fork workers at all.

A worker must own its reactor: the supervisor never runs one, and normally never imports
one either, so each worker installs a fresh reactor after the fork.  One path still needs
more: a user's module that imports ``twisted.internet.reactor`` at import time (to call
``reactor.callLater`` from handlers, say) installs the global reactor in the supervisor, and
every worker inherits its epoll descriptor and waker.  Refusing would break such code, which
the original spoon ran; so :func:`renew_inherited_reactor` gives the child new kernel objects
for the same reactor object.  It is the only code of spoon that touches Twisted's private
reactor state, it does so only for the reactor kinds listed in :data:`RENEWABLE_REACTORS`
(others are refused by :func:`check_forkable`, with the reason), and
``tests/test_pool_reactor.py`` fails if a Twisted release changes what it relies on.
"""

import importlib
import sys

__all__ = [
    "CannotFork",
    "DEFAULT_REACTOR_MODULE",
    "RENEWABLE_REACTORS",
    "check_forkable",
    "check_reactor_choice",
    "install_reactor_module",
    "renew_inherited_reactor",
]

#: Reactor classes whose kernel state is only a poller and a waker, renewable in a child.
RENEWABLE_REACTORS = {
    "twisted.internet.epollreactor.EPollReactor",
    "twisted.internet.pollreactor.PollReactor",
    "twisted.internet.selectreactor.SelectReactor",
}


#: What workers install when no reactor is chosen: the module whose ``install()`` picks the
#: platform's default (what importing ``twisted.internet.reactor`` would do, without reading
#: that file after a user switch).
DEFAULT_REACTOR_MODULE = "twisted.internet.default"

#: Reactor entries already looked up, by short name: after a user switch the plugin files
#: behind the lookup may be unreadable, so a name resolved before it stays resolved.
_known_types = {}


class CannotFork(RuntimeError):
    """This process's state does not allow forking workers that serve on their own."""


def _installed_reactor():
    return sys.modules.get("twisted.internet.reactor")


def _qualified_name(reactor):
    return "%s.%s" % (type(reactor).__module__, type(reactor).__qualname__)


def check_forkable():
    """Raise :class:`CannotFork` when a worker forked from this process could not get its
    own reactor: the global reactor is running here, or is of a kind we cannot renew."""
    reactor = _installed_reactor()
    if reactor is None:
        return
    if getattr(reactor, "running", False):
        raise CannotFork(
            "a Spork cannot pre-fork from a process whose Twisted reactor is running: "
            "the workers would share its epoll set and waker.  Run the pool through "
            "spoon.service (it starts the supervisor with fork and exec) or call "
            "serve_forever() before starting any reactor"
        )
    qual = _qualified_name(reactor)
    if qual not in RENEWABLE_REACTORS:
        raise CannotFork(
            "twisted.internet.reactor (%s) was installed before serve_forever() forked "
            "its workers, and its state cannot be renewed in a child.  Do not import "
            "twisted.internet.reactor at module level in the server's process (import it "
            "inside handlers), or install the default reactor" % qual
        )


def reactor_type(name):
    """The ``twisted.application.reactors`` entry of short name ``name`` (what ``twistd
    --reactor`` takes); ValueError naming the known ones otherwise."""
    if name in _known_types:
        return _known_types[name]
    from twisted.application.reactors import getReactorTypes

    types = list(getReactorTypes())
    for entry in types:
        _known_types.setdefault(entry.shortName, entry)
    if name in _known_types:
        return _known_types[name]
    raise ValueError("no reactor named %r (known: %s)" % (name, ", ".join(t.shortName for t in types)))


def check_reactor_choice(name):
    """The reactor entry of ``name``; ValueError when it cannot be what the workers run:
    unknown, or another kind was already installed here (and every worker would inherit
    that one)."""
    entry = reactor_type(name)
    reactor = _installed_reactor()
    installed = type(reactor).__module__ if reactor is not None else None
    if installed is not None and installed != entry.moduleName and entry.shortName != "default":
        raise ValueError(
            "--reactor %s: a %s reactor was already installed in the supervisor (something "
            "imported twisted.internet.reactor at import time); import it inside functions "
            "so that each worker can install %s" % (name, installed, entry.moduleName)
        )
    return entry


def install_reactor_module(module_name):
    """Install the reactor of ``module_name`` (imported by the supervisor) as this worker's
    global reactor unless one is installed already.  By module rather than by name: the
    name lookup scans Twisted's plugins, which a worker that dropped privileges may no
    longer be allowed to read."""
    if _installed_reactor() is not None:
        return False
    importlib.import_module(module_name).install()
    return True


def renew_inherited_reactor():
    """In a forked child, give the inherited global reactor (if any) kernel objects of its
    own: close the poller and waker shared with the parent and run the constructor again on
    the same object, so that modules holding ``twisted.internet.reactor`` use the new
    state.  Returns False when no reactor was inherited (the normal case)."""
    reactor = _installed_reactor()
    if reactor is None:
        return False
    # Private state, named only here (see the module docstring): the waker's pipe, the
    # epoll object (PollReactor and SelectReactor keep no descriptor there), the thread
    # pool whose threads do not exist in a child.
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        try:
            waker.connectionLost(None)
        except Exception:
            pass
    close = getattr(getattr(reactor, "_poller", None), "close", None)
    if close is not None:
        try:
            close()
        except OSError:
            pass
    if getattr(reactor, "threadpool", None) is not None:
        reactor.threadpool = None
    reactor.__init__()
    return True
