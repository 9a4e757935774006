"""``python -m spoon.prefork --fd FD --target PATH``: the supervisor started (fork and exec)
around an inherited listening socket, as twistd and the embedding service start it."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from support import ROOT, children_of, kill_group, recv_all, wait_for
from test_prefork import ask, assert_gone, serving_pids

TARGETS = '''
import os
import spoon.server
from twisted.internet.protocol import DatagramProtocol


class Handler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d %d %s\\n" % (os.getpid(), self.server.generation,
                                           str(self.server.pids is None).encode()))


class EchoPool(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = 3
    generation = 0

    def load_config(self):
        self.generation += 1


class NoShutdownSignal(EchoPool):
    """Installs no shutdown handler of its own (as in one process: TERM kills it)."""

    signal_shutdown = None
    prefork = 2


def site():
    """A plain Twisted web site answering with the worker's pid."""
    from twisted.web import resource, server

    class Pid(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            if request.path == b"/slow":
                # Quiet for a while, then the answer: a request in progress.
                from twisted.internet import reactor

                def finish():
                    request.write(b"%d" % os.getpid())
                    request.finish()

                reactor.callLater(1.5, finish)
                return server.NOT_DONE_YET
            return b"%d" % os.getpid()

    return server.Site(Pid())


class PidDatagram(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"%d" % os.getpid(), addr)


def datagram():
    return PidDatagram()


def answer_at_eof():
    """A raw Twisted protocol that answers only once the client has half-closed: its pid,
    the length of the whole input, then the input reversed."""
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    @implementer(IHalfCloseableProtocol)
    class AnswerAtEOF(Protocol):
        def connectionMade(self):
            self.chunks = []

        def dataReceived(self, data):
            self.chunks.append(data)

        def readConnectionLost(self):
            body = b"".join(self.chunks)
            self.transport.write(b"%d %d\\n" % (os.getpid(), len(body)))
            self.transport.write(body[::-1])
            self.transport.loseConnection()

        def writeConnectionLost(self):
            pass

    return Factory.forProtocol(AnswerAtEOF)


def reactor_name():
    """Answers "<pid> <class name of the worker's reactor>" and closes."""
    from twisted.internet.protocol import Factory, Protocol

    class Name(Protocol):
        def connectionMade(self):
            from twisted.internet import reactor

            self.transport.write(b"%d %s" % (os.getpid(), type(reactor).__name__.encode()))
            self.transport.loseConnection()

    return Factory.forProtocol(Name)
'''


@pytest.fixture
def targets(tmp_path):
    (tmp_path / "pooltargets.py").write_text(textwrap.dedent(TARGETS))
    return tmp_path


class Pool:
    """A supervisor process started with an inherited socket; killed by group at the end."""

    def __init__(self, sock, target, path, *args):
        self.log_path = path / ("pool-%d.log" % sock.fileno())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), ROOT]))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spoon.prefork", "--fd", str(sock.fileno()), "--target", target, *args],
                pass_fds=[sock.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def log(self):
        with open(self.log_path, encoding="utf8", errors="replace") as f:
            return f.read()

    def kill(self):
        kill_group(self.proc)


@pytest.fixture
def pools():
    started = []

    def start(*args, **kwargs):
        pool = Pool(*args, **kwargs)
        started.append(pool)
        return pool

    yield start
    for pool in started:
        pool.kill()


def _listening(family=socket.AF_INET, host="127.0.0.1"):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def test_spoon_class_pool_on_inherited_socket(pools, targets):
    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.EchoPool", targets)
    # --workers defaults to the class's prefork (3).
    wait_for(lambda: len(children_of(pool.pid)) == 3, timeout=20, what="3 workers")
    workers = set(children_of(pool.pid))
    seen = serving_pids(port, workers)
    assert pool.pid not in seen
    assert ask(port)[2] is True  # pids is None in a worker
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0
    assert_gone(workers)
    log = pool.log()
    # One line per record, with the pid of the process that wrote it.
    assert " INFO [%d] spoon-server: Forked worker" % pool.pid in log
    assert any("[%d]" % w in log for w in workers)


def test_workers_option_and_hup(pools, targets):
    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.EchoPool", targets, "--workers", "2", "--worker-timeout", "5")
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    old = set(children_of(pool.pid))
    assert set(serving_pids(port, old).values()) == {1}
    pool.proc.send_signal(signal.SIGHUP)
    assert_gone(old, timeout=20)
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=10)
    assert set(serving_pids(port, children_of(pool.pid)).values()) == {2}
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0


def test_twisted_site_pre_forked(pools, targets):
    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.site", targets, "--workers", "2", "--graceful-timeout", "5")
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    seen = set()

    def fetch():
        with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=10) as r:
            seen.add(int(r.read()))
        return workers <= seen

    wait_for(fetch, timeout=20, interval=0, what="both workers answering HTTP")
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0
    assert_gone(workers)


def test_udp_factory_pool(pools, targets):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.datagram", targets, "--workers", "2", "--udp")
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)

        def answered():
            client.sendto(b"?", ("127.0.0.1", port))
            try:
                return int(client.recv(100)) in workers
            except socket.timeout:
                return False

        wait_for(answered, timeout=20, interval=0.05, what="a datagram answered by a worker")
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0


def test_exits_with_its_parent(targets, tmp_path):
    """A parent killed with SIGKILL (twistd, say) leaves no supervisor or worker behind."""
    parent_code = textwrap.dedent(
        """
        import os, socket, subprocess, sys, time
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        env = dict(os.environ, PYTHONPATH=%r)
        child = subprocess.Popen(
            [sys.executable, "-m", "spoon.prefork", "--fd", str(sock.fileno()),
             "--target", "pooltargets.EchoPool", "--workers", "2", "--graceful-timeout", "2"],
            pass_fds=[sock.fileno()], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(child.pid, sock.getsockname()[1], flush=True)
        time.sleep(600)
        """
        % os.pathsep.join([str(targets), ROOT])
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        supervisor, port = map(int, parent.stdout.readline().split())
        wait_for(lambda: len(children_of(supervisor)) == 2, timeout=20)
        workers = set(children_of(supervisor))
        serving_pids(port, workers)
        parent.kill()
        parent.wait(timeout=10)
        assert_gone({supervisor, *workers}, timeout=10)
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.stdout.close()


def test_bad_target_fails_with_a_message(pools, targets):
    with _listening() as sock:
        pool = pools(sock, "pooltargets.NoSuchThing", targets)
    assert pool.proc.wait(timeout=20) == 2
    assert "NoSuchThing" in pool.log()
    assert children_of(pool.pid) == []


def test_site_pool_stop_closes_idle_keep_alive_connections(pools, targets):
    """A browser's persistent connection does not hold a graceful stop for the whole grace
    period: between requests it is closed."""
    import time

    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.site", targets, "--workers", "2")  # grace: 30 s
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response or not response.split(b"\r\n\r\n", 1)[1]:
            response += client.recv(4096)
        assert response.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        pool.proc.send_signal(signal.SIGTERM)
        assert client.recv(4096) == b""  # closed by the server, between requests
        assert pool.proc.wait(timeout=20) == 0
        assert time.monotonic() - start < 10
    assert_gone(workers)


def test_site_pool_stop_lets_a_slow_request_finish(pools, targets):
    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.site", targets, "--workers", "2")
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        # A first request answered (the connection is persistent), then a slow one.
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in first or not first.split(b"\r\n\r\n", 1)[1]:
            first += client.recv(4096)
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        # (Whether the worker has read it yet or not: the connection was busy less than
        # IDLE_CLOSE_AFTER ago, and then carries a request in progress.)
        pool.proc.send_signal(signal.SIGTERM)
        rest = recv_all(client)
        assert rest.startswith(b"HTTP/1.1 200")
        body = rest.split(b"\r\n\r\n", 1)[1]  # chunked: "<size>\r\n<pid>\r\n0\r\n\r\n"
        assert int(body.split(b"\r\n")[1]) in workers
    assert pool.proc.wait(timeout=20) == 0



def _send_half_close_and_read(port, body, timeout=30):
    """Send ``body``, shut down our writing side, read the reply to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(body)
        client.shutdown(socket.SHUT_WR)
        reply = recv_all(client, limit=1 << 30)
    header, _, rest = reply.partition(b"\n")
    assert header, "connection closed without an answer: half-close not passed through"
    pid, length = map(int, header.split())
    return pid, length, rest


def test_half_close_reaches_a_plain_factory_protocol(pools, targets):
    """A client's shutdown(SHUT_WR) reaches readConnectionLost of an IHalfCloseableProtocol
    served by the pool (the connection-tracking wrapper passes it through), for a small and
    a multi-MiB input."""
    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.answer_at_eof", targets, "--workers", "2", "--graceful-timeout", "5")
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    seen = set()

    def both_answer():
        pid, length, rest = _send_half_close_and_read(port, b"hello")
        assert (length, rest) == (5, b"olleh")
        seen.add(pid)
        return workers <= seen

    wait_for(both_answer, timeout=20, interval=0, what="both workers answering at EOF")
    body = os.urandom(1 << 16) * 64  # 4 MiB
    pid, length, rest = _send_half_close_and_read(port, body)
    assert pid in workers
    assert length == len(body)
    assert rest == body[::-1]
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0
    assert_gone(workers)


def _reactors_of(port, workers):
    seen = {}

    def every_worker_said():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            reply = recv_all(client)
        pid, name = reply.split()
        seen[int(pid)] = name.decode()
        return set(workers) <= set(seen)

    wait_for(every_worker_said, timeout=20, interval=0, what="each worker's reactor")
    return set(seen.values())


@pytest.mark.parametrize("name, expected", [("select", "SelectReactor"), (None, "EPollReactor")])
def test_reactor_option_installs_it_in_every_worker(pools, targets, name, expected):
    args = ["--workers", "2"] + (["--reactor", name] if name else [])
    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.reactor_name", targets, *args)
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    assert _reactors_of(port, workers) == {expected}
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0


def test_unknown_reactor_fails_with_a_message(pools, targets):
    with _listening() as sock:
        pool = pools(sock, "pooltargets.reactor_name", targets, "--reactor", "nosuch")
    assert pool.proc.wait(timeout=20) == 2
    assert 'reactor = "nosuch" (option --reactor): unknown reactor' in pool.log()
    assert children_of(pool.pid) == []


def _uids(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line for %d" % pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_uid_gid_switch_user_before_forking(pools, targets):
    """--uid/--gid: the supervisor imports, then becomes nobody; the workers it forks are
    nobody too and serve."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    with _listening() as sock:
        port = sock.getsockname()[1]
        # --reactor: looked up before the switch, not again through Twisted's plugin files
        # once nobody (tests/test_prefork_private_checkout.py makes them unreadable).
        pool = pools(sock, "pooltargets.EchoPool", targets, "--workers", "2", "--reactor", "poll",
                     "--uid", "nobody", "--gid", str(nobody.pw_gid))
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20, what="2 workers:\n" + pool.log())
    workers = set(children_of(pool.pid))
    serving_pids(port, workers)
    for pid in [pool.pid, *workers]:
        assert _uids(pid) == [nobody.pw_uid] * 4, pid
    assert "Supervisor runs as uid %d gid %d" % (nobody.pw_uid, nobody.pw_gid) in pool.log()
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0
    assert_gone(workers)


def test_unknown_user_fails_with_a_message(pools, targets):
    with _listening() as sock:
        pool = pools(sock, "pooltargets.EchoPool", targets, "--uid", "no-such-user-here")
    assert pool.proc.wait(timeout=20) == 2
    assert "no such user" in pool.log()
    assert children_of(pool.pid) == []


def test_pool_term_drains_workers_of_a_class_without_shutdown_signal(pools, targets):
    """signal_shutdown = None: a pool TERM still drains the workers (each one handles the
    supervisor's SIGTERM) instead of killing them with the request in flight."""
    import re

    with _listening() as sock:
        port = sock.getsockname()[1]
        pool = pools(sock, "pooltargets.NoShutdownSignal", targets, "--graceful-timeout", "15")
    wait_for(lambda: len(children_of(pool.pid)) == 2, timeout=20)
    workers = set(children_of(pool.pid))
    serving_pids(port, workers)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        # A request in flight: its handler waits for the line.
        pool.proc.send_signal(signal.SIGTERM)
        draining = lambda: {int(p) for p in re.findall(r" INFO \[(\d+)\] \S+: SIGTERM received", pool.log())}
        try:
            wait_for(lambda: draining() == workers, timeout=20, what="both workers draining")
        except AssertionError:
            raise AssertionError(pool.log())
        client.sendall(b"hi\n")
        reply = recv_all(client)
    assert int(reply.split()[0]) in workers
    assert pool.proc.wait(timeout=20) == 0
    assert "killed by SIGTERM" not in pool.log()
