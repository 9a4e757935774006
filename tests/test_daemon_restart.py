"""``restart`` reuses the options of the running instance unless given again: real daemons,
real signals, one log file followed through the README's whole sequence."""

import os
import signal

from support import (  # noqa: F401 (daemons: the fixture)
    LOG_LINE,
    daemons,
    lines_matching,
    log_lines,
    pid_alive,
    wait_for,
    workers_of,
)


def _logged(path, text, pid, name="probe-server"):
    return wait_for(
        lambda: [p for p, _ in lines_matching(path, name, text) if p == pid],
        timeout=20,
        what="%r logged by %d in %s" % (text, pid, path),
    )


def _nice(pid):
    return os.getpriority(os.PRIO_PROCESS, pid) - os.getpriority(os.PRIO_PROCESS, 0)


def test_the_readme_sequence_keeps_logging_to_the_same_file(daemons):
    """start -L, reload, restart, stop, each given only -p: every phase logs to the file
    that start was given."""
    log = daemons.log_file
    first, port = daemons.start("-L", log)
    _logged(log, "Starting probe_servers.ProbeServer", first)
    assert daemons.ask(port, "one") == "one\n\n"
    _logged(log, "handled 'one'", first)

    assert daemons.run("reload", "-p", daemons.pid_file).returncode == 0
    _logged(log, "SIGUSR1 received", first)

    os.unlink(daemons.port_file)
    result = daemons.run("restart", "-p", daemons.pid_file)
    assert result.returncode == 0, result.stderr
    assert "Restarting with the options of the running instance" in result.stderr
    assert "log_file=%s" % log in result.stderr
    assert not pid_alive(first)
    second = daemons.pid()
    assert second != first
    _logged(log, "SIGTERM received", first)
    _logged(log, "Starting probe_servers.ProbeServer", second)
    assert daemons.ask(daemons.port(), "two") == "two\n\n"
    _logged(log, "handled 'two'", second)
    _logged(log, "twisted saw two", second, name="probe.twisted")

    result = daemons.run("stop", "-p", daemons.pid_file)
    assert result.returncode == 0, result.stderr
    assert not pid_alive(second)
    _logged(log, "SIGTERM received", second)
    for line in log_lines(log):
        assert LOG_LINE.match(line), line


def test_options_given_to_restart_override_the_recorded_ones(daemons):
    first_log = daemons.log_file
    second_log = str(daemons.dir / "second.log")
    master, _ = daemons.start("-L", first_log, "-s", "2", "-n", "3")
    workers_of(master, 2)
    assert _nice(master) == 3
    result = daemons.run("restart", "-p", daemons.pid_file, "-L", second_log)
    assert result.returncode == 0, result.stderr
    new_master = daemons.pid()
    # -L given again wins; -s and -n come from the running instance.
    workers = workers_of(new_master, 2)
    assert _nice(new_master) == 3
    answer = daemons.ask(daemons.port(), "gen").split()
    assert int(answer[1]) in workers
    _logged(second_log, "handled 'gen'", int(answer[1]))
    assert not [p for p, _ in lines_matching(first_log, "probe-server", "Starting")
                if p == new_master]


def test_restart_after_a_crash_reuses_the_crashed_instance_options(daemons):
    first, _ = daemons.start("-L", daemons.log_file)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not pid_alive(first), timeout=10, what="the daemon to die")
    result = daemons.run("restart", "-p", daemons.pid_file)
    assert result.returncode == 0, result.stderr
    second = daemons.pid()
    assert second != first
    _logged(daemons.log_file, "Starting probe_servers.ProbeServer", second)
    # (logged by the restart command itself, before it forked the daemon)
    assert lines_matching(daemons.log_file, "spoon.daemon", "Removing stale pid file")
