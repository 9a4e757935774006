"""The original spoon API: Gulp handlers and Spoon/Spork servers, served by Twisted.

Code written for spoon 1.0.x runs unchanged: handlers keep socketserver's contract
(``setup()``, ``handle()``, ``finish()``, ``rfile``, ``wfile``) and their blocking style,
servers keep their class attributes, signals and methods.  Underneath, every server owns a
Twisted protocol factory (:meth:`_SpoonMixIn.protocol_factory`) that any Twisted program
can also listen with, and ``serve_forever()`` runs a reactor.

The behaviour lives in mixins and the concrete classes have empty bodies, as in the
original, so that ``class Forked(MyEchoServer, TCPSpork)`` still gets the Spork behaviour
although ``MyEchoServer`` (a TCPSpoon) comes first in its MRO.
"""

import contextlib
import logging
import signal
import socket
import socketserver
import threading

from twisted.internet import defer
from zope.interface import implementer

from spoon import adapter, balance, lifecycle
from spoon.pool.target import IPoolTarget
from spoon.logs import bridge_twisted_to_stdlib
from spoon.reactors import mark_ran, reactor_for_serving

__all__ = [
    "Gulp",
    "TCPGulp",
    "UDPGulp",
    "TCPSpoon",
    "UDPSpoon",
    "TCPSpork",
    "UDPSpork",
    "LineTooLong",
]

LineTooLong = adapter.LineTooLong


class _Gulp:
    """Handle a single request: implement :meth:`handle`."""

    def handle(self):
        raise NotImplementedError()

    def wait(self, deferred):
        """Suspend this handler until ``deferred`` fires and return its result (or raise
        its failure).  The reactor and the other connections carry on meanwhile."""
        reactor = getattr(getattr(self.server, "_factory", None), "reactor", None)
        return adapter.wait(deferred, reactor)


class TCPGulp(_Gulp, socketserver.StreamRequestHandler):
    """Handle one TCP connection with blocking-style ``rfile``/``wfile``.

    ``timeout``: seconds a read or write may wait before ``socket.timeout`` is raised in
    the handler (None: wait forever).  ``max_line_length``: the longest line
    ``rfile.readline()`` returns; a longer one raises :class:`LineTooLong`.
    ``read_high_water``: unread input above which the server stops reading the socket.
    """

    timeout = None
    max_line_length = adapter.DEFAULT_MAX_LINE_LENGTH
    read_high_water = adapter.DEFAULT_READ_HIGH_WATER

    def setup(self):
        connection = self.connection = self.request
        if not isinstance(connection, adapter.GreenSocket):
            # Used with a real socket (e.g. under stdlib socketserver): plain behaviour.
            return super().setup()
        if self.timeout is not None:
            connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = connection.makefile("rb", self.rbufsize)
        self.wfile = connection.makefile("wb", self.wbufsize)


Gulp = TCPGulp


class UDPGulp(_Gulp, socketserver.DatagramRequestHandler):
    """Handle one datagram: ``rfile`` reads it, what ``wfile`` holds after ``finish()`` is
    sent back to the sender as one datagram."""


_inherited_sockets = []


@contextlib.contextmanager
def using_socket(sock):
    """Servers constructed inside this block adopt ``sock`` (an already bound, and for
    streams listening, socket) instead of binding their address.

    This is how a supervisor started with an inherited descriptor (twistd, the embedding
    service) builds a user's server class whatever its ``__init__`` looks like.
    """
    _inherited_sockets.append(sock)
    try:
        yield sock
    finally:
        if _inherited_sockets and _inherited_sockets[-1] is sock:
            _inherited_sockets.pop()


def _address_text(address):
    host, port = address[0], address[1]
    return "[%s]:%s" % (host, port) if ":" in str(host) else "%s:%s" % (host, port)


@implementer(IPoolTarget)
class _SpoonMixIn:
    """A server that consumes Gulps in a single process."""

    server_logger = "spoon-server"
    handler_klass = TCPGulp
    # Custom signal handling
    signal_reload = signal.SIGUSR1
    signal_shutdown = signal.SIGTERM
    # Socket options.
    ipv6_only = False
    allow_reuse_address = True
    request_queue_size = 1024
    #: Seconds a graceful stop waits for in-flight handlers before closing them.
    graceful_timeout = 30
    #: Opt-in for protocols where the client always speaks first (never set it for a
    #: handler that greets before reading): a connection's handler then starts at its
    #: first byte, so an idle connection holds no greenlet, and on Linux the kernel hands
    #: over connections only once they have data (TCP_DEFER_ACCEPT).
    client_speaks_first = False
    command_line_defaults = {
        "port": 5000,
        "interface": "::0",
        "pid_file": None,
        "log_file": None,
        "sentry_dsn": None,
        "spork": None,
    }

    socket_type = socket.SOCK_STREAM

    def __init__(self, address, bind_and_activate=True):
        self.log = logging.getLogger(self.server_logger)
        self.server_address = tuple(address)
        self.address_family = socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
        self.socket = None
        self._reactor = None
        self._factory = None
        self._port = None
        self._serving_thread = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._shutdown_requested = False
        self._stopping = False
        self._grace_call = None
        self.load_config()
        if bind_and_activate:
            self.socket = self._bind(self.server_address)
            self.server_address = self.socket.getsockname()
            self._install_signal_handlers()

    # -- socket ---------------------------------------------------------------------------

    def _bind(self, address):
        """Bind and listen now, so that a busy port fails in the constructor."""
        if _inherited_sockets:
            sock = _inherited_sockets.pop()
            sock.setblocking(False)
            self.address_family = sock.family
            return sock
        sock = socket.socket(self.address_family, self.socket_type)
        try:
            if self.allow_reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.address_family == socket.AF_INET6:
                sock.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if self.ipv6_only else 0
                )
            sock.bind(address)
            if self.socket_type == socket.SOCK_STREAM:
                if self.client_speaks_first and hasattr(socket, "TCP_DEFER_ACCEPT"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
                sock.listen(self.request_queue_size)
        except OSError as e:
            sock.close()
            raise OSError(
                e.errno, "cannot listen on %s: %s" % (_address_text(address), e.strerror)
            ) from e
        sock.setblocking(False)
        return sock

    def fileno(self):
        return self.socket.fileno()

    def server_close(self):
        """Close the listening socket."""
        if self.socket is not None:
            self.socket.close()

    # -- the Twisted side -----------------------------------------------------------------

    def protocol_factory(self, reactor=None):
        """A Twisted factory (stream) or datagram protocol serving ``handler_klass`` for
        this server; listen with it on any endpoint of a running reactor."""
        return adapter.GulpFactory(
            self, self.handler_klass, reactor, self.log, lazy_start=self.client_speaks_first
        )

    def _listen(self, reactor):
        """Serve this server's bound socket in ``reactor``, on spoon's lean transport."""
        self._factory = self.protocol_factory(reactor)
        # One process: accept at once; a pool worker serves with shared=True (one by one).
        self._port = balance.listen_one_by_one(
            self.socket,
            self._factory,
            reactor,
            balance.serve_gulp(self._factory, reactor),
            shared=self._accept_shared,
        )

    # -- serving --------------------------------------------------------------------------

    def serve_forever(self, poll_interval=0.1):
        """Run a reactor serving this server until :meth:`shutdown` (or SIGTERM).

        ``poll_interval`` is accepted for compatibility; the reactor needs no polling.
        """
        reactor = reactor_for_serving()
        self._reactor = reactor
        self._stopping = False
        self._serving_thread = threading.get_ident()
        self._stopped.clear()
        bridge_twisted_to_stdlib()
        try:
            self.serve(reactor, shared=False).addCallback(lambda _: lifecycle.stop_reactor(reactor))
            reactor.callWhenRunning(self._started)
            mark_ran(reactor)
            reactor.run()
        finally:
            self._reactor = None
            self._serving_thread = None
            self._stopped.set()

    def _started(self):
        # reactor.run() installed Twisted's own SIGINT/SIGTERM handlers: ours win.
        self._install_signal_handlers()
        if self._shutdown_requested:
            self._shutdown_requested = False
            self._begin_stop(graceful=True)

    def shutdown(self):
        """Stop gracefully: stop accepting, let in-flight handlers finish (for at most
        ``graceful_timeout`` seconds), then return from ``serve_forever``.

        Safe to call from a signal handler, a handler or another thread; from another
        thread it waits until ``serve_forever`` has returned, as socketserver does.
        """
        reactor = self._reactor
        if reactor is None:
            self._shutdown_requested = True
            return
        reactor.callFromThread(self._begin_stop, True)
        if self._serving_thread not in (None, threading.get_ident()):
            self._stopped.wait()

    def _begin_stop(self, graceful):
        self.begin_stop(graceful)

    # -- signals and configuration --------------------------------------------------------

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            self.log.debug("Not in the main thread: no signal handlers installed")
            return
        if self.signal_reload is not None:
            signal.signal(self.signal_reload, self.reload_handler)
        if self.signal_shutdown is not None:
            signal.signal(self.signal_shutdown, self.shutdown_handler)
        signal.signal(signal.SIGINT, self.interrupt_handler)

    def load_config(self):
        """Read the configuration; called at construction and again on SIGUSR1.

        Can be reimplemented.
        """

    def shutdown_handler(self, *args, **kwargs):
        """Handler for the shutdown signal (SIGTERM): graceful stop."""
        self.log.info("SIGTERM received. Shutting down.")
        self.shutdown()

    def interrupt_handler(self, *args, **kwargs):
        """Handler for SIGINT (Ctrl-C): stop now, closing open connections."""
        self.log.info("SIGINT received. Stopping now.")
        reactor = self._reactor
        if reactor is None:
            raise KeyboardInterrupt
        reactor.callFromThread(self._begin_stop, False)

    def reload_handler(self, *args, **kwargs):
        """Handler for the reload signal (SIGUSR1): ``load_config()`` in the reactor
        thread, between requests."""
        self.log.info("SIGUSR1 received. Reloading configuration.")
        reactor = self._reactor
        if reactor is None:
            self._reload()
        else:
            reactor.callFromThread(self._reload)

    def _reload(self):
        try:
            self.load_config()
        except Exception:
            self.log.exception("load_config() failed; keeping the previous configuration")

    def handle_error(self, request, client_address):
        """Called inside ``except`` when a handler raised: log it with its traceback."""
        self.log.error(
            "Error while processing request from: %s", client_address, exc_info=True
        )

    # == BEGIN the pool's target interface (spoon.pool.target.IPoolTarget) ================
    # The public methods through which spoon.pool (and the single-process serve_forever)
    # drives this server; spoon.pool reads nothing else of it.

    #: Seconds without a heartbeat before a pool kills a worker (None: the pool's default).
    worker_timeout = None
    _accept_shared = False
    _serving = None

    @property
    def pool_name(self):
        klass = type(self)
        return "%s.%s" % (klass.__module__, klass.__qualname__)

    @property
    def pool_workers(self):
        return getattr(self, "prefork", None) or 1

    def reload(self):
        """``load_config()``; a failure is logged and the previous configuration kept."""
        self._reload()

    def serve(self, reactor, shared=False):
        """Listen on the bound socket in ``reactor``; ``shared``: take connections one by
        one (other processes accept on the same socket).  The Deferred fires once a stop
        (:meth:`begin_stop`) has drained."""
        self._reactor = reactor
        self._stopping = False
        self._accept_shared = shared
        self._serving = lifecycle.ServingRun(reactor)
        self._listen(reactor)
        return self._serving.served

    def begin_stop(self, graceful=True):
        """Stop accepting and drain (see :class:`spoon.lifecycle.GracefulStop`); the
        Deferred fires once drained.  In the reactor thread."""
        if self._reactor is None or self._serving is None:
            return defer.succeed(None)
        self._stopping = True
        port, self._port = self._port, None
        factory = self._factory
        return self._serving.begin_stop(
            graceful,
            [port] if port is not None else [],
            [factory] if factory is not None else [],
            self.graceful_timeout,
            self.log,
        )

    def signal_handlers(self):
        """The handlers a pool worker installs: this class's reload and shutdown handlers
        (a graceful stop on SIGTERM too, even for a class without ``signal_shutdown``),
        an immediate stop on SIGINT and SIGQUIT."""
        handlers = {
            signal.SIGTERM: self.shutdown_handler,
            signal.SIGINT: self.interrupt_handler,
            signal.SIGQUIT: self.interrupt_handler,
        }
        if self.signal_shutdown is not None:
            handlers[self.signal_shutdown] = self.shutdown_handler
        if self.signal_reload is not None:
            handlers[self.signal_reload] = self.reload_handler
        return handlers

    def pool_started(self, pool):
        self._supervisor = pool
        self.pids = pool.pids

    def pool_stopped(self):
        self._supervisor = None
        self.pids = []

    def became_worker(self, number):
        self._supervisor = None
        self.pids = None

    # == END the pool's target interface ==================================================


class _DatagramMixIn:
    """Socket type and Twisted listening for datagram servers."""

    socket_type = socket.SOCK_DGRAM
    handler_klass = UDPGulp

    def protocol_factory(self, reactor=None):
        return adapter.GulpDatagramProtocol(self, self.handler_klass, reactor)

    def _listen(self, reactor):
        self._factory = self.protocol_factory(reactor)
        self._port = reactor.adoptDatagramPort(
            self.socket.fileno(), self.address_family, self._factory
        )


class _SporkMixIn(_SpoonMixIn):
    """The same as a Spoon, but pre-forks ``prefork`` worker processes that share the
    listening socket.  ``pids`` lists the workers in the master, None in a worker.

    ``serve_forever()`` makes this process the supervisor (:mod:`spoon.prefork`): it never
    runs a reactor; each worker installs its own and serves the inherited socket.  What
    ``load_config()`` loaded here before forking is shared copy-on-write by the workers.
    ``prefork`` <= 1 serves in this process, as a Spoon does.
    """

    prefork = 4
    #: Seconds a worker's reactor may go without reporting a heartbeat (a handler stuck in
    #: a CPU loop or a blocking call) before the supervisor kills and replaces it.
    worker_timeout = 30

    def __init__(self, address, bind_and_activate=True):
        self.pids = None
        self._supervisor = None
        _SpoonMixIn.__init__(self, address, bind_and_activate)

    def serve_forever(self, poll_interval=0.1):
        """Pre-fork ``prefork`` workers and supervise them until :meth:`shutdown` or a stop
        signal (see :mod:`spoon.prefork` for the signals the supervisor handles)."""
        if self.prefork is None or self.prefork <= 1:
            return _SpoonMixIn.serve_forever(self, poll_interval)
        if self._shutdown_requested:  # shutdown() came first
            self._shutdown_requested = False
            return
        from spoon.pool.supervisor import Supervisor

        Supervisor(self).run()

    def shutdown(self):
        """In the supervisor: stop every worker gracefully (they stop accepting and finish
        what is in flight) and return from ``serve_forever``.  In a worker: stop it."""
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.request_stop(graceful=True)
            return
        _SpoonMixIn.shutdown(self)

    def reload_handler(self, *args, **kwargs):
        """In the supervisor: ``load_config()`` in every worker (and here)."""
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.request(self.signal_reload or signal.SIGUSR1)
            return
        _SpoonMixIn.reload_handler(self, *args, **kwargs)


class TCPSpoon(_SpoonMixIn):
    """A TCP server that handles everything in a single process."""


class TCPSpork(_SporkMixIn):
    """A TCP server that pre-forks a number of worker processes."""


class UDPSpoon(_DatagramMixIn, _SpoonMixIn):
    """A UDP server that handles everything in a single process."""


class UDPSpork(_DatagramMixIn, _SporkMixIn):
    """A UDP server that pre-forks a number of worker processes."""
