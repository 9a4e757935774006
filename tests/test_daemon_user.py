"""``spoon ... start --uid/--gid``: the port, pid file and log file are opened as root, then
the serving processes (the supervisor and every worker) run as the user given.  Real
processes, as root."""

import os
import pathlib
import shutil
import tempfile

import pytest

from support import (
    Daemons,
    lines_matching,
    pid_alive,
    proc_ids,
    wait_for,
    workers_of,
)

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")


@pytest.fixture
def shared_daemons():
    """Daemons in a directory every user can enter and write: the daemon, once nobody,
    writes its log there and removes its pid file."""
    path = tempfile.mkdtemp(prefix="spoon-daemon-user-")
    os.chmod(path, 0o777)
    d = Daemons(pathlib.Path(path))
    yield d
    d.kill_all()
    shutil.rmtree(path, ignore_errors=True)


def test_uid_and_gid_switch_the_supervisor_and_its_workers(shared_daemons):
    d = shared_daemons
    master, port = d.start("-L", d.log_file, "-s", "2", "--uid", "nobody", "--gid", "nogroup")
    workers = workers_of(master, 2)
    for pid in [master, *workers]:
        assert proc_ids(pid) == ([NOBODY] * 4, [NOBODY] * 4), pid
    answer = d.ask(port, "gen").split()
    assert answer[0] == "1" and int(answer[1]) in workers
    assert lines_matching(d.log_file, "probe-server", "Running as uid 65534 gid 65534")[0][0] == master
    # The pid file was written (and locked) as root before the switch; stop, run by root,
    # still recognises its daemon, which removes the file on its way out.
    assert os.stat(d.pid_file).st_uid == 0
    status = d.run("status", "-p", d.pid_file)
    assert status.returncode == 0, status.stderr
    stop = d.run("stop", "-p", d.pid_file)
    assert stop.returncode == 0, stop.stderr
    assert not pid_alive(master)
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=20, what="workers gone")
    assert not os.path.exists(d.pid_file) and not os.path.exists(d.pid_file + ".json")


def test_uid_alone_takes_the_users_group(shared_daemons):
    # A server alone imports all it needs before the switch: this passes from a checkout
    # only root can read too.
    d = shared_daemons
    pid, port = d.start("--uid", str(NOBODY))
    assert d.ask(port, "gen") == "1 %d\n" % pid  # serving: switched by now
    assert proc_ids(pid) == ([NOBODY] * 4, [NOBODY] * 4)


def test_unknown_user_is_refused_before_anything_starts(shared_daemons):
    d = shared_daemons
    result = d.run("start", "-p", d.pid_file, "--uid", "no-such-user-here")
    assert result.returncode == 2
    assert 'uid = "no-such-user-here" (option --uid): no such user' in result.stderr
    assert not os.path.exists(d.port_file) and not os.path.exists(d.pid_file)


def test_stop_removes_a_pid_file_the_daemon_could_no_longer_remove(shared_daemons):
    """A pid file in a directory only root may write (as /run): the daemon, once nobody,
    cannot remove it on its way out; stop, run by root, does once the daemon has exited."""
    d = shared_daemons
    run_dir = d.dir / "run"
    run_dir.mkdir(mode=0o755)
    d.pid_file = str(run_dir / "probe.pid")
    d.pid_files.append(d.pid_file)
    pid, port = d.start("--uid", "nobody")
    assert d.ask(port, "gen") == "1 %d\n" % pid
    stop = d.run("stop", "-p", d.pid_file)
    assert stop.returncode == 0, stop.stderr
    assert not pid_alive(pid)
    assert os.listdir(run_dir) == []
