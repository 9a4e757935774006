"""Pid file helpers and send_action, on real files, real processes and real signals."""

import logging
import os
import signal
import subprocess
import sys

import pytest

from spoon import daemon
from spoon.server import TCPSpoon


@pytest.fixture
def sleeper():
    """A real process to signal; killed at the end whatever happened.  A plain ``sleep``,
    so that a signal has its default effect at any moment (a Python child would turn an
    early SIGINT into KeyboardInterrupt depending on how far its start-up got)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_write_pidfile_is_atomic_and_readable(tmp_path):
    path = tmp_path / "x.pid"
    path.write_text("old content that is longer than a pid\n")
    old_inode = os.stat(path).st_ino
    assert daemon.write_pidfile(str(path), 4242) == str(path)
    # A rename, not an in-place rewrite: readers never see a half-written file.
    assert os.stat(path).st_ino != old_inode
    assert path.read_text() == "4242\n"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert daemon.read_pidfile(str(path)) == 4242
    # Beside it, the identity record (no temporary files left).
    assert sorted(os.listdir(tmp_path)) == ["x.pid", "x.pid.json"]


def test_write_pidfile_defaults_to_this_process(tmp_path):
    path = str(tmp_path / "me.pid")
    daemon.write_pidfile(path)
    assert daemon.read_pidfile(path) == os.getpid()


def test_write_pidfile_unwritable_location(tmp_path):
    path = str(tmp_path / "missing" / "x.pid")
    with pytest.raises(daemon.PidFileError, match="cannot write the pid file .*missing/x.pid"):
        daemon.write_pidfile(path)


def test_read_pidfile(tmp_path):
    path = tmp_path / "x.pid"
    assert daemon.read_pidfile(str(path)) is None
    path.write_text("")
    assert daemon.read_pidfile(str(path)) is None
    path.write_text("  123 \n")
    assert daemon.read_pidfile(str(path)) == 123
    for junk in ("abc", "-5", "0", "12 34"):
        path.write_text(junk)
        with pytest.raises(daemon.PidFileError, match="does not hold a pid"):
            daemon.read_pidfile(str(path))


def test_remove_pidfile_only_by_its_owner(tmp_path):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, os.getpid() + 1)
    assert daemon.remove_pidfile(path) is False
    assert os.path.exists(path)
    daemon.write_pidfile(path)
    assert daemon.remove_pidfile(path) is True
    assert not os.path.exists(path)
    assert daemon.remove_pidfile(path) is False


def test_process_alive_counts_zombies_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: a zombie until wait(); poll /proc until it has exited.
    from support import wait_for

    def exited():
        with open("/proc/%d/stat" % proc.pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_for(exited, timeout=30, what="the child to exit")
    assert daemon.process_alive(proc.pid) is False
    proc.wait(timeout=10)
    assert daemon.process_alive(proc.pid) is False
    assert daemon.process_alive(os.getpid()) is True


def test_check_pidfile(tmp_path, sleeper, caplog):
    path = str(tmp_path / "x.pid")
    assert daemon.check_pidfile(path) == path  # no file: fine
    daemon.write_pidfile(path, sleeper.pid)
    with pytest.raises(daemon.PidFileError, match="already running: .* %d" % sleeper.pid):
        daemon.check_pidfile(path)
    sleeper.kill()
    sleeper.wait(timeout=10)
    with caplog.at_level(logging.WARNING, logger="spoon.daemon"):
        daemon.check_pidfile(path)
    assert not os.path.exists(path)
    assert "Removing stale pid file" in caplog.text
    with pytest.raises(daemon.PidFileError, match="it is a directory"):
        daemon.check_pidfile(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == []


def test_send_action_missing_pid_file_is_logged_not_raised(tmp_path, caplog):
    path = str(tmp_path / "none.pid")
    logger = logging.getLogger("test-send-action")
    with caplog.at_level(logging.WARNING, logger="test-send-action"):
        assert daemon.send_action("stop", path, logger=logger) is None
        assert daemon.send_action("reload", path, logger=logger) is None
    assert caplog.text.count("No pid file available: %s" % path) == 2


def test_send_action_stale_pid_is_logged(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, proc.pid)
    with caplog.at_level(logging.WARNING, logger="spoon.daemon"):
        assert daemon.send_action("stop", path) is None
    assert "not running" in caplog.text


def test_send_action_signals(tmp_path, sleeper):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, sleeper.pid)
    assert daemon.send_action("stop", path) == sleeper.pid
    assert sleeper.wait(timeout=10) == -signal.SIGTERM


def test_send_action_reload_is_sigusr1(tmp_path, sleeper):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, sleeper.pid)
    assert daemon.send_action("reload", path) == sleeper.pid
    # The sleeper has no SIGUSR1 handler: the default action kills it, which shows the signal.
    assert sleeper.wait(timeout=10) == -signal.SIGUSR1


class OtherSignals(TCPSpoon):
    signal_shutdown = signal.SIGINT
    signal_reload = signal.SIGHUP


def test_send_action_uses_the_class_signals(tmp_path, sleeper):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, sleeper.pid)
    assert daemon.send_action("stop", path, klass=OtherSignals) == sleeper.pid
    assert sleeper.wait(timeout=10) == -signal.SIGINT


def test_send_action_unknown_action(tmp_path):
    with pytest.raises(ValueError, match="unknown action"):
        daemon.send_action("explode", str(tmp_path / "x.pid"))


def test_wait_for_exit(sleeper):
    assert daemon.wait_for_exit(sleeper.pid, 0.05) is False
    sleeper.kill()
    assert daemon.wait_for_exit(sleeper.pid, 30) is True
