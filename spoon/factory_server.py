"""Any Twisted factory, pre-forked: a server-like object around a plain
``IProtocolFactory`` (e.g. a ``twisted.web.server.Site``) or ``DatagramProtocol``, so that
the supervisor and workers of :mod:`spoon.prefork` serve it as they serve a Spoon.

What a worker's graceful stop needs from its factory (``connections``, ``when_idle``,
``abort_all``) comes from a ``WrappingFactory`` that tracks the connections.  Its wrapper
passes half-close through: Twisted's transport asks its own protocol (the wrapper) whether it
provides ``IHalfCloseableProtocol``, so a wrapper that did not would turn a client's
``shutdown(SHUT_WR)`` into a full close of a protocol that wants ``readConnectionLost``.  For a Site it
also counts the requests in progress on each connection, so that a stop can close the
persistent connections that sit between requests instead of waiting for the browser.
"""

import socket

from spoon.balance import listen_one_by_one
from spoon.server import _SpoonMixIn, using_socket

__all__ = ["FactoryServer", "DatagramFactoryServer"]


#: While a pool of a plain HTTP factory (a twisted.web Site) drains, persistent
#: connections that sit between requests are closed (a browser would otherwise hold the
#: stop for the whole grace period): checked this often, once quiet for
#: IDLE_CLOSE_AFTER seconds.
IDLE_CLOSE_INTERVAL = 0.2
IDLE_CLOSE_AFTER = 0.5


def _tracking_factory(wrapped, reactor=None):
    """Wrap a plain Twisted factory so that a graceful stop can wait for its connections
    (the interface the server's stop uses: ``connections``, ``when_idle``, ``abort_all``)."""
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
    from zope.interface import implementer

    if reactor is None:
        from twisted.internet import reactor

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

    class TrackingFactory(WrappingFactory):
        noisy = False
        protocol = ActivityWrapper

        def __init__(self, wrapped):
            WrappingFactory.__init__(self, wrapped)
            self._idle_callbacks = []
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
            if not self.protocols and self._idle_callbacks:
                if self._closer is not None and self._closer.running:
                    self._closer.stop()
                callbacks, self._idle_callbacks = self._idle_callbacks, []
                for cb in callbacks:
                    cb()

        def when_idle(self, callback):
            """Called once the stop has begun: also close persistent HTTP connections as
            soon as they are between requests."""
            if not self.protocols:
                callback()
                return
            self._idle_callbacks.append(callback)
            if self._closer is None:
                from twisted.internet.task import LoopingCall

                self._closer = LoopingCall(self._close_idle)
                self._closer.clock = reactor
                self._closer.start(IDLE_CLOSE_INTERVAL, now=True)

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


class _DatagramStop:
    """What a graceful stop needs from a plain datagram protocol: nothing to wait for."""

    connections = ()

    def __init__(self, protocol):
        self.protocol = protocol

    def when_idle(self, callback):
        callback()

    def abort_all(self):
        pass


class FactoryServer(_SpoonMixIn):
    """A pool target made from a callable returning a plain Twisted ``IProtocolFactory``
    (e.g. a ``twisted.web.server.Site``), so that the same supervisor and workers serve it.

    ``make_factory()`` runs in each worker, once its reactor is installed (a Site built in
    the supervisor would import and install the reactor there).  ``sock`` is the bound,
    listening socket.
    """

    prefork = 4

    def __init__(self, sock, make_factory):
        self.make_factory = make_factory
        with using_socket(sock):
            _SpoonMixIn.__init__(self, sock.getsockname())

    def protocol_factory(self, reactor=None):
        return _tracking_factory(self.make_factory(), reactor)

    def _listen(self, reactor):
        self._factory = self.protocol_factory(reactor)
        self._port = listen_one_by_one(self.socket, self._factory, reactor)


class DatagramFactoryServer(FactoryServer):
    """The same for a callable returning a ``DatagramProtocol``."""

    socket_type = socket.SOCK_DGRAM

    def _listen(self, reactor):
        protocol = self.make_factory()
        self._factory = _DatagramStop(protocol)
        self._port = reactor.adoptDatagramPort(
            self.socket.fileno(), self.address_family, protocol
        )
