"""Unit tests of spoon.service: endpoint parsing, binding, dotted paths, the supervisor
life cycle driven by a MemoryReactorClock, and the line relay.  No process is started."""

import os
import signal
import socket
import subprocess
import sys

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

import spoon.server
from spoon.net import bind_socket, parse_socket_endpoint, socket_options
from spoon.service import PreforkService, ServeService
from spoon.targets import TargetError, resolve


# -- endpoint strings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8080", ("tcp", "0.0.0.0", 8080, None)),
        ("tcp:port=8080:interface=127.0.0.1", ("tcp", "127.0.0.1", 8080, None)),
        ("tcp:0:interface=\\:\\:1:backlog=7", ("tcp", "::1", 0, 7)),
        ("tcp6:8080", ("tcp", "::", 8080, None)),
        ("tcp6:8080:\\:\\:1", ("tcp", "::1", 8080, None)),
        ("udp:53:interface=127.0.0.1", ("udp", "127.0.0.1", 53, None)),
        ("8080", ("tcp", "0.0.0.0", 8080, None)),
        ("unix:/tmp/x.sock", ("unix", "/tmp/x.sock", None, None)),
        ("unix:address=/tmp/x.sock:mode=600:backlog=9", ("unix", "/tmp/x.sock", None, 9)),
        ("systemd:domain=INET:index=1", ("systemd", None, None, None)),
    ],
)
def test_parse_socket_endpoints(description, expected):
    spec = parse_socket_endpoint(description)
    assert (spec.kind, spec.host, spec.port, spec.backlog) == expected


@pytest.mark.parametrize("description, index, name", [
    ("systemd:domain=INET:index=1", 1, None),
    ("systemd:domain=INET:name=web.socket", None, "web.socket"),
])
def test_a_systemd_socket_is_chosen_by_position_or_by_name(description, index, name):
    spec = parse_socket_endpoint(description)
    assert (spec.kind, spec.index, spec.name) == ("systemd", index, name)


#: Two sockets passed as systemd passes them (descriptors 3 and 4, LISTEN_FDNAMES in the
#: same order); the endpoint given picks one; prints the port of the socket it got.
ADOPT_NAMED = """
import os, socket, sys
from spoon.net import bind_socket, parse_socket_endpoint
socks = []
for fd in (3, 4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    os.dup2(s.fileno(), fd)
    socks.append(s)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="first:second")
got = bind_socket(parse_socket_endpoint(sys.argv[1]))
print(" ".join(str(s.getsockname()[1]) for s in socks + [got]))
"""


@pytest.mark.parametrize("choice, which", [("index=0", 0), ("index=1", 1), ("name=first", 0),
                                           ("name=second", 1)])
def test_the_chosen_systemd_socket_is_the_one_adopted(choice, which):
    out = subprocess.run([sys.executable, "-c", ADOPT_NAMED, "systemd:domain=INET:" + choice],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ports = out.stdout.split()
    assert ports[2] == ports[which]


@pytest.mark.parametrize("description", [
    "systemd:domain=INET", "systemd:domain=INET:index=0:name=web", "systemd:domain=INET:index=x",
    "systemd:domain=INET:name=",
])
def test_a_systemd_endpoint_names_exactly_one_socket(description):
    with pytest.raises(ValueError, match="endpoint"):
        parse_socket_endpoint(description)


@pytest.mark.parametrize("description", ["onion:443", "tls:443", "ssh:22"])
def test_other_endpoints_are_not_socket_endpoints(description):
    assert parse_socket_endpoint(description) is None


@pytest.mark.parametrize("description", ["tcp:http", "tcp:80:bogus=1", "tcp:", "tcp:80:backlog=x"])
def test_malformed_socket_endpoints_are_rejected(description):
    with pytest.raises(ValueError, match="endpoint"):
        parse_socket_endpoint(description)


class SpeaksFirst(spoon.server.TCPSpoon):
    client_speaks_first = True


def _defers_accept(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) != 0


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
@pytest.mark.parametrize("klass, deferred", [(spoon.server.TCPSpoon, False), (SpeaksFirst, True)])
def test_a_client_speaks_first_class_defers_accept_on_every_socket_spoon_binds(klass, deferred):
    """The class binding itself (a script, the spoon command), the TCP sockets spoon binds
    for it (a pool's, ``twistd spoon``'s endpoints): the same TCP_DEFER_ACCEPT."""
    itself = klass(("127.0.0.1", 0))
    bound = bind_socket(parse_socket_endpoint("tcp:0:interface=127.0.0.1"), **socket_options(klass))
    served = ServeService(klass(("127.0.0.1", 0), bind_and_activate=False),
                          ["tcp:0:interface=127.0.0.1"], reactor=MemoryReactorClock())
    served.startService()
    try:
        assert _defers_accept(itself.socket) is deferred
        assert _defers_accept(bound) is deferred
        assert _defers_accept(served.ports[0].socket) is deferred
    finally:
        itself.server_close()
        bound.close()
        for port in served.ports:
            port.stopListening()


#: A new generation of a code upgrade (the listening socket handed down as SPOON_UPGRADE_FDS):
#: the class binding its address itself, or spoon.net binding for it; prints the socket's
#: TCP_DEFER_ACCEPT and port.
NEW_GENERATION = """
import socket, sys
import spoon.server
from spoon.net import bind_socket, parse_socket_endpoint, socket_options

class Server(spoon.server.TCPSpoon):
    client_speaks_first = sys.argv[3] == "first"

port = int(sys.argv[1])
if sys.argv[2] == "class":
    sock = Server(("127.0.0.1", port)).socket
else:
    sock = bind_socket(parse_socket_endpoint("tcp:%d:interface=127.0.0.1" % port),
                       **socket_options(Server))
print(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT), sock.getsockname()[1])
"""


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
@pytest.mark.parametrize("path", ["class", "net"])
@pytest.mark.parametrize("old, new", [(True, False), (False, True)])
def test_an_upgrade_defers_accept_as_the_new_code_says_not_as_the_old_did(path, old, new):
    """An upgrade that changes client_speaks_first: the inherited socket follows the new
    class (a greeting server would otherwise have its clients wait for the kernel)."""
    old_socket = socket.socket()
    try:
        old_socket.bind(("127.0.0.1", 0))
        old_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1 if old else 0)
        old_socket.listen(8)
        port = old_socket.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-c", NEW_GENERATION, str(port), path, "first" if new else "greets"],
            env=dict(os.environ, SPOON_UPGRADE_FDS=str(old_socket.fileno())),
            pass_fds=[old_socket.fileno()], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        deferral, inherited_port = out.stdout.split()
        assert int(inherited_port) == port  # the inherited socket, not a new one
        assert (int(deferral) != 0) is new
        assert (old_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) != 0) is new
    finally:
        old_socket.close()


def test_bind_dual_stack_serves_ipv4_and_ipv6():
    sock = bind_socket(parse_socket_endpoint("tcp:0:interface=\\:\\:"))
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        for host in ("127.0.0.1", "::1"):
            client = socket.create_connection((host, port), timeout=5)
            client.close()
    finally:
        sock.close()


def test_bind_ipv6_only_and_busy_port_message():
    sock = bind_socket(parse_socket_endpoint("tcp:0:interface=\\:\\:1"), ipv6_only=True)
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        busy = parse_socket_endpoint("tcp:%d:interface=\\:\\:1" % sock.getsockname()[1])
        with pytest.raises(OSError, match=r"cannot bind tcp \[::1\]:%d" % busy.port):
            bind_socket(busy, reuse_address=False)
    finally:
        sock.close()


def test_bind_udp():
    sock = bind_socket(parse_socket_endpoint("udp:0:interface=127.0.0.1"))
    try:
        assert sock.type == socket.SOCK_DGRAM
    finally:
        sock.close()


# -- dotted paths ---------------------------------------------------------------------------


def test_resolve_names_the_path_in_errors():
    assert resolve("spoon.examples.EchoServer").__name__ == "EchoServer"
    with pytest.raises(TargetError, match="'no_such_module_x.Server'"):
        resolve("no_such_module_x.Server")
    with pytest.raises(TargetError, match="'spoon.examples.Nope'.*no attribute 'Nope'"):
        resolve("spoon.examples.Nope")
    with pytest.raises(TargetError, match="not a dotted path"):
        resolve("EchoServer")


def test_prefork_service_rejects_non_server_classes_and_wrong_endpoints():
    with pytest.raises(TargetError, match="not a spoon server class"):
        PreforkService("socket.socket")
    with pytest.raises(ValueError, match="cannot be pre-forked"):
        PreforkService("spoon.examples.EchoServer", "tls:0")
    with pytest.raises(ValueError, match="TCP server but the endpoint is UDP"):
        PreforkService("spoon.examples.EchoServer", "udp:0")


# -- the supervisor's life cycle on a fake reactor ------------------------------------------


class _Process:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, signum):
        self.signals.append(signum)


class ProcessReactor(MemoryReactorClock):
    """MemoryReactorClock that records spawnProcess calls (it has no IReactorProcess)."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.running = True

    def callWhenRunning(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None, gid=None, usePTY=0, childFDs=None):
        process = _Process(1000 + len(self.spawned))
        self.spawned.append((protocol, executable, list(args), env, dict(childFDs)))
        protocol.makeConnection(process)
        return process


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _text(event):
    from twisted.logger import formatEvent

    return formatEvent(event)


def test_spawns_supervisor_with_the_bound_socket_and_options(events):
    reactor = ProcessReactor()
    svc = PreforkService(
        "spoon.examples.EchoServer", "tcp:0:interface=127.0.0.1", workers=3,
        graceful_timeout=7, worker_timeout=9, reactor=reactor,
    )
    svc.privilegedStartService()
    try:
        assert svc.address[0] == "127.0.0.1" and svc.address[1] > 0
        svc.startService()
        protocol, executable, args, env, fds = reactor.spawned[0]
        assert args[1:] == [
            "-m", "spoon.prefork", "--fd", "3", "--target", "spoon.examples.EchoServer",
            "--log-format", "json", "--log-level", "info", "--workers", "3", "--graceful-timeout", "7", "--worker-timeout", "9",
        ]
        assert fds[3] == svc.socket.fileno() and fds[1] == "r" and fds[2] == "r"
        assert svc.pid == 1000
        # Output lines become one log event each, partial lines wait for their end.
        protocol.childDataReceived(2, b"[1001] worker: hel")
        protocol.childDataReceived(2, b"lo\n[1002] second\n\n")
        lines = [_text(e) for e in events if e.get("log_system") == "spoon.pool" and "[100" in _text(e)]
        assert lines == ["[1001] worker: hello", "[1002] second"]
    finally:
        svc.stopService()


def test_pool_records_become_events_of_their_logger_level_pid_and_time(events):
    """The supervisor writes JSON lines (--log-format json); each becomes one event of its
    logger and level carrying the writer's pid, time and traceback; spoon's text lines are
    understood too; anything else is relayed as it is."""
    from spoon import logs

    reactor = ProcessReactor()
    svc = PreforkService("spoon.examples.EchoServer", reactor=reactor)
    svc.startService()
    protocol = reactor.spawned[0][0]
    protocol.childDataReceived(2, logs.render(1e9, "INFO", 8424, "gen-server", "generation 1",
                                              log_format="json").encode() + b"\n")
    protocol.childDataReceived(2, logs.render(1e9 + 1, "ERROR", 8425, "spoon.worker", "boom",
                                              "Traceback (most recent call last):\n  x",
                                              log_format="json").encode() + b"\n")
    protocol.childDataReceived(2, logs.render(1e9 + 2, "WARNING", 8426, "w", "text line").encode()
                               + b"\n")
    protocol.childDataReceived(1, b"a print\n")
    svc.stopService()
    relayed = [e for e in events if e.get(logs.PID_KEY) or e.get("log_system") == "spoon.pool"]
    assert [(e["log_namespace"], e["log_level"], e["log_system"], _text(e)) for e in relayed] == [
        ("gen-server", LogLevel.info, "gen-server#info pid=8424", "generation 1"),
        ("spoon.worker", LogLevel.error, "spoon.worker#error pid=8425", "boom"),
        ("w", LogLevel.warn, "w#warn pid=8426", "text line"),
        ("spoon.pool", LogLevel.info, "spoon.pool", "a print"),
    ]
    assert [round(e[logs.TIME_KEY]) for e in relayed[:3]] == [1e9, 1e9 + 1, 1e9 + 2]
    assert relayed[1][logs.TRACEBACK_KEY] == "Traceback (most recent call last):\n  x"


def test_unexpected_exit_restarts_with_back_off(events):
    reactor = ProcessReactor()
    svc = PreforkService("spoon.examples.EchoServer", reactor=reactor, restart_delay=(0.5, 3.0))
    svc.startService()
    delays = []
    for _ in range(5):
        protocol = reactor.spawned[-1][0]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        assert svc.pid is None
        pending = [c for c in reactor.getDelayedCalls() if c.active()]
        assert len(pending) == 1
        delays.append(pending[0].getTime() - reactor.seconds())
        reactor.advance(delays[-1])
        assert svc.pid is not None
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert len(reactor.spawned) == 6
    assert any("starting a new one in 3.0s" in _text(e) for e in events)
    # A supervisor that ran long enough resets the back-off.
    reactor.advance(svc.stable_after)
    reactor.spawned[-1][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    pending = [c for c in reactor.getDelayedCalls() if c.active()]
    assert pending[0].getTime() - reactor.seconds() == 0.5
    svc.stopService()
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


def test_stop_sends_term_and_fires_when_the_supervisor_is_gone():
    reactor = ProcessReactor()
    svc = PreforkService("spoon.examples.EchoServer", graceful_timeout=4, reactor=reactor)
    svc.startService()
    process = svc.process
    d = svc.stopService()
    assert process.signals == [signal.SIGTERM]
    assert svc.socket is None  # our copy is closed at once; the pool holds its own
    fired = []
    d.addCallback(fired.append)
    assert not fired
    reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
    assert fired == [None]
    assert len(reactor.spawned) == 1  # not restarted
    assert not [c for c in reactor.getDelayedCalls() if c.active()]


def test_relayed_signals():
    reactor = ProcessReactor()
    svc = PreforkService("spoon.examples.EchoServer", reactor=reactor)
    assert svc.reload() is False  # nothing to signal yet
    svc.startService()
    svc.reload()
    svc.restart_workers()
    svc.add_worker()
    svc.remove_worker()
    assert svc.process.signals == [signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU]
    svc.stopService()


def test_stop_before_spawn_and_during_back_off():
    reactor = ProcessReactor()
    svc = PreforkService("spoon.examples.EchoServer", reactor=reactor)
    svc.startService()
    reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    fired = []
    svc.stopService().addCallback(fired.append)
    assert fired == [None]
    reactor.advance(60)
    assert len(reactor.spawned) == 1


def test_import_root_is_passed_to_the_supervisor(tmp_path, monkeypatch):
    package = tmp_path / "pkg_for_root_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "apps.py").write_text("import spoon.server\nclass S(spoon.server.TCPSpork):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    svc = PreforkService("pkg_for_root_test.apps.S", reactor=ProcessReactor())
    assert svc.python_path == [str(tmp_path)]
    assert svc._environment()["PYTHONPATH"].split(":")[0] == str(tmp_path)


def test_main_module_targets_are_refused():
    import __main__

    __main__.SpoonTestServer = type("SpoonTestServer", (object,), {"__module__": "__main__"})
    try:
        with pytest.raises(TargetError, match="__main__"):
            PreforkService("__main__.SpoonTestServer")
    finally:
        del __main__.SpoonTestServer


def test_workers_get_the_reactor_kind_of_this_process():
    """The supervisor is told which reactor its workers install: the one named, else the
    kind this process runs (twistd --reactor poll), else nothing (a fake reactor)."""
    from twisted.internet.pollreactor import PollReactor

    from spoon.service import reactor_short_name

    assert reactor_short_name(PollReactor()) == "poll"
    assert reactor_short_name(ProcessReactor()) is None
    svc = PreforkService("spoon.examples.EchoServer", reactor=ProcessReactor())
    assert "--reactor" not in svc.supervisor_args()
    svc = PreforkService("spoon.examples.EchoServer", reactor=ProcessReactor(), reactor_name="select")
    assert svc.supervisor_args()[-2:] == ["--reactor", "select"]


def test_a_unix_endpoint_replaces_a_stale_socket_file_but_not_a_live_one(tmp_path):
    path = str(tmp_path / "s.sock")
    spec = parse_socket_endpoint("unix:%s:mode=600" % path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a killed server leaves its socket file behind
    live = bind_socket(spec)
    try:
        assert live.getsockname() == path and oct(os.stat(path).st_mode & 0o777) == "0o600"
        with pytest.raises(OSError, match="cannot bind unix %s: Address already in use" % path):
            bind_socket(spec)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(path)  # the live server's file was left alone
    finally:
        live.close()
