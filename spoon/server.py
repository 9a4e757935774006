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
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time

from twisted.internet import defer
from zope.interface import implementer

from spoon import errorlog, greenio, lifecycle, listener, proxy, tls
from spoon.pool.hooks import IPoolHooks
from spoon.pool.stats import COUNTERS
from spoon.pool.target import IPoolTarget, IRequestCounting
from spoon.pool import upgrade
from spoon.logs import bridge_twisted_to_stdlib
from spoon.net import set_defer_accept
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

LineTooLong = greenio.LineTooLong


class _Gulp:
    """Handle a single request: implement :meth:`handle`."""

    def handle(self):
        raise NotImplementedError()

    def wait(self, deferred):
        """Suspend this handler until ``deferred`` fires and return its result (or raise
        its failure).  The reactor and the other connections carry on meanwhile."""
        reactor = getattr(getattr(self.server, "_factory", None), "reactor", None)
        return greenio.wait(deferred, reactor)


class TCPGulp(_Gulp, socketserver.StreamRequestHandler):
    """Handle one TCP connection with blocking-style ``rfile``/``wfile``.

    ``timeout``: seconds a read or write may wait before ``socket.timeout`` is raised in
    the handler (None: wait forever).  ``max_line_length``: the longest line
    ``rfile.readline()`` returns; a longer one raises :class:`LineTooLong`.
    ``read_high_water``: unread input above which the server stops reading the socket.
    """

    timeout = None
    max_line_length = greenio.DEFAULT_MAX_LINE_LENGTH
    read_high_water = greenio.DEFAULT_READ_HIGH_WATER

    def setup(self):
        connection = self.connection = self.request
        if not isinstance(connection, greenio.GreenSocket):
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


def _client_text(client_address):
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return _address_text(client_address)
    return repr(client_address)


#: The socketserver ``get_request`` implementations spoon knows: an override of any other
#: kind cannot be honoured (the reactor accepts connections), so such a class is refused.
_KNOWN_GET_REQUEST = (socketserver.TCPServer.get_request, socketserver.UDPServer.get_request)


def check_server_class(klass):
    """Raise TypeError, with the reason and the way out, when ``klass`` mixes in something
    spoon cannot honour.

    socketserver's ``ThreadingMixIn`` and ``ForkingMixIn`` run each request in a thread or
    a forked child, but a spoon handler runs in a greenlet of the reactor thread and does
    its I/O through that reactor: from another thread or process it would silently
    misbehave.  A ``get_request()`` override is refused for the same reason: connections
    are accepted by the reactor, never by a call to ``get_request()``.
    """
    for mixin, instead in (
        (socketserver.ThreadingMixIn, "each connection already runs concurrently in its own greenlet"),
        (socketserver.ForkingMixIn, "use TCPSpork/UDPSpork (a pool of pre-forked workers)"),
    ):
        if issubclass(klass, mixin):
            raise TypeError(
                "%s mixes in socketserver.%s, which spoon cannot honour: handlers run in "
                "greenlets of the reactor thread; %s" % (klass.__qualname__, mixin.__name__, instead)
            )
    get_request = getattr(klass, "get_request", None)
    if get_request is not None and get_request not in _KNOWN_GET_REQUEST + (
        _DatagramMixIn.get_request,
    ):
        raise TypeError(
            "%s overrides get_request(), which spoon cannot honour: connections are "
            "accepted by the Twisted reactor.  Override verify_request() (accept or "
            "refuse a client) or process_request() (wrap or account each request) "
            "instead" % klass.__qualname__
        )


def check_handler_class(server_class):
    """Raise TypeError, in one line saying what to do, unless ``server_class`` names a
    handler it can serve: a ``socketserver.BaseRequestHandler`` subclass (a Gulp) whose
    ``handle()`` is its own.  Called before serving, so that a server class written
    without its handler fails at start instead of failing every connection."""
    handler = getattr(server_class, "handler_klass", None)
    name = server_class.__qualname__
    if not (isinstance(handler, type) and issubclass(handler, socketserver.BaseRequestHandler)):
        raise TypeError(
            "%s.handler_klass is %r, not a request handler class: set it to a subclass of "
            "spoon.server.Gulp (UDPGulp for UDP)" % (name, handler)
        )
    if handler.handle is _Gulp.handle:
        raise TypeError(
            "%s has no handler: set handler_klass to a subclass of spoon.server.Gulp "
            "(UDPGulp for UDP) that implements handle()" % name
        )


@implementer(IPoolTarget, IPoolHooks, IRequestCounting)
class _SpoonMixIn:
    """A server that consumes Gulps in a single process.

    The concrete classes are ``socketserver.TCPServer``/``UDPServer`` subclasses, so
    socketserver's whole surface is theirs (see "socketserver compatibility" in the
    README).  Connections are accepted by a Twisted reactor; each one then goes through
    socketserver's own sequence, in its handler's greenlet: ``verify_request``, then
    ``process_request`` (``finish_request`` builds the handler, ``shutdown_request`` and
    ``close_request`` close the connection), ``handle_error`` when something raised.
    """

    server_logger = "spoon-server"
    handler_klass = TCPGulp
    # Custom signal handling
    signal_reload = signal.SIGUSR1
    signal_shutdown = signal.SIGTERM
    # Socket options.
    ipv6_only = False
    allow_reuse_address = True
    #: socketserver's SO_REUSEPORT switch (Python 3.11 added it to socketserver; spoon
    #: honours it on every Python it supports).
    allow_reuse_port = False
    request_queue_size = 1024
    #: Seconds a graceful stop waits for in-flight handlers before closing them.
    graceful_timeout = 30
    #: Opt-in for protocols where the client always speaks first (never set it for a
    #: handler that greets before reading): a connection's handler then starts at its
    #: first byte, so an idle connection holds no greenlet, and on Linux the kernel hands
    #: over connections only once they have data (TCP_DEFER_ACCEPT).
    client_speaks_first = False
    #: Every connection starts with a PROXY protocol header (v1 or v2) from a load
    #: balancer: ``client_address`` and ``verify_request`` see the client it names.
    #: Stream servers only (see "Behind HAProxy" in the README).
    proxy_protocol = False
    #: The load balancers allowed to send that header: addresses and networks; a
    #: connection from anywhere else is refused.  Default: loopback only.
    proxy_allow_from = proxy.DEFAULT_ALLOW_FROM
    command_line_defaults = {
        "port": 5000,
        "interface": "::0",
        "pid_file": None,
        "log_file": None,
        "sentry_dsn": None,
        "spork": None,
    }

    socket_type = socket.SOCK_STREAM

    def __init_subclass__(cls, **kwargs):
        """A subclass written socketserver's way, with ``RequestHandlerClass = Handler``
        as a class attribute, gets that handler as its ``handler_klass``: the two names
        always mean the same class."""
        super().__init_subclass__(**kwargs)
        if "RequestHandlerClass" in cls.__dict__:
            handler = cls.__dict__["RequestHandlerClass"]
            if not isinstance(handler, property):
                if "handler_klass" not in cls.__dict__:
                    cls.handler_klass = handler
                delattr(cls, "RequestHandlerClass")

    @property
    def RequestHandlerClass(self):
        """socketserver's name for ``handler_klass`` (one attribute under two names)."""
        return self.handler_klass

    @RequestHandlerClass.setter
    def RequestHandlerClass(self, klass):
        self.handler_klass = klass

    def __init__(self, address, bind_and_activate=True):
        check_server_class(type(self))
        self.log = logging.getLogger(self.server_logger)
        if not isinstance(address, (str, bytes)):
            address = tuple(address)
            if ":" in str(address[0]):
                self.address_family = socket.AF_INET6
        socketserver.BaseServer.__init__(self, address, self.handler_klass)
        self.socket = None
        self._reactor = None
        self._factory = None
        self._port = None
        self._service_actions = None
        self._poll_interval = 0.1
        self._serving_thread = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._shutdown_requested = False
        self._stopping = False
        self._errors = None
        self.load_config()
        inherited = _inherited_sockets.pop() if _inherited_sockets else None
        if inherited is None:
            # A new generation of a code upgrade: the old one listens on this address.
            inherited = upgrade.take_inherited_socket(self.address_family, self.socket_type, address)
            if inherited is not None:
                # Activated by the old generation's code: defer as this code says.
                set_defer_accept(inherited, self.client_speaks_first)
        if inherited is not None:
            # Bound (and listening) by a supervisor: server_bind() and server_activate()
            # already happened there.
            inherited.setblocking(False)
            self.socket = inherited
            self.address_family = inherited.family
            self.server_address = inherited.getsockname()
            self._install_signal_handlers()
            return
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except OSError as e:
                self.server_close()
                raise OSError(
                    e.errno,
                    "cannot listen on %s: %s" % (_address_text(address), e.strerror or e),
                ) from e
            except OverflowError as e:
                self.server_close()
                raise ValueError(
                    "cannot listen on %s: the port must be 0-65535" % _address_text(address)
                ) from e
            except BaseException:
                self.server_close()
                raise
            self.socket.setblocking(False)
            self._install_signal_handlers()

    # -- socket ---------------------------------------------------------------------------

    def server_bind(self):
        """Set the socket options of the class (dual stack unless ``ipv6_only``, address
        and port reuse), then bind; called by the constructor, may be extended."""
        sock = self.socket
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if self.ipv6_only else 0)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self):
        """Listen (streams), with ``TCP_DEFER_ACCEPT`` for a ``client_speaks_first``
        class; called by the constructor, may be extended."""
        if self.client_speaks_first:
            set_defer_accept(self.socket, True)
        super().server_activate()

    def fileno(self):
        return self.socket.fileno()

    def server_close(self):
        """Close the listening socket."""
        if self.socket is not None:
            self.socket.close()

    # -- socketserver's request sequence ----------------------------------------------------

    def finish_request(self, request, client_address):
        """Build ``RequestHandlerClass`` for this request (its ``__init__`` runs
        ``setup()``, ``handle()`` and ``finish()``), as socketserver does."""
        klass = self.handler_klass
        counters = COUNTERS
        counters.requests_started += 1
        try:
            if klass.__new__ is object.__new__:
                # The same as klass(...), without a C-level call between the greenlet and
                # the handler's frames: a suspended handler then saves less stack.
                handler = object.__new__(klass)
                handler.__init__(request, client_address, self)
            else:
                klass(request, client_address, self)
        except BaseException as e:
            counters.requests_finished += 1
            self._request_ended(e)
            raise
        counters.requests_finished += 1
        self._request_ended(None)

    def handle_request(self):
        """Serve exactly one request in this process and return, as socketserver does:
        wait at most ``timeout`` seconds (None: as long as it takes) for a client, else
        call ``handle_timeout()``.

        No reactor is involved: the request is accepted here and its handler runs in this
        thread on the accepted (blocking) socket, so nothing outlives the call.  A
        handler's ``wait()`` needs a reactor and is not available in this mode.
        """
        check_handler_class(type(self))
        timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.PollSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if selector.select(remaining):
                    try:
                        request, client_address = self.get_request()
                    except (BlockingIOError, InterruptedError):
                        # Another process sharing the socket took it: wait again.
                        continue
                    except OSError:
                        return None
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    return self.handle_timeout()
        if isinstance(request, socket.socket):
            request.setblocking(True)
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)
        return None

    # -- the Twisted side -----------------------------------------------------------------

    def protocol_factory(self, reactor=None, proxy_protocol=None):
        """A Twisted factory (stream) or datagram protocol serving ``handler_klass`` for
        this server; listen with it on any endpoint of a running reactor.
        ``proxy_protocol``: read a PROXY protocol header first (None: as the class says)."""
        if proxy_protocol is None:
            proxy_protocol = self.proxy_protocol
        preface = None
        if proxy_protocol:
            preface = proxy.HeaderPolicy(self.proxy_allow_from, self.log, reactor)
        return greenio.GulpFactory(
            self, reactor, self.log, lazy_start=self.client_speaks_first, preface=preface
        )

    def _listen(self, reactor):
        """Serve this server's bound socket in ``reactor``, on spoon's lean transport, or
        with :attr:`tls` set on Twisted's TCP transport under its TLS layer."""
        self._factory = self.protocol_factory(reactor)
        serve = listener.serve_gulp(self._factory, reactor)
        if self.tls:
            wrapped = tls.wrap_factory(self._factory, self.tls)

            def serve(conn, peer):
                listener.serve_twisted(conn, peer, wrapped, reactor)

        # One process: accept at once; a pool worker serves with shared=True (one by one);
        # the port reads the Gulp factory's open connections for its accept policy.
        self._port = listener.listen_one_by_one(
            self.socket, self._factory, reactor, serve, shared=self._accept_shared
        )

    # -- serving --------------------------------------------------------------------------

    def serve_forever(self, poll_interval=None):
        """Run a reactor serving this server until :meth:`shutdown` (or SIGTERM).

        The reactor needs no polling; ``poll_interval`` (default 0.1) is how often
        ``service_actions()`` runs (in the reactor thread), when the class overrides it.
        """
        check_handler_class(type(self))
        _script_configuration(self)
        _log_start(self, None)
        self._serve_here(poll_interval)

    def _serve_here(self, poll_interval):
        """Serve in this process's reactor until stopped."""
        reactor = reactor_for_serving()
        self._reactor = reactor
        if poll_interval is not None:
            self._poll_interval = poll_interval
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
            self._stop_service_actions()
            self._reactor = None
            self._serving_thread = None
            self._stopped.set()

    def _started(self):
        # reactor.run() installed Twisted's own SIGINT/SIGTERM handlers: ours win.
        self._install_signal_handlers()
        if self._shutdown_requested:
            self._shutdown_requested = False
            self._begin_stop(graceful=True)

    def _start_service_actions(self, reactor):
        """Call ``service_actions()`` every ``poll_interval`` seconds, as socketserver's
        loop does, when the class overrides it (the stock one does nothing: no timer)."""
        if type(self).service_actions is socketserver.BaseServer.service_actions:
            return
        from twisted.internet.task import LoopingCall

        loop = self._service_actions = LoopingCall(self._run_service_actions)
        loop.clock = reactor
        loop.start(max(0.001, float(self._poll_interval or 0.1)), now=False)

    def _run_service_actions(self):
        try:
            self.service_actions()
        except Exception:
            self.log.exception("service_actions() failed")

    def _stop_service_actions(self):
        loop, self._service_actions = self._service_actions, None
        if loop is not None and loop.running:
            loop.stop()

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
        else:
            COUNTERS.generation += 1

    def handle_error(self, request, client_address):
        """Called inside ``except`` when a request failed.

        What the client did (reset, went away, timed out, sent an over-long line) is one
        INFO line without a traceback.  A handler bug is an ERROR with its traceback;
        the same failure from the same place is logged in full once, then counted (one
        line with the count every 10 seconds while it goes on), so a client that makes
        the handler raise on purpose cannot flood the log.
        """
        exc_type, exc, tb = sys.exc_info()
        fault = errorlog.peer_fault(exc)
        if fault is not None:
            if isinstance(exc, socket.timeout):
                COUNTERS.timeouts += 1
            else:
                COUNTERS.peer_resets += 1
            self.log.info("Client %s: %s", _client_text(client_address), fault)
            return
        COUNTERS.errors += 1
        limiter = self._error_limiter()
        if limiter is None or limiter.admit(errorlog.origin(exc_type, tb), (client_address, exc)):
            self.log.error(
                "Error while processing request from: %s", client_address, exc_info=True
            )

    def _error_limiter(self):
        """The repeat limiter of this serving run (None outside a reactor: no timer)."""
        reactor = self._reactor
        if reactor is None:
            return None
        limiter = self._errors
        if limiter is None or limiter.clock is not reactor:
            limiter = self._errors = errorlog.RepeatLimiter(reactor, self._report_repeats)
        return limiter

    def _report_repeats(self, count, interval, last):
        client_address, exc = last
        what = "%s: %s" % (type(exc).__name__, exc)
        self.log.error("Error while processing request from: %s: %s (the same error as above, %s)",
                       client_address, what, errorlog.repeated(count, interval))

    @property
    def stopping(self):
        """True once a graceful stop has begun: a handler serving a persistent session
        can check it between requests and end the session politely."""
        return self._stopping

    # == BEGIN the pool's target interface (spoon.pool.target.IPoolTarget) ================
    # The public methods through which spoon.pool (and the single-process serve_forever)
    # drives this server; spoon.pool reads nothing else of it.

    #: Seconds without a heartbeat before a pool kills a worker (None: the pool's default).
    worker_timeout = None
    #: The TLS settings of the ssl: endpoint this server serves (:mod:`spoon.tls`); set by
    #: whoever binds that endpoint (the pool's command line, the spoon command); None: plain.
    tls = None
    #: A pool worker is replaced after this many requests (0: never; spoon.pool.retire),
    #: plus up to ``max_requests_jitter`` more, drawn per worker...
    max_requests = 0
    max_requests_jitter = 0
    #: ...or once its resident memory exceeds this many bytes (0: no limit).
    max_worker_memory = 0
    _request_observer = None

    def watch_requests(self, observer):
        """``observer(exc)`` is called as each request ends (IRequestCounting)."""
        self._request_observer = observer

    def _request_ended(self, exc):
        observer = self._request_observer
        if observer is not None:
            observer(exc)
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
        self._start_service_actions(reactor)
        return self._serving.served

    def begin_stop(self, graceful=True):
        """Stop accepting and drain (see :class:`spoon.lifecycle.GracefulStop`); the
        Deferred fires once drained.  In the reactor thread."""
        if self._reactor is None or self._serving is None:
            return defer.succeed(None)
        self._stopping = True
        self._stop_service_actions()
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

    # == BEGIN lifecycle hooks (spoon.pool.hooks.IPoolHooks): override any of them =========
    # Each runs in the process named; an exception is logged with the hook's name (in
    # post_fork it also fails that worker's boot).  See README "Status, metrics and hooks".

    def when_ready(self):
        """Supervisor: every wanted worker serves (once per pool start)."""

    def pre_fork(self, number):
        """Supervisor: worker ``number`` is about to be forked."""

    def post_fork(self, number):
        """Worker ``number``, just forked, before it serves (reconnect a database here)."""

    def worker_exit(self, number):
        """Worker ``number``, on its way out, its reactor stopped."""

    def child_exit(self, pid, cause):
        """Supervisor: worker ``pid`` has ended; ``cause``: stopped, retired, timeout,
        boot_failure, crashed or killed."""

    def on_reload(self):
        """Supervisor: a reload (USR1) or a replacement of the workers (HUP) begins."""

    # == END lifecycle hooks ================================================================


class _DatagramMixIn:
    """Socket type and Twisted listening for datagram servers.

    ``max_packet_size`` (socketserver's) is the largest datagram a handler gets; a larger
    one is dropped and reported as truncated, never passed on cut short.
    """

    socket_type = socket.SOCK_DGRAM
    handler_klass = UDPGulp

    def protocol_factory(self, reactor=None, proxy_protocol=None):
        """The datagram protocol (the PROXY protocol does not apply to datagrams)."""
        return greenio.GulpDatagramProtocol(self, reactor)

    def _listen(self, reactor):
        self._factory = self.protocol_factory(reactor)
        # One byte more than the limit, so that a larger datagram shows itself.
        self._port = reactor.adoptDatagramPort(
            self.socket.fileno(),
            self.address_family,
            self._factory,
            maxPacketSize=self.max_packet_size + 1,
        )

    def get_request(self):
        """socketserver's datagram ``get_request``, refusing a truncated datagram."""
        data, client_address = self.socket.recvfrom(self.max_packet_size + 1)
        if len(data) > self.max_packet_size:
            greenio.report_truncated(self.log, client_address, self.max_packet_size)
            raise OSError("datagram larger than max_packet_size")
        return (data, self.socket), client_address


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
    #: Seconds a zero-downtime upgrade (USR2) waits for the new generation to serve
    #: before it gives up on it and this one serves on.
    upgrade_timeout = 60

    def __init__(self, address, bind_and_activate=True):
        self.pids = None
        self._supervisor = None
        _SpoonMixIn.__init__(self, address, bind_and_activate)

    def serve_forever(self, poll_interval=0.1):
        """Pre-fork ``prefork`` workers and supervise them until :meth:`shutdown` or a stop
        signal (see :mod:`spoon.prefork` for the signals the supervisor handles)."""
        check_handler_class(type(self))
        cfg = _script_configuration(self)
        if self.prefork is None or self.prefork <= 1:
            _log_start(self, None)
            return self._serve_here(poll_interval)
        # Each worker's service_actions() runs at this interval too.
        self._poll_interval = poll_interval
        if self._shutdown_requested:  # shutdown() came first
            self._shutdown_requested = False
            return
        from spoon.pool.supervisor import Supervisor

        _log_start(self, self.prefork)
        Supervisor(
            self,
            metrics_endpoint=cfg.metrics if cfg is not None else None,
            statsd=cfg.statsd if cfg is not None else None,
        ).run()

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


def _script_configuration(server):
    """A server run by its own program (``serve_forever()``): what a ``SPOON_CONFIG`` file
    or ``SPOON_*`` variables set (workers, timeouts) beats the class, as in every other
    entry point; logging as the program configured it, else spoon's default."""
    from spoon import config, logs

    if config.command_line_configuration() is not None:
        return None  # run by spoon's command line, which applied its configuration already
    cfg = config.build("script", server_class=type(server))
    for name, attribute in (
        ("workers", "prefork"),
        ("graceful_timeout", "graceful_timeout"),
        ("worker_timeout", "worker_timeout"),
    ):
        if cfg.kinds.get(name) in ("file", "env"):
            setattr(server, attribute, getattr(cfg, name))
    config.apply_server_attributes(cfg, server)
    logs.ensure_default_logging(server.server_logger, cfg)
    return cfg


def _log_start(server, workers):
    """Say where ``server`` listens (and with how many workers), as twistd does."""
    server.log.info("listening on %s%s", _address_text(server.server_address),
                    " with %d workers" % workers if workers else "")


class TCPSpoon(_SpoonMixIn, socketserver.TCPServer):
    """A TCP server that handles everything in a single process."""


class TCPSpork(_SporkMixIn, socketserver.TCPServer):
    """A TCP server that pre-forks a number of worker processes."""


class UDPSpoon(_DatagramMixIn, _SpoonMixIn, socketserver.UDPServer):
    """A UDP server that handles everything in a single process."""


class UDPSpork(_DatagramMixIn, _SporkMixIn, socketserver.UDPServer):
    """A UDP server that pre-forks a number of worker processes."""
