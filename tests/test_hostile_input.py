"""Hostile input against a real pool: whatever bytes clients send, and however they go away,
no worker dies, each worker's memory stays bounded, and a well-formed client served at the
same time sees correct replies and no error.

The pool is a real ``TCPSpork`` with two worker processes on 127.0.0.1, serving either the
README's handler (one ``readline()``, decode UTF-8, lower, write) or a persistent line
protocol (``for line in self.rfile``).  Hypothesis generates the hostile connections, a few
at a time and overlapping: random bytes, NUL bytes, 10 MiB without a newline, invalid UTF-8,
up to 800 KB of pipelined lines whose replies are mostly left unread, each connection ending with a
FIN, a reset (RST via ``SO_LINGER 0``, often in the middle of a message) or a plain close;
1,000 silent connections (opened, never written to) are held open meanwhile and end with a
close or a reset at the end.

Memory: the bound is on each worker's peak RSS (the kernel's high-water mark, VmHWM, so a
peak between two looks counts) over its RSS at the start.  Measured here (Python 3.11,
x86-64, 200 examples): workers start at 22-27 MiB and peak 4-12 MiB higher, about 500 silent
connections each included.  The assertion allows 48 MiB: with ``max_line_length`` unbounded
(the mutation tried) the 10 MiB lines alone take the peak 66-113 MiB higher.
"""

import contextlib
import resource
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from support import connect, pid_alive, recv_all, rss_kib, wait_for, workers_of

#: Connections held open, never written to, for the whole test.
SILENT_CONNECTIONS = 1000
#: Growth of one worker's RSS over the test above which it fails (KiB).
RSS_GROWTH_LIMIT_KIB = 48 * 1024
#: Hypothesis examples per handler (up to 6 connections each): 3-10 s per test here.
EXAMPLES = 200
#: Seconds the silent connections and the attacks may take in all; a test over it fails.
ATTACK_BUDGET = 45

POOL = """
import logging
import os
import sys

import spoon.server
from spoon.examples import EchoServerForked, RequestHandler


class SessionHandler(spoon.server.Gulp):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"ok " + line)


class Pool(EchoServerForked):  # the README's server and handler
    server_logger = "hostile"
    prefork = 2
    handler_klass = {"readme": RequestHandler, "session": SessionHandler}[sys.argv[1]]


logging.basicConfig(level=logging.INFO, filename=sys.argv[2],
                    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
server = Pool(("127.0.0.1", 0))
print("READY", server.server_address[1], os.getpid(), flush=True)
server.serve_forever()
"""


def _reset(sock):
    """Close with an RST instead of a FIN (SO_LINGER on, zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the hostile clients ---------------------------------------------------------------------

INVALID_UTF8 = [
    b"\xff",  # never valid
    b"\xc3\x28",  # a lead byte without its continuation
    b"\xc0\xaf",  # overlong encoding of "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf8\x88\x80\x80\x80",  # a five-byte form
    b"\xe2\x82",  # truncated
]

#: One hostile connection: (payload, how it ends).  "fin" half-closes and reads the reply to
#: EOF, "reset" sends an RST right after the payload, "drop" closes without reading.
endings = st.sampled_from(["fin", "reset", "drop"])

payloads = st.one_of(
    st.binary(min_size=1, max_size=4096),  # random bytes, newlines or not
    st.integers(1, 70000).map(lambda n: b"\0" * n),  # NUL bytes, past max_line_length too
    st.integers(1, 70000).map(lambda n: b"\0" * n + b"\n"),
    st.just(b"x" * (10 * 1024 * 1024)),  # 10 MiB without a newline
    st.tuples(st.text(max_size=50), st.sampled_from(INVALID_UTF8), st.text(max_size=50)).map(
        lambda t: t[0].encode("utf8") + t[1] + t[2].encode("utf8") + b"\n"
    ),  # invalid UTF-8 in a line
    st.binary(min_size=1, max_size=8192).map(lambda b: b.replace(b"\n", b"")),  # cut message
    st.integers(1, 400000).map(lambda n: b"a\n" * n),  # pipelined lines, replies unread
)

hostile_connections = st.lists(st.tuples(payloads, endings), min_size=1, max_size=6)


def attack(address, payload, ending):
    """One hostile connection.  Whatever the server does to it (closing it early, resetting
    it) is fine: only the properties of the pool are checked."""
    try:
        sock = connect(address, timeout=10)
    except OSError:
        return
    try:
        try:
            sock.sendall(payload)
        except OSError:
            return  # the server closed it mid-send (e.g. after max_line_length)
        if ending == "reset":
            _reset(sock)
            return
        if ending == "fin":
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
                recv_all(sock, limit=1 << 16)
    finally:
        sock.close()


class WellFormedClient(threading.Thread):
    """Talks to the pool correctly, in parallel with the attacks, until stopped: every
    error or wrong reply is recorded."""

    def __init__(self, address, kind):
        super().__init__(daemon=True)
        self.address = address
        self.kind = kind
        self.stopping = threading.Event()
        self.served = 0
        self.errors = []

    def run(self):
        while not self.stopping.is_set():
            try:
                if self.kind == "readme":
                    self._readme_round()
                else:
                    self._session_round()
            except Exception as e:  # recorded, the test fails on it
                self.errors.append(repr(e))

    def _readme_round(self):
        n = self.served
        with connect(self.address, timeout=10) as sock:
            sock.sendall(b"Hello World %d\n" % n)
            reply = recv_all(sock)
        if reply != b"hello world %d\n" % n:
            self.errors.append("wrong reply %r" % reply[:100])
        self.served += 1

    def _session_round(self):
        """One persistent session of 20 lines, each answered before the next is sent."""
        with connect(self.address, timeout=10) as sock:
            reader = sock.makefile("rb")
            for _ in range(20):
                n = self.served
                sock.sendall(b"Line %d\n" % n)
                reply = reader.readline()
                if reply != b"ok Line %d\n" % n:
                    self.errors.append("wrong reply %r" % reply[:100])
                    return
                self.served += 1
            sock.shutdown(socket.SHUT_WR)
            rest = reader.read()
            if rest:
                self.errors.append("unexpected data after the session %r" % rest[:100])

    def stop(self):
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the well-formed client is stuck"


@pytest.fixture
def descriptors_for_silent_clients():
    """Enough descriptors in this process (and the pool it starts) for the silent clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SILENT_CONNECTIONS * 2 + 200
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip("RLIMIT_NOFILE hard limit %d below %d" % (hard, wanted))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("kind", ["readme", "session"])
def test_hostile_input_kills_no_worker_bounds_memory_and_spares_a_well_formed_client(
    server_process, tmp_path, descriptors_for_silent_clients, kind
):
    log_file = str(tmp_path / "pool.log")
    pool = server_process(POOL, args=(kind, log_file))
    address = ("127.0.0.1", pool.port)
    workers = sorted(workers_of(pool.pid, 2))
    baseline = {pid: rss_kib(pid) for pid in workers}

    client = WellFormedClient(address, kind)
    client.start()
    silent = []
    try:
        deadline = time.monotonic() + ATTACK_BUDGET
        for _ in range(SILENT_CONNECTIONS):
            silent.append(connect(address, timeout=10))
            assert time.monotonic() < deadline, "over the time budget of the attacks"
        wait_for(lambda: client.served > 0, timeout=30, what="the well-formed client served")

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            # Each example acts on the same pool, whose state carries over: a failure is
            # not a function of one example alone, so shrinking would mislead (and cost).
            phases=[Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(hostile_connections)
        def attacks_leave_the_pool_whole(connections):
            # The connections of one example overlap: each worker serves several at once.
            threads = [threading.Thread(target=attack, args=(address, payload, ending))
                       for payload, ending in connections]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
                assert not thread.is_alive(), "a hostile client is stuck"
            assert all(pid_alive(pid) for pid in workers), "a worker died"
            assert client.errors == [], client.errors[:10]
            assert time.monotonic() < deadline, "over the time budget of the attacks"

        attacks_leave_the_pool_whole()
        served_during_attacks = client.served
        # The silent clients are still connected and each still holds a worker connection:
        # going away now (half of them with a reset) is one more hostile act.
        for i, sock in enumerate(silent):
            if i % 2:
                _reset(sock)
            else:
                sock.close()
        silent = []
        before = client.served
        wait_for(lambda: client.served > before + 5, timeout=30,
                 what="the well-formed client served after the silent ones left")
    finally:
        for sock in silent:
            sock.close()
        client.stop()

    assert client.errors == [], client.errors[:10]
    assert served_during_attacks > 0
    assert sorted(workers_of(pool.pid, 2)) == workers, "a worker was replaced"
    # The kernel's high-water mark of each worker's RSS: a peak between two looks counts.
    peak = {pid: rss_kib(pid, "VmHWM") for pid in workers}
    growth = {pid: peak[pid] - baseline[pid] for pid in workers}
    print("RSS KiB at start %s, peak %s, growth %s" % (baseline, peak, growth))
    assert max(growth.values()) < RSS_GROWTH_LIMIT_KIB, (baseline, peak)
