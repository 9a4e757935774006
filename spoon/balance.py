"""A listening port for pre-forked workers that share one socket: accept one connection per
reactor iteration, and only once this iteration's work is done.

Twisted's ``tcp.Port`` accepts up to ``numberAccepts`` connections per wake-up (100 at
first, growing by 20 each time it fills).  With several workers on one socket, a worker that
wakes up takes every connection waiting in the queue, then runs their handlers one after the
other, while its siblings sit idle: with a CPU-bound handler the first worker serves most of
the requests and clients wait behind it.

This port takes one connection at a time, and not at the moment the socket becomes readable
but after the other events of the same reactor iteration have been handled (the handlers
that iteration woke up have run).  A worker busy running a handler therefore never holds a
connection that an idle worker could have taken; the idle one, asleep in its own poll on the
same socket, accepts it.  A connection whose handler waits for input costs no CPU and does
not stop this worker from accepting.

It uses only public interfaces: ``IReactorFDSet.addReader`` for the listening socket and
``IReactorSocket.adoptStreamConnection`` for each accepted connection, so the connections
get Twisted's own TCP transport.
"""

import errno
import logging
import os
import socket

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from zope.interface import implementer

_log = logging.getLogger("spoon.balance")

#: accept() errors that mean "out of a resource for now": log, wait a little, try again.
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: accept() errors that concern only the one connection being accepted.
_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
RESOURCE_RETRY_DELAY = 0.1


@implementer(IListeningPort, IReadDescriptor)
class OneByOnePort:
    """Serve ``factory`` on the already listening stream socket ``sock`` (not closed here;
    the port works on its own duplicate of the descriptor)."""

    def __init__(self, sock, factory, reactor):
        self.factory = factory
        self.reactor = reactor
        self.family = sock.family
        self.socket = sock.dup()
        self.socket.setblocking(False)
        self._listening = False
        self._accept_scheduled = False
        self._reading = False

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
        finally:
            self.socket.close()
            self.factory.doStop()
        return defer.succeed(None)

    loseConnection = stopListening

    def getHost(self):
        from twisted.internet.address import IPv4Address, IPv6Address

        addr = self.socket.getsockname()
        if self.family == socket.AF_INET6:
            return IPv6Address("TCP", addr[0], addr[1], addr[2], addr[3])
        return IPv4Address("TCP", addr[0], addr[1])

    # -- IReadDescriptor ----------------------------------------------------------------

    def fileno(self):
        return self.socket.fileno() if self._listening else -1

    def logPrefix(self):
        return "OneByOnePort"

    def doRead(self):
        # Not now: first let the reactor finish this iteration (the handlers it woke up may
        # keep this process busy for a while); an idle sibling worker may take the
        # connection meanwhile.
        self._stop_reading()
        if not self._accept_scheduled:
            self._accept_scheduled = True
            self.reactor.callLater(0, self._accept_later)

    def connectionLost(self, reason):
        self._reading = False

    # -- internals ----------------------------------------------------------------------

    def _start_reading(self):
        if self._listening and not self._reading:
            self._reading = True
            self.reactor.addReader(self)

    def _stop_reading(self):
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def _accept_later(self):
        self._accept_scheduled = False
        if not self._listening:
            return
        try:
            self._accept_one()
        except OSError as e:
            _log.error("accept() failed: %s; retrying in %ss", e, RESOURCE_RETRY_DELAY)
            self.reactor.callLater(RESOURCE_RETRY_DELAY, self._start_reading)
            return
        self._start_reading()

    def _accept_one(self):
        """Accept one waiting connection and hand it to the factory; False if none waits."""
        while True:
            try:
                conn, _ = self.socket.accept()
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno in _SKIP:
                    continue
                if e.errno in _TRANSIENT:
                    raise
                raise
            break
        try:
            conn.setblocking(False)
            self.reactor.adoptStreamConnection(conn.fileno(), self.family, self.factory)
        except Exception:
            _log.exception("could not start serving an accepted connection")
        finally:
            # adoptStreamConnection works on its own duplicate of the descriptor.
            conn.close()
        return True


def listen_one_by_one(sock, factory, reactor):
    """Start a :class:`OneByOnePort` for ``factory`` on ``sock`` and return it."""
    port = OneByOnePort(sock, factory, reactor)
    port.startListening()
    return port
