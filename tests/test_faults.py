"""Production faults, with real processes and sockets: a reset is not an end of input,
the log says what a client did in one line and does not repeat a traceback without end,
a graceful stop does not wait out its whole grace period for idle sessions."""

import signal
import socket
import struct
import time

import pytest

from support import connect, cpu_seconds, recv_all, request, wait_for


@pytest.fixture
def faulty(server_process):
    def start(name, env=None):
        return server_process(
            "import fault_servers; fault_servers.main(*sys.argv[1:])", args=(name,), env=env
        )

    return start


def _send_then_reset(address, payload):
    """Send ``payload`` and close with an RST (SO_LINGER 0), no FIN."""
    sock = connect(address)
    sock.sendall(payload)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _stop(server):
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=15) == 0
    return server.read_output()


def test_a_reset_mid_message_is_never_processed_as_a_whole_message(faulty):
    server = faulty("ReadsToEndServer")
    address = ("127.0.0.1", server.port)
    for _ in range(10):
        _send_then_reset(address, b"m" * 5000)
    # A clean end of input (FIN) is still an end of input.
    assert request(address, b"m" * 5000) == b"processed 5000\n"
    out = _stop(server)
    assert out.count("PROCESSED") == 1, out
    assert out.count("connection reset by the client") == 10
    assert "Traceback" not in out and "BrokenPipeError" not in out


def test_a_handler_bug_hit_again_and_again_logs_one_traceback_then_a_count(faulty):
    server = faulty("RaisesServer")
    address = ("127.0.0.1", server.port)
    for _ in range(200):
        assert request(address, b"boom\n") == b""
    wait_for(lambda: any("repeated" in line for line in server.lines_so_far()),
             timeout=20, what="the count of repeated errors")
    out = _stop(server)
    assert out.count("Traceback") == 1
    assert out.count("RuntimeError: handler bug hit on purpose") == 2  # traceback, count
    assert "RuntimeError: handler bug hit on purpose (the same error as above, " \
        "repeated 199 times in the last 10s)" in out, out


def test_peer_faults_are_one_info_line_without_traceback(faulty):
    server = faulty("ImpatientServer")  # handler timeout 0.2 s
    address = ("127.0.0.1", server.port)
    idle = connect(address)
    assert recv_all(idle) == b""  # closed by the server after its timeout
    idle.close()
    out = _stop(server)
    [line] = [l for l in out.splitlines() if "timed out waiting for the client" in l]
    assert " INFO: Client 127.0.0.1:" in line
    assert "Traceback" not in out and "ERROR" not in out


def test_ctrl_c_with_a_connection_open_logs_no_error(faulty):
    server = faulty("SessionServer")
    client = connect(("127.0.0.1", server.port))
    client.sendall(b"hi\n")
    assert client.recv(100) == b"ok hi\n"
    server.signal(signal.SIGINT)
    assert server.wait(timeout=10) == 0
    client.close()
    out = server.read_output()
    assert "ERROR" not in out and "Traceback" not in out, out


@pytest.mark.parametrize("name", ["SessionServer", "SessionPool"])
def test_term_ends_idle_sessions_at_once_instead_of_waiting_out_the_grace_period(
    faulty, name
):
    server = faulty(name)  # graceful_timeout = 30
    address = ("127.0.0.1", server.port)
    clients = [connect(address, timeout=20) for _ in range(4)]
    for i, client in enumerate(clients):
        client.sendall(b"req %d\n" % i)
        assert client.recv(100) == b"ok req %d\n" % i
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    for client in clients:
        # The handler saw EOF between requests, and server.stopping was True.
        assert recv_all(client) == b"bye stopping=1\n"
        client.close()
    assert server.wait(timeout=20) == 0
    elapsed = time.monotonic() - t0
    out = server.read_output()
    assert elapsed < 15, (elapsed, out)  # far from the 30 s grace period
    assert "still open at the end of the stop" not in out and "Stop timed out" not in out


def test_out_of_descriptors_the_accept_loop_pauses_logs_once_a_second_and_recovers(faulty):
    server = faulty("SessionServer", env={"FD_LIMIT": "64"})
    address = ("127.0.0.1", server.port)
    clients = []
    try:
        for _ in range(300):
            clients.append(connect(address, timeout=10))
        wait_for(lambda: any("Too many open files" in l for l in server.lines_so_far()),
                 what="accept() failing with EMFILE")
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        wait_for(lambda: time.monotonic() - t0 > 3, what="3 s of exhaustion")
        cpu_share = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        failures = [l for l in server.lines_so_far() if "accept() failed" in l]
    finally:
        for client in clients:
            client.close()
    # Descriptors are back: the clients waiting in the queue, then new ones, are served.
    assert request(address, b"again\n", timeout=10) == b"ok again\nbye stopping=0\n"
    out = _stop(server)
    assert cpu_share < 0.3, cpu_share  # paused, not spinning on a readable socket
    assert len(failures) <= 6, failures  # about one line a second, with a count
    assert any("repeated" in l for l in failures) or len(failures) <= 2, failures
    assert "Traceback" not in out


def test_a_server_class_without_its_handler_fails_at_start_in_one_line():
    import spoon.server

    class NoHandler(spoon.server.TCPSpoon):
        pass

    class NotAHandler(spoon.server.TCPSpork):
        handler_klass = dict

    for klass, words in ((NoHandler, "has no handler"), (NotAHandler, "not a request handler")):
        server = klass(("127.0.0.1", 0))
        try:
            with pytest.raises(TypeError, match=words) as info:
                server.serve_forever()
            assert "\n" not in str(info.value) and "Gulp" in str(info.value)
        finally:
            server.server_close()


def test_an_out_of_range_port_is_one_clear_error():
    import spoon.server

    with pytest.raises(ValueError, match=r"127\.0\.0\.1:70000: the port must be 0-65535"):
        spoon.server.TCPSpoon(("127.0.0.1", 70000))
