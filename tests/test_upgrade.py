"""Zero-downtime code upgrade for real: a pool under continuous load gets new code on disk
and a USR2 (a script's own supervisor, the ``spoon`` command's ``upgrade``, twistd's pool
service); the replies switch from the old code to the new one with no failed request, and
a new generation that cannot serve leaves the old one serving."""

import os
import signal
import subprocess
import sys
import uuid

import pytest

from support import ROOT, PoolLoad, log_lines, pid_alive, processes_with_token, wait_for

APP = '''
import os
import spoon.server

VERSION = {version}
BROKEN = {broken}
{extra}

class Handler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d %d\\n" % (os.getpid(), VERSION))


class Server(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = 2
    graceful_timeout = 10

    def load_config(self):
        if BROKEN:
            raise RuntimeError("a broken configuration")

    def server_activate(self):
        super().server_activate()
        with open(os.environ["APP_PORT_FILE"], "w") as f:
            f.write(str(self.server_address[1]))
'''

SCRIPT = '''
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s [%(process)d] %(name)s: %(message)s")
import app
app.Server(("127.0.0.1", 0)).serve_forever()
'''


class App:
    """A scratch directory with ``app.py`` (its reply carries VERSION) and a log file;
    every process started here carries a token in its environment, by which the test
    kills whatever is left."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.port_file = str(tmp_path / "app.port")
        self.log = str(tmp_path / "app.log")
        self.token = uuid.uuid4().hex
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]),
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
            APP_PORT_FILE=self.port_file,
            SPOON_TEST_TOKEN=self.token,
            # setproctitle would write the process titles over the environment, token
            # included: kill_all finds the processes by it.
            SPT_NOENV="1",
        )
        self.deploy(1)

    def deploy(self, version, extra="", broken=False):
        (self.dir / "app.py").write_text(APP.format(version=version, extra=extra, broken=broken))

    def port(self):
        wait_for(lambda: os.path.exists(self.port_file) and open(self.port_file).read(), 30,
                 what="the port file")
        with open(self.port_file) as f:
            return int(f.read())

    def popen(self, args):
        with open(self.log, "ab") as log:
            return subprocess.Popen(args, cwd=str(self.dir), env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, args, timeout=120):
        return subprocess.run(args, cwd=str(self.dir), env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def logged(self, text):
        return any(text in line for line in log_lines(self.log))

    def kill_all(self):
        def left():
            return [pid for pid in processes_with_token(self.token) if pid != os.getpid()]

        for _ in range(5):
            for pid in left():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if not left():
                return
            wait_for(lambda: not left(), 5, what="no process left")


@pytest.fixture
def app(tmp_path):
    a = App(tmp_path)
    yield a
    a.kill_all()


def versions(load):
    return [version for _, version in list(load.answers)]


def upgrade_under_load(app, signal_upgrade, old_master):
    """Load the pool, deploy version 2, upgrade; returns the load once version 2 answered
    and ``old_master`` has exited."""
    load = PoolLoad(app.port(), threads=4)
    try:
        load.wait_for_answers(100)
        app.deploy(2, extra="# the new code")
        signal_upgrade()
        wait_for(lambda: 2 in versions(load), 60, what="an answer of the new code")
        wait_for(lambda: not pid_alive(old_master), 30, what="the old generation's exit")
        load.wait_for_answers(200)
    finally:
        load.stop()
    return load


def failed_upgrade_under_load(app, port, deploy, signal_upgrade, *logged):
    """Load the pool, ``deploy()`` code that cannot take over, upgrade, wait until the log
    shows each of ``logged`` in turn; returns the load, which must have seen no failed or
    refused request."""
    load = PoolLoad(port, threads=4)
    try:
        load.wait_for_answers(50)
        deploy()
        signal_upgrade()
        for text in logged:
            wait_for(lambda: app.logged(text), 60, what="%r in the log" % text)
        load.wait_for_answers(200)
    finally:
        load.stop()
    assert load.failures == [] and load.refused == 0, load.failures[:5]
    return load


def start_script(app, script=SCRIPT):
    (app.dir / "run.py").write_text(script)
    return app.popen([sys.executable, "run.py"])


def start_twistd(app):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return app.popen([twistd, "--pidfile", str(app.dir / "twistd.pid"), "--logfile", app.log, "-n",
                      "spoon", "--server", "app.Server", "-s", "2", "-e", "tcp:0:interface=127.0.0.1"])


def usr2(proc):
    return lambda: os.kill(proc.pid, signal.SIGUSR2)


def assert_switched(load):
    assert load.failures == [], load.failures[:5]
    assert load.refused == 0
    seen = versions(load)
    assert seen[:50] == [1] * 50
    # Once the old generation has gone, only the new code answers.
    assert set(seen[-150:]) == {2}


def test_usr2_to_a_script_upgrades_its_pool_under_load_without_a_failed_request(app):
    proc = start_script(app)
    load = upgrade_under_load(app, usr2(proc), proc.pid)
    assert proc.wait(timeout=10) == 0
    assert_switched(load)
    assert app.logged("Upgrade: new generation")


def test_a_new_generation_that_cannot_start_leaves_the_old_one_serving(app):
    proc = start_script(app)
    load = failed_upgrade_under_load(
        app, app.port(), lambda: app.deploy(2, extra="raise ImportError('a broken deploy')"),
        usr2(proc), "Upgrade failed")
    assert set(versions(load)) == {1}
    assert proc.poll() is None
    assert app.logged("a broken deploy")  # the new generation's own traceback
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


STALLED_WORKERS = """
import time

def _stall(self, number):
    time.sleep(3600)  # the new generation's workers never serve

Server.post_fork = _stall
Server.upgrade_timeout = 2
"""


def test_a_new_generation_that_does_not_serve_in_time_is_stopped_and_no_connection_is_refused(app):
    proc = start_script(app, SCRIPT.replace("import app\n", "import app\napp.Server.upgrade_timeout = 2\n"))
    # The new generation stops (its stalled workers killed after its grace) while the old
    # one serves on the socket they shared: nothing refused at the socket.
    load = failed_upgrade_under_load(
        app, app.port(),
        lambda: (app.dir / "app.py").write_text(APP.format(version=2, extra="", broken=False) + STALLED_WORKERS),
        usr2(proc), "did not serve within 2", "Graceful stop of 2 worker(s)")
    assert set(versions(load)) == {1}
    assert proc.poll() is None
    # The abandoned generation is gone and reaped: the old supervisor's only children are
    # its own two workers (the kernel's list of children includes zombies).
    def children():
        with open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)) as f:
            return {int(pid) for pid in f.read().split()}

    workers = {pid for pid, _ in load.answers}
    wait_for(lambda: children() == workers, 30, what="only the old workers left under %d" % proc.pid)


def _daemon(app, *args):
    return [sys.executable, "-m", "spoon.daemon", "app.Server", *args]


class UpgradeCommand:
    """``spoon app.Server upgrade -p PID_FILE`` run in a thread (it returns only once the
    upgrade is over, while the test keeps its load running): :meth:`start`, :meth:`result`."""

    def __init__(self, app, pid_file):
        import threading

        self.completed = None
        self.thread = threading.Thread(target=self._run, args=(app, pid_file))

    def _run(self, app, pid_file):
        self.completed = app.run(_daemon(app, "upgrade", "-p", pid_file))

    def start(self):
        self.thread.start()

    def result(self):
        self.thread.join(timeout=90)
        return self.completed


def _start_daemon(app):
    """A daemonised 2-worker pool of ``app``: its pid file and its pid."""
    pid_file = str(app.dir / "app.pid")
    started = app.run(_daemon(app, "start", "-p", pid_file, "-L", app.log, "-s", "2",
                              "-e", "tcp:0:interface=127.0.0.1"))
    assert started.returncode == 0, started.stderr
    return pid_file, int(open(pid_file).read())


def test_spoon_upgrade_switches_the_daemon_to_the_new_code_and_the_pid_file_to_the_new_master(app):
    pid_file, old = _start_daemon(app)
    command = UpgradeCommand(app, pid_file)
    load = upgrade_under_load(app, command.start, old)
    result = command.result()
    assert result.returncode == 0, result.stderr
    new = int(open(pid_file).read())
    assert new != old and pid_alive(new)
    assert "Upgraded: process %d serves" % new in result.stderr
    assert_switched(load)
    status = app.run(_daemon(app, "status", "-p", pid_file))
    assert status.returncode == 0, status.stdout + status.stderr
    stopped = app.run(_daemon(app, "stop", "-p", pid_file))
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(new)


def test_spoon_upgrade_reports_a_failed_upgrade_and_the_daemon_keeps_its_pid_file(app):
    pid_file, old = _start_daemon(app)
    # Code that does not import is refused by the command itself: nothing is signalled.
    app.deploy(2, extra="raise ImportError('a broken deploy')")
    result = app.run(_daemon(app, "upgrade", "-p", pid_file))
    assert result.returncode == 2 and "a broken deploy" in result.stderr
    assert not app.logged("SIGUSR2")
    # Code that imports but cannot serve: the new generation fails, the old one says so.
    app.deploy(2, broken=True)
    result = app.run(_daemon(app, "upgrade", "-p", pid_file))
    assert result.returncode == 1, result.stderr
    assert "Upgrade failed" in result.stderr and "keeps serving" in result.stderr
    assert app.logged("a broken configuration")
    assert int(open(pid_file).read()) == old and pid_alive(old)
    load = PoolLoad(app.port(), threads=2)
    try:
        load.wait_for_answers(20)
    finally:
        load.stop()
    assert load.failures == [] and set(versions(load)) == {1}
    stopped = app.run(_daemon(app, "stop", "-p", pid_file))
    assert stopped.returncode == 0, stopped.stderr


def _twistd_port(app):
    import re

    def find():
        for line in log_lines(app.log):
            match = re.search(r"on tcp \[?[^\s\]]*\]?:(\d+)", line)
            if match:
                return int(match.group(1))
        return None

    return wait_for(find, 30, what="the listening port in twistd's log")


def _supervisors(twistd_pid):
    from support import children_of

    return children_of(twistd_pid)


def test_usr2_to_twistd_upgrades_its_pool_through_the_pool_service(app):
    proc = start_twistd(app)
    port = _twistd_port(app)
    wait_for(lambda: len(_supervisors(proc.pid)) == 1, 30, what="the supervisor")
    (old_supervisor,) = _supervisors(proc.pid)
    with open(app.port_file, "w") as f:
        f.write(str(port))
    load = upgrade_under_load(app, usr2(proc), old_supervisor)
    assert_switched(load)
    # twistd is the master and stays (its pid file too); its supervisor is the new one.
    assert proc.poll() is None and int(open(app.dir / "twistd.pid").read()) == proc.pid
    (new_supervisor,) = _supervisors(proc.pid)
    assert new_supervisor != old_supervisor
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # twistd re-raises the signal


def test_a_twistd_pool_keeps_serving_when_the_new_code_cannot_start(app):
    proc = start_twistd(app)
    load = failed_upgrade_under_load(
        app, _twistd_port(app), lambda: app.deploy(2, extra="raise ImportError('a broken deploy')"),
        usr2(proc), "upgrade failed: new supervisor")
    assert set(versions(load)) == {1}
    assert app.logged("a broken deploy") and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_under_systemd_the_old_generation_names_the_new_main_pid_and_never_says_stopping(app):
    import socket as socketlib

    path = str(app.dir / "notify")
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(1)
    app.env["NOTIFY_SOCKET"] = path
    messages = []

    def receive_until(condition, timeout=30):
        def got():
            try:
                messages.append(listener.recv(4096).decode())
            except socketlib.timeout:
                pass
            return condition()

        wait_for(got, timeout, interval=0, what="notify messages, so far %r" % messages)

    try:
        proc = start_script(app)
        receive_until(lambda: any("READY=1" in m for m in messages))
        app.deploy(2, extra="# the new code")
        os.kill(proc.pid, signal.SIGUSR2)

        def handed_over():
            alone = [m for m in messages[1:] if m.startswith("MAINPID=")]
            ready = [m for m in messages[1:] if "READY=1" in m]
            return alone and ready
        receive_until(handed_over)
        assert proc.wait(timeout=30) == 0
        listener.setblocking(False)
        try:
            while True:  # whatever the old generation said on its way out
                messages.append(listener.recv(4096).decode())
        except BlockingIOError:
            pass
    finally:
        listener.close()
    assert "READY=1" in messages[0] and "MAINPID=%d" % proc.pid in messages[0]
    (handover,) = [m for m in messages[1:] if m.startswith("MAINPID=")]
    (new_ready,) = [m for m in messages[1:] if "READY=1" in m]
    new_pid = int(handover.split("=")[1])
    assert new_pid != proc.pid and "MAINPID=%d" % new_pid in new_ready
    assert not any("STOPPING=1" in m for m in messages), messages


SYSTEMD_ACTIVATE = """
import os, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(64)
with open(os.environ["APP_PORT_FILE"], "w") as f:
    f.write(str(sock.getsockname()[1]))
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="spoon.socket")
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_a_socket_activated_daemon_upgrades_onto_the_socket_systemd_passed(app):
    """systemd passes the socket to the first generation only (LISTEN_PID names it): the
    new one takes it from the old one."""
    pid_file = str(app.dir / "app.pid")
    proc = app.popen([sys.executable, "-c", SYSTEMD_ACTIVATE, *_daemon(
        app, "start", "-D", "-p", pid_file, "-s", "2", "-e", "systemd:domain=INET:index=0")])
    wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read().strip(), 30, what="the pid file")
    command = UpgradeCommand(app, pid_file)
    load = upgrade_under_load(app, command.start, proc.pid)
    result = command.result()
    assert result.returncode == 0, result.stderr
    assert proc.wait(timeout=10) == 0
    assert_switched(load)
    assert int(open(pid_file).read()) != proc.pid


def test_a_new_generation_that_cannot_take_over_stops_and_the_old_one_serves_on(app):
    """A when_ready callback of the new generation fails (the daemon's pid file cannot be
    written, say): it says why, stops, and the old one is never told to stop."""
    proc = start_script(app)
    load = failed_upgrade_under_load(app, app.port(), lambda: app.deploy(2, extra=(
        "from spoon.pool import upgrade\n"
        "def _refuse():\n"
        "    raise PermissionError('cannot write the pid file')\n"
        "upgrade.when_ready(_refuse)\n")), usr2(proc), "Upgrade failed")
    assert app.logged("taking over failed: PermissionError: cannot write the pid file")
    assert proc.poll() is None
    # Only the old code answered once the new generation had stopped.
    assert set(versions(load)[-100:]) == {1}
