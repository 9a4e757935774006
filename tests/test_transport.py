"""The lean transport (spoon.transport) with the greenlet bridge over real loopback sockets,
the reactor in memory: what it does at accept with input that is, or is not, already
waiting."""

import gc
import socket
import socketserver
import weakref

import greenlet
import pytest
from twisted.internet.testing import MemoryReactorClock

import spoon.server
from spoon import transport
from spoon.greenio import GulpFactory
from support import recv_all, wait_for


class Echo(spoon.server.Gulp):
    """Reads one line, answers it upper-cased."""

    def handle(self):
        self.wfile.write(self.rfile.readline().upper())


class Banner(spoon.server.Gulp):
    """Speaks first (an SMTP-like greeting), then echoes one line."""

    def handle(self):
        self.wfile.write(b"hello\n")
        self.wfile.write(self.rfile.readline().upper())


@pytest.fixture
def accepted():
    """``accept(payload)``: a client connects and sends ``payload`` (if any); returns the
    server's accepted socket, its peer address and the client socket."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    opened = [listening]

    def accept(payload=b""):
        client = socket.create_connection(listening.getsockname(), timeout=5)
        opened.append(client)
        if payload:
            client.sendall(payload)
        listening.settimeout(5)
        conn, peer = listening.accept()
        conn.setblocking(True)
        opened.append(conn)
        if payload:  # until the request has arrived on the server's side
            wait_for(lambda: conn.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        return conn, peer, client

    yield accept
    for s in opened:
        s.close()


def serve(conn, peer, handler, lazy_start=False):
    """Serve ``conn`` on a lean transport; returns (transport, greenlet switches made)."""
    reactor = MemoryReactorClock()
    factory = GulpFactory(socketserver.BaseServer(("127.0.0.1", 0), handler), reactor,
                          lazy_start=lazy_start)
    switches = []
    previous = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        lean = transport.serve_accepted(conn, peer, factory, reactor)
    finally:
        greenlet.settrace(previous)
    return lean, reactor, switches


def test_a_request_already_waiting_at_accept_runs_to_completion_without_suspending(accepted):
    conn, peer, client = accepted(b"ping\n")
    lean, reactor, switches = serve(conn, peer, Echo)
    # Into the handler and back out, once: it found its request in the buffer.
    assert switches == ["switch", "switch"]
    assert not lean.connected and reactor.getReaders() == []
    assert client.recv(64) == b"PING\n"


def test_a_handler_that_speaks_first_starts_at_accept_when_nothing_waits(accepted):
    conn, peer, client = accepted()
    lean, reactor, switches = serve(conn, peer, Banner)
    assert client.recv(64) == b"hello\n"  # before the client said anything
    assert lean in reactor.getReaders()  # and now waits for its line


def test_an_idle_connection_s_transport_and_protocol_carry_no_instance_dictionary(accepted):
    """They live as long as the connection, idle ones included: slots only."""
    conn, peer, client = accepted()
    lean, reactor, switches = serve(conn, peer, Banner)
    assert client.recv(64) == b"hello\n"  # the handler now waits in readline()
    assert not hasattr(lean, "__dict__")
    assert not hasattr(lean.protocol, "__dict__")


def test_a_lazily_started_handler_still_waits_for_the_first_byte(accepted):
    conn, peer, client = accepted()
    lean, reactor, switches = serve(conn, peer, Banner, lazy_start=True)
    assert switches == []  # no handler yet: the client has not spoken
    assert lean in reactor.getReaders()
    client.sendall(b"hi\n")
    wait_for(lambda: conn.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    lean.doRead()
    assert not lean.connected
    assert recv_all(client) == b"hello\nHI\n"


class RecordingFactory(GulpFactory):
    """A GulpFactory that keeps a weak reference to each protocol it builds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.built.append(weakref.ref(protocol))
        return protocol


class RememberedEcho(Echo):
    """Echo, leaving a weak reference to each handler instance on its server."""

    def setup(self):
        self.server.handlers.append(weakref.ref(self))
        super().setup()


def test_a_finished_connection_is_freed_by_reference_counting_without_the_cyclic_collector(accepted):
    server = socketserver.BaseServer(("127.0.0.1", 0), RememberedEcho)
    server.handlers = []
    reactor = MemoryReactorClock()
    factory = RecordingFactory(server, reactor)
    gc.collect()
    gc.disable()
    try:
        # One request waiting at accept (served at once), one that the handler waits
        # for in readline() and gets later; both greenlets go back to the pool.
        conn, peer, client = accepted(b"first\n")
        done = weakref.ref(transport.serve_accepted(conn, peer, factory, reactor))
        assert recv_all(client) == b"FIRST\n"
        conn, peer, client = accepted()
        lean = transport.serve_accepted(conn, peer, factory, reactor)
        later = weakref.ref(lean)
        client.sendall(b"second\n")
        wait_for(lambda: conn.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        lean.doRead()
        assert recv_all(client) == b"SECOND\n"
        del lean, conn
        assert len(factory.pool.idle) == 1
        refs = [done, later] + factory.built + server.handlers
        assert len(refs) == 6
        assert [r() for r in refs] == [None] * 6
    finally:
        gc.enable()
