"""The line adapter: run blocking-style Gulp handlers on Twisted transports, without threads.

Each stream connection runs its handler inside a greenlet, in the reactor's own thread.
Bytes from ``dataReceived`` go into a buffer.  A read the buffer can satisfy returns at
once; a read that cannot switches back to the reactor (the "hub") and resumes when data,
EOF or a timeout arrives.  Writes go to the transport; while the transport asks its
producer to pause, the writing handler is suspended.  Input is bounded too: past a
high-water mark the transport stops reading until the handler consumes what it has.

So a slow or idle client costs one suspended greenlet, never a process or a thread, and a
handler can also wait for a Twisted ``Deferred`` (:func:`wait`) without blocking others.
"""

import errno
import logging
import os
import socket

import greenlet
from twisted.internet import error
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    ILoggingContext,
    IProtocol,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from spoon.lifecycle import IdleWaiters, IDrainable, NothingToDrain
from spoon.peercert import peer_certificate
from spoon.pool.stats import COUNTERS
from spoon.transport import IDeliversWaitingInput

__all__ = [
    "GulpFactory",
    "GulpProtocol",
    "GulpDatagramProtocol",
    "IConnectionPreface",
    "LineTooLong",
    "GreenSocket",
    "GreenReader",
    "GreenWriter",
    "wait",
]

#: Default upper bound on one line returned by ``rfile.readline()`` (handler attribute
#: ``max_line_length``).
DEFAULT_MAX_LINE_LENGTH = 64 * 1024
#: Default amount of unread input after which the transport stops reading (handler
#: attribute ``read_high_water``).
DEFAULT_READ_HIGH_WATER = 1024 * 1024
#: Writes are handed to the transport in slices of at most this size, so that a huge
#: ``wfile.write`` is paced by the client instead of being copied into one buffer.
WRITE_CHUNK = 64 * 1024
#: How many idle greenlets a pool keeps for reuse.
POOL_MAX_IDLE = 256


class LineTooLong(ValueError):
    """``readline()`` found no end of line within the handler's ``max_line_length``."""


class IConnectionPreface(Interface):
    """Something a stream connection must read before its handler may start (the PROXY
    protocol header, :mod:`spoon.proxy`): it may change who the client is, and the
    handler (and ``verify_request``) run only once it is done."""

    def begin(transport, client_address, done):
        """A new connection: return an object with ``data_received(data)``, ``eof()`` and
        ``cancel()`` that reads the preface from the bytes it is given and then calls
        ``done(client_address, rest)`` (``rest``: the bytes that followed it); or None
        when the connection is refused at once.  A refused connection is closed here."""


def _current_hub():
    """The greenlet that handlers switch back to: the one running the reactor."""
    return greenlet.getcurrent()


class GreenletPool:
    """Reusable greenlets for running jobs; creating a greenlet per connection costs more
    than switching into an idle one."""

    def __init__(self, hub, max_idle=POOL_MAX_IDLE):
        self.hub = hub
        self.max_idle = max_idle
        self.idle = []
        self._first = None  # the job a new greenlet starts with

    def spawn(self, job, arg):
        """Run ``job(arg)`` in a pooled greenlet until it first suspends or returns.

        Must be called from the hub.  One argument, called as ``job(arg)``: a call with
        ``*args`` would go through C (``PyObject_Call``) and start another C-level
        interpreter frame, which a suspended greenlet keeps a copy of (about 400 bytes
        per idle connection); a plain call of a Python function does not.
        """
        if self.idle:
            self.idle.pop().switch(job, arg)
            return
        # A new greenlet's first switch passes no arguments: greenlet holds the
        # arguments of a greenlet's run for as long as that run lasts (here: for the
        # pooled greenlet's life), which would keep the first job's argument alive.
        self._first = (job, arg)
        greenlet.greenlet(self._loop, parent=self.hub).switch()

    def _loop(self):
        job, arg = self._first
        self._first = None
        idle = self.idle
        hub = self.hub
        while True:
            job(arg)
            job = arg = None
            if len(idle) >= self.max_idle:
                return
            idle.append(greenlet.getcurrent())
            job, arg = hub.switch()


def wait(deferred, reactor=None):
    """Suspend the calling handler until ``deferred`` fires; return its result or raise
    its failure.  Other connections of the process are served meanwhile.

    ``reactor`` is used only when the Deferred fires from another handler's greenlet: the
    resumption is then scheduled on the reactor instead of nesting greenlets.
    """
    current = greenlet.getcurrent()
    hub = current.parent
    if hub is None:
        raise RuntimeError("wait() must be called from a handler, not from the reactor")
    outcome = []

    def fired(result):
        outcome.append(result)
        if waiting:
            if greenlet.getcurrent() is hub:
                current.switch()
            else:
                _reactor(reactor).callLater(0, current.switch)
        return None

    waiting = False
    deferred.addBoth(fired)
    if not outcome:
        waiting = True
        try:
            hub.switch()
        finally:
            waiting = False
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor
    return reactor


@implementer(IProtocol, ILoggingContext, IHalfCloseableProtocol, IPushProducer)
class GulpProtocol:
    """One stream connection: its input buffer, its flow control and its handler greenlet.

    Handlers never see this object directly; they use :class:`GreenSocket` (``request``),
    :class:`GreenReader` (``rfile``) and :class:`GreenWriter` (``wfile``).

    A Twisted protocol (``IProtocol``) without ``twisted.internet.protocol.Protocol``'s
    instance dictionary: one of these lives as long as its connection, idle ones
    included, so its attributes are slots.
    """

    __slots__ = (
        "factory",
        "transport",
        "connected",
        "client_address",
        "_buf",
        "_scan",
        "_eof",
        "_lost",
        "_closed",
        "_reading_paused",
        "_writes_paused",
        "_producer_registered",
        "_waiting",
        "_greenlet",
        "_timeout",
        "_high_water",
        "_max_line",
        "_started",
        "_between_requests",
        "_took",
        "_preface",
        "__weakref__",
    )

    def __init__(self):
        self.factory = None
        self.transport = None
        self.connected = 0
        self.client_address = None
        self._buf = bytearray()
        self._scan = 0  # how far readline has already looked for b"\n"
        self._eof = False  # no more input will come
        self._lost = None  # the exception a read past the buffer raises: input was cut
        self._closed = False  # the connection is gone
        self._reading_paused = False  # we paused the transport (input high-water)
        self._writes_paused = False  # the transport paused us (output buffer full)
        self._producer_registered = False
        self._waiting = None  # "read" or "write" while the handler is suspended on I/O
        self._greenlet = None
        self._timeout = None  # seconds a read or write may wait (the handler's timeout)
        self._high_water = DEFAULT_READ_HIGH_WATER
        self._max_line = DEFAULT_MAX_LINE_LENGTH
        self._started = False  # the handler greenlet has been started
        self._between_requests = False  # suspended in readline() with nothing buffered
        self._took = False  # the handler has read something: a request was under way
        self._preface = None  # reading what comes before the client's bytes (IConnectionPreface)

    def makeConnection(self, transport):
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def logPrefix(self):
        return "GulpProtocol"

    # -- Twisted side -------------------------------------------------------------------

    def connectionMade(self):
        factory = self.factory
        klass = factory.server.RequestHandlerClass
        self._high_water = getattr(klass, "read_high_water", DEFAULT_READ_HIGH_WATER)
        self._max_line = getattr(klass, "max_line_length", DEFAULT_MAX_LINE_LENGTH)
        addr = getattr(self.transport, "peer_tuple", None)
        if addr is None:
            peer = self.transport.getPeer()
            if getattr(peer, "host", None) is None:
                # Not an IP endpoint (a UNIX socket): what accept() gives, as socketserver.
                addr = getattr(peer, "name", None) or ""
            elif getattr(peer, "flowInfo", None) is not None:
                addr = (peer.host, peer.port, peer.flowInfo, peer.scopeID)
            else:
                addr = (peer.host, peer.port)
        self.client_address = addr
        factory.connection_started(self)
        if factory.preface is not None:
            # The handler starts once the preface is read (_preface_done).
            self._preface = factory.preface.begin(self.transport, addr, self._preface_done)
            if self._preface is None:
                self._started = True  # refused and closed: no handler, ever
            return
        if not factory.lazy_start and not IDeliversWaitingInput.providedBy(self.transport):
            self._start_handler()

    def input_checked(self):
        """The transport delivered the input that waited at accept (IDeliversWaitingInput):
        start the handler now if that input did not (a request already there is in the
        buffer: the handler runs without suspending for it).  Behind a preface (PROXY
        header) the handler starts once the preface is read instead."""
        if self._preface is not None:
            return
        if not self._started and not self.factory.lazy_start and not self._closed:
            self._start_handler()

    def _preface_done(self, client_address, rest):
        self._preface = None
        self.client_address = client_address
        if rest:
            self._buf += rest
        if rest or not self.factory.lazy_start:
            self._start_handler()

    def dataReceived(self, data):
        if self._preface is not None:
            self._preface.data_received(data)
            return
        buf = self._buf
        buf += data
        COUNTERS.bytes_in += len(data)
        if self._waiting == "read":
            self._wake()
        elif not self._started:
            self._start_handler()
        elif len(buf) > self._high_water and not self._reading_paused and not self._eof:
            self._reading_paused = True
            self.transport.pauseProducing()

    def readConnectionLost(self):
        if self._preface is not None:
            self._preface.eof()
            return
        self._eof = True
        if self._waiting == "read":
            self._wake()
        elif not self._started:
            self._start_handler()

    def writeConnectionLost(self):
        """The write side was half-closed; nothing to do, writes will fail."""

    def connectionLost(self, reason=None):
        if (
            not self._eof
            and reason is not None
            and not isinstance(reason.value, error.ConnectionDone)
        ):
            # Gone without an end of input (a reset, or aborted): what the buffer holds
            # may be a cut message, and a read that needs more must say so, as a socket
            # does, instead of passing the truncated input off as complete.  (isinstance
            # on the value: Failure.check costs more than the rest of a short request.)
            if isinstance(reason.value, error.ConnectionAborted):
                # Aborted by our own fast stop.  A handler waiting for its next request
                # lost nothing: that session simply ends (EOF, no log line per idle
                # session); one that was mid-request hears that it was cut.
                if not (self._between_requests and not self._buf):
                    self._lost = ConnectionAbortedError(errno.ECONNABORTED, "Connection aborted")
            else:
                self._lost = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        if self._preface is not None:
            self._preface.cancel()
            self._preface = None
        self._eof = True
        self._closed = True
        self.factory.connection_ended(self)
        if self._waiting is not None:
            self._wake()

    # IPushProducer: the transport tells us when its output buffer is full or drained.
    def pauseProducing(self):
        self._writes_paused = True

    def resumeProducing(self):
        self._writes_paused = False
        if self._waiting == "write":
            self._wake()

    def stopProducing(self):
        self._writes_paused = False
        self._closed = True
        if self._waiting == "write":
            self._wake()

    # -- handler greenlet -----------------------------------------------------------------

    def _start_handler(self):
        self._started = True
        self.factory.pool.spawn(GulpProtocol._run_handler, self)

    def _run_handler(self):
        """Body of the handler greenlet: socketserver's request sequence for one
        connection (:func:`serve_request`).  The handler's ``request`` (a
        :class:`GreenSocket`) is made here and held only by the handler's side: it points
        at this protocol, nothing here points back, so a finished connection is freed by
        reference counting alone."""
        factory = self.factory
        factory.active_handlers += 1
        self._greenlet = greenlet.getcurrent()
        try:
            serve_request(factory.server, GreenSocket(self), self.client_address, factory.log)
        finally:
            factory.active_handlers -= 1
            self._greenlet = None
            if not self._closed:  # socketserver's shutdown_request has closed it, usually
                self._close()

    def _close(self):
        """socketserver's shutdown_request: flush what was written, then close."""
        if self._closed:
            return
        transport = self.transport
        if self._producer_registered:
            # A paused producer would keep loseConnection from ever completing.
            self._producer_registered = False
            transport.unregisterProducer()
        transport.loseConnection()

    def _wake(self):
        """Resume the suspended handler (called from the hub or scheduled onto it)."""
        g = self._greenlet
        if g is None:
            return
        if greenlet.getcurrent() is self.factory.pool.hub:
            g.switch()
        else:
            self.factory.reactor.callLater(0, self._wake_if_waiting, g)

    def _wake_if_waiting(self, g):
        if self._waiting is not None and self._greenlet is g:
            g.switch()

    def _suspend(self, why):
        """Switch to the hub until ``_wake`` or the timeout; ``why`` is "read" or "write"."""
        hub = self.factory.pool.hub
        timeout = self._timeout
        if greenlet.getcurrent() is hub:
            raise RuntimeError("spoon handler I/O must run inside the handler greenlet")
        if timeout is None:
            self._waiting = why
            try:
                hub.switch()
            finally:
                self._waiting = None
            return
        if timeout == 0:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        g = greenlet.getcurrent()
        call = self.factory.reactor.callLater(timeout, self._time_out, g)
        self._waiting = why
        try:
            hub.switch()
        finally:
            self._waiting = None
            if call.active():
                call.cancel()

    def _time_out(self, g):
        if self._greenlet is g and self._waiting is not None:
            g.throw(socket.timeout("timed out"))

    # -- reading, used by GreenReader and GreenSocket ---------------------------------------

    def _wait_for_input(self):
        """Suspend until more input or EOF arrives; the handler asked for it, so read."""
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._suspend("read")

    def _consumed(self):
        """Called after taking bytes out of the buffer: resume reading under the mark."""
        if self._reading_paused and len(self._buf) <= self._high_water // 2:
            self._reading_paused = False
            if not self._closed:
                self.transport.resumeProducing()

    def _take(self, n):
        buf = self._buf
        if n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._scan = 0
        self._took = True
        if self._reading_paused:
            self._consumed()
        return data

    def recv(self, n):
        if n <= 0:
            return b""
        while not self._buf and not self._eof:
            self._wait_for_input()
        if not self._buf and self._lost is not None:
            raise self._lost
        return self._take(n)

    def read(self, n=-1):
        if n is None or n < 0:
            while not self._eof:
                self._wait_for_input()
            if self._lost is not None:
                raise self._lost
            return self._take(len(self._buf))
        while len(self._buf) < n and not self._eof:
            self._wait_for_input()
        if len(self._buf) < n and self._lost is not None:
            raise self._lost
        return self._take(n)

    def buffered_line(self):
        """The next line if the buffer already holds it whole, else None (no waiting)."""
        buf = self._buf
        i = buf.find(b"\n", 0, self._max_line)
        if i < 0 or self._reading_paused:
            return None
        return self._take(i + 1)

    def readline(self, size=-1):
        limit = self._max_line
        explicit = size is not None and size >= 0
        if explicit:
            limit = size
        buf = self._buf
        while True:
            i = buf.find(b"\n", self._scan, limit)
            if i >= 0:
                return self._take(i + 1)
            if len(buf) >= limit:
                if explicit:
                    return self._take(limit)
                raise LineTooLong(
                    "line longer than max_line_length (%d bytes)" % self._max_line
                )
            if self._eof:
                if self._lost is not None:
                    raise self._lost
                return self._take(len(buf))
            self._scan = len(buf)
            if not buf:
                # Waiting for the first line of a request: between requests.
                self._wait_for_request()
            else:
                self._wait_for_input()

    def _wait_for_request(self):
        """Wait for input between two requests, unless a graceful stop has begun: then
        the session ends here, as if the client had closed (EOF), instead of holding the
        stop until the grace period runs out.  Only after a first request: a client that
        has just connected is about to send one, and it is served."""
        if self._took and self.factory.stopping:
            self._end_input()
            return
        self._between_requests = True
        try:
            self._wait_for_input()
        finally:
            self._between_requests = False

    def _end_input(self):
        """No more input for the handler: read EOF from now on, stop reading."""
        self._eof = True
        if not self._reading_paused and not self._closed:
            self._reading_paused = True
            self.transport.pauseProducing()

    def end_if_idle(self):
        """Graceful stop: a session between two requests ends now (its handler, waiting
        for the next request with nothing buffered, reads EOF)."""
        if self._waiting == "read" and self._between_requests and self._took and not self._buf:
            self._end_input()
            self._wake()

    # -- writing, used by GreenWriter and GreenSocket ---------------------------------------

    def sendall(self, data):
        if self._closed:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if not self._producer_registered:
            self._producer_registered = True
            self.transport.registerProducer(self, True)
        n = len(data)
        if n <= WRITE_CHUNK:
            self._write_chunk(data if type(data) is bytes else bytes(data))
            return
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, WRITE_CHUNK):
            self._write_chunk(bytes(view[start : start + WRITE_CHUNK]))

    def _write_chunk(self, chunk):
        while self._writes_paused and not self._closed:
            self._suspend("write")
        if self._closed:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        COUNTERS.bytes_out += len(chunk)
        self.transport.write(chunk)


def serve_request(server, request, client_address, log=None):
    """socketserver's sequence for one accepted request, in the calling greenlet:
    ``verify_request``; if it accepts, ``process_request`` (whose stock version calls
    ``finish_request``, which builds the handler, then ``shutdown_request``); if it
    refuses, ``shutdown_request`` without building the handler; ``handle_error`` when
    any of them raised.  Overrides of each hook are honoured.

    Unlike socketserver's loop, an exception never escapes: it concerns this request
    only, and a failing ``handle_error`` or ``shutdown_request`` is logged on ``log``.
    """
    try:
        if not server.verify_request(request, client_address):
            server.shutdown_request(request)
            return
        server.process_request(request, client_address)
    except greenlet.GreenletExit:
        raise
    except BaseException:
        try:
            server.handle_error(request, client_address)
        except Exception:
            if log is not None:
                log.exception("handle_error itself failed")
        try:
            server.shutdown_request(request)
        except Exception:
            if log is not None:
                log.exception("shutdown_request failed")


class GreenSocket:
    """What a stream handler gets as ``self.request`` / ``self.connection``: the socket
    methods handlers commonly call, made cooperative."""

    __slots__ = ("_proto",)

    family = socket.AF_INET
    type = socket.SOCK_STREAM

    def __init__(self, proto):
        self._proto = proto

    def recv(self, bufsize, flags=0):
        return self._proto.recv(bufsize)

    def recv_into(self, buffer, nbytes=0, flags=0):
        view = memoryview(buffer).cast("B")
        data = self._proto.recv(nbytes or view.nbytes)
        view[: len(data)] = data
        return len(data)

    def sendall(self, data, flags=0):
        self._proto.sendall(data)

    def send(self, data, flags=0):
        self._proto.sendall(data)
        return len(data)

    def settimeout(self, value):
        self._proto._timeout = None if value is None else float(value)

    def gettimeout(self):
        return self._proto._timeout

    def setblocking(self, flag):
        self._proto._timeout = None if flag else 0.0

    def getpeername(self):
        return self._proto.client_address

    def getpeercert(self, binary_form=False):
        """The client's certificate on a TLS connection, as ``ssl.SSLSocket.getpeercert()``
        gives it (so handlers written for ``ssl``-wrapped sockets run unchanged): a dict with
        ``subject``, ``issuer``, ``serialNumber``, ``notBefore``, ``notAfter`` and
        ``version`` (and ``subjectAltName`` when the certificate has DNS names), or the DER
        bytes with ``binary_form=True``.  ``None`` on a plain connection or when the client
        sent no certificate.  Unlike ``ssl``, the dict is given even when the certificate was
        not verified; verification is the listening endpoint's business."""
        transport = self._proto.transport
        if not ISSLTransport.providedBy(transport):
            return None
        return peer_certificate(transport.getPeerCertificate(), binary_form)

    def getsockname(self):
        host = self._proto.transport.getHost()
        if not hasattr(host, "port"):  # a UNIX socket: its path, as socket.getsockname()
            return os.fsdecode(host.name) if host.name else ""
        if getattr(host, "flowInfo", None) is not None:
            return (host.host, host.port, host.flowInfo, host.scopeID)
        return (host.host, host.port)

    def _handle(self):
        handle = getattr(self._proto.transport, "getHandle", None)
        return handle() if handle is not None else None

    def fileno(self):
        handle = self._handle()
        return handle.fileno() if handle is not None else -1

    def setsockopt(self, *args):
        handle = self._handle()
        if handle is not None and hasattr(handle, "setsockopt"):
            handle.setsockopt(*args)

    def getsockopt(self, *args):
        return self._handle().getsockopt(*args)

    def shutdown(self, how):
        proto = self._proto
        if proto._closed:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            # Further reads return EOF; the transport stops reading for good.
            proto._eof = True
            stop_reading = getattr(proto.transport, "stopReading", None)
            (stop_reading or proto.transport.pauseProducing)()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            if proto._producer_registered:
                proto._producer_registered = False
                proto.transport.unregisterProducer()
            proto.transport.loseWriteConnection()

    def close(self):
        """Close the connection once what was written is sent (socketserver's
        ``close_request()`` calls this; the connection is also closed when the handler's
        request is over, whatever an override of ``close_request()`` does)."""
        self._proto._close()

    def makefile(self, mode="r", buffering=None, **kwargs):
        if "w" in mode:
            return GreenWriter(self._proto)
        if "b" not in mode:
            raise ValueError("spoon handler sockets only offer binary files")
        return GreenReader(self._proto)

    def __repr__(self):
        return "<GreenSocket peer=%r>" % (self._proto.client_address,)


class _GreenFile:
    __slots__ = ("_proto", "closed")

    def __init__(self, proto):
        self._proto = proto
        self.closed = False

    def close(self):
        self.closed = True

    def readable(self):
        return False

    def writable(self):
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GreenReader(_GreenFile):
    """``rfile``: a binary file over the connection's input buffer."""

    __slots__ = ()

    def readable(self):
        return True

    def read(self, size=-1):
        return self._proto.read(size)

    def read1(self, size=-1):
        return self._proto.recv(size if size and size > 0 else WRITE_CHUNK)

    def readline(self, size=-1):
        proto = self._proto
        if size == -1:
            line = proto.buffered_line()
            if line is not None:
                return line
        return proto.readline(size)

    def readlines(self, hint=-1):
        lines = []
        total = 0
        while True:
            line = self._proto.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        data = self._proto.read(view.nbytes)
        view[: len(data)] = data
        return len(data)

    def __iter__(self):
        return self

    def __next__(self):
        proto = self._proto
        line = proto.buffered_line()
        if line is None:
            line = proto.readline()
            if not line:
                raise StopIteration
        return line


class GreenWriter(_GreenFile):
    """``wfile``: a binary file writing to the connection (unbuffered, like socketserver's
    default ``wbufsize = 0``)."""

    __slots__ = ()

    def writable(self):
        return True

    def write(self, data):
        proto = self._proto
        if (
            proto._producer_registered
            and not proto._writes_paused
            and not proto._closed
            and not self.closed
            and type(data) is bytes
            and len(data) <= WRITE_CHUNK
        ):
            # The common case, without the checks and slicing of sendall().
            proto.transport.write(data)
            return len(data)
        if self.closed:
            raise ValueError("write to closed file")
        proto.sendall(data)
        return len(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.closed:
            raise ValueError("flush of closed file")


@implementer(IDrainable)
class GulpFactory(Factory):
    """The protocol factory of a stream Spoon: usable on any Twisted stream endpoint."""

    protocol = GulpProtocol
    noisy = False

    def __init__(self, server, reactor=None, log=None, lazy_start=False, preface=None):
        #: A ``socketserver.BaseServer`` (a Spoon): its hooks run each request and its
        #: ``RequestHandlerClass`` sets the connection's limits.
        self.server = server
        #: Start a connection's handler at its first byte (or EOF) instead of at accept:
        #: only correct for protocols where the client speaks first.
        self.lazy_start = lazy_start
        #: An :class:`IConnectionPreface` every connection reads before its handler
        #: starts (the PROXY protocol header), or None.
        self.preface = preface
        self.reactor = _reactor(reactor)
        self.log = log
        self.pool = None
        self.active_handlers = 0
        self.connections = set()
        self._idle = IdleWaiters()
        #: A graceful stop has begun: handlers between requests read EOF.
        self.stopping = False

    def end_idle_sessions(self):
        """A graceful stop begins: end the sessions that are between requests now, and
        those that get there later when they do."""
        self.stopping = True
        for proto in list(self.connections):
            proto.end_if_idle()

    def buildProtocol(self, addr):
        p = GulpProtocol()
        p.factory = self
        if self.pool is None:
            self.pool = GreenletPool(_current_hub())
        return p

    def connection_started(self, proto):
        self.connections.add(proto)
        counters = COUNTERS
        counters.connections_open += 1
        counters.connections_total += 1

    def connection_ended(self, proto):
        connections = self.connections
        connections.discard(proto)
        COUNTERS.connections_open -= 1
        if not connections and self._idle.pending:
            self._idle.fire()

    def when_idle(self):
        """A Deferred fired once no connection is open (at once if none is)."""
        return self._idle.wait(not self.connections)

    def abort_all(self):
        """Close every open connection now (end of a graceful stop's grace period)."""
        for proto in list(self.connections):
            transport = proto.transport
            abort = getattr(transport, "abortConnection", None)
            (abort or transport.loseConnection)()



class _DatagramReply:
    """``self.socket`` of a datagram handler: ``sendto`` goes out through the transport."""

    __slots__ = ("_transport",)

    def __init__(self, transport):
        self._transport = transport

    def sendto(self, data, *args):
        address = args[-1]
        COUNTERS.bytes_out += len(data)
        self._transport.write(bytes(data), address)
        return len(data)

    def getsockname(self):
        host = self._transport.getHost()
        return (host.host, host.port)


def report_truncated(log, client_address, max_packet_size):
    """Log a datagram dropped for being larger than ``max_packet_size``."""
    log.warning(
        "Dropped a datagram from %s: larger than max_packet_size (%d bytes), it would "
        "have reached the handler truncated",
        client_address,
        max_packet_size,
    )


@implementer(IDrainable)
class GulpDatagramProtocol(DatagramProtocol):
    """The datagram protocol of a UDP Spoon: one handler run per datagram, in a greenlet so
    that it may ``wait()`` on Deferreds.

    Listen with ``maxPacketSize`` one above the server's ``max_packet_size``: a datagram
    that fills the larger buffer was cut by the kernel and is dropped with a warning
    instead of reaching the handler truncated.
    """

    noisy = False

    def __init__(self, server, reactor=None):
        self.server = server
        self.reactor = _reactor(reactor)
        self.log = getattr(server, "log", None) or logging.getLogger("spoon.greenio")
        self.pool = None
        self.active_handlers = 0
        self.connections = ()

    def datagramReceived(self, data, addr):
        limit = self.server.max_packet_size
        if len(data) > limit:
            report_truncated(self.log, addr, limit)
            return
        COUNTERS.bytes_in += len(data)
        if self.pool is None:
            self.pool = GreenletPool(_current_hub())
        self.pool.spawn(self._run_handler, (data, tuple(addr)))

    def _run_handler(self, datagram):
        data, addr = datagram
        self.active_handlers += 1
        try:
            serve_request(self.server, (data, _DatagramReply(self.transport)), addr, self.log)
        finally:
            self.active_handlers -= 1

    def end_idle_sessions(self):
        """Nothing to end: a datagram is one request."""

    def when_idle(self):
        return NothingToDrain().when_idle()

    def abort_all(self):
        pass
