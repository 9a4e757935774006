"""The worker side of the pre-fork layer: what a freshly forked child does before it serves.

A worker is a single-process Spoon serving the socket it inherited from the supervisor, in a
reactor of its own, plus two duties towards the supervisor: a heartbeat written from the
reactor (so a worker stuck in a handler is noticed) and dying with its supervisor (so no
orphan keeps serving after the master is gone).
"""

import faulthandler
import logging
import os
import signal
import sys

from spoon import linux

log = logging.getLogger("spoon.worker")

#: Signals the supervisor handles itself; a worker must not run the supervisor's handlers.
SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)

#: Sent by the supervisor to a worker whose heartbeat is late, just after logging which
#: worker it is: the worker's faulthandler writes every thread's traceback to stderr, from
#: the C signal handler (so even a worker stuck in a CPU loop or a blocking call answers).
#: A real-time signal, which no server class uses for reload or shutdown.
DUMP_SIGNAL = signal.SIGRTMIN + 1

#: Reactor classes whose state can be rebuilt in a forked child (their only kernel objects
#: are the poller and the waker).  Others (asyncio, ...) keep state we cannot renew.
_RENEWABLE_REACTORS = {
    "twisted.internet.epollreactor.EPollReactor",
    "twisted.internet.pollreactor.PollReactor",
    "twisted.internet.selectreactor.SelectReactor",
}


#: Modules every worker needs; imported once in the supervisor so that the workers share
#: them copy-on-write instead of each importing (and owning) a copy.  None of them installs
#: a reactor.
PRELOAD = (
    "twisted.internet.default",
    "twisted.internet.epollreactor",
    "twisted.internet.posixbase",
    "twisted.internet.tcp",
    "twisted.internet.udp",
    "twisted.internet.task",
    "twisted.internet.defer",
    "twisted.logger",
    "spoon.balance",
    "spoon.reactors",
    "spoon.logs",
)


def preload(extra=()):
    """Import :data:`PRELOAD` and ``extra`` (those that exist) in the supervisor, before
    forking."""
    import importlib

    for name in PRELOAD + tuple(extra):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def reactor_type(name):
    """The ``twisted.application.reactors`` entry of reactor short name ``name`` (what
    ``twistd --reactor`` takes: ``epoll``, ``poll``, ``select``, ``asyncio``...); ValueError
    naming the known ones otherwise."""
    from twisted.application.reactors import getReactorTypes

    types = list(getReactorTypes())
    for entry in types:
        if entry.shortName == name:
            return entry
    raise ValueError(
        "no reactor named %r (known: %s)" % (name, ", ".join(t.shortName for t in types))
    )


def installed_reactor_module():
    """Module of the class of the installed global reactor, or None when none is."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return None
    return type(reactor).__module__


def check_reactor_choice(name):
    """Raise ValueError when reactor ``name`` cannot be what the workers run: unknown, or
    another kind of reactor was already installed in this process (by the import of the
    server's module) and would be the one inherited by every worker."""
    entry = reactor_type(name)
    installed = installed_reactor_module()
    if installed is not None and installed != entry.moduleName and entry.shortName != "default":
        raise ValueError(
            "--reactor %s: a %s reactor was already installed in the supervisor (something "
            "imported twisted.internet.reactor at import time); import it inside functions "
            "so that each worker can install %s" % (name, installed, entry.moduleName)
        )
    return entry


def install_reactor_module(module_name):
    """Install the reactor of ``module_name`` (a ``twisted.application.reactors`` entry's
    ``moduleName``, imported by the supervisor) as this worker's global reactor, unless one
    is installed already (inherited from the supervisor: then it is renewed, not replaced).
    By module rather than by name: the name lookup scans Twisted's plugins, which a worker
    that dropped privileges may no longer be allowed to read."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    import importlib

    importlib.import_module(module_name).install()
    return True


class CannotFork(RuntimeError):
    """This process's state does not allow forking workers that serve on their own."""


def check_forkable():
    """Raise :class:`CannotFork` when a worker forked from this process could not get its
    own reactor: the global reactor is running here, or is of a kind we cannot renew."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return
    if getattr(reactor, "running", False):
        raise CannotFork(
            "a Spork cannot pre-fork from a process whose Twisted reactor is running: "
            "the workers would share its epoll set and waker.  Run the pool through "
            "spoon.service (it starts the supervisor with fork and exec) or call "
            "serve_forever() before starting any reactor"
        )
    qual = "%s.%s" % (type(reactor).__module__, type(reactor).__qualname__)
    if qual not in _RENEWABLE_REACTORS:
        raise CannotFork(
            "twisted.internet.reactor (%s) was installed before serve_forever() forked "
            "its workers, and its state cannot be renewed in a child.  Do not import "
            "twisted.internet.reactor at module level in the server's process (import it "
            "inside handlers), or install the default reactor" % qual
        )


def renew_inherited_reactor():
    """Give this (forked) process its own reactor state.

    If the parent had imported ``twisted.internet.reactor``, this child holds the same
    epoll descriptor and waker as the parent and its other children: used as is, every
    worker would see every other worker's events.  Close them and re-run the reactor's
    constructor on the same object, so that code holding a reference to the reactor (``from
    twisted.internet import reactor`` at a module's top) uses the new state.
    """
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        return False
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        try:
            waker.connectionLost(None)  # closes its pipe or socket pair
        except Exception:
            pass
    _close_inherited_poller(reactor)
    threadpool = getattr(reactor, "threadpool", None)
    if threadpool is not None:
        # Its threads do not exist in a forked child.
        reactor.threadpool = None
    reactor.__init__()
    return True


def _close_inherited_poller(reactor):
    # Private attribute, isolated here: EPollReactor keeps its epoll object in _poller and
    # offers no public way to close it.  Poll and select reactors hold no descriptor there.
    poller = getattr(reactor, "_poller", None)
    close = getattr(poller, "close", None)
    if close is not None:
        try:
            close()
        except OSError:
            pass


class Heartbeat:
    """Written from the worker's reactor every ``interval`` seconds to the supervisor's
    pipe: the first beat says "ready" (listening, reactor running); when beats stop, the
    supervisor knows the reactor is stuck.  Also the worker's watch on its supervisor: if
    the pipe is broken or the parent changed, the master is gone and the worker stops."""

    READY = b"R"
    BEAT = b"."

    def __init__(self, fd, interval, master_pid, on_orphaned):
        self.fd = fd
        self.interval = interval
        self.master_pid = master_pid
        self.on_orphaned = on_orphaned
        self._loop = None
        self._first = True
        self._orphaned = False

    def start(self, reactor):
        from twisted.internet.task import LoopingCall

        self._loop = LoopingCall(self.beat)
        self._loop.clock = reactor
        self._loop.start(self.interval, now=True)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def beat(self):
        if os.getppid() != self.master_pid:
            self._orphan("parent %d is gone" % self.master_pid)
            return
        try:
            os.write(self.fd, self.READY if self._first else self.BEAT)
            self._first = False
        except BlockingIOError:
            pass  # the supervisor is behind on reading; it is alive
        except OSError:
            self._orphan("heartbeat pipe closed")

    def _orphan(self, why):
        if self._orphaned:
            return
        self._orphaned = True
        self.stop()
        self.on_orphaned(why)


def run_worker(server, heartbeat_fd, master_pid, heartbeat_interval, close_fds=(), reactor_module=None):
    """Body of a forked worker: serve ``server`` (its socket inherited) until stopped, then
    exit the process.  ``reactor_module``: module of the reactor to install (default: the
    inherited global reactor, else Twisted's default).  Never returns."""
    code = 1
    try:
        code = _serve(server, heartbeat_fd, master_pid, heartbeat_interval, close_fds, reactor_module)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        try:
            log.exception("Worker %d failed", os.getpid())
        except BaseException:
            pass
    finally:
        _flush_logs()
        os._exit(code)


def _serve(server, heartbeat_fd, master_pid, heartbeat_interval, close_fds, reactor_module=None):
    from spoon.reactors import reactor_for_serving
    from spoon.server import _SpoonMixIn

    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Job-control and terminal signals are for the supervisor; a worker ignores them.
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, server.interrupt_handler)
    _drain_on_term(server)
    server._install_signal_handlers()
    # The supervisor blocked its signals around fork(); now that our handlers are in
    # place, whatever arrived meanwhile is delivered to them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)

    try:
        faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    except (ValueError, AttributeError, OSError, RuntimeError):
        pass  # no usable stderr: the supervisor's log line is all there will be

    # A worker never outlives its supervisor, even one killed by SIGKILL.
    linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != master_pid:
        return 1  # the supervisor died before the line above
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass

    renew_inherited_reactor()
    if reactor_module:
        install_reactor_module(reactor_module)
    reactor = reactor_for_serving()

    def orphaned(why):
        log.warning("Worker %d: supervisor gone (%s); stopping now", os.getpid(), why)
        reactor.callLater(1.0, os._exit, 1)
        server._begin_stop(False)

    heartbeat = Heartbeat(heartbeat_fd, heartbeat_interval, master_pid, orphaned)
    reactor.callWhenRunning(heartbeat.start, reactor)
    _balance_stream_listening(server)
    _SpoonMixIn.serve_forever(server)
    heartbeat.stop()
    return 0


def _drain_on_term(server):
    """A class without a shutdown signal of its own (``signal_shutdown = None``) still
    drains on a pool stop: the supervisor sends SIGTERM to the workers it forked, and the
    worker handles it with the server's graceful ``shutdown_handler`` (installed wherever
    the server installs its handlers, so also over the reactor's own once it runs)."""
    if getattr(server, "signal_shutdown", None) is not None:
        return
    install = server._install_signal_handlers

    def install_with_term():
        install()
        signal.signal(signal.SIGTERM, server.shutdown_handler)

    server._install_signal_handlers = install_with_term


def _balance_stream_listening(server):
    """Serve a stream server's socket with :class:`spoon.balance.OneByOnePort` (and the
    lean transport) instead of a port that takes many connections per wake-up from the
    shared socket.
    Only when the class kept the stock ``_listen`` (a class that listens its own way keeps
    it)."""
    import socket

    from spoon.balance import listen_one_by_one, serve_gulp
    from spoon.server import _SpoonMixIn

    if getattr(type(server), "_listen", None) is not _SpoonMixIn._listen:
        return
    if server.socket is None or server.socket.type != socket.SOCK_STREAM:
        return

    def _listen(reactor):
        server._factory = server.protocol_factory(reactor)
        server._port = listen_one_by_one(
            server.socket, server._factory, reactor, serve_gulp(server._factory, reactor)
        )

    server._listen = _listen


def _flush_logs():
    for handler in list(logging.getLogger().handlers):
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
