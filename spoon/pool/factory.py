"""Any Twisted factory as a pool target: a plain ``IProtocolFactory`` (a
``twisted.web.server.Site``, say) or ``DatagramProtocol`` served by the same supervisor and
workers as a Spoon, through :class:`spoon.pool.target.IPoolTarget`.

The target holds the socket and a callable that makes the factory (called in each worker,
once its reactor is installed: a Site built in the supervisor would install a reactor
there).  What a graceful stop needs from the factory (:class:`spoon.lifecycle.IDrainable`)
comes from a ``WrappingFactory`` that tracks the connections.  Its wrapper passes half-close
through: Twisted's transport asks its own protocol (the wrapper) whether it provides
``IHalfCloseableProtocol``, so a wrapper that did not would turn a client's
``shutdown(SHUT_WR)`` into a full close of a protocol that wants ``readConnectionLost``.  For
a Site it also counts the requests in progress on each connection, so that a stop can close
the persistent connections that sit between requests instead of waiting for the browser.
"""

import logging
import signal
import socket

from twisted.internet import defer
from zope.interface import implementer

from spoon.lifecycle import IdleWaiters, IDrainable, NothingToDrain, ServingRun
from spoon.pool.target import IPoolTarget

__all__ = ["FactoryTarget", "tracking_factory"]


#: While a pool of a plain HTTP factory (a twisted.web Site) drains, persistent
#: connections that sit between requests are closed (a browser would otherwise hold the
#: stop for the whole grace period): checked this often, once quiet for
#: IDLE_CLOSE_AFTER seconds.
IDLE_CLOSE_INTERVAL = 0.2
IDLE_CLOSE_AFTER = 0.5


def tracking_factory(wrapped, reactor):
    """Wrap a plain Twisted factory so that a graceful stop can wait for its connections
    (:class:`spoon.lifecycle.IDrainable`)."""
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    class ActivityWrapper(ProtocolWrapper):
        """Remembers when the connection last carried bytes, whether it ever answered, and
        (for HTTP) how many requests are in progress on it."""

        last_activity = 0.0
        answered = False
        requests = 0

        def dataReceived(self, data):
            self.last_activity = reactor.seconds()
            ProtocolWrapper.dataReceived(self, data)

        def write(self, data):
            self.last_activity = reactor.seconds()
            self.answered = True
            ProtocolWrapper.write(self, data)

        def writeSequence(self, data):
            self.last_activity = reactor.seconds()
            self.answered = True
            ProtocolWrapper.writeSequence(self, data)

        def between_requests(self, quiet_since):
            return self.answered and not self.requests and self.last_activity < quiet_since

    @implementer(IHalfCloseableProtocol)
    class HalfCloseableActivityWrapper(ActivityWrapper):
        """The wrapper of a protocol that provides ``IHalfCloseableProtocol``: the end of
        the peer's input (and of our output) reaches it instead of closing the connection.
        Provided by the class because ``ProtocolWrapper.makeConnection`` replaces what the
        instance directly provides with the transport's interfaces."""

        def readConnectionLost(self):
            self.last_activity = reactor.seconds()
            IHalfCloseableProtocol(self.wrappedProtocol).readConnectionLost()

        def writeConnectionLost(self):
            IHalfCloseableProtocol(self.wrappedProtocol).writeConnectionLost()

    counts_requests = _count_http_requests(wrapped)

    @implementer(IDrainable)
    class TrackingFactory(WrappingFactory):
        noisy = False
        protocol = ActivityWrapper

        def __init__(self, wrapped):
            WrappingFactory.__init__(self, wrapped)
            self._idle = IdleWaiters()
            self._closer = None

        def buildProtocol(self, addr):
            protocol = self.wrappedFactory.buildProtocol(addr)
            if protocol is None:
                return None
            if IHalfCloseableProtocol.providedBy(protocol):
                return HalfCloseableActivityWrapper(self, protocol)
            return self.protocol(self, protocol)

        @property
        def connections(self):
            return self.protocols

        def unregisterProtocol(self, p):
            WrappingFactory.unregisterProtocol(self, p)
            if not self.protocols and self._idle.pending:
                if self._closer is not None and self._closer.running:
                    self._closer.stop()
                self._idle.fire()

        def end_idle_sessions(self):
            """Close persistent HTTP connections as soon as they are between requests."""
            if self.protocols and self._closer is None:
                from twisted.internet.task import LoopingCall

                self._closer = LoopingCall(self._close_idle)
                self._closer.clock = reactor
                self._closer.start(IDLE_CLOSE_INTERVAL, now=True)

        def when_idle(self):
            return self._idle.wait(not self.protocols)

        def _close_idle(self):
            if not counts_requests:
                return  # not HTTP: nothing tells when a connection is between requests
            quiet_since = reactor.seconds() - IDLE_CLOSE_AFTER
            for p in list(self.protocols):
                if p.between_requests(quiet_since) and p.transport is not None:
                    p.transport.loseConnection()

        def abort_all(self):
            if self._closer is not None and self._closer.running:
                self._closer.stop()
            for p in list(self.protocols):
                transport = p.transport
                if transport is not None:
                    getattr(transport, "abortConnection", transport.loseConnection)()

    return TrackingFactory(wrapped)


def _count_http_requests(factory):
    """For a twisted.web ``Site`` (any factory with a ``requestFactory``): count, on the
    connection's wrapper, the requests in progress (from creation to ``notifyFinish``).
    Returns False for other factories."""
    make_request = getattr(factory, "requestFactory", None)
    if make_request is None:
        return False

    def counting_request_factory(channel, *args, **kwargs):
        request = make_request(channel, *args, **kwargs)
        wrapper = getattr(channel, "transport", None)
        if hasattr(wrapper, "between_requests"):
            wrapper.requests += 1

            def finished(result):
                wrapper.requests -= 1
                return None

            request.notifyFinish().addBoth(finished)
        return request

    factory.requestFactory = counting_request_factory
    return True


@implementer(IPoolTarget)
class FactoryTarget:
    """A pool target made of ``sock`` (bound; listening for streams) and ``make_factory``,
    a callable returning a Twisted ``IProtocolFactory``, or a ``DatagramProtocol`` when
    ``sock`` is a datagram socket.  ``name``: what process titles call it."""

    pool_workers = 4
    graceful_timeout = 30
    worker_timeout = None
    signal_shutdown = signal.SIGTERM
    signal_reload = signal.SIGUSR1

    def __init__(self, sock, make_factory, name=None):
        # Non-blocking for every process sharing it (a flag of the open file): a worker's
        # read loop stops at "nothing more" instead of blocking.
        sock.setblocking(False)
        self.socket = sock
        self.make_factory = make_factory
        self.pool_name = name or getattr(make_factory, "__qualname__", repr(make_factory))
        self.log = logging.getLogger("spoon-server")
        self.pids = None
        # While serving: the reactor, the port, what drains, the serving run.
        self._reactor = self._port = self._drainable = self._serving = None

    @property
    def datagram(self):
        return self.socket.type == socket.SOCK_DGRAM

    def reload(self):
        """A plain factory has no configuration to reload."""

    def serve(self, reactor, shared):
        from spoon.listener import listen_one_by_one

        self._reactor = reactor
        self._serving = ServingRun(reactor)
        if self.datagram:
            self._drainable = NothingToDrain()
            self._port = reactor.adoptDatagramPort(self.socket.fileno(), self.socket.family, self.make_factory())
        else:
            self._drainable = tracking_factory(self.make_factory(), reactor)
            self._port = listen_one_by_one(self.socket, self._drainable, reactor, shared=shared)
        return self._serving.served

    def begin_stop(self, graceful=True):
        if self._serving is None:
            return defer.succeed(None)
        port, self._port = self._port, None
        return self._serving.begin_stop(
            graceful, [port] if port is not None else [], [self._drainable], self.graceful_timeout, self.log
        )

    def _stop_from_signal(self, graceful):
        reactor = self._reactor
        if reactor is not None:
            reactor.callFromThread(self.begin_stop, graceful)

    def signal_handlers(self):
        def graceful(signum, frame):
            self._stop_from_signal(True)

        def fast(signum, frame):
            self._stop_from_signal(False)

        return {
            signal.SIGTERM: graceful,
            self.signal_shutdown: graceful,
            signal.SIGINT: fast,
            signal.SIGQUIT: fast,
            self.signal_reload: lambda signum, frame: None,
        }

    def pool_started(self, pool):
        self.pids = pool.pids

    def pool_stopped(self):
        self.pids = []

    def became_worker(self, number):
        self.pids = None
