"""The one graceful stop (:class:`spoon.lifecycle.GracefulStop`) and the drain interface its
drainables provide, on Twisted's in-memory clock."""

import logging
import signal
import socket

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer
from zope.interface.verify import verifyObject

import spoon.server
from spoon.greenio import GulpDatagramProtocol, GulpFactory
from spoon.lifecycle import GracefulStop, IDrainable, IdleWaiters, NothingToDrain
from spoon.pool.factory import FactoryTarget, tracking_factory
from spoon.pool.target import IPoolTarget

log = logging.getLogger("test.lifecycle")


@implementer(IDrainable)
class Connections:
    """A drainable whose connections the test opens and closes."""

    def __init__(self, n):
        self.connections = set(range(n))
        self.aborted = 0
        self.idle_sessions_ended = 0
        self._idle = IdleWaiters()

    def end_idle_sessions(self):
        self.idle_sessions_ended += 1

    def close(self, c):
        self.connections.discard(c)
        if not self.connections:
            self._idle.fire()

    def when_idle(self):
        return self._idle.wait(not self.connections)

    def abort_all(self):
        # As a transport's abortConnection: the connection is reported lost later.
        self.aborted += 1


class Port:
    def __init__(self):
        self.stopped = 0

    def stopListening(self):
        self.stopped += 1
        return defer.succeed(None)


def fired(d):
    result = []
    d.addBoth(result.append)
    return bool(result)


def test_graceful_stop_stops_listening_then_completes_when_the_last_connection_ends():
    reactor, port, conns = MemoryReactorClock(), Port(), Connections(2)
    stop = GracefulStop(reactor, [port], [conns], 10, log).start()
    done = stop.when_done()
    assert port.stopped == 1 and not fired(done)
    assert conns.idle_sessions_ended == 1  # sessions between requests end now
    conns.close(0)
    reactor.advance(5)
    assert not fired(done)
    conns.close(1)
    assert fired(done) and conns.aborted == 0
    assert reactor.getDelayedCalls() == []  # the grace timer is gone


def test_graceful_stop_aborts_what_is_left_after_the_grace_period(caplog):
    reactor, conns = MemoryReactorClock(), Connections(3)
    stop = GracefulStop(reactor, [Port()], [conns], 10, log).start()
    done = stop.when_done()
    reactor.advance(9.9)
    assert not fired(done) and conns.aborted == 0
    with caplog.at_level(logging.WARNING):
        reactor.advance(0.1)
    assert conns.aborted == 1
    assert "Closing 3 connection(s) still open at the end of the stop" in caplog.text
    reactor.advance(0)
    assert fired(done)


def test_fast_stop_aborts_at_once_and_a_later_fast_stop_turns_a_graceful_one_fast():
    reactor, conns = MemoryReactorClock(), Connections(1)
    stop = GracefulStop(reactor, [Port()], [conns], 10, log).start(graceful=False)
    assert conns.aborted == 1 and not fired(stop.when_done())
    reactor.advance(0)
    assert fired(stop.when_done())
    reactor, conns = MemoryReactorClock(), Connections(1)
    stop = GracefulStop(reactor, [Port()], [conns], 10, log).start()
    stop.abort_now()
    assert conns.aborted == 1
    assert not fired(stop.when_done())  # the aborts reach the sockets first
    reactor.advance(0)
    assert fired(stop.when_done())


def test_every_drainable_declares_the_drain_interface():
    reactor = MemoryReactorClock()

    class Server(spoon.server.TCPSpoon):
        pass

    server = Server(("127.0.0.1", 0))
    try:
        gulps = GulpFactory(server, reactor)
        datagrams = GulpDatagramProtocol(server, reactor)
        tracked = tracking_factory(Factory.forProtocol(Protocol), reactor)
        for drainable in (gulps, datagrams, tracked, NothingToDrain()):
            assert verifyObject(IDrainable, drainable)
            assert fired(drainable.when_idle())  # nothing open: idle at once
    finally:
        server.server_close()


def test_spoon_servers_and_the_factory_target_provide_the_pool_interface():
    server = spoon.server.TCPSpork(("127.0.0.1", 0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert verifyObject(IPoolTarget, server)
        assert server.pool_workers == spoon.server.TCPSpork.prefork
        assert server.pool_name == "spoon.server.TCPSpork"
        target = FactoryTarget(sock, DatagramProtocol, "tests.datagram")
        assert verifyObject(IPoolTarget, target)
        assert signal.SIGTERM in target.signal_handlers()
    finally:
        server.server_close()
        sock.close()


def test_a_spoon_in_memory_serves_then_drains_through_begin_stop():
    """serve() and begin_stop() of a Spoon, on a memory reactor: the served Deferred fires
    once the graceful stop has waited for the open connection."""
    reactor = MemoryReactorClock()
    server = spoon.server.TCPSpoon(("127.0.0.1", 0))
    try:
        served = server.serve(reactor, shared=False)
        factory = server.protocol_factory(reactor)
        assert not fired(served)
        stop = server.begin_stop(graceful=True)
        assert fired(stop) and fired(served)  # nothing was open
        assert fired(server.begin_stop(graceful=False))  # again: nothing more to do
        del factory
    finally:
        server.server_close()
