"""Functional tests of ``python -m spoon.daemon``: real daemons, pid files, signals, logs.

Every daemon started here carries a unique token in its environment; the ``daemon``
fixture kills (SIGKILL, by pid) every process holding that token when the test ends, and
also the pid named by each pid file, so nothing is left behind even when a test fails
half-way.  All waits are bounded polls.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import spoon.daemon
from support import (
    LOG_LINE,
    ROOT,
    SentryCollector,
    daemons,  # noqa: F401 (the fixture)
    lines_matching,
    log_lines,
    pid_alive,
    processes_with_token,
    wait_for,
    workers_of,
)

# -- start / reload / stop ---------------------------------------------------------------------


def test_start_serve_reload_stop(daemons):
    started = time.monotonic()
    pid, port = daemons.start("-L", daemons.log_file)
    assert time.monotonic() - started < 30
    # The command returned after the pid file was written, by a daemon that is not a child
    # of ours, in its own session, not a session leader, in "/", streams on /dev/null.
    assert pid_alive(pid)
    assert os.getsid(pid) not in (pid, os.getsid(0))
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, own_nice + 10)
    assert oct(os.stat(daemons.pid_file).st_mode & 0o777) == "0o644"
    assert daemons.ask(port, "HeLLo") == "hello\n\n"
    assert daemons.ask(port, "gen") == "1 %d\n" % pid

    result = daemons.run("reload", "-p", daemons.pid_file)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: daemons.ask(port, "gen") == "2 %d\n" % pid, timeout=15, what="reload")

    result = daemons.run("stop", "-p", daemons.pid_file)
    assert result.returncode == 0, result.stderr
    # stop waits for the process to exit, and the process removed its pid file.
    assert not pid_alive(pid)
    assert not os.path.exists(daemons.pid_file)
    with pytest.raises(OSError):
        daemons.ask(port, "gen", timeout=2)
    # No temporary pid files left behind.
    assert [name for name in os.listdir(daemons.dir) if ".pid" in name] == []

    # One log: server records and Twisted's events, each line with the daemon's pid.
    assert lines_matching(daemons.log_file, "probe-server", "Starting probe_servers.ProbeServer")
    # (the reload was polled for: "gen" was asked at least twice)
    handled = [p for p, _ in lines_matching(daemons.log_file, "probe-server", "handled 'gen'")]
    assert len(handled) >= 2 and set(handled) == {pid}
    seen = [p for p, _ in lines_matching(daemons.log_file, "probe.twisted", "twisted saw gen")]
    assert len(seen) == len(handled) and set(seen) == {pid}
    assert lines_matching(daemons.log_file, "probe-server", "SIGUSR1 received")[0][0] == pid
    assert lines_matching(daemons.log_file, "probe-server", "SIGTERM received")[0][0] == pid
    for line in log_lines(daemons.log_file):
        assert LOG_LINE.match(line), line


def test_restart_waits_for_the_old_process(daemons):
    old_pid, old_port = daemons.start()
    # A connection in flight keeps the old process draining for graceful_timeout (3 s).
    held = socket.create_connection(("127.0.0.1", old_port), timeout=20)
    try:
        held.sendall(b"hold\n")
        wait_for(
            lambda: daemons.ask(old_port, "gen") == "1 %d\n" % old_pid, what="old server"
        )
        os.unlink(daemons.port_file)
        result = daemons.run("restart", "-p", daemons.pid_file)
        assert result.returncode == 0, result.stderr
        # restart returned only after the old process was gone...
        assert not pid_alive(old_pid)
        # ...which closed the held connection on its way out.
        held.settimeout(10)
        try:
            assert held.recv(100) == b""
        except ConnectionResetError:
            pass
    finally:
        held.close()
    new_pid = daemons.pid()
    assert new_pid != old_pid and pid_alive(new_pid)
    assert daemons.ask(daemons.port(), "gen") == "1 %d\n" % new_pid
    assert "exited" in result.stderr


def test_restart_gives_up_when_the_old_process_does_not_exit_in_time(daemons):
    old_pid, old_port = daemons.start()
    held = socket.create_connection(("127.0.0.1", old_port), timeout=20)
    try:
        held.sendall(b"hold\n")
        wait_for(lambda: daemons.ask(old_port, "gen") == "1 %d\n" % old_pid, what="server")
        result = daemons.run("restart", "-p", daemons.pid_file, "--stop-timeout", "0.2")
        # Still draining the held connection (graceful_timeout 3 s): no second start.
        assert result.returncode == 1
        assert "did not exit within 0.2s" in result.stderr
        assert daemons.pid() == old_pid
    finally:
        held.close()
    assert spoon.daemon.wait_for_exit(old_pid, 30)


def test_restart_when_not_running_starts(daemons):
    result = daemons.run("restart", "-p", daemons.pid_file)
    assert result.returncode == 0, result.stderr
    pid = daemons.pid()
    assert daemons.ask(daemons.port(), "gen") == "1 %d\n" % pid


def test_start_refuses_a_live_pid_file(daemons):
    pid, port = daemons.start()
    os.unlink(daemons.port_file)
    result = daemons.run("start", "-p", daemons.pid_file)
    assert result.returncode == 1
    assert "already running" in result.stderr and str(pid) in result.stderr
    # Nothing was constructed (no port file) and the pid file still names the first daemon.
    assert not os.path.exists(daemons.port_file)
    assert daemons.pid() == pid
    assert daemons.ask(port, "gen") == "1 %d\n" % pid


def test_start_removes_a_stale_pid_file(daemons):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    with open(daemons.pid_file, "w") as f:
        f.write("%d\n" % dead.pid)
    pid, port = daemons.start("-L", daemons.log_file)
    assert pid != dead.pid
    assert daemons.ask(port, "gen") == "1 %d\n" % pid
    assert lines_matching(daemons.log_file, "spoon.daemon", "Removing stale pid file")


def test_unwritable_pid_file_location_fails_before_forking(daemons):
    missing = str(daemons.dir / "no-such-dir" / "probe.pid")
    result = daemons.run("start", "-p", missing)
    assert result.returncode == 1
    assert "cannot write the pid file %s" % missing in result.stderr
    # The server was never built (it would have written the port file), nothing runs.
    assert not os.path.exists(daemons.port_file)
    assert processes_with_token(daemons.token) == []


def test_pid_file_that_is_not_a_pid_is_left_alone(daemons):
    with open(daemons.pid_file, "w") as f:
        f.write("precious data\n")
    result = daemons.run("start", "-p", daemons.pid_file)
    assert result.returncode == 1
    assert "does not hold a pid" in result.stderr
    with open(daemons.pid_file) as f:
        assert f.read() == "precious data\n"


def test_log_file_survives_logrotate_move_and_create(daemons):
    pid, port = daemons.start("-L", daemons.log_file)
    assert daemons.ask(port, "before") == "before\n\n"
    wait_for(lambda: lines_matching(daemons.log_file, "probe-server", "handled 'before'"))
    rotated = daemons.log_file + ".1"
    os.rename(daemons.log_file, rotated)
    assert daemons.ask(port, "after") == "after\n\n"
    # The daemon noticed the move and created a new file at the same path.
    wait_for(lambda: os.path.exists(daemons.log_file), what="a new log file")
    assert lines_matching(daemons.log_file, "probe-server", "handled 'after'") == [
        (pid, "handled 'after'")
    ]
    assert lines_matching(daemons.log_file, "probe.twisted", "twisted saw after") == [
        (pid, "twisted saw after")
    ]
    assert not lines_matching(rotated, "probe-server", "handled 'after'")
    assert daemons.run("reload", "-p", daemons.pid_file).returncode == 0
    wait_for(lambda: lines_matching(daemons.log_file, "probe-server", "SIGUSR1 received"))


def test_foreground_writes_pid_file_and_logs_to_stderr(daemons):
    proc = subprocess.Popen(
        [sys.executable, "-m", "spoon.daemon", "probe_servers.ProbeServer", "start", "-D",
         "-p", daemons.pid_file, "-n", "0"],
        cwd=str(daemons.dir),
        env=daemons.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: os.path.exists(daemons.port_file) and os.path.exists(daemons.pid_file),
                 timeout=30, what="the foreground server")
        assert daemons.pid() == proc.pid
        assert daemons.ask(daemons.port(), "gen") == "1 %d\n" % proc.pid
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert not os.path.exists(daemons.pid_file)
    lines = err.decode().splitlines()
    assert any(
        LOG_LINE.match(line) and "INFO [%d] probe-server: handled 'gen'" % proc.pid in line
        for line in lines
    ), err
    assert any("INFO [%d] probe.twisted: twisted saw gen" % proc.pid in line for line in lines), err


# -- pre-forked pools (and the Spork class default: the original crashed on int(None)) ----------


def test_spork_pool_start_reload_stop(daemons):
    klass = "probe_servers.ProbeSpork"
    master, port = daemons.start("-L", daemons.log_file, klass=klass)
    workers = workers_of(master, 2)  # the class's prefork = 2, no -s given
    gen, answering = daemons.ask(port, "gen").split()
    assert gen == "1" and int(answering) in workers
    assert daemons.ask(port, "prefork") == "2\n"

    assert daemons.run("reload", "-p", daemons.pid_file, klass=klass).returncode == 0
    # Every worker reloaded (each logs it with its own pid), and answers the new generation.
    wait_for(
        lambda: {p for p, _ in lines_matching(daemons.log_file, "probe-server", "SIGUSR1")}
        >= set(workers),
        timeout=20,
        what="SIGUSR1 in every worker",
    )
    wait_for(lambda: daemons.ask(port, "gen").split()[0] == "2", timeout=20, what="generation 2")

    result = daemons.run("stop", "-p", daemons.pid_file, klass=klass)
    assert result.returncode == 0, result.stderr
    assert not pid_alive(master)
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=20, what="workers gone")
    assert not os.path.exists(daemons.pid_file)

    # One file: the master's and every worker's records, each with its writer's pid.
    assert lines_matching(daemons.log_file, "probe-server", "Starting")[0][0] == master
    handled = {p for p, _ in lines_matching(daemons.log_file, "probe-server", "handled")}
    assert handled and handled <= set(workers)
    seen = {p for p, _ in lines_matching(daemons.log_file, "probe.twisted", "twisted saw")}
    assert seen and seen <= set(workers)
    for line in log_lines(daemons.log_file):
        assert LOG_LINE.match(line), line


def test_spork_option_sets_the_number_ofworkers_of(daemons):
    master, port = daemons.start("-s", "3", klass="probe_servers.ProbeSpork")
    workers_of(master, 3)
    assert daemons.ask(port, "prefork") == "3\n"


def test_spork_option_preforks_a_spoon_class(daemons):
    master, port = daemons.start("-s", "2")
    workers = workers_of(master, 2)
    gen, answering = daemons.ask(port, "gen").split()
    assert gen == "1" and int(answering) in workers
    assert daemons.run("stop", "-p", daemons.pid_file).returncode == 0
    assert not pid_alive(master)
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=20, what="workers gone")


# -- errors: clear messages, non-zero status, nothing started ----------------------------------


@pytest.mark.parametrize(
    "klass, message",
    [
        ("no_such_module.Server", "cannot import 'no_such_module.Server'"),
        ("probe_servers.Missing", "module 'probe_servers' has no attribute 'Missing'"),
        ("probe_servers.NotAServer", "'probe_servers.NotAServer' is not a spoon server class"),
        ("ProbeServer", "'ProbeServer' is not a dotted path"),
    ],
)
def test_bad_server_class(daemons, klass, message):
    result = daemons.run("start", "-p", daemons.pid_file, klass=klass)
    assert result.returncode == 2
    assert message in result.stderr
    assert not os.path.exists(daemons.pid_file)


def test_busy_port(daemons):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = daemons.run("start", "-p", daemons.pid_file, "-P", str(port))
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:%d" % port in result.stderr
    assert "Address already in use" in result.stderr
    assert not os.path.exists(daemons.pid_file)
    assert processes_with_token(daemons.token) == []


def test_spork_count_must_be_positive(daemons):
    result = daemons.run("start", "-p", daemons.pid_file, "-s", "0")
    assert result.returncode == 2
    assert "--spork: must be at least 1, not 0" in result.stderr


def test_daemon_needs_a_pid_file(daemons):
    result = daemons.run("start")
    assert result.returncode == 2
    assert "needs a pid file" in result.stderr


def test_sentry_missing_is_said_clearly(daemons):
    # Hide sentry-sdk, installed or not, behind a package that fails to import.
    blocker = daemons.dir / "blocker" / "sentry_sdk"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    daemons.env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), daemons.env["PYTHONPATH"]])
    result = daemons.run("start", "-p", daemons.pid_file, "-S", "http://key@127.0.0.1:9/1")
    assert result.returncode == 2
    assert "sentry-sdk is not installed" in result.stderr
    assert "spoon[sentry]" in result.stderr
    assert not os.path.exists(daemons.port_file)


def test_stop_and_reload_without_a_daemon(daemons):
    stop = daemons.run("stop", "-p", daemons.pid_file)
    assert stop.returncode == 1
    assert "No pid file available: %s" % daemons.pid_file in stop.stderr
    reload = daemons.run("reload", "-p", daemons.pid_file)
    assert reload.returncode == 1
    assert "No pid file available" in reload.stderr


def test_console_script_has_the_same_arguments():
    script = os.path.join(os.path.dirname(sys.executable), "spoon")
    if not os.path.exists(script):
        pytest.skip("the spoon console script is not installed in this environment")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--spork", "--pid-file", "--port", "--interface", "--nice", "--debug",
                 "--info", "--log-file", "--sentry-dsn", "--no-daemon",
                 "{start,stop,reload,restart,status,upgrade}", "--uid", "--gid", "--version"):
        assert flag in result.stdout
    assert result.stdout.startswith("usage: spoon ")


def test_console_script_runs_a_server_class_from_the_current_directory(daemons):
    script = os.path.join(os.path.dirname(sys.executable), "spoon")
    if not os.path.exists(script):
        pytest.skip("the spoon console script is not installed in this environment")
    env = dict(daemons.env, PYTHONPATH=ROOT)  # probe_servers only importable from the cwd
    common = dict(cwd=str(daemons.dir), env=env, capture_output=True, text=True, timeout=60,
                  stdin=subprocess.DEVNULL)
    result = subprocess.run([script, "probe_servers.ProbeServer", "start", "-p", "probe.pid"],
                            **common)
    assert result.returncode == 0, result.stderr
    pid = daemons.pid()
    assert daemons.ask(daemons.port(), "gen") == "1 %d\n" % pid
    result = subprocess.run([script, "probe_servers.ProbeServer", "stop", "-p", "probe.pid"],
                            **common)
    assert result.returncode == 0, result.stderr
    assert not pid_alive(pid) and not os.path.exists(daemons.pid_file)


# -- the library functions of the original README ----------------------------------------------

LIBRARY_USE = """
import sys
import spoon.daemon
import probe_servers

server = probe_servers.ProbeServer(("127.0.0.1", 0))
spoon.daemon.run_daemon(server, sys.argv[1])
"""


def test_run_daemon_and_send_action_from_code(daemons):
    script = daemons.dir / "run_it.py"
    script.write_text(LIBRARY_USE)
    result = subprocess.run(
        [sys.executable, str(script), "probe.pid"],  # relative: taken before chdir("/")
        cwd=str(daemons.dir), env=daemons.env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    pid = daemons.pid()
    port = daemons.port()
    assert daemons.ask(port, "gen") == "1 %d\n" % pid
    assert spoon.daemon.send_action("reload", daemons.pid_file) == pid
    wait_for(lambda: daemons.ask(port, "gen") == "2 %d\n" % pid, timeout=15, what="reload")
    assert spoon.daemon.send_action("stop", daemons.pid_file) == pid
    assert spoon.daemon.wait_for_exit(pid, 30)
    wait_for(lambda: not os.path.exists(daemons.pid_file), what="pid file removal")


FAILING = """
import sys
import spoon.daemon
import probe_servers

class Broken(probe_servers.ProbeServer):
    def serve_forever(self, poll_interval=0.1):
        with open(sys.argv[1]) as f:
            print("PIDFILE", f.read().strip(), flush=True)
        raise RuntimeError("boom")

spoon.daemon.run_daemon(Broken(("127.0.0.1", 0)), sys.argv[1], daemonize=False)
"""


def test_run_daemon_removes_the_pid_file_on_an_error(daemons):
    script = daemons.dir / "failing.py"
    script.write_text(FAILING)
    result = subprocess.run(
        [sys.executable, str(script), daemons.pid_file],
        cwd=str(daemons.dir), env=daemons.env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "RuntimeError: boom" in result.stderr
    pid_line = [line for line in result.stdout.splitlines() if line.startswith("PIDFILE")]
    assert pid_line and int(pid_line[0].split()[1]) > 0
    assert not os.path.exists(daemons.pid_file)


def test_unwritable_log_file_fails_before_forking(daemons):
    missing = str(daemons.dir / "no-such-dir" / "probe.log")
    result = daemons.run("start", "-p", daemons.pid_file, "-L", missing)
    assert result.returncode == 1
    assert missing in result.stderr and "No such file or directory" in result.stderr
    assert not os.path.exists(daemons.pid_file)
    assert processes_with_token(daemons.token) == []


def test_sentry_dsn_reports_from_the_daemon(daemons):
    """-S with sentry-sdk installed: a warning logged by the detached daemon reaches the
    DSN's server (a real HTTP server on 127.0.0.1 recording what it is sent)."""
    pytest.importorskip("sentry_sdk")
    with SentryCollector() as collector:
        pid, port = daemons.start("-S", collector.dsn(3))
        assert daemons.ask(port, "warn") == "warned\n"
        wait_for(
            lambda: any(b"probe warning from %d" % pid in body for _, body in collector.received),
            timeout=30,
            what="the warning at the Sentry server",
        )


DETACH_FAILING = """
import sys
import spoon.daemon

spoon.daemon.detach(stdout=sys.argv[1], pidfile=sys.argv[2])
print("the caller must not get here", file=sys.stderr)
"""


def test_detach_reports_a_failed_set_up_to_the_caller(daemons):
    script = daemons.dir / "detach_failing.py"
    script.write_text(DETACH_FAILING)
    missing = str(daemons.dir / "no-such-dir" / "out.txt")
    result = subprocess.run(
        [sys.executable, str(script), missing, daemons.pid_file],
        cwd=str(daemons.dir), env=daemons.env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "cannot start the daemon: %s: No such file or directory" % missing in result.stderr
    assert "must not get here" not in result.stderr
    assert not os.path.exists(daemons.pid_file)
