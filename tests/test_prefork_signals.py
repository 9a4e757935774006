"""Signals to a pre-forked pool's supervisor (and to one worker), under load too."""

import os
import signal
import socket
import time

import pytest

from spoon.pool.supervisor import KILL_MARGIN
from support import children_of, pid_alive, wait_for
from test_prefork import Load, assert_gone, output_so_far, serving_pids, start_spork


def _send(port, command):
    """Open a connection and send ``command`` (the reply is read later)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(command + b"\n")
    sock.shutdown(socket.SHUT_WR)
    return sock


def _reply(sock):
    data = b""
    with sock:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk


def _holder(sock, workers):
    """The worker pid holding the server side of the client socket ``sock``."""
    local = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            lport = int(fields[1].split(":")[1], 16)
            rport = int(fields[2].split(":")[1], 16)
            # (TIME_WAIT leftovers of earlier connections have no inode: skip them.)
            if lport == server_port and rport == local and fields[9] != "0":
                inode = fields[9]
    if inode is None:
        return None
    target = "socket:[%s]" % inode
    for pid in workers:
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == target:
                    return pid
        except OSError:
            continue
    return None


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except (ConnectionRefusedError, socket.timeout, TimeoutError):
        return True
    return False


def test_term_drains_in_flight_then_exits_zero(server_process):
    proc = start_spork(server_process, prefork=2)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    in_flight = _send(proc.port, b"wait 1.5")
    wait_for(lambda: _holder(in_flight, workers), timeout=10, what="request accepted")
    proc.signal(signal.SIGTERM)
    assert _reply(in_flight).split()[0].isdigit()  # answered in full
    assert proc.wait(timeout=20) == 0
    assert "RETURNED pids=[]" in proc.read_output()
    assert_gone(workers)
    assert _refused(proc.port)


def test_term_kills_what_outlives_graceful_timeout(server_process):
    proc = start_spork(server_process, prefork=2, graceful_timeout=1)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    stuck = _send(proc.port, b"block 120")  # blocks its worker: only a kill ends it
    wait_for(lambda: _holder(stuck, workers), timeout=10, what="request accepted")
    start = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    # A worker blocked in its handler cannot close anything itself: killed once its
    # grace period and the supervisor's margin are over.
    assert time.monotonic() - start < 1 + KILL_MARGIN + 5
    assert_gone(workers)
    assert _reply(stuck) == b""
    assert "Stop timed out: killing 1 worker(s)" in proc.read_output()


def test_term_under_load_fails_no_accepted_connection(server_process):
    proc = start_spork(server_process, prefork=2)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    with Load(proc.port, clients=6) as load:
        wait_for(lambda: load.ok > 200, timeout=20, what="load running")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        served = load.ok
        wait_for(lambda: load.refused > 0, timeout=10, what="clients refused after the stop")
    print("TERM under load: %d served, %d failed, %d refused" % (served, len(load.failures), load.refused))
    assert load.failures == []
    assert_gone(workers)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_int_and_quit_stop_fast(server_process, signum):
    proc = start_spork(server_process, prefork=2)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    in_flight = _send(proc.port, b"wait 60")
    wait_for(lambda: _holder(in_flight, workers), timeout=10, what="request accepted")
    start = time.monotonic()
    proc.signal(signum)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - start < 5
    assert_gone(workers)
    try:
        assert _reply(in_flight) == b""
    except ConnectionResetError:
        pass


def test_usr1_reloads_config_in_every_worker(server_process):
    proc = start_spork(server_process, prefork=3)
    workers = set(children_of(proc.pid))
    assert set(serving_pids(proc.port, workers).values()) == {1}
    proc.signal(signal.SIGUSR1)

    def all_reloaded():
        seen = serving_pids(proc.port, workers)
        return all(seen[p] == 2 for p in workers)

    wait_for(all_reloaded, timeout=15, what="generation 2 in every worker")
    assert set(children_of(proc.pid)) == workers  # reloaded in place, not replaced
    # The supervisor reloaded too: a worker forked now starts with generation 2.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    new = wait_for(lambda: set(children_of(proc.pid)) - workers, timeout=5)
    assert set(serving_pids(proc.port, new).values()) == {2}
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_hup_replaces_every_worker_under_load_without_failure(server_process):
    proc = start_spork(server_process, prefork=2)
    old = set(children_of(proc.pid))
    serving_pids(proc.port, old)
    with Load(proc.port, clients=6) as load:
        wait_for(lambda: load.ok > 100, timeout=20, what="load running")
        proc.signal(signal.SIGHUP)
        assert_gone(old, timeout=20)
        wait_for(lambda: len(children_of(proc.pid)) == 2, timeout=10)
        new = set(children_of(proc.pid))
        ok_at_end = load.ok
        wait_for(lambda: load.ok > ok_at_end + 100, timeout=20, what="load served by new workers")
    print("HUP under load: %d served, %d failed, %d refused" % (load.ok, len(load.failures), load.refused))
    assert load.failures == [] and load.refused == 0
    assert not new & old
    # The supervisor ran load_config() before forking the new ones.
    assert set(serving_pids(proc.port, new).values()) == {2}
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_ttin_ttou_change_the_worker_count_never_below_one(server_process):
    proc = start_spork(server_process, prefork=2)
    count = lambda: len(children_of(proc.pid))  # noqa: E731
    proc.signal(signal.SIGTTIN)
    wait_for(lambda: count() == 3, timeout=10, what="3 workers")
    serving_pids(proc.port, children_of(proc.pid))
    for wanted in (2, 1):
        proc.signal(signal.SIGTTOU)
        wait_for(lambda: count() == wanted, timeout=15, what="%d worker(s)" % wanted)
    last = children_of(proc.pid)
    # Never below one: the signal is logged and ignored.
    proc.signal(signal.SIGTTOU)
    wait_for(lambda: "SIGTTOU ignored" in "\n".join(output_so_far(proc)), timeout=10)
    assert children_of(proc.pid) == last
    serving_pids(proc.port, last)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_term_to_one_worker_drains_it_and_master_replaces_it(server_process):
    proc = start_spork(server_process, prefork=2)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    in_flight = _send(proc.port, b"wait 1.5")
    holder = wait_for(lambda: _holder(in_flight, workers), timeout=10, what="request accepted")
    os.kill(holder, signal.SIGTERM)
    new = wait_for(lambda: set(children_of(proc.pid)) - workers, timeout=10, what="replacement")
    assert int(_reply(in_flight).split()[0]) == holder  # finished its request
    assert_gone([holder])
    serving_pids(proc.port, (workers - {holder}) | new)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_shutdown_called_in_the_master_stops_the_pool(server_process, tmp_path):
    flag = tmp_path / "stop"
    proc = start_spork(server_process, prefork=2, extra=[str(flag)])
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    in_flight = _send(proc.port, b"wait 1")
    wait_for(lambda: _holder(in_flight, workers), timeout=10, what="request accepted")
    flag.write_text("now")
    assert _reply(in_flight).split()[0].isdigit()
    assert proc.wait(timeout=20) == 0
    out = proc.read_output()
    assert "SHUTDOWN RETURNED" in out and "RETURNED pids=[]" in out
    assert_gone(workers)
    assert not pid_alive(proc.pid)
