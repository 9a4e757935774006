"""Options of the ``spoon`` command: --version, and -D/-n (a foreground process keeps the
priority its manager gave it unless asked).  Real processes."""

import os
import signal
import subprocess
import sys

import pytest

import spoon
from support import daemons, wait_for  # noqa: F401 (daemons: the fixture)


@pytest.mark.parametrize("command", ["module", "script"])
def test_version_prints_spoons_version(command):
    if command == "module":
        argv = [sys.executable, "-m", "spoon.daemon", "--version"]
    else:
        argv = [os.path.join(os.path.dirname(sys.executable), "spoon"), "--version"]
        if not os.path.exists(argv[0]):
            pytest.skip("the spoon console script is not installed in this environment")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "spoon %s\n" % spoon.__version__


def _foreground(daemons, *extra):
    """Run ``start -D`` until it serves; its priority relative to ours, then stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spoon.daemon", "probe_servers.ProbeServer", "start", "-D",
         "-p", daemons.pid_file, *extra],
        cwd=str(daemons.dir), env=daemons.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        wait_for(lambda: os.path.exists(daemons.port_file), timeout=30, what="the server")
        assert daemons.ask(daemons.port(), "gen") == "1 %d\n" % proc.pid
        nice = os.getpriority(os.PRIO_PROCESS, proc.pid) - os.getpriority(os.PRIO_PROCESS, 0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stderr.close()
    return nice


def test_foreground_start_keeps_its_priority_unless_nice_is_given(daemons):
    # (a daemon's default renice by 10 is checked in test_daemon.py)
    assert _foreground(daemons) == 0
    os.unlink(daemons.port_file)
    assert _foreground(daemons, "-n", "4") == 4

