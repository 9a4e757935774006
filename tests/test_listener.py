"""The accept policy of the workers' listening port (spoon.listener.OneByOnePort), step by
step: a real listening socket and real client connections, a memory reactor whose clock
the test advances."""

import os
import socket

import pytest
from twisted.internet.testing import MemoryReactorClock

from spoon.listener import OneByOnePort
from support import wait_for


class Factory:
    """Stands for a Gulp factory: ``connections`` holds what is still open."""

    def __init__(self):
        self.connections = set()
        self.started = self.stopped = 0

    def doStart(self):
        self.started += 1

    def doStop(self):
        self.stopped += 1


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    clients = []

    def connect(n):
        for _ in range(n):
            c = socket.create_connection(sock.getsockname(), timeout=5)
            clients.append(c)

    yield sock, connect
    for c in clients:
        c.close()
    sock.close()


def _queued(sock):
    """Connections waiting in the accept queue (probed without accepting: poll)."""
    import select

    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


def make_port(sock, keep_open):
    """A port whose ``serve`` keeps the connection open (its handler waits for input) when
    ``keep_open()`` says so, else is done with it at once (handler ran inline)."""
    reactor = MemoryReactorClock()
    factory = Factory()
    served = []

    def serve(conn, peer):
        served.append(conn)
        if keep_open():
            factory.connections.add(conn)
        else:
            conn.close()

    port = OneByOnePort(sock, factory, reactor, serve)
    port.startListening()
    return port, reactor, factory, served


def test_takes_connections_in_a_row_while_each_is_done_at_once(listener):
    sock, connect = listener
    port, reactor, factory, served = make_port(sock, keep_open=lambda: False)
    assert port in reactor.getReaders() and factory.started == 1
    connect(5)
    wait_for(lambda: _queued(sock))
    port.doRead()
    assert len(served) == 5  # all in one wake-up: this worker was never busy meanwhile
    assert not reactor.getDelayedCalls()


def test_stops_at_the_first_connection_left_open(listener):
    sock, connect = listener
    port, reactor, factory, served = make_port(sock, keep_open=lambda: True)
    connect(3)
    wait_for(lambda: _queued(sock))
    port.doRead()
    assert len(served) == 1  # its handler waits for input: poll again before the next
    # Handed over as accept() made it: no ioctl(FIONBIO) per connection (the transports
    # do not block on it, test_lean_transport_never_blocks_... below).
    assert served[0].getblocking()


def test_with_open_connections_accepts_only_after_the_iteration(listener):
    sock, connect = listener
    port, reactor, factory, served = make_port(sock, keep_open=lambda: False)
    factory.connections.add("a connection of ours that may be readable now")
    connect(2)
    wait_for(lambda: _queued(sock))
    port.doRead()
    assert served == [] and len(reactor.getDelayedCalls()) == 1
    port.doRead()  # readable again in the same iteration: still one delayed accept
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)  # the next iteration
    assert len(served) == 1  # one per iteration while others of ours are open
    assert port in reactor.getReaders()  # still listening


def test_stop_listening_drains_the_queue_then_closes(listener):
    sock, connect = listener
    port, reactor, factory, served = make_port(sock, keep_open=lambda: True)
    connect(4)
    wait_for(lambda: _queued(sock))
    port.stopListening()
    assert len(served) == 4  # what the kernel had queued is served, not reset
    assert port not in reactor.getReaders()
    assert factory.stopped == 1
    assert port.fileno() == -1
    # The shared socket itself stays open for the other workers.
    assert sock.fileno() != -1


class Recorder:
    """A plain Twisted protocol that records what the transport delivers."""

    def __init__(self):
        self.data = []
        self.transport = None

    def makeConnection(self, transport):
        self.transport = transport

    def dataReceived(self, data):
        self.data.append(data)

    def readConnectionLost(self):
        self.data.append(b"<EOF>")

    def input_checked(self):
        """The lean transport calls this once the waiting input is delivered."""

    def connectionLost(self, reason):
        pass


class RecorderFactory:
    def __init__(self):
        self.protocol = Recorder()

    def buildProtocol(self, addr):
        return self.protocol


def _in_thread(fn, timeout=5.0):
    """Run ``fn`` in a thread; True if it returned within ``timeout`` (False: it blocked)."""
    import threading

    done = threading.Event()

    def run():
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout)


def test_lean_transport_never_blocks_on_an_accepted_socket_left_in_blocking_mode(listener):
    from spoon import transport

    sock, connect = listener
    connect(1)
    wait_for(lambda: _queued(sock))
    conn, peer = sock.accept()
    assert conn.getblocking()  # as the listening port hands it over: no ioctl per accept
    reactor = MemoryReactorClock()
    factory = RecorderFactory()
    served = []
    try:
        # Nothing waits yet: start() must return and register for reading, not wait.
        assert _in_thread(lambda: served.append(transport.serve_accepted(conn, peer, factory,
                                                                         reactor)))
        lean = served[0]
        assert lean in reactor.getReaders() and factory.protocol.data == []
        # Nor may a write larger than the socket buffers wait for the client to read.
        big = b"x" * (16 << 20)
        assert _in_thread(lambda: lean.write(big))
        assert lean in reactor.getWriters()
        assert _in_thread(lean.doRead)  # spurious wake-up: nothing to read, no wait
    finally:
        conn.close()


def test_accepted_sockets_keep_their_family_and_ignore_a_default_timeout():
    """What the port hands over is a plain blocking-mode stream socket of the listening
    socket's family, even with a process-wide default timeout (under which recv and send
    would first wait for the socket to be ready, MSG_DONTWAIT or not)."""
    sock = socket.socket(socket.AF_INET6)
    sock.bind(("::1", 0))
    sock.listen(8)
    port, reactor, factory, served = make_port(sock, keep_open=lambda: True)
    client = socket.create_connection(sock.getsockname()[:2], timeout=5)
    client_address = client.getsockname()
    socket.setdefaulttimeout(5.0)
    try:
        wait_for(lambda: _queued(sock))
        port.doRead()
    finally:
        socket.setdefaulttimeout(None)
        client.close()
    try:
        (conn,) = served
        assert (conn.family, conn.type) == (socket.AF_INET6, socket.SOCK_STREAM)
        assert conn.gettimeout() is None and not os.get_inheritable(conn.fileno())
        assert conn.getpeername() == client_address
    finally:
        port.stopListening()
        for conn in served:
            conn.close()
        sock.close()
