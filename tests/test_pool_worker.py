"""A worker's duties, without forking: it serves its target with the shared accept policy
and stops its reactor when serving ends; its heartbeat says "ready", then beats, and
notices a supervisor that is gone."""

import os

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

import spoon.server
from spoon.pool.worker import Heartbeat, serve_shared


class RecordingTarget:
    def __init__(self):
        self.calls = []
        self.served = defer.Deferred()

    def serve(self, reactor, shared):
        self.calls.append((reactor, shared))
        return self.served


def test_a_worker_asks_its_target_for_the_shared_accept_policy_and_stops_when_served():
    reactor, target = MemoryReactorClock(), RecordingTarget()
    reactor.running = True
    serve_shared(target, reactor)
    assert target.calls == [(reactor, True)]
    target.served.callback(None)
    reactor.advance(0)
    assert not reactor.running


def test_a_spoon_served_shared_takes_connections_one_by_one():
    reactor = MemoryReactorClock()
    server = spoon.server.TCPSpork(("127.0.0.1", 0))
    try:
        server.serve(reactor, shared=True)
        (port,) = [r for r in reactor.getReaders() if hasattr(r, "shared")]
        assert port.shared is True
        server.begin_stop(False)
        server.serve(reactor, shared=False)
        (port,) = [r for r in reactor.getReaders() if hasattr(r, "shared")]
        assert port.shared is False
    finally:
        server.server_close()


def test_the_heartbeat_says_ready_then_beats_then_stops_when_the_pipe_breaks():
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    orphaned = []
    clock = MemoryReactorClock()
    beat = Heartbeat(write_fd, 1.0, os.getppid(), orphaned.append)
    try:
        beat.start(clock)
        clock.advance(1.0)
        clock.advance(1.0)
        assert os.read(read_fd, 100) == b"R.."
        os.close(read_fd)
        read_fd = None
        clock.advance(1.0)
        assert orphaned == ["heartbeat pipe closed"]
        clock.advance(1.0)
        assert len(orphaned) == 1
    finally:
        os.close(write_fd)
        if read_fd is not None:
            os.close(read_fd)


def test_the_heartbeat_notices_a_new_parent():
    read_fd, write_fd = os.pipe()
    orphaned = []
    try:
        beat = Heartbeat(write_fd, 1.0, os.getppid() + 100000, orphaned.append)
        beat.start(MemoryReactorClock())
        assert orphaned and "is gone" in orphaned[0]
    finally:
        os.close(read_fd)
        os.close(write_fd)
