"""Pid file helpers and send_action, on real files, real processes and real signals."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from spoon import daemon, pidfile
from spoon.server import TCPSpoon
from support import ROOT, sleeper  # noqa: F401 (the fixture)


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


# -- the lock and the identity: only the daemon that wrote the pid file is signalled ----------

LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, b"%d\\n" % os.getpid())
print("LOCKED", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def locker(tmp_path):
    """A process that writes a bare pid file (the old format: no identity record) naming
    itself and holds its lock, as a spoon daemon does; killed at the end."""
    path = str(tmp_path / "locked.pid")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == b"LOCKED\n"
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()


def test_a_bare_pid_file_is_vouched_for_by_its_lock(locker, caplog):
    proc, path = locker
    assert not os.path.exists(path + ".json")
    instance = daemon.inspect_pidfile(path)
    assert (instance.state, instance.pid, instance.holder) == ("running", proc.pid, proc.pid)
    with caplog.at_level(logging.INFO, logger="spoon.daemon"):
        assert daemon.send_action("stop", path) == proc.pid
    assert proc.wait(timeout=10) == -signal.SIGTERM
    assert "Sent SIGTERM to process %d (stop)" % proc.pid in caplog.text
    # Its lock went with it: the same file now names a dead process.
    assert daemon.inspect_pidfile(path).state == "stale"


def test_a_bare_pid_file_naming_an_unrelated_process_is_not_signalled(tmp_path, sleeper, caplog):
    path = tmp_path / "x.pid"
    path.write_text("%d\n" % sleeper.pid)  # as an old spoon, or anyone, may have left it
    instance = daemon.inspect_pidfile(str(path))
    assert instance.state == "unverified" and instance.holder is None
    with caplog.at_level(logging.WARNING, logger="spoon.daemon"):
        assert daemon.send_action("reload", str(path)) is None
        assert daemon.send_action("stop", str(path)) is None
    assert sleeper.poll() is None
    assert caplog.text.count("process %d from %s neither holds" % (sleeper.pid, path)) == 2
    with pytest.raises(daemon.PidFileError, match="already running: .*neither holds"):
        daemon.check_pidfile(str(path))
    assert path.read_text() == "%d\n" % sleeper.pid


def test_a_reused_pid_does_not_match_the_recorded_start_time(tmp_path, sleeper, caplog):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, sleeper.pid)
    record = json.loads(open(path + ".json").read())
    assert record == {"pid": sleeper.pid, "start_time": pidfile.process_start_time(sleeper.pid)}
    # The daemon that wrote the file started one tick earlier than the process that has
    # its pid now: a crash, then pid reuse.
    record["start_time"] -= 1
    with open(path + ".json", "w") as f:
        json.dump(record, f)
    assert daemon.inspect_pidfile(path).state == "stale"
    with caplog.at_level(logging.WARNING, logger="spoon.daemon"):
        assert daemon.send_action("stop", path) is None
    assert "now belongs to another process" in caplog.text
    assert sleeper.poll() is None
    # start removes such a pid file and its record as stale.
    daemon.check_pidfile(path)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_record_of_another_pid_is_no_identity(tmp_path, sleeper):
    path = str(tmp_path / "x.pid")
    daemon.write_pidfile(path, sleeper.pid)
    with open(path, "w") as f:
        f.write("%d\n" % os.getpid())  # rewritten by someone, the record left behind
    assert daemon.inspect_pidfile(path).state == "unverified"


def test_the_lock_is_held_by_the_process_that_wrote_the_pid_file(tmp_path):
    path = str(tmp_path / "me.pid")
    daemon.write_pidfile(path)
    # Another process sees this one as the holder; this one never sees its own lock.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path[:0] = [%r]\n" % ROOT
         + "from spoon import daemon; i = daemon.inspect_pidfile(%r); print(i.state, i.holder)"
         % path],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.split() == ["running", str(os.getpid())], probe.stderr
    assert daemon.remove_pidfile(path) is True
    assert sorted(os.listdir(tmp_path)) == []


def test_status_exit_codes(tmp_path, sleeper, locker):
    proc, locked = locker
    out, err = io.StringIO(), io.StringIO()
    assert daemon.report_status(locked, out, err) == 0
    assert re.match(r"running: pid %d, up \d\d:\d\d:\d\d\n$" % proc.pid, out.getvalue())
    path = tmp_path / "x.pid"
    out = io.StringIO()
    assert daemon.report_status(str(path), out, err) == 2
    assert out.getvalue() == "not running: No pid file available: %s\n" % path
    path.write_text("%d\n" % sleeper.pid)
    assert daemon.report_status(str(path), out, err) == 1
    assert "neither holds" in err.getvalue()
    sleeper.kill()
    sleeper.wait(timeout=10)
    out = io.StringIO()
    assert daemon.report_status(str(path), out, err) == 2
    assert out.getvalue().startswith("not running: Process %d " % sleeper.pid)
    path.write_text("junk")
    err = io.StringIO()
    assert daemon.report_status(str(path), out, err) == 1
    assert "does not hold a pid" in err.getvalue()
