"""A listening port for pre-forked workers that share one socket: accept one connection per
reactor iteration, and only once this iteration's work is done.

Twisted's ``tcp.Port`` accepts up to ``numberAccepts`` connections per wake-up (100 at
first, growing by 20 each time it fills).  With several workers on one socket, a worker that
wakes up takes every connection waiting in the queue, then runs their handlers one after the
other, while its siblings sit idle: with a CPU-bound handler the first worker serves most of
the requests and clients wait behind it.

This port accepts a connection only when this worker is not busy with another one.  It
keeps accepting in one wake-up only while each accepted connection is done with at once
(the lean transport reads what already waits and runs the handler before returning): the
worker was busy meanwhile, but a sibling that was idle had its own chance to take the next
connection, as it sleeps in its own poll on the same socket.  At the first connection left
open (its handler waits for input), it stops and polls again.  And when the worker has open
connections at wake-up, some of them may have become readable in the same iteration, and
their handlers may keep it busy: it accepts only after them, from a delayed call.  A
connection whose handler waits for input costs no CPU and does not stop this worker from
accepting.

With Twisted's own transport (any other factory) the handler never runs at accept time, so
that port takes exactly one connection per wake-up.

A single process (``shared=False``: ``serve_forever()`` of a Spoon, ``twistd spoon -s 1``)
has no sibling to leave a connection to, so there the port simply accepts what waits, up to
``accepts_per_read`` per wake-up.

It uses only public interfaces: ``IReactorFDSet.addReader`` for the listening socket; each
accepted connection is handed to a ``serve(sock, peer)`` callable: spoon's lean transport
for Gulp servers (:func:`serve_gulp`), ``IReactorSocket.adoptStreamConnection`` (Twisted's
own TCP transport) for any other factory (:func:`serve_twisted`).
"""

import errno
import logging
import os
import socket

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from zope.interface import implementer

from spoon import errorlog
from spoon.transport import ReactorReader

_log = logging.getLogger("spoon.listener")

#: accept() errors that concern only the one connection being accepted.
_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
#: Pause of the accepts after an accept() failed for lack of resources (descriptors,
#: memory); doubled while it lasts, up to RESOURCE_RETRY_MAX.
RESOURCE_RETRY_DELAY = 0.1
RESOURCE_RETRY_MAX = 1.0


@implementer(IListeningPort, IReadDescriptor)
class OneByOnePort(ReactorReader):
    """Serve ``factory`` on the already listening stream socket ``sock`` (not closed here;
    the port works on its own duplicate of the descriptor).  ``serve(conn, peer)`` starts
    serving one accepted socket (in blocking mode: the serving transport does not block
    on it, see :meth:`_accept_one`); default :func:`serve_twisted`."""

    #: Upper bound of connections accepted in one wake-up.
    accepts_per_read = 64

    def __init__(self, sock, factory, reactor, serve=None, shared=True):
        #: Other processes accept on the same socket.  When False (a single process)
        #: there is nobody to leave a connection to: every wake-up accepts at once, up
        #: to ``accepts_per_read``, without the one-by-one policy and its delayed call.
        self.shared = shared
        self.factory = factory
        self.reactor = reactor
        self.family = sock.family
        self.serve = serve or (lambda conn, peer: serve_twisted(conn, peer, factory, reactor))
        self.socket = ListeningSocket(sock)
        self.socket.setblocking(False)
        self._listening = False
        self._accept_scheduled = False
        self._reading = False
        self._retry_delay = RESOURCE_RETRY_DELAY
        self._accept_errors = errorlog.RepeatLimiter(
            reactor, self._report_accept_errors, interval=1.0
        )

    # -- IListeningPort -----------------------------------------------------------------

    def startListening(self):
        if self._listening:
            return
        self._listening = True
        self.factory.doStart()
        self._start_reading()

    def stopListening(self):
        """Stop accepting.  The connections already waiting in the queue at this moment are
        accepted first (a pool stopping as a whole refuses new SYNs before this, so the
        queue drains to empty and nobody whose connection the kernel completed is reset)."""
        if not self._listening:
            return defer.succeed(None)
        self._listening = False
        self._stop_reading()
        try:
            while self._accept_one():
                pass
        except OSError as e:
            _log.error("accept() failed while draining the queue: %s", e)
        finally:
            self.socket.close()
            self.factory.doStop()
        return defer.succeed(None)

    loseConnection = stopListening

    def getHost(self):
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        addr = self.socket.getsockname()
        if self.family == socket.AF_UNIX:
            return UNIXAddress(addr or None)
        if self.family == socket.AF_INET6:
            return IPv6Address("TCP", addr[0], addr[1], addr[2], addr[3])
        return IPv4Address("TCP", addr[0], addr[1])

    # -- IReadDescriptor ----------------------------------------------------------------

    def fileno(self):
        return self.socket.fileno() if self._listening else -1

    def logPrefix(self):
        return "OneByOnePort"

    def doRead(self):
        if not self.shared:
            self._accept_all()
            return
        if self._accept_scheduled:
            return
        if not self.factory.connections:
            # Nothing else of ours can be ready in this iteration: accept at once.
            self._accept_batch()
            return
        # Some of our connections may have become readable in this same iteration, and
        # their handlers may keep this process busy for a while: accept only after them
        # (an idle sibling worker may take the connection meanwhile).  The socket stays
        # registered: the next poll comes after the delayed call has run.
        self._accept_scheduled = True
        self.reactor.callLater(0, self._accept_later)

    def connectionLost(self, reason):
        self._reading = False

    # -- internals ----------------------------------------------------------------------

    def _start_reading(self):
        if self._listening:
            ReactorReader._start_reading(self)

    def _accept_later(self):
        self._accept_scheduled = False
        if self._listening:
            self._accept_batch()

    def _accept_batch(self):
        """Accept and serve connections while each one is done with at once (the lean
        transport reads what waits and runs the handler before returning): this worker
        was not busy meanwhile, so it took nothing an idle sibling could have had.  Stop
        at the first connection left open (its handler waits for input or is paused):
        the next one is for the next poll."""
        for _ in range(self.accepts_per_read):
            if not self._listening or not self._accept_now():
                return
            if self.factory.connections:
                return

    def _accept_all(self):
        """Accept whatever waits (up to ``accepts_per_read``): nobody else would."""
        for _ in range(self.accepts_per_read):
            if not self._listening or not self._accept_now():
                return

    def _accept_now(self):
        try:
            accepted = self._accept_one()
        except OSError as e:
            # Out of descriptors or memory: pause instead of spinning on a readable
            # socket, longer while it lasts; one log line a second at most.
            delay = self._retry_delay
            self._retry_delay = min(RESOURCE_RETRY_MAX, delay * 2)
            if self._accept_errors.admit(e.errno, e):
                _log.error("accept() failed: %s; pausing accepts for %ss", e, delay)
            self._stop_reading()
            self.reactor.callLater(delay, self._start_reading)
            return False
        self._retry_delay = RESOURCE_RETRY_DELAY
        return accepted

    def _report_accept_errors(self, count, interval, last):
        _log.error(
            "accept() failed: %s (%s)", last, errorlog.repeated(count, interval),
        )

    def _accept_one(self):
        """Accept one waiting connection and hand it to the factory; False if none waits."""
        while True:
            try:
                conn, peer = self.socket.accept()
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno in _SKIP:
                    continue
                raise  # out of descriptors or memory: the caller waits a little
            break
        # The accepted socket is left in blocking mode (accept4 is called without
        # SOCK_NONBLOCK and setblocking would cost an ioctl per connection): the lean
        # transport passes MSG_DONTWAIT on each call, Twisted's own transport switches
        # its socket to non-blocking itself.
        try:
            self.serve(conn, peer)
        except Exception:
            _log.exception("could not start serving a connection from %s", peer)
            conn.close()
        return True


class ListeningSocket(socket.socket):
    """A duplicate of a listening stream socket whose ``accept()`` skips the per-call
    work of ``socket.socket.accept`` this port does not need: reading ``family`` and
    ``type`` back through their enum conversions (four Python calls each) and the
    default-timeout checks.  It builds the accepted socket from the descriptor and
    address that the base class's own ``_accept()`` (what ``socket.accept`` itself is
    made of) returns, with the family and type known at construction.

    The accepted socket is a plain ``socket.SocketType`` (the C socket object that
    ``socket.socket`` extends in Python): the same methods, without a Python-level
    ``__init__`` and ``close`` per connection, and 40 bytes smaller for as long as the
    connection lasts."""

    def __init__(self, sock):
        self._accept_family = sock.family
        super().__init__(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))

    def accept(self):
        fd, peer = self._accept()
        conn = socket.SocketType(self._accept_family, socket.SOCK_STREAM, 0, fd)
        if socket.getdefaulttimeout() is not None:
            # A process-wide default timeout would make every recv/send wait for the
            # socket to be ready first, MSG_DONTWAIT or not: undo it (rare: an ioctl).
            conn.settimeout(None)
        return conn, peer


def serve_twisted(conn, peer, factory, reactor):
    """Serve an accepted socket on Twisted's own TCP transport (any factory)."""
    try:
        reactor.adoptStreamConnection(conn.fileno(), conn.family, factory)
    finally:
        # adoptStreamConnection works on its own duplicate of the descriptor.
        conn.close()


def serve_gulp(factory, reactor):
    """A ``serve`` callable for Gulp factories: spoon's lean transport."""
    from spoon import transport

    def serve(conn, peer):
        transport.serve_accepted(conn, peer, factory, reactor)

    return serve


def listen_one_by_one(sock, factory, reactor, serve=None, shared=True):
    """Start a :class:`OneByOnePort` for ``factory`` on ``sock`` and return it."""
    port = OneByOnePort(sock, factory, reactor, serve, shared)
    port.startListening()
    return port
