"""Spoon servers are socketserver servers: the inherited surface, its hooks honoured on the
serving path, in one process and in every pre-forked worker.

Real servers and sockets throughout: in this process for construction-time behaviour and
``handle_request()``, in child processes (tests/socketserver_servers.py) for the serving
path of ``serve_forever()``.
"""

import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading

import pytest

import spoon.server
from support import (
    HERE,
    ROOT,
    bound_client,
    connect,
    read_events,
    recv_all,
    request,
    wait_for,
)


class Lower(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(self.rfile.readline().lower())


class LowerServer(spoon.server.TCPSpoon):
    handler_klass = Lower


class PidHandler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d\n" % os.getpid())


# -- what a server is --------------------------------------------------------------------


def test_servers_are_socketserver_servers_with_the_original_mro_contract():
    s = spoon.server
    assert issubclass(s.TCPSpoon, socketserver.TCPServer)
    assert issubclass(s.TCPSpork, socketserver.TCPServer)
    assert issubclass(s.UDPSpoon, socketserver.UDPServer)
    assert issubclass(s.UDPSpork, socketserver.UDPServer)

    class MyEchoServer(s.TCPSpoon):
        handler_klass = Lower

    class Forked(MyEchoServer, s.TCPSpork):
        prefork = 2

    server = Forked(("127.0.0.1", 0))
    try:
        assert isinstance(server, socketserver.BaseServer)
        assert isinstance(server, socketserver.TCPServer)
        assert isinstance(server, s.TCPSpork)
        # The Spork behaviour wins although MyEchoServer (a Spoon) comes first.
        assert type(server).serve_forever is s._SporkMixIn.serve_forever
        assert server.pids is None
    finally:
        server.server_close()


def test_request_handler_class_and_handler_klass_are_one_attribute():
    server = LowerServer(("127.0.0.1", 0), bind_and_activate=False)
    server.server_close()
    assert server.RequestHandlerClass is Lower
    server.RequestHandlerClass = PidHandler
    assert server.handler_klass is PidHandler
    server.handler_klass = Lower
    assert server.RequestHandlerClass is Lower

    class SocketserverStyle(spoon.server.TCPSpoon):
        RequestHandlerClass = PidHandler

    assert SocketserverStyle.handler_klass is PidHandler
    other = SocketserverStyle(("127.0.0.1", 0), bind_and_activate=False)
    other.server_close()
    assert other.RequestHandlerClass is PidHandler


def test_socketserver_attributes_describe_the_bound_socket():
    server = LowerServer(("127.0.0.1", 0))
    try:
        assert server.socket.getsockname() == server.server_address
        assert server.server_address[1] != 0
        assert server.fileno() == server.socket.fileno()
        assert server.address_family == socket.AF_INET
        assert server.socket_type == socket.SOCK_STREAM
        assert server.timeout is None
        assert server.allow_reuse_address is True
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        server.server_close()
    six = LowerServer(("::1", 0))
    try:
        assert six.address_family == socket.AF_INET6 == six.socket.family
    finally:
        six.server_close()
    udp = spoon.server.UDPSpoon(("127.0.0.1", 0))
    try:
        assert udp.socket_type == socket.SOCK_DGRAM == udp.socket.type
        assert udp.max_packet_size == socketserver.UDPServer.max_packet_size
    finally:
        udp.server_close()


def test_allow_reuse_port_lets_two_servers_share_a_port():
    class Shared(LowerServer):
        allow_reuse_port = True

    first = Shared(("127.0.0.1", 0))
    try:
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        second = Shared(first.server_address)
        second.server_close()
    finally:
        first.server_close()


def _listen_backlog(port):
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss (iproute2) is needed to read a listening socket's backlog")
    out = subprocess.run(
        [ss, "-ltnH", "sport = :%d" % port], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return int(out[2])  # Send-Q of a listening socket: its backlog


def test_request_queue_size_is_the_listen_backlog():
    class Small(LowerServer):
        request_queue_size = 7

    server = Small(("127.0.0.1", 0))
    try:
        assert _listen_backlog(server.server_address[1]) == 7
    finally:
        server.server_close()


def test_constructor_calls_overridden_server_bind_and_server_activate():
    calls = []

    class Hooked(LowerServer):
        def server_bind(self):
            calls.append("bind")
            # An option set before bind, as socketserver code does.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
            super().server_bind()

        def server_activate(self):
            calls.append("activate")
            self.socket.listen(3)  # a backlog of its own

    server = Hooked(("127.0.0.1", 0))
    try:
        assert calls == ["bind", "activate"]
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 32768
        assert _listen_backlog(server.server_address[1]) == 3
    finally:
        server.server_close()
    calls.clear()
    unbound = Hooked(("127.0.0.1", 0), bind_and_activate=False)
    assert calls == [] and unbound.socket is not None
    unbound.server_bind()
    unbound.server_activate()
    assert calls == ["bind", "activate"]
    unbound.server_close()


def test_an_inherited_socket_is_not_bound_or_activated_again():
    calls = []

    class Hooked(LowerServer):
        def server_bind(self):
            calls.append("bind")

        def server_activate(self):
            calls.append("activate")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    with spoon.server.using_socket(sock):
        server = Hooked(sock.getsockname())
    try:
        assert calls == []
        assert server.socket is sock and server.server_address == sock.getsockname()
    finally:
        server.server_close()


def test_with_statement_closes_the_socket():
    with LowerServer(("127.0.0.1", 0)) as server:
        port = server.server_address[1]
        assert server.socket.fileno() >= 0
    assert server.socket.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        connect(("127.0.0.1", port), timeout=2)


def test_a_get_request_override_is_refused_at_construction_with_the_way_out():
    class OwnAccept(LowerServer):
        def get_request(self):
            return self.socket.accept()

    with pytest.raises(TypeError, match="get_request.*verify_request"):
        OwnAccept(("127.0.0.1", 0))


@pytest.mark.parametrize(
    "mixin, advice",
    [(socketserver.ThreadingMixIn, "greenlet"), (socketserver.ForkingMixIn, "TCPSpork")],
)
def test_threading_and_forking_mixins_are_refused_with_the_reason(mixin, advice):
    class Mixed(mixin, LowerServer):
        pass

    fds_before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(TypeError, match=mixin.__name__) as info:
        Mixed(("127.0.0.1", 0))
    assert advice in str(info.value)
    assert sorted(os.listdir("/proc/self/fd")) == fds_before  # nothing left bound


# -- handle_request ------------------------------------------------------------------------


def _client_in_thread(address, payload, results, source=None):
    def run():
        try:
            sock = bound_client(source) if source else socket.socket()
            with sock:
                sock.settimeout(10)
                sock.connect(address)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                results.append(recv_all(sock))
        except OSError as e:
            results.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_handle_request_serves_exactly_one_request_in_this_process():
    class Verified(LowerServer):
        handler_klass = PidHandler
        seen = []

        def verify_request(self, request, client_address):
            self.seen.append(client_address[0])
            return client_address[0] != "127.0.0.2"

    server = Verified(("127.0.0.1", 0))
    try:
        address = server.server_address
        results = []
        first = _client_in_thread(address, b"one\n", results)
        second = _client_in_thread(address, b"two\n", results)
        server.handle_request()
        wait_for(lambda: len(results) == 1, what="the first reply")
        assert results == [b"%d\n" % os.getpid()]  # served here, by this process
        server.handle_request()  # the second waited in the queue meanwhile
        first.join(10), second.join(10)
        assert results[1] == b"%d\n" % os.getpid()
        denied = []
        third = _client_in_thread(address, b"three\n", denied, source="127.0.0.2")
        server.handle_request()
        third.join(10)
        # Closed unanswered (the close may beat the client's half-close).
        assert denied[0] == b"" or isinstance(denied[0], OSError), denied
        assert server.seen[-1] == "127.0.0.2"
    finally:
        server.server_close()


def test_handle_request_of_a_spork_serves_in_the_calling_process():
    class Pool(spoon.server.TCPSpork):
        handler_klass = PidHandler
        prefork = 2

    server = Pool(("127.0.0.1", 0))
    try:
        results = []
        thread = _client_in_thread(server.server_address, b"x\n", results)
        server.handle_request()
        thread.join(10)
        assert results == [b"%d\n" % os.getpid()]
    finally:
        server.server_close()


def test_handle_request_calls_handle_timeout_after_timeout_seconds():
    class Timed(LowerServer):
        timeout = 0.2
        timeouts = 0

        def handle_timeout(self):
            self.timeouts += 1

    server = Timed(("127.0.0.1", 0))
    try:
        assert server.handle_request() is None
        assert server.timeouts == 1
    finally:
        server.server_close()


def test_handle_request_leaves_nothing_behind(tmp_path):
    """In a fresh process: no reactor imported, no thread, no descriptor but the
    listening socket, no signal handler besides the server's own."""
    code = """
import os, signal, socket, sys, threading
sys.path[:0] = [%r]
import spoon.server

class Lower(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(self.rfile.readline().lower())

class S(spoon.server.TCPSpoon):
    handler_klass = Lower

server = S(("127.0.0.1", 0))
fds = sorted(os.listdir("/proc/self/fd"))
handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGCHLD)}
client = socket.create_connection(server.server_address, timeout=5)
client.sendall(b"HELLO\\n")
client.shutdown(socket.SHUT_WR)
server.handle_request()
reply = client.recv(100)
client.close()
assert reply == b"hello\\n", reply
assert "twisted.internet.reactor" not in sys.modules
assert threading.active_count() == 1
assert sorted(os.listdir("/proc/self/fd")) == fds, (fds, os.listdir("/proc/self/fd"))
assert {s: signal.getsignal(s) for s in handlers} == handlers
print("CLEAN")
""" % ROOT
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CLEAN"


def test_udp_handle_request_serves_one_datagram_and_drops_a_truncated_one(caplog):
    class Echo(spoon.server.UDPGulp):
        def handle(self):
            self.wfile.write(b"%d" % len(self.rfile.read()))

    class Small(spoon.server.UDPSpoon):
        handler_klass = Echo
        max_packet_size = 50
        timeout = 5

    server = Small(("127.0.0.1", 0))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"x" * 51, server.server_address)
            client.sendto(b"y" * 50, server.server_address)
            server.handle_request()  # the 51-byte one: dropped, reported
            server.handle_request()
            assert client.recv(100) == b"50"
        assert "larger than max_packet_size (50 bytes)" in caplog.text
    finally:
        server.server_close()


# -- the serving path in real processes, one process and a 2-worker pool -------------------


@pytest.fixture
def hooked(server_process, tmp_path):
    def start(name, poll_interval="0.1"):
        events = str(tmp_path / ("%s.events" % name))
        proc = server_process(
            "import socketserver_servers; socketserver_servers.main(*sys.argv[1:])",
            args=(name, poll_interval),
            env={"EVENTS": events},
        )
        proc.events = lambda: read_events(events)
        return proc

    return start


def _hooks_of(events, port):
    return [hook for _pid, hook, p in events if p == port]


def _exchange(address, payload, source="127.0.0.1"):
    with bound_client(source) as sock:
        sock.connect(address)
        port = str(sock.getsockname()[1])
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
        except OSError:  # reset, or closed before our half-close
            reply = b"<reset>"
    return port, reply


@pytest.mark.parametrize("name", ["HookedSpoon", "HookedSpork"])
def test_every_connection_goes_through_socketservers_hooks_in_order(hooked, name):
    server = hooked(name)
    address = ("127.0.0.1", server.port)
    ok_port, ok_reply = _exchange(address, b"hello\n")
    denied_port, denied_reply = _exchange(address, b"hello\n", source="127.0.0.2")
    boom_port, boom_reply = _exchange(address, b"boom\n")
    assert ok_reply == b"HELLO\n"
    assert denied_reply in (b"", b"<reset>")
    assert boom_reply in (b"", b"<reset>")

    def complete():
        events = server.events()
        return all(
            _hooks_of(events, port) and _hooks_of(events, port)[-1] == "close"
            for port in (ok_port, denied_port, boom_port)
        ) and events

    events = wait_for(complete, what="the hooks of three connections")
    assert _hooks_of(events, ok_port) == [
        "verify", "process", "finish", "handle", "shutdown", "close"
    ]
    # Refused: closed without building the handler (nothing read by it).
    assert _hooks_of(events, denied_port) == ["verify", "shutdown", "close"]
    assert _hooks_of(events, boom_port) == [
        "verify", "process", "finish", "handle", "error", "shutdown", "close"
    ]
    # Bound and activated once, by the process that was constructed; never in a worker.
    binds = [(pid, hook) for pid, hook, _ in events if hook in ("server_bind", "server_activate")]
    assert binds == [(str(server.pid), "server_bind"), (str(server.pid), "server_activate")]
    request_pids = {pid for pid, hook, p in events if p == ok_port}
    if name == "HookedSpork":
        assert str(server.pid) not in request_pids  # served by a worker


@pytest.mark.parametrize("name, processes", [("HookedSpoon", 1), ("HookedSpork", 2)])
def test_service_actions_run_every_poll_interval_in_every_serving_process(
    hooked, name, processes
):
    server = hooked(name, poll_interval="0.3")  # three times the default 0.1

    def calls():
        times = {}
        for pid, hook, when in server.events():
            if hook == "service_actions":
                times.setdefault(pid, []).append(float(when))
        return len(times) == processes and min(map(len, times.values())) >= 6 and times

    times = wait_for(calls, timeout=30, what="service_actions in %d process(es)" % processes)
    if name == "HookedSpork":
        assert str(server.pid) not in times  # the workers, not the supervisor
    for pid, stamps in times.items():
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        median = gaps[len(gaps) // 2]
        assert 0.2 < median < 0.6, (pid, gaps)  # the serve_forever argument, not 0.1


@pytest.mark.parametrize("name", ["UDPHookedSpoon", "UDPHookedSpork"])
def test_udp_verify_request_and_max_packet_size_in_every_worker(hooked, name):
    server = hooked(name)  # max_packet_size = 100
    address = ("127.0.0.1", server.port)
    with bound_client("127.0.0.1", socket.SOCK_DGRAM) as client:
        for size in (100, 101, 100):
            client.sendto(b"a" * size, address)
            if size == 100:
                assert client.recv(200) == b"100 " + b"A" * 16  # whole
    with bound_client("127.0.0.2", socket.SOCK_DGRAM) as denied:
        denied.settimeout(0.5)
        denied.sendto(b"hello", address)
        denied_port = str(denied.getsockname()[1])
        with pytest.raises(socket.timeout):
            denied.recv(200)
    wait_for(lambda: _hooks_of(server.events(), denied_port) == ["verify"],
             what="the denied datagram's verify_request")
    handled = [p for _pid, hook, p in server.events() if hook == "handle"]
    assert denied_port not in handled and len(handled) == 2
    server.signal(signal.SIGTERM)
    server.wait(timeout=15)
    out = server.read_output()
    assert out.count("larger than max_packet_size (100 bytes)") == 1


# -- the same program on socketserver and on spoon ----------------------------------------

PROGRAM = """
import os, socket, socketserver, sys
sys.path[:0] = [%(root)r]
import spoon.server

BASE = {"stdlib": socketserver.TCPServer, "spoon": spoon.server.TCPSpoon}[sys.argv[1]]


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"welcome %%d\\n" %% self.server.served)
        for line in self.rfile:
            if line.strip() == b"quit":
                self.wfile.write(b"bye\\n")
                return
            self.wfile.write(b"%%d:%%s" %% (self.server.served, line.upper()))


class Server(BASE):
    allow_reuse_address = True
    served = 0

    def verify_request(self, request, client_address):
        return client_address[0] in ("127.0.0.1",)

    def process_request(self, request, client_address):
        self.served += 1
        super().process_request(request, client_address)


if BASE is spoon.server.TCPSpoon:
    class Server(Server):
        handler_klass = Handler
    server = Server(("127.0.0.1", 0))
else:
    server = Server(("127.0.0.1", 0), Handler)
with server:
    print("READY", server.server_address[1], flush=True)
    server.serve_forever()
"""


def _session(address, lines, source="127.0.0.1"):
    with bound_client(source) as sock:
        sock.connect(address)
        try:
            for line in lines:
                sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)
        except OSError:  # reset, or closed before our half-close
            return b"<reset>"


def test_a_socketserver_program_behaves_the_same_on_tcpspoon(server_process):
    def run(base):
        proc = server_process(PROGRAM % {"root": ROOT}, args=(base,))
        address = ("127.0.0.1", proc.port)
        seen = [
            _session(address, [b"hello\n", b"world\n"]),
            _session(address, [b"a\n", b"quit\n"]),
            # Refused (it sends nothing: with unread data, a close may reset).
            _session(address, [], source="127.0.0.2"),
            _session(address, [b"partial line without newline"]),
            _session(address, []),
        ]
        proc.kill()
        return seen

    stdlib = run("stdlib")
    assert stdlib[0] == b"welcome 1\n1:HELLO\n1:WORLD\n"  # the program does what it says
    assert stdlib[2] == b""  # refused by its verify_request
    assert run("spoon") == stdlib
