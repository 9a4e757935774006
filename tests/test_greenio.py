"""The line adapter on Twisted's in-memory transport and clock: no sockets, no sleeps.

The test itself plays the reactor (the hub greenlet): it feeds bytes with
``dataReceived`` and the handler greenlet runs until it must wait again.
"""

import logging
import socketserver
import socket

import greenlet
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport

import spoon.server
from spoon.greenio import GulpFactory, LineTooLong


class RecordingServer(socketserver.BaseServer):
    """A plain socketserver server (what the adapter drives), recording errors."""

    def __init__(self, handler=None):
        super().__init__(("127.0.0.1", 0), handler)
        self.errors = []
        self.log = logging.getLogger("test-adapter")

    def handle_error(self, request, client_address):
        import sys

        self.errors.append(sys.exc_info()[1])


class HalfCloseableTransport(StringTransport):
    """StringTransport plus the TCP half-close it lacks."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class Conn:
    """One connection of ``handler`` on an in-memory transport."""

    def __init__(self, handler, factory=None, server=None):
        self.server = server or RecordingServer(handler)
        if self.server.RequestHandlerClass is None:
            self.server.RequestHandlerClass = handler
        self.clock = MemoryReactorClock()
        self.factory = factory or GulpFactory(self.server, self.clock)
        self.proto = self.factory.buildProtocol(None)
        self.transport = HalfCloseableTransport()
        self.proto.makeConnection(self.transport)

    def feed(self, data):
        self.proto.dataReceived(data)

    def eof(self):
        self.proto.readConnectionLost()

    def out(self):
        return self.transport.value()

    @property
    def closed(self):
        return self.transport.disconnecting


class Lower(spoon.server.Gulp):
    """The original README's handler."""

    def handle(self):
        request = self.rfile.readline().decode("utf8")
        self.wfile.write(request.lower().encode("utf8"))


def test_readme_example_half_close():
    c = Conn(Lower)
    c.feed(b"Te")
    c.feed(b"st")
    assert c.out() == b"" and not c.closed
    c.eof()
    assert c.out() == b"test"
    assert c.closed
    assert c.factory.active_handlers == 0


class HeadersAndBody(spoon.server.Gulp):
    """Command line, header lines up to a blank line, then Content-Length bytes."""

    def handle(self):
        command = self.rfile.readline().strip()
        headers = {}
        while True:
            line = self.rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = self.rfile.read(int(headers.get(b"content-length", b"0")))
        self.wfile.write(b"%s %d %s\n" % (command, len(headers), body[::-1]))
        self.wfile.write(self.rfile.readline())  # what follows the body, if anything


REQUEST = (
    b"CHECK spam/1.0\r\n"
    b"From: a@example.com\r\n"
    b"Content-Length: 36\r\n"
    b"X-Long: " + b"x" * 300 + b"\r\n"
    b"\r\n"
    b"The quick brown fox\njumps over\r\nthe\n"
    b"trailer line\n"
)


def _reply(chunks, eof_at_end=True):
    c = Conn(HeadersAndBody)
    for chunk in chunks:
        c.feed(chunk)
    if eof_at_end:
        c.eof()
    return c.out(), c.closed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(REQUEST)), max_size=30))
def test_any_chunking_gives_the_same_reply(cuts):
    whole = _reply([REQUEST])
    points = sorted(set(cuts))
    pieces = [REQUEST[a:b] for a, b in zip([0] + points, points + [len(REQUEST)])]
    assert _reply(pieces) == whole
    assert whole[0].startswith(b"CHECK spam/1.0 3 ")
    assert whole[1]


def test_reply_does_not_wait_for_eof_when_request_is_complete():
    out, closed = _reply([REQUEST], eof_at_end=False)
    assert out.endswith(b"trailer line\n") and closed


class PingPong(spoon.server.Gulp):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"pong " + line)


def test_interactive_ping_pong_answers_each_line_before_the_next():
    c = Conn(PingPong)
    for i in range(5):
        before = len(c.out())
        c.feed(b"ping %d\n" % i)
        assert c.out()[before:] == b"pong ping %d\n" % i
    c.eof()
    assert c.closed and c.factory.active_handlers == 0


class Greeter(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(b"220 hello\r\n")
        name = self.rfile.readline().strip()
        self.wfile.write(b"250 hi " + name + b"\r\n")


def test_server_speaks_first():
    c = Conn(Greeter)
    assert c.out() == b"220 hello\r\n"
    c.feed(b"bob\r\n")
    assert c.out() == b"220 hello\r\n250 hi bob\r\n"
    assert c.closed


class Slow(spoon.server.Gulp):
    timeout = 5

    def handle(self):
        self.wfile.write(b"first\n")
        self.rfile.readline()
        self.wfile.write(b"never\n")


def test_timeout_raises_socket_timeout_in_handler_and_closes():
    c = Conn(Slow)
    c.clock.advance(4.9)
    assert not c.closed
    c.clock.advance(0.2)
    assert c.closed
    assert c.out() == b"first\n"
    [error] = c.server.errors
    assert isinstance(error, socket.timeout)
    assert c.factory.active_handlers == 0


class PatientPingPong(PingPong):
    timeout = 5


def test_timeout_restarts_for_each_read():
    c = Conn(PatientPingPong)
    for i in range(4):
        c.clock.advance(4)
        c.feed(b"x\n")
    assert not c.closed and not c.server.errors


class Caught(spoon.server.Gulp):
    """Catches its own errors and reports them, to test what is raised."""

    def handle(self):
        try:
            self.rfile.readline()
        except Exception as e:  # noqa: BLE001 - reporting the exact type
            self.wfile.write(type(e).__name__.encode())


def test_line_longer_than_limit_is_an_error_not_a_buffer():
    c = Conn(Caught)
    c.feed(b"a" * (64 * 1024 - 1))
    assert c.out() == b""
    c.feed(b"bb")
    assert c.out() == b"LineTooLong"
    assert c.closed


def test_line_limit_is_a_class_attribute():
    class Short(Caught):
        max_line_length = 10

    c = Conn(Short)
    c.feed(b"0123456789abc\n")
    assert c.out() == b"LineTooLong"


def test_line_too_long_goes_to_handle_error_when_uncaught():
    class Short(Lower):
        max_line_length = 4

    c = Conn(Short)
    c.feed(b"abcdef\n")
    assert isinstance(c.server.errors[0], LineTooLong)
    assert c.closed


def test_readline_with_explicit_size_returns_partial_line():
    class Sized(spoon.server.Gulp):
        def handle(self):
            self.wfile.write(self.rfile.readline(3) + b"|" + self.rfile.readline())

    c = Conn(Sized)
    c.feed(b"abcdef\n")
    assert c.out() == b"abc|def\n"


class NeverReads(spoon.server.Gulp):
    def handle(self):
        self.server.gate = Deferred()
        self.wait(self.server.gate)
        data = self.rfile.read(3 * 1024 * 1024)
        self.wfile.write(b"%d" % len(data))


def test_unread_input_above_high_water_pauses_reading_until_consumed():
    c = Conn(NeverReads)
    chunk = b"z" * 65536
    for _ in range(16):
        c.feed(chunk)
    assert c.transport.producerState == "producing"  # exactly 1 MiB: not above the mark
    c.feed(chunk)
    assert c.transport.producerState == "paused"
    c.server.gate.callback(None)
    # The handler asks for more than is buffered, so reading resumes.
    assert c.transport.producerState == "producing"
    for _ in range(48 - 17):
        c.feed(chunk)
    assert c.out() == b"%d" % (3 * 1024 * 1024)


class PausedWriter(spoon.server.Gulp):
    def handle(self):
        self.request.sendall(b"a")
        # What a full transport does: ask its producer (the connection) to pause.
        self.server.proto.pauseProducing()
        self.request.sendall(b"b" * 100)
        self.request.sendall(b"c")


def test_write_suspends_handler_while_transport_is_full():
    server = RecordingServer(PausedWriter)
    factory = GulpFactory(server, MemoryReactorClock())
    proto = server.proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    # The first write registered the connection as the transport's streaming producer.
    assert transport.producer is proto and transport.streaming
    assert transport.value() == b"a"
    assert factory.active_handlers == 1 and not transport.disconnecting
    proto.resumeProducing()
    assert transport.value() == b"a" + b"b" * 100 + b"c"
    assert transport.disconnecting and factory.active_handlers == 0
    # Closing unregisters the producer, or loseConnection could wait forever.
    assert transport.producer is None


def test_huge_write_is_handed_over_in_chunks():
    class Huge(spoon.server.Gulp):
        def handle(self):
            self.wfile.write(b"q" * (1024 * 1024 + 5))

    c = Conn(Huge)
    assert len(c.out()) == 1024 * 1024 + 5
    assert len(c.transport.io.getvalue()) == 1024 * 1024 + 5


class WaitsThenWrites(spoon.server.Gulp):
    def handle(self):
        line = self.rfile.readline()
        self.server.events.append(("read", line))
        try:
            self.wfile.write(b"reply")
        except OSError as e:
            self.server.events.append(("write", type(e).__name__))
        self.server.events.append(("again", self.rfile.readline()))


def test_client_disconnect_while_handler_waits():
    server = RecordingServer()
    server.events = []
    c = Conn(WaitsThenWrites, server=server)
    assert c.factory.active_handlers == 1
    c.proto.connectionLost(None)
    assert server.events == [("read", b""), ("write", "BrokenPipeError"), ("again", b"")]
    assert c.factory.active_handlers == 0
    assert not c.factory.connections
    assert not server.errors


def _live_greenlets():
    import gc

    gc.collect()
    return {id(g) for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and g}


def test_no_handler_greenlet_left_alive_after_disconnects():
    server = RecordingServer()
    server.events = []
    factory = GulpFactory(server, MemoryReactorClock())
    before = _live_greenlets()
    conns = [Conn(WaitsThenWrites, factory=factory, server=server) for _ in range(50)]
    assert factory.active_handlers == 50
    for c in conns:
        c.proto.connectionLost(None)
    assert factory.active_handlers == 0
    # Whatever greenlet is still alive is an idle one in the pool, waiting for a job.
    left = _live_greenlets() - before - {id(g) for g in factory.pool.idle}
    assert left == set()
    assert 0 < len(factory.pool.idle) <= 50


class Boom(spoon.server.Gulp):
    def handle(self):
        if self.rfile.readline() == b"boom\n":
            raise RuntimeError("kaboom")
        self.wfile.write(b"fine")


def test_exception_goes_to_handle_error_and_closes_only_that_connection():
    server = RecordingServer(Boom)
    factory = GulpFactory(server, MemoryReactorClock())
    bad = Conn(Boom, factory=factory, server=server)
    good = Conn(Boom, factory=factory, server=server)
    bad.feed(b"boom\n")
    assert bad.closed and not good.closed
    assert [type(e) for e in server.errors] == [RuntimeError]
    good.feed(b"ok\n")
    assert good.out() == b"fine"


def test_handle_error_of_a_real_server_logs_traceback(caplog):
    class BoomServer(spoon.server.TCPSpoon):
        handler_klass = Boom

    server = BoomServer(("127.0.0.1", 0), bind_and_activate=False)
    server.server_close()
    c = Conn(Boom, server=server)
    with caplog.at_level(logging.ERROR, logger="spoon-server"):
        c.feed(b"boom\n")
    [record] = caplog.records
    assert record.name == "spoon-server"
    assert "Error while processing request from" in record.getMessage()
    assert record.exc_info[0] is RuntimeError
    assert c.closed


class WaitsForDeferred(spoon.server.Gulp):
    def handle(self):
        d = Deferred()
        self.server.pending.append(d)
        result = self.wait(d)
        self.wfile.write(b"got " + result)


def test_handler_waits_on_deferred_without_blocking_others():
    server = RecordingServer()
    server.pending = []
    factory = GulpFactory(server, MemoryReactorClock())
    a = Conn(WaitsForDeferred, factory=factory, server=server)
    b = Conn(WaitsForDeferred, factory=factory, server=server)
    assert len(server.pending) == 2
    server.pending[1].callback(b"B")
    assert b.out() == b"got B" and b.closed and not a.closed
    server.pending[0].callback(b"A")
    assert a.out() == b"got A"


def test_wait_raises_the_failure():
    class Fails(spoon.server.Gulp):
        def handle(self):
            d = Deferred()
            self.server.pending.append(d)
            self.wait(d)

    server = RecordingServer()
    server.pending = []
    Conn(Fails, server=server)
    server.pending[0].errback(ValueError("nope"))
    assert isinstance(server.errors[0], ValueError)


def test_wait_outside_a_handler_is_an_error():
    from spoon.greenio import wait

    with pytest.raises(RuntimeError):
        wait(Deferred())


class Lifecycle(spoon.server.Gulp):
    def setup(self):
        self.server.events.append("setup")
        super().setup()

    def handle(self):
        self.server.events.append("handle")
        self.wfile.write(b"x")

    def finish(self):
        self.server.events.append("finish")
        super().finish()


def test_setup_and_finish_overrides_run_in_order():
    server = RecordingServer()
    server.events = []
    c = Conn(Lifecycle, server=server)
    assert server.events == ["setup", "handle", "finish"]
    assert c.out() == b"x" and c.closed


class SocketMethods(spoon.server.Gulp):
    def handle(self):
        req = self.request
        assert self.connection is req
        req.settimeout(3)
        assert req.gettimeout() == 3.0
        data = req.recv(4)
        self.server.seen = (req.getpeername(), req.getsockname(), data)
        req.sendall(b"ab")
        req.send(b"c")
        req.shutdown(socket.SHUT_WR)


def test_request_offers_common_socket_methods():
    server = RecordingServer()
    c = Conn(SocketMethods, server=server)
    c.feed(b"hello")
    peer, local, data = server.seen
    assert peer == (c.transport.getPeer().host, c.transport.getPeer().port)
    assert local == (c.transport.getHost().host, c.transport.getHost().port)
    assert data == b"hell"
    assert c.out() == b"abc"
    assert c.transport.write_closed
    assert not server.errors


class ReadsEverything(spoon.server.Gulp):
    def handle(self):
        lines = self.rfile.readlines()
        self.wfile.writelines([b"%d:" % len(lines)] + lines)


def test_readlines_and_writelines():
    c = Conn(ReadsEverything)
    c.feed(b"a\nb\nc")
    c.eof()
    assert c.out() == b"3:a\nb\nc"


def test_lazy_start_runs_the_handler_at_the_first_byte_only():
    server = RecordingServer(Lower)
    factory = GulpFactory(server, MemoryReactorClock(), lazy_start=True)
    c = Conn(Lower, factory=factory, server=server)
    assert factory.active_handlers == 0  # idle connection: no greenlet yet
    c.feed(b"LAZY\n")
    assert c.out() == b"lazy\n" and c.closed
    quiet = Conn(Lower, factory=factory, server=server)
    quiet.eof()  # EOF before any byte still runs the handler, which reads b""
    assert quiet.closed and factory.active_handlers == 0


def test_client_speaks_first_is_an_opt_in_of_the_server_class():
    assert spoon.server.TCPSpoon.client_speaks_first is False

    class Lazy(spoon.server.TCPSpoon):
        client_speaks_first = True

    eager = spoon.server.TCPSpoon(("127.0.0.1", 0), bind_and_activate=False)
    lazy = Lazy(("127.0.0.1", 0), bind_and_activate=False)
    assert eager.protocol_factory(MemoryReactorClock()).lazy_start is False
    assert lazy.protocol_factory(MemoryReactorClock()).lazy_start is True


# -- a reset is not an end of input ---------------------------------------------------------


class ReadsToEof(spoon.server.Gulp):
    def handle(self):
        data = self.rfile.read()
        self.wfile.write(b"processed %d" % len(data))


def test_reset_mid_message_raises_connection_reset_instead_of_a_short_read():
    c = Conn(ReadsToEof)
    c.feed(b"x" * 5000)
    c.proto.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
    assert c.out() == b""  # the cut message was never processed
    assert [type(e) for e in c.server.errors] == [ConnectionResetError]


def test_fin_stays_end_of_input_even_if_a_reset_follows():
    c = Conn(ReadsToEof)
    c.feed(b"x" * 5000)
    c.eof()
    assert c.out() == b"processed 5000"
    c.proto.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
    assert c.server.errors == []


def test_reset_leaves_whole_buffered_lines_readable_then_raises():
    class Lines(spoon.server.Gulp):
        def handle(self):
            self.server.lines = []
            for line in self.rfile:
                self.server.lines.append(line)

    c = Conn(Lines)
    c.feed(b"one\ntwo\nthr")
    c.proto.connectionLost(Failure(ConnectionLost()))
    assert c.server.lines == [b"one\n", b"two\n"]
    assert [type(e) for e in c.server.errors] == [ConnectionResetError]


def test_abort_by_the_server_raises_connection_aborted_in_a_waiting_handler():
    c = Conn(ReadsToEof)
    c.feed(b"partial")
    c.proto.connectionLost(Failure(ConnectionAborted()))
    assert [type(e) for e in c.server.errors] == [ConnectionAbortedError]


# -- a graceful stop ends sessions that are between requests ---------------------------------


class Session(spoon.server.Gulp):
    """A persistent protocol: one reply per line until the client or a stop ends it."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"ok " + line)
        self.wfile.write(b"bye stopping=%d\n" % bool(getattr(self.server, "stopping", False)))


def test_graceful_stop_gives_eof_to_a_handler_waiting_between_requests():
    server = RecordingServer(Session)
    factory = GulpFactory(server, MemoryReactorClock())
    idle = Conn(Session, factory=factory, server=server)
    idle.feed(b"a\n")
    mid_line = Conn(Session, factory=factory, server=server)
    mid_line.feed(b"par")
    factory.end_idle_sessions()
    assert idle.out() == b"ok a\nbye stopping=0\n" and idle.closed
    # A request under way is not cut: it is answered, then the session ends.
    assert mid_line.out() == b"" and not mid_line.closed
    mid_line.feed(b"tial\n")
    assert mid_line.out() == b"ok partial\nbye stopping=0\n" and mid_line.closed
    assert server.errors == []


def test_graceful_stop_waits_for_the_first_request_of_a_new_connection():
    server = RecordingServer(Session)
    factory = GulpFactory(server, MemoryReactorClock())
    fresh = Conn(Session, factory=factory, server=server)
    factory.end_idle_sessions()
    assert not fresh.closed  # just connected: its request is on its way
    fresh.feed(b"first\n")
    assert fresh.out() == b"ok first\nbye stopping=0\n" and fresh.closed


def test_a_body_read_is_not_between_requests():
    class Body(spoon.server.Gulp):
        def handle(self):
            size = int(self.rfile.readline())
            self.wfile.write(b"got %d" % len(self.rfile.read(size)))

    server = RecordingServer(Body)
    factory = GulpFactory(server, MemoryReactorClock())
    c = Conn(Body, factory=factory, server=server)
    c.feed(b"6\n")
    factory.end_idle_sessions()
    assert not c.closed
    c.feed(b"abcdef")
    assert c.out() == b"got 6" and c.closed


def test_a_fast_stop_ends_a_session_waiting_for_its_next_request_quietly():
    class Quiet(spoon.server.Gulp):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(b"ok " + line)

    c = Conn(Quiet)
    c.feed(b"a\n")
    c.proto.connectionLost(Failure(ConnectionAborted()))
    assert c.server.errors == []  # nothing was cut: no error, no log line
    assert c.out() == b"ok a\n"
    mid = Conn(Quiet)
    mid.feed(b"half a li")
    mid.proto.connectionLost(Failure(ConnectionAborted()))
    assert [type(e) for e in mid.server.errors] == [ConnectionAbortedError]
