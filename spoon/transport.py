"""A lean TCP transport for Gulp connections, registered through ``IReactorFDSet``.

Twisted's ``tcp.Server`` is general: every write waits for the next reactor iteration
(``startWriting`` then ``doWrite``), closing waits for another one, and every accepted
socket is registered with epoll before its first byte is read.  For the short
request/reply exchanges spoon servers mostly see, those iterations are most of the cost.

This transport does the same job with fewer steps, using only public interfaces:

- right after accept it reads what is already waiting (a client that spoke first, with
  ``TCP_DEFER_ACCEPT`` nearly always) and registers with the reactor only if it must wait;
- a write with nothing buffered goes straight to the socket; only the remainder is
  buffered and written when the reactor says the socket is writable;
- ``loseConnection`` with nothing buffered closes at once.

Connections reach it through :mod:`spoon.listener`'s listening port (``serve_gulp``).
Everything else (TLS, the PROXY protocol, other endpoints, plain Twisted factories) keeps
Twisted's own transports: ``GulpProtocol`` works on either.
"""

import errno
import socket

from twisted.internet import address, error
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReadWriteDescriptor,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

#: Bytes asked of ``recv`` per read.
READ_SIZE = 65536
#: Buffered output above which a registered streaming producer is paused (Twisted's value).
BUFFER_SIZE = 65536
#: Bytes given to one ``send`` call at most.
SEND_LIMIT = 128 * 1024

_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS)
#: Every recv and send passes this flag: the socket itself may stay in blocking mode (no
#: ``ioctl(FIONBIO)`` per accepted connection) and no call of ours ever waits.
_DONTWAIT = socket.MSG_DONTWAIT


class IDeliversWaitingInput(Interface):
    """A transport that, right after ``connectionMade``, delivers the input already waiting
    on its socket (``dataReceived``, ``readConnectionLost``), then calls the protocol's
    ``input_checked()``.

    A protocol that would start work at ``connectionMade`` (GulpProtocol: the handler's
    greenlet) can wait for that call instead: a request that was already there is then
    in its buffer when the work starts, and it runs to completion without suspending for
    input and being woken again.
    """


def _lost(exc=None):
    return Failure(error.ConnectionLost(str(exc) if exc else "Connection lost"))


class ReactorReader:
    """Registering a descriptor (``self``, with ``self.reactor``) for reading once, and
    unregistering it once: the bookkeeping both spoon descriptors share."""

    __slots__ = ()  # LeanConnection has slots only
    _reading = False

    def _start_reading(self):
        if not self._reading:
            self._reading = True
            self.reactor.addReader(self)

    def _stop_reading(self):
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)


@implementer(
    ITCPTransport,
    IReadWriteDescriptor,
    IConsumer,
    IPushProducer,
    ISystemHandle,
    IDeliversWaitingInput,
)
class LeanConnection(ReactorReader):
    """One accepted stream socket serving ``protocol`` (a ``GulpProtocol``, or any protocol
    with an ``input_checked()`` method: see :class:`IDeliversWaitingInput`).

    ``peer`` is the address ``accept()`` returned; the Twisted address objects are built
    only when asked for.

    One lives as long as its connection, idle ones included: its attributes are slots,
    its output list is made only when a write must wait, and at close it lets go of its
    protocol, so that the two are freed by reference counting alone.
    """

    __slots__ = (
        "socket",
        "peer_tuple",
        "protocol",
        "reactor",
        "disconnecting",
        "connected",
        "producer",
        "_out",
        "_out_len",
        "_reading",
        "_writing",
        "_read_closed",
        "_read_stopped",
        "_write_closing",
        "_producer_paused",
        "__weakref__",
    )

    def __init__(self, sock, peer, protocol, reactor):
        self.socket = sock
        self.peer_tuple = peer
        self.protocol = protocol
        self.reactor = reactor
        self.disconnecting = False
        self.connected = True
        self.producer = None
        self._out = ()  # chunks waiting to be sent: a list once there are some
        self._out_len = 0
        self._reading = False
        self._writing = False
        self._read_closed = False  # EOF seen or reading shut down
        self._read_stopped = False  # paused by the protocol (flow control)
        self._write_closing = False  # half-close once the buffer is written
        self._producer_paused = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        """Connect the protocol, read whatever already waits on the socket, tell the
        protocol so (:class:`IDeliversWaitingInput`), and wait for more only if needed."""
        protocol = self.protocol
        protocol.makeConnection(self)
        while self.connected and not self._read_closed and not self._read_stopped:
            if not self._read_once():
                break
        if self.connected:
            protocol.input_checked()
        if self.connected and not self._read_closed and not self._read_stopped:
            self._start_reading()

    def _read_once(self):
        """One ``recv``: deliver data or EOF. Returns True if something was delivered."""
        try:
            data = self.socket.recv(READ_SIZE, _DONTWAIT)
        except OSError as e:
            if e.errno in _WOULD_BLOCK:
                return False
            self._close_now(_lost(e))
            return False
        if data:
            self.protocol.dataReceived(data)
            return True
        self._read_closed = True
        self._stop_reading()
        self.protocol.readConnectionLost()
        return False


    def _close_now(self, reason):
        if not self.connected:
            return
        self.connected = False
        self.disconnecting = False
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)
        self._out = ()
        self._out_len = 0
        try:
            self.socket.close()
        except OSError:
            pass
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        # The protocol keeps its transport (a handler may still ask it for addresses);
        # this side lets go, so no reference cycle outlives the connection.
        protocol, self.protocol = self.protocol, None
        protocol.connectionLost(reason)

    # -- IReadDescriptor / IWriteDescriptor (called by the reactor) ------------------------

    def fileno(self):
        return self.socket.fileno() if self.connected else -1

    def logPrefix(self):
        return "spoon.transport"

    def doRead(self):
        self._read_once()

    def doWrite(self):
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.socket.send(data[:SEND_LIMIT] if len(data) > SEND_LIMIT else data,
                                    _DONTWAIT)
        except OSError as e:
            if e.errno in _WOULD_BLOCK:
                self._out = [data]
                return None
            self._close_now(_lost(e))
            return None
        rest = data[sent:] if sent else data
        if rest:
            self._out = [rest]
            self._out_len = len(rest)
        else:
            self._out = ()
            self._out_len = 0
            self._writing = False
            self.reactor.removeWriter(self)
            self._drained()
        if self._producer_paused and self._out_len <= BUFFER_SIZE:
            self._producer_paused = False
            self.producer.resumeProducing()
        return None

    def _drained(self):
        if self.disconnecting:
            self._close_now(connectionDone)
        elif self._write_closing:
            self._write_closing = False
            self._shutdown_write()

    def connectionLost(self, reason):
        """The reactor gave up on this descriptor (e.g. it was closed under it)."""
        self._close_now(reason)

    # -- ITransport -------------------------------------------------------------------------

    def write(self, data):
        if not self.connected or self.disconnecting or self._write_closing:
            return
        if not data:
            return
        if not self._out:
            try:
                sent = self.socket.send(data, _DONTWAIT)
            except OSError as e:
                if e.errno not in _WOULD_BLOCK:
                    self._close_now(_lost(e))
                    return
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._out = [data]
        else:
            self._out.append(data)
        self._out_len += len(data)
        if not self._writing:
            self._writing = True
            self.reactor.addWriter(self)
        if self.producer is not None and self._out_len > BUFFER_SIZE and not self._producer_paused:
            self._producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data):
        for chunk in data:
            self.write(chunk)

    def loseConnection(self):
        if not self.connected or self.disconnecting:
            return
        self._stop_reading()
        if self._out:
            self.disconnecting = True
        else:
            self._close_now(connectionDone)

    def abortConnection(self):
        self._close_now(Failure(error.ConnectionAborted()))

    def loseWriteConnection(self):
        if not self.connected:
            return
        if self._out:
            self._write_closing = True
        else:
            self._shutdown_write()

    def _shutdown_write(self):
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.protocol.writeConnectionLost()

    def _address(self, addr):
        if self.socket.family == socket.AF_UNIX:
            # accept() gives '' for an unnamed client, as socketserver passes it on.
            return address.UNIXAddress(addr or None)
        if self.socket.family == socket.AF_INET6:
            return address.IPv6Address("TCP", *addr)
        return address.IPv4Address("TCP", *addr[:2])

    def getPeer(self):
        return self._address(self.peer_tuple)

    def getHost(self):
        return self._address(self.socket.getsockname())

    def getHandle(self):
        return self.socket

    # -- ITCPTransport extras -----------------------------------------------------------------

    def getTcpNoDelay(self):
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)

    def getTcpKeepAlive(self):
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, enabled)

    # -- IPushProducer: the protocol pausing its input -------------------------------------

    def pauseProducing(self):
        self._read_stopped = True
        self._stop_reading()

    def resumeProducing(self):
        self._read_stopped = False
        if self.connected and not self._read_closed and not self.disconnecting:
            self._start_reading()

    def stopReading(self):
        self._read_closed = True
        self._stop_reading()

    def stopProducing(self):
        self.loseConnection()

    # -- IConsumer: the protocol as the producer of our output -----------------------------

    def registerProducer(self, producer, streaming):
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self):
        self.producer = None
        self._producer_paused = False


def serve_accepted(sock, peer, factory, reactor):
    """Serve a freshly accepted socket with ``factory``'s (a GulpFactory) protocol on a
    LeanConnection.

    ``sock`` may be in blocking mode: every recv and send of the transport passes
    ``MSG_DONTWAIT``.  Returns the transport, or None if the factory refused the
    connection.
    """
    # GulpFactory.buildProtocol ignores its address argument: don't build one.
    protocol = factory.buildProtocol(None)
    if protocol is None:
        sock.close()
        return None
    transport = LeanConnection(sock, peer, protocol, reactor)
    transport.start()
    return transport
