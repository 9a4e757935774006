"""A pool whose first workers cannot start halts instead of keeping an open port that
nothing answers (issue 10, point 1): the port is closed, the reason is logged once at
ERROR with the worker's traceback, and every entry point exits non-zero within seconds."""

import os
import socket
import subprocess
import sys
import time

import pytest

from support import HERE, ROOT, children_of, pid_alive, wait_for

MISSING = "No module named 'no_such_module_for_workers'"


def _refused(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]), PYTHONUNBUFFERED="1")


def _run(args, timeout=30):
    """Run to completion (bounded); (exit code, output, seconds taken)."""
    began = time.monotonic()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate(timeout=10)
        raise AssertionError("still running after %ss:\n%s" % (timeout, out.decode(errors="replace")))
    return proc.returncode, out.decode("utf8", "replace"), time.monotonic() - began


def _assert_halted_once(out):
    assert out.count("Halting the pool") == 1, out
    # The worker's traceback, sent on its heartbeat pipe, is in the log once.
    assert out.count("import no_such_module_for_workers") == 1, out
    assert MISSING in out


def test_a_spork_whose_workers_cannot_start_closes_its_port_and_raises(server_process):
    server = server_process('import pool_fault_servers as s; s.main("BrokenWorkers")')
    code = server.wait(timeout=30)
    out = server.read_output()
    assert code != 0, out
    assert "PoolHalted" in out and "RETURNED" in out
    _assert_halted_once(out)
    assert _refused(server.port)
    assert children_of(server.pid) == []


def test_the_prefork_command_exits_non_zero_when_its_pool_halts():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "spoon.prefork", "--fd", str(sock.fileno()), "--workers", "2",
             "--target", "pool_fault_servers.BrokenWorkers"],
            pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
            start_new_session=True,
        )
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    out = out.decode("utf8", "replace")
    assert proc.returncode == 3, out
    _assert_halted_once(out)
    assert _refused(port)


def test_twistd_exits_non_zero_and_closes_the_port_when_its_pool_halts(tmp_path):
    port = _free_port()
    code, out, took = _run(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "spoon", "--server",
         "pool_fault_servers.BrokenWorkers", "-I", "127.0.0.1", "-P", str(port), "-s", "2"],
    )
    assert code != 0, out
    assert "Halting the pool" in out and MISSING in out, out
    assert "starting a new one" not in out  # not restarted over and over
    assert took < 20, out
    assert _refused(port)


def test_the_spoon_command_exits_non_zero_when_its_pool_halts(tmp_path):
    port = _free_port()
    code, out, took = _run(
        [sys.executable, "-m", "spoon.daemon", "pool_fault_servers.BrokenWorkers", "start", "-D",
         "-I", "127.0.0.1", "-P", str(port), "-s", "2"],
    )
    assert code != 0, out
    assert "Halting the pool" in out and MISSING in out, out
    assert took < 20, out
    assert _refused(port)
