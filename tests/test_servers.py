"""Single-process Spoon servers as real processes: sockets, signals, memory bounds."""

import os
import signal
import socket
import time

import pytest

import spoon.server
from support import connect, recv_all, request, rss_kib, wait_for


@pytest.fixture
def sample(server_process):
    def start(name, host="127.0.0.1", env=None):
        return server_process(
            "import sample_servers; sample_servers.main(*sys.argv[1:])",
            args=(name, host),
            env=env,
        )

    return start


@pytest.fixture
def keep_signal_handlers():
    """Servers built in this process install signal handlers: put the old ones back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sigterm_lets_in_flight_handler_finish_then_returns(sample):
    server = sample("SlowServer")
    client = connect(("127.0.0.1", server.port), timeout=10)
    client.sendall(b"1.0\n")
    assert client.recv(100) == b"started\n"
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    rest = recv_all(client)
    assert rest == b"finished\n"
    client.close()
    assert server.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    out = server.read_output()
    assert "SIGTERM received" in out and "RETURNED" in out


def test_graceful_stop_closes_handlers_still_running_after_grace_period(sample):
    server = sample("SlowServer")  # graceful_timeout = 2
    client = connect(("127.0.0.1", server.port), timeout=15)
    client.sendall(b"60\n")
    assert client.recv(100) == b"started\n"
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    try:
        assert recv_all(client) == b""  # closed without the reply
    except ConnectionResetError:
        pass  # aborted: also closed without the reply
    assert server.wait(timeout=15) == 0
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 10, elapsed
    assert "still open at the end of the stop" in server.read_output()


def test_sigint_stops_at_once(sample):
    server = sample("SlowServer")
    client = connect(("127.0.0.1", server.port), timeout=15)
    client.sendall(b"60\n")
    assert client.recv(100) == b"started\n"
    server.signal(signal.SIGINT)
    assert server.wait(timeout=5) == 0
    client.close()


def test_sigusr1_reloads_config_between_requests_and_survives_errors(sample):
    server = sample("ReloadServer", env={"FAIL_RELOAD_AT": "3"})
    address = ("127.0.0.1", server.port)
    assert request(address, b"gen\n").split()[0] == b"1"
    server.signal(signal.SIGUSR1)
    wait_for(lambda: request(address, b"gen\n").split()[0] == b"2", what="generation 2")
    server.signal(signal.SIGUSR1)  # this one raises in load_config
    wait_for(lambda: "load_config() failed" in "\n".join(server.output) or _drain(server),
             what="the failed reload to be logged")
    assert request(address, b"gen\n").split()[0] == b"2"  # still serving, old config
    server.signal(signal.SIGUSR1)
    wait_for(lambda: request(address, b"gen\n").split()[0] == b"3", what="generation 3")


def _drain(server):
    """Read whatever the server printed so far (non-blocking) into server.output."""
    import fcntl

    fd = server.proc.stdout.fileno()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        data = b""
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    if data:
        server.output.extend(data.decode("utf8", "replace").splitlines())
    return False


def test_handler_exception_is_logged_with_traceback_and_server_goes_on(sample):
    server = sample("CrashyServer")
    address = ("127.0.0.1", server.port)
    assert request(address, b"crash\n") == b""
    assert request(address, b"fine\n") == b"ok\n"
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    out = server.read_output()
    assert "sample-crashy ERROR: Error while processing request from: ('127.0.0.1'," in out
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: handler crashed on purpose" in out


def test_shutdown_from_another_thread_waits_and_serve_forever_runs_again(sample):
    server = sample("TwiceServer")
    address = ("127.0.0.1", server.port)
    assert request(address, b"hello\n") == b"round 1\n"
    assert request(address, b"stop\n") == b"round 1\n"
    # The second serve_forever() runs a fresh reactor on the same socket (a request that
    # raced the stop may still be answered by the first round).
    wait_for(lambda: request(address, b"hello\n", timeout=10) == b"round 2\n",
             timeout=15, what="the second serve_forever() to answer")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    out = server.read_output()
    assert out.index("SHUTDOWN RETURNED") > 0 and "RETURNED AGAIN" in out


def test_udp_datagram_in_reply_datagram_out(sample):
    for host, family, target in (("::0", socket.AF_INET6, "::1"),
                                 ("::0", socket.AF_INET, "127.0.0.1")):
        server = sample("UDPEchoServer", host=host)
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"Hello UDP", (target, server.port))
            data, addr = client.recvfrom(2048)
            assert data == b"hello udp"
            assert addr[1] == server.port
        server.kill()


def test_busy_port_fails_in_constructor_naming_address_leaving_nothing_open(
    keep_signal_handlers,
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fds_before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError) as info:
            spoon.server.TCPSpoon(("127.0.0.1", port))
        assert "127.0.0.1:%d" % port in str(info.value)
        assert info.value.errno == 98  # EADDRINUSE
        assert sorted(os.listdir("/proc/self/fd")) == fds_before


def test_dual_stack_unless_ipv6_only(keep_signal_handlers):
    dual = spoon.server.TCPSpoon(("::0", 0))
    try:
        assert dual.socket.family == socket.AF_INET6
        connect(("127.0.0.1", dual.server_address[1]), timeout=2).close()
    finally:
        dual.server_close()

    class V6Only(spoon.server.TCPSpoon):
        ipv6_only = True

    only = V6Only(("::0", 0))
    try:
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", only.server_address[1]), timeout=2)
        connect(("::1", only.server_address[1]), timeout=2).close()
    finally:
        only.server_close()


def test_class_attributes_and_defaults_of_the_original():
    s = spoon.server
    assert s.Gulp is s.TCPGulp
    assert s.TCPSpoon.server_logger == "spoon-server"
    assert s.TCPSpoon.handler_klass is s.TCPGulp
    assert s.UDPSpoon.handler_klass is s.UDPGulp
    assert s.TCPSpoon.signal_reload == signal.SIGUSR1
    assert s.TCPSpoon.signal_shutdown == signal.SIGTERM
    assert s.TCPSpoon.ipv6_only is False and s.TCPSpoon.allow_reuse_address is True
    assert s.TCPSpork.prefork == 4 and s.UDPSpork.prefork == 4
    assert s.TCPSpoon.command_line_defaults == {
        "port": 5000, "interface": "::0", "pid_file": None,
        "log_file": None, "sentry_dsn": None, "spork": None,
    }

    class MyEchoServer(s.TCPSpoon):
        handler_klass = s.Gulp

    class MyEchoServerForked(MyEchoServer, s.TCPSpork):
        prefork = 6

    # The README's combination keeps the Spork behaviour.
    assert MyEchoServerForked.serve_forever is s.TCPSpork.serve_forever
    assert issubclass(MyEchoServerForked, s._SporkMixIn)


def test_unread_input_is_bounded_in_memory(sample):
    """A client pushes up to 1 GiB that the handler never reads: the server stops reading
    and its RSS grows by less than 32 MiB."""
    server = sample("NeverReadsServer")
    client = connect(("127.0.0.1", server.port), timeout=10)
    assert client.recv(100) == b"parked\n"
    base = rss_kib(server.pid)
    client.settimeout(2)
    block = b"p" * (1024 * 1024)
    sent = 0
    try:
        while sent < 1024 * 1024 * 1024:
            sent += client.send(block)
    except socket.timeout:
        pass  # the server stopped reading: the client is blocked, as it should be
    grown = rss_kib(server.pid) - base
    client.close()
    print("unread input: client pushed %d bytes, server RSS grew %d KiB" % (sent, grown))
    assert sent < 256 * 1024 * 1024, sent
    assert grown < 32 * 1024, "server RSS grew by %d KiB" % grown


def test_output_to_a_slow_reader_is_bounded_in_memory(sample):
    """A handler writes 200 MiB to a client that reads slowly: RSS grows < 32 MiB."""
    server = sample("FirehoseServer")
    client = connect(("127.0.0.1", server.port), timeout=10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.sendall(b"go\n")
    first = client.recv(65536)
    base = rss_kib(server.pid)
    peak = base
    received = len(first)
    # Slow phase: 256 KiB every 20 ms for about two seconds.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        received += len(client.recv(256 * 1024))
        peak = max(peak, rss_kib(server.pid))
        time.sleep(0.02)  # the shape of the load (a slow reader), not synchronisation
    while True:
        data = client.recv(1 << 20)
        if not data:
            break
        received += len(data)
        peak = max(peak, rss_kib(server.pid))
    client.close()
    print("slow reader: 200 MiB written, server RSS grew at most %d KiB" % (peak - base))
    assert received == 200 * 1024 * 1024
    assert peak - base < 32 * 1024, "server RSS grew by %d KiB" % (peak - base)


TWISTED_NATIVE = """
    import sys
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    import sample_servers

    tcp = sample_servers.EchoServer(("127.0.0.1", 0), bind_and_activate=False)
    udp = sample_servers.UDPEchoServer(("127.0.0.1", 0), bind_and_activate=False)

    def listening(port):
        udp_port = reactor.listenUDP(0, udp.protocol_factory(reactor), interface="127.0.0.1")
        print("READY", port.getHost().port, udp_port.getHost().port, flush=True)

    d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tcp.protocol_factory(reactor))
    d.addCallback(listening)
    reactor.run()
"""


def test_twisted_native_endpoints_without_preforking(server_process):
    server = server_process(TWISTED_NATIVE)
    assert request(("127.0.0.1", server.port), b"ENDPOINT\n") == b"endpoint\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"DATAGRAM", ("127.0.0.1", int(server.ready_words[2])))
        assert client.recvfrom(100)[0] == b"datagram"


def test_many_concurrent_persistent_clients(sample):
    """Idle persistent connections cost greenlets, not the server: 200 clients at once."""
    server = sample("EchoServer")
    clients = [connect(("127.0.0.1", server.port), timeout=10) for _ in range(200)]
    for i, c in enumerate(clients):
        c.sendall(b"CLIENT %d\n" % i)
    for i, c in enumerate(clients):
        assert recv_all(c) == b"client %d\n" % i
        c.close()


def test_client_reset_while_handler_waits_leaves_server_serving(sample):
    server = sample("EchoServer")
    import struct

    for _ in range(20):
        c = connect(("127.0.0.1", server.port))
        c.sendall(b"partial line without end")
        # SO_LINGER 0: close with a reset instead of a FIN.
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    assert request(("127.0.0.1", server.port), b"STILL HERE\n") == b"still here\n"
