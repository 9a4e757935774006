"""``proxy_protocol = True`` on real servers and sockets, without a load balancer: the test
sends the PROXY header itself (from 127.0.0.1, the only address ``WhoFromOneAddress``
allows) and from 127.0.0.2 (elsewhere).  One process, a pre-forked pool, and ``twistd
spoon -s 2``."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from support import (
    HERE,
    bound_client,
    proxy_v1,
    proxy_v2,
    recv_all,
    wait_for,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
FRONT = ("198.51.100.1", 25)

START = """
    import logging, sys
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(message)s")
    from proxy_servers import {klass}
    server = {klass}(("127.0.0.1", 0))
    print("READY", server.server_address[1], flush=True)
    server.serve_forever()
"""


def through(port, header, line=b"hello", source="127.0.0.1"):
    """Send ``header`` and a line from ``source``; the reply's fields ([] if closed)."""
    with bound_client(source, timeout=10) as sock:
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(header + line + b"\n")
            return recv_all(sock).split()
        except ConnectionResetError:
            return []


@pytest.mark.parametrize("klass", ["WhoSpoon", "WhoFromOneAddress"], ids=["one-process", "pool"])
def test_handler_sees_the_client_of_a_v1_or_v2_header(server_process, klass):
    server = server_process(START.format(klass=klass))
    for i in range(6):  # enough to meet both workers of the pool
        client = ("192.0.2.%d" % (10 + i), 40000 + i)
        header = proxy_v1(client, FRONT) if i % 2 else proxy_v2(client, FRONT)
        fields = through(server.port, header, b"req%d" % i)
        assert fields[2:] == [client[0].encode(), b"%d" % client[1], b"req%d" % i]
    six = ("2001:db8::44", 4444)
    assert through(server.port, proxy_v1(six, ("2001:db8::1", 25)))[2:4] == [b"2001:db8::44", b"4444"]


@pytest.mark.parametrize("klass", ["WhoSpoon", "WhoFromOneAddress"], ids=["one-process", "pool"])
def test_headers_from_elsewhere_and_garbage_are_refused_and_logged_once_per_process(server_process, klass):
    server = server_process(START.format(klass=klass))
    client = ("192.0.2.10", 40000)
    for _ in range(5):
        assert through(server.port, proxy_v1(client, FRONT), source="127.0.0.2") == []
    for _ in range(5):
        assert through(server.port, b"", b"no header at all") == []
    assert through(server.port, proxy_v2(client, FRONT))[2] == b"192.0.2.10"  # still serving
    processes = 1 if klass == "WhoSpoon" else 2

    def refused(what):
        return [l for l in server.lines_so_far() if l.startswith("LOG Refused a connection") and what in l]

    wait_for(lambda: refused("not in proxy_allow_from"), what="the refusal logged")
    wait_for(lambda: refused("invalid header"), what="the invalid header logged")
    assert 1 <= len(refused("from 127.0.0.2:")) <= processes
    assert all("not in proxy_allow_from" in l for l in refused("from 127.0.0.2:"))
    assert 1 <= len(refused("invalid header")) <= processes


@pytest.mark.parametrize(
    "klass, endpoint, workers",
    [("WhoSpork", "tcp", "2"), ("WhoPlain", "haproxy:tcp", "2"), ("WhoPlain", "haproxy:tcp", "1")],
    ids=["class-attribute-pool", "haproxy-endpoint-pool", "haproxy-endpoint-one-process"],
)
def test_twistd_reads_the_header_for_the_class_attribute_or_a_haproxy_endpoint(tmp_path, klass, endpoint, workers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "spoon", "--server", "proxy_servers." + klass,
         "-e", "%s:%d:interface=127.0.0.1" % (endpoint, port), "-s", workers],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        def served():
            try:
                return through(port, proxy_v2(("192.0.2.77", 7777), FRONT))
            except OSError:
                return None

        fields = wait_for(served, timeout=30, interval=0.1, what="twistd serving")
        assert fields[2:4] == [b"192.0.2.77", b"7777"]
        assert (int(fields[1]) != proc.pid) == (workers != "1")  # a pre-forked worker answered
        assert through(port, proxy_v1(("192.0.2.78", 7000), FRONT))[2:4] == [b"192.0.2.78", b"7000"]
        proc.send_signal(signal.SIGTERM)
        # twistd ends by re-raising the signal that stopped it.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stdout.close()
