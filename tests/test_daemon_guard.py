"""The ``spoon`` command acts only on the daemon that wrote the pid file: real daemons,
real unrelated processes, real signals.

A pid file can name a process that is not the daemon (pid reuse after a crash, a hand-made
file, an older spoon's).  ``stop``, ``reload``, ``restart`` and ``status`` then say so in one
line on stderr and exit non-zero, and the process is left alone.
"""

import os
import signal

import pytest

from spoon import daemon
from support import (  # noqa: F401 (daemons, sleeper: the fixtures)
    daemons,
    pid_alive,
    sleeper,
    wait_for,
    workers_of,
)


def _locks_on(path):
    """(kind, pid) of every lock /proc/locks lists on ``path``'s file."""
    st = os.stat(path)
    inode = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    found = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "->":
                continue  # a waiter, not a holder
            if fields[5] == inode:
                found.append((fields[1], int(fields[4])))
    return found


@pytest.mark.parametrize("klass", ["probe_servers.ProbeServer", "probe_servers.ProbeSpork"])
def test_the_supervisor_alone_holds_the_pid_file_lock_until_it_dies(daemons, klass):
    master, port = daemons.start("-s", "2", klass=klass)
    workers = workers_of(master, 2)
    assert daemons.ask(port, "gen").split()[1] in {str(w) for w in workers}
    # One POSIX lock, the supervisor's (taken after the double fork, not inherited by the
    # workers it forked).
    assert _locks_on(daemons.pid_file) == [("POSIX", master)]
    status = daemons.run("status", "-p", daemons.pid_file, klass=klass)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("running: pid %d, up 00:00:" % master)
    assert status.stdout.splitlines()[0].endswith(", %s" % klass)  # then the pool table

    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not pid_alive(master), timeout=10, what="the supervisor to die")
    # Released with the supervisor, whether or not its workers are still on their way out.
    assert _locks_on(daemons.pid_file) == []
    status = daemons.run("status", "-p", daemons.pid_file, klass=klass)
    assert status.returncode == 2
    assert status.stdout == "not running: Process %d from %s is not running (stale pid file)\n" % (
        master, daemons.pid_file
    )
    stop = daemons.run("stop", "-p", daemons.pid_file, klass=klass)
    assert stop.returncode == 1
    assert stop.stderr == "Process %d from %s is not running (stale pid file)\n" % (
        master, daemons.pid_file
    )


@pytest.mark.parametrize("command", ["reload", "stop", "restart", "status"])
def test_a_pid_file_naming_an_unrelated_process_is_refused(daemons, sleeper, command):
    with open(daemons.pid_file, "w") as f:
        f.write("%d\n" % sleeper.pid)
    result = daemons.run(command, "-p", daemons.pid_file, "--stop-timeout", "5")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "process %d from %s neither holds the pid file's lock" % (
        sleeper.pid, daemons.pid_file
    ) in line
    assert "has exited" not in result.stderr
    # Left alone (a signal would have ended the sleep at once), nothing started.
    assert sleeper.poll() is None and pid_alive(sleeper.pid)
    assert not os.path.exists(daemons.port_file)
    with open(daemons.pid_file) as f:
        assert f.read() == "%d\n" % sleeper.pid


@pytest.mark.parametrize("command", ["reload", "stop", "restart", "status"])
def test_a_pid_file_that_holds_no_pid_exits_non_zero_with_the_reason(daemons, command):
    with open(daemons.pid_file, "w") as f:
        f.write("precious data\n")
    result = daemons.run(command, "-p", daemons.pid_file)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "%s does not hold a pid ('precious data')" % daemons.pid_file in line
    assert not os.path.exists(daemons.port_file)
    with open(daemons.pid_file) as f:
        assert f.read() == "precious data\n"


def test_status_of_a_stopped_daemon(daemons):
    result = daemons.run("status", "-p", daemons.pid_file)
    assert result.returncode == 2
    assert result.stdout == "not running: No pid file available: %s\n" % daemons.pid_file
    pid, _ = daemons.start()
    assert daemons.run("status", "-p", daemons.pid_file).returncode == 0
    assert daemons.run("stop", "-p", daemons.pid_file).returncode == 0
    assert not pid_alive(pid)
    assert daemons.run("status", "-p", daemons.pid_file).returncode == 2


def test_the_identity_record_names_the_daemon_and_goes_with_it(daemons):
    pid, _ = daemons.start("-L", daemons.log_file)
    instance = daemon.inspect_pidfile(daemons.pid_file)
    assert (instance.state, instance.holder) == ("running", pid)
    assert instance.record["pid"] == pid
    assert instance.record["start_time"] == instance.start_time
    assert instance.record["klass"] == "probe_servers.ProbeServer"
    assert 'log_file = "%s"' % daemons.log_file in instance.record["config"].splitlines()
    assert daemons.run("stop", "-p", daemons.pid_file).returncode == 0
    assert not os.path.exists(daemons.pid_file)
    assert not os.path.exists(daemons.pid_file + ".json")
