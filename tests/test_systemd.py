"""spoon.systemd and a pool's notifications, read from a real NOTIFY_SOCKET datagram
socket."""

import os
import socket
import threading

import pytest

from spoon.systemd import Notifier
from support import ROOT


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notifier_sends_each_state_as_one_datagram(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready(status="serving", mainpid=1234)
    assert sock.recv(4096) == b"READY=1\nMAINPID=1234\nSTATUS=serving"
    assert notifier.reloading()
    reloading = sock.recv(4096).split(b"\n")
    assert reloading[0] == b"RELOADING=1" and reloading[1].startswith(b"MONOTONIC_USEC=")
    assert notifier.stopping() and sock.recv(4096) == b"STOPPING=1"
    assert notifier.watchdog() and sock.recv(4096) == b"WATCHDOG=1"


def test_a_full_notify_queue_drops_the_message_instead_of_blocking_the_sender(notify_socket):
    path, sock = notify_socket  # never read: the queue fills up (net.unix.max_dgram_qlen)
    notifier = Notifier({"NOTIFY_SOCKET": path}, send_timeout=0.05)
    results = []

    def send_until_refused():
        while len(results) < 1000 and (not results or results[-1]):
            results.append(notifier.watchdog())

    sender = threading.Thread(target=send_until_refused, daemon=True)
    sender.start()
    sender.join(timeout=60)
    assert not sender.is_alive(), "a send blocked on the full queue"
    assert results[0] is True and results[-1] is False
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_notify_socket_names_work():
    name = "spoon-test-%d" % os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"


def test_without_systemd_nothing_is_sent_and_nothing_fails():
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready() is False and notifier.stopping() is False
    # systemd gone (its socket removed): the service goes on.
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).ready() is False


def test_watchdog_interval_is_half_the_timeout_for_this_process_only(notify_socket):
    path, _ = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval == 1.5
    env["WATCHDOG_PID"] = str(os.getpid() + 1)  # meant for another process
    assert Notifier(env).watchdog_interval is None


POOL = """
import os, sys
sys.path[:0] = [%r]
import spoon.server

class Echo(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(self.rfile.readline())

class Pool(spoon.server.TCPSpork):
    handler_klass = Echo
    prefork = 2

server = Pool(("127.0.0.1", 0))
print("READY", server.server_address[1], os.getpid(), flush=True)
server.serve_forever()
""" % ROOT


def _messages(sock, until, timeout=20):
    """Datagrams read from ``sock`` until one contains ``until`` (bounded)."""
    import time

    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if until in got[-1]:
            return got
    raise AssertionError("no %r among %r" % (until, got))


def test_a_pool_tells_systemd_ready_reloading_stopping_and_pings_the_watchdog(
    server_process, notify_socket
):
    import signal

    path, sock = notify_socket
    sock.settimeout(0.5)
    proc = server_process(POOL, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    first = _messages(sock, "READY=1")
    ready = first[-1].split("\n")
    assert "MAINPID=%d" % proc.pid in ready  # the supervisor, once both workers serve
    assert not any("WATCHDOG" in m for m in first)  # no ping before the pool is whole
    pings = _messages(sock, "WATCHDOG=1") + _messages(sock, "WATCHDOG=1")
    assert pings[-1] == "WATCHDOG=1"
    proc.signal(signal.SIGHUP)  # reload: replace the workers one by one
    reload = _messages(sock, "RELOADING=1")
    after = _messages(sock, "READY=1")
    assert after[-1].startswith("READY=1")
    proc.signal(signal.SIGTERM)
    stop = _messages(sock, "STOPPING=1")
    assert proc.wait(timeout=20) == 0
    assert reload and stop
