"""``twistd spoon`` driven for real: the twistd of this virtualenv, daemonised or not, with
pid and log files in temporary directories, signals sent to the pid in the pid file, and
/proc read for the processes (their parents, their uid, their end).

The servers are in ``test_service_apps``; every request answers "<pid> <generation> <uid>".
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from support import HERE, LOG_LINE, children_of, pid_alive, request, wait_for

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _descendants(pid):
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def ask(port, line=b"hi", host="127.0.0.1", timeout=10.0):
    """(pid, generation, uid) of the process that served one request."""
    reply = request((host, port), line + b"\n", timeout=timeout)
    pid, generation, uid = reply.split()
    return int(pid), int(generation), int(uid)


class SlowRequest(threading.Thread):
    """A "sleep S" request in a thread: ``started`` is set once the handler runs (so the
    request is in flight), ``answer`` is (pid, generation, uid) at the end."""

    def __init__(self, port, seconds):
        super().__init__(daemon=True)
        self.port, self.seconds = port, seconds
        self.started = threading.Event()
        self.answer = self.error = None
        self.start()

    def run(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.sendall(b"sleep %s\n" % str(self.seconds).encode())
                sock.shutdown(socket.SHUT_WR)
                reader = sock.makefile("rb")
                assert reader.readline() == b"started\n"
                self.started.set()
                pid, generation, uid = reader.read().split()
                self.answer = int(pid), int(generation), int(uid)
        except Exception as e:
            self.error = e
            self.started.set()

    def wait_in_flight(self, timeout=20):
        assert self.started.wait(timeout), "the slow request never started"
        assert self.error is None, self.error


def _status_uid(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line for %d" % pid)


class Twistd:
    """One twistd run in ``directory`` with twistd.pid / twistd.log there."""

    def __init__(self, directory, spoon_args, daemon=True, twistd_args=(), env=None):
        self.directory = directory
        self.pidfile = os.path.join(directory, "twistd.pid")
        self.logfile = os.path.join(directory, "twistd.log")
        self.env = dict(os.environ, PYTHONPATH=HERE)
        self.env.update(env or {})
        self.command = [TWISTD, "--pidfile", self.pidfile, "--logfile", self.logfile]
        self.command += list(twistd_args) + (["-n"] if not daemon else [])
        self.command += ["spoon"] + list(spoon_args)
        self.daemon = daemon
        self.pid = None
        self.proc = None
        self.known = set()

    def start(self, timeout=30.0):
        self.started_at = time.monotonic()
        if self.daemon:
            done = subprocess.run(
                self.command, cwd=self.directory, env=self.env, capture_output=True, timeout=timeout
            )
            assert done.returncode == 0, (done.stdout + done.stderr).decode() + self.log()
            self.pid = wait_for(self._read_pid, timeout, what="twistd pid file")
        else:
            self.proc = subprocess.Popen(
                self.command, cwd=self.directory, env=self.env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            self.pid = self.proc.pid
        self.known.add(self.pid)
        return self

    def _read_pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def log(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def port(self, timeout=30.0):
        """The port the server listens on, read from the log."""
        pattern = re.compile(r"on (?:tcp|udp) \[?[^\s\]]*\]?:(\d+)")

        def find():
            match = pattern.search(self.log())
            return int(match.group(1)) if match else None

        return wait_for(find, timeout, what="the listening port in the log:\n" + self.log())

    def processes(self):
        """twistd and every process below it (remembered, for the clean-up)."""
        found = [self.pid] + _descendants(self.pid)
        self.known.update(found)
        return found

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait_gone(self, timeout=40.0):
        """Wait until twistd and every process it started are gone; return the seconds."""
        start = time.monotonic()
        wait_for(lambda: not any(pid_alive(p) for p in self.known), timeout,
                 what="every process to exit:\n" + self.log()[-3000:])
        if self.proc is not None:
            self.proc.wait(timeout=5)
        return time.monotonic() - start

    def kill(self):
        if self.pid is not None:
            self.processes() if pid_alive(self.pid) else None
        for pid in sorted(self.known, reverse=True):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def workdir():
    """A temporary directory every user can enter and write (twistd --uid nobody removes
    its pid file there)."""
    path = tempfile.mkdtemp(prefix="spoon-twistd-")
    os.chmod(path, 0o777)
    yield path
    for name in os.listdir(path):
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    os.rmdir(path)


@pytest.fixture
def twistd(workdir):
    runs = []

    def start(spoon_args, **kwargs):
        run = Twistd(workdir, spoon_args, **kwargs)
        runs.append(run)
        return run.start()

    yield start
    for run in runs:
        run.kill()


class Load:
    """Sequential requests from a few threads until stopped: counts successes and failures."""

    def __init__(self, port, threads=2):
        self.port = port
        self.ok = 0
        self.failures = []
        self.pids = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                pid, _, _ = ask(self.port, timeout=10)
            except Exception as e:  # any failure counts
                with self._lock:
                    self.failures.append(repr(e))
            else:
                with self._lock:
                    self.ok += 1
                    self.pids.add(pid)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


# -- options --------------------------------------------------------------------------------


def test_twistd_help_lists_spoon_and_every_option():
    out = subprocess.run([TWISTD, "--help"], capture_output=True, timeout=30).stdout.decode()
    assert re.search(r"^\s+spoon\s+\S", out, re.M), out
    out = subprocess.run([TWISTD, "spoon", "--help"], capture_output=True, timeout=30).stdout.decode()
    for option in ["--server=", "-P, --port=", "-I, --interface=", "-e, --endpoint=",
                   "-s, --spork=", "--graceful-timeout=", "--worker-timeout="]:
        assert option in out, out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--server is required"),
        (["--server", "no_such_module_q.Server"], "cannot import 'no_such_module_q.Server'"),
        (["--server", "test_service_apps.Missing"], "'test_service_apps.Missing'"),
        (["--server", "test_service_apps.NotAServer"], "'test_service_apps.NotAServer' is not a spoon server class"),
        (["--server", "test_service_apps.GenerationSpork", "-e", "tls:0"], "cannot be pre-forked"),
        (["--server", "test_service_apps.GenerationSpork", "-e", "udp:0"], "is a TCP server"),
        (["--server", "test_service_apps.UDPGenerationSpork", "-e", "tcp:0"], "is a UDP server"),
    ],
)
def test_bad_options_give_a_clear_error(args, message):
    done = subprocess.run(
        [TWISTD, "-n", "spoon"] + args, capture_output=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=HERE),
    )
    assert done.returncode != 0
    output = (done.stdout + done.stderr).decode()
    assert message in output, output


# -- without pre-forking --------------------------------------------------------------------


def test_single_process_foreground_reload_rotate_and_graceful_stop(twistd):
    """-s 1 with -n and --reactor poll: the server runs in twistd's own process."""
    run = twistd(
        ["--server", "test_service_apps.GenerationSpork", "-s", "1", "-I", "127.0.0.1", "-P", "0"],
        daemon=False, twistd_args=["--reactor", "poll"],
    )
    port = run.port()
    pid, generation, _ = wait_for(lambda: _try(ask, port), 20, what="first answer")
    assert (pid, generation) == (run.pid, 1)
    assert "PollReactor" in run.log()

    run.signal(signal.SIGUSR1)
    wait_for(lambda: ask(port)[1] == 2, 20, what="generation 2 after USR1")
    wait_for(lambda: os.path.exists(run.logfile + ".1"), 20, what="log rotated on USR1")
    run.signal(signal.SIGHUP)  # without workers to restart: a reload
    wait_for(lambda: ask(port)[1] == 3, 20, what="generation 3 after HUP")

    ask(port, b"log")
    wait_for(lambda: re.search(r"INFO \[%d\] gen-server: request logged by the handler" % run.pid, run.log()),
             10, what="the stdlib record in twistd's log with its pid")

    # An in-flight request finishes; twistd exits once it has.
    client = SlowRequest(port, 1.5)
    client.wait_in_flight()
    run.signal(signal.SIGTERM)
    seconds = run.wait_gone()
    client.join(15)
    assert client.answer is not None and client.answer[0] == run.pid, client.error
    assert run.proc.returncode in (0, -signal.SIGTERM)  # twistd re-raises the signal that stopped it
    assert not os.path.exists(run.pidfile)
    print("single-process stop with one in-flight 1.5 s request took %.2fs" % seconds)


def _try(f, *args):
    try:
        return f(*args)
    except OSError:
        return None


def test_usr1_handler_installed_before_twistd_still_rotates_and_reloads(twistd, workdir):
    """A module that installs its own SIGUSR1 handler at import makes twistd skip its log
    rotation handler; twistd spoon sets it aside, so all three still happen."""
    marker = os.path.join(workdir, "early-usr1")
    with open(os.path.join(workdir, "early_usr1_app.py"), "w") as f:
        f.write(textwrap.dedent("""
            import os, signal
            from test_service_apps import GenerationSpoon

            def _early(signum, frame):
                with open(%r, "a") as f:
                    f.write("called\\n")

            signal.signal(signal.SIGUSR1, _early)
        """ % marker))
    run = twistd(["--server", "early_usr1_app.GenerationSpoon", "-I", "127.0.0.1", "-P", "0"])
    port = run.port()
    assert ask(port)[:2] == (run.pid, 1)
    run.signal(signal.SIGUSR1)
    wait_for(lambda: ask(port)[1] == 2, 20, what="generation 2 after USR1")
    wait_for(lambda: os.path.exists(run.logfile + ".1"), 20, what="log rotated on USR1")
    wait_for(lambda: os.path.exists(marker), 20, what="the module's own handler called")
    run.signal(signal.SIGTERM)
    run.wait_gone()


# -- pre-forked -----------------------------------------------------------------------------


def _worker_pids(run):
    """Pids of the workers: the grandchildren of twistd (twistd > supervisor > workers)."""
    supervisors = children_of(run.pid)
    run.processes()
    return sorted(p for s in supervisors for p in children_of(s))


def _answers_from(port, pids, timeout=30.0, generation=None):
    """Ask until every pid in ``pids`` has answered (with ``generation`` when given)."""
    seen = {}

    def all_seen():
        pid, gen, _ = ask(port)
        if generation is None or gen == generation:
            seen[pid] = gen
        return set(pids) <= set(seen)

    wait_for(all_seen, timeout, interval=0, what="answers from %s (seen %s)" % (pids, seen))
    return seen


def test_prefork_daemon_serve_reload_rolling_restart_under_load_and_stop(twistd):
    run = twistd(["--server", "test_service_apps.GenerationSpork", "-I", "127.0.0.1", "-P", "0",
                  "--graceful-timeout", "10"])
    port = run.port()
    workers = wait_for(lambda: len(_worker_pids(run)) == 2 and _worker_pids(run), 30, what="2 workers")
    assert run.pid not in workers
    seen = _answers_from(port, workers)
    assert set(seen) == set(workers) and set(seen.values()) == {1}

    # USR1: load_config() in every worker, and twistd's log file is rotated.
    run.signal(signal.SIGUSR1)
    _answers_from(port, workers, generation=2)
    wait_for(lambda: os.path.exists(run.logfile + ".1"), 20, what="log rotated on USR1")
    assert _worker_pids(run) == workers

    # HUP under continuous load: new workers, no failed request.
    load = Load(port, threads=2)
    try:
        wait_for(lambda: load.ok >= 20, 20, what="load running")
        run.signal(signal.SIGHUP)
        wait_for(lambda: (set(_worker_pids(run)) & set(workers)) == set() and len(_worker_pids(run)) == 2,
                 60, what="every worker replaced after HUP")
        before = load.ok
        wait_for(lambda: load.ok >= before + 20, 20, what="load served by the new workers")
    finally:
        load.stop()
    new_workers = _worker_pids(run)
    # TTIN / TTOU reach the supervisor: one worker more, then one fewer.
    run.signal(signal.SIGTTIN)
    wait_for(lambda: len(_worker_pids(run)) == 3, 30, what="3 workers after TTIN")
    run.signal(signal.SIGTTOU)
    wait_for(lambda: len(_worker_pids(run)) == 2, 30, what="2 workers after TTOU")
    new_workers = _worker_pids(run)
    print("HUP under load: %d requests, %d failures" % (load.ok, len(load.failures)))
    assert load.failures == []
    _answers_from(port, new_workers)

    # Every line in the log carries a pid: twistd's own and the pool's relayed ones.
    text = open(run.logfile).read() + open(run.logfile + ".1").read()
    for worker_pid in workers:
        assert "INFO [%d] gen-server: config generation 2" % worker_pid in text, text
    for line in text.splitlines():
        assert LOG_LINE.match(line) or line.startswith("\t"), line

    # TERM: graceful stop of everything, in-flight requests included.
    client = SlowRequest(port, 1)
    client.wait_in_flight()
    run.processes()
    run.signal(signal.SIGTERM)
    seconds = run.wait_gone()
    client.join(15)
    print("TERM stop of twistd + supervisor + 2 workers with a 1 s request in flight: %.2fs" % seconds)
    assert client.answer is not None and client.answer[0] in new_workers, client.error
    assert not os.path.exists(run.pidfile)
    assert "pool stopped" in run.log()


def test_twistd_reactor_option_reaches_the_workers(twistd):
    """twistd --reactor poll: the pool's workers run a poll reactor too."""
    run = twistd(["--server", "test_service_apps.GenerationSpork", "-I", "127.0.0.1", "-P", "0", "-s", "2"],
                 daemon=False, twistd_args=["--reactor", "poll"])
    port = run.port()
    workers = wait_for(lambda: len(_worker_pids(run)) == 2 and _worker_pids(run), 30, what="2 workers")
    seen = {}

    def every_worker_said():
        reply = _try(request, ("127.0.0.1", port), b"reactor\n", 10.0)
        if not reply:
            return False
        pid, name = reply.split()
        seen[int(pid)] = name.decode()
        return set(workers) <= set(seen)

    wait_for(every_worker_said, 30, interval=0, what="the reactor of each worker (seen %s)" % seen)
    assert set(seen.values()) == {"PollReactor"}, seen
    # The supervisor shows its process title (spoon.pool.proctitle), not its arguments.
    assert open("/proc/%d/cmdline" % children_of(run.pid)[0]).read().startswith("spoon: supervisor ")
    run.signal(signal.SIGTERM)
    run.wait_gone()


def _free_privileged_port():
    for port in range(783, 1024):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free privileged port")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a privileged port and --uid need root")
def test_privileged_port_and_privilege_drop(twistd):
    port = _free_privileged_port()
    run = twistd(["--server", "test_service_apps.GenerationSpork", "-I", "127.0.0.1", "-P", str(port)],
                 twistd_args=["--uid", "nobody", "--gid", "nogroup"])
    workers = wait_for(lambda: len(_worker_pids(run)) == 2 and _worker_pids(run), 30,
                       what="2 workers:\n" + run.log())
    seen = _answers_from(port, workers)
    nobody = 65534
    assert set(seen) == set(workers)
    for pid in run.processes():
        assert _status_uid(pid) == [nobody] * 4, pid
    assert ask(port)[2] == nobody
    # The supervisor ("python -m spoon.prefork ... --uid 65534 --gid 65534", executed while
    # twistd was root, now titled) switched user itself.
    supervisor = children_of(run.pid)[0]
    with open("/proc/%d/cmdline" % supervisor) as f:
        assert f.read().startswith("spoon: supervisor test_service_apps.GenerationSpork [tcp:%d" % port)
    assert "Supervisor runs as uid 65534 gid 65534" in run.log()
    run.signal(signal.SIGTERM)
    run.wait_gone()


def _ask_udp(port, timeout=5.0):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hi\n", ("127.0.0.1", port))
        pid, generation = sock.recvfrom(1024)[0].split()
        return int(pid), int(generation)


@pytest.mark.parametrize("spork", [1, 2])
def test_udp_server(twistd, spork):
    run = twistd(["--server", "test_service_apps.UDPGenerationSpork", "-s", str(spork),
                  "-e", "udp:0:interface=127.0.0.1"])
    port = run.port()
    expected = {run.pid} if spork == 1 else None
    if spork == 2:
        expected = set(wait_for(lambda: len(_worker_pids(run)) == 2 and _worker_pids(run), 30, what="2 workers"))
    for generation in (1, 2):
        seen = {}

        def every_process_answered():
            answer = _try(_ask_udp, port, 1.0)
            if answer is not None and answer[1] == generation:
                seen[answer[0]] = generation
            return set(seen) >= expected

        wait_for(every_process_answered, 30, interval=0,
                 what="generation %d from %s (seen %s)" % (generation, expected, seen))
        run.signal(signal.SIGUSR1)
    run.signal(signal.SIGTERM)
    run.wait_gone()


def test_single_process_on_any_twisted_endpoint(twistd, workdir):
    """Without pre-forking any stream endpoint works: here a UNIX socket next to TCP."""
    path = os.path.join(workdir, "spoon.sock")
    run = twistd(["--server", "test_service_apps.GenerationSpoon", "-e", "unix:" + path,
                  "-e", "tcp:0:interface=127.0.0.1"])
    port = run.port()
    assert ask(port)[0] == run.pid
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        wait_for(lambda: os.path.exists(path), 10, what="the UNIX socket")
        sock.connect(path)
        sock.sendall(b"hi\n")
        sock.shutdown(socket.SHUT_WR)
        assert int(sock.recv(100).split()[0]) == run.pid
    run.signal(signal.SIGTERM)
    run.wait_gone()


def test_twistd_killed_leaves_no_process(twistd):
    """Even SIGKILL to twistd: the supervisor has a parent-death signal, its workers too."""
    run = twistd(["--server", "test_service_apps.GenerationSpork", "-I", "127.0.0.1", "-P", "0"])
    port = run.port()
    workers = wait_for(lambda: len(_worker_pids(run)) == 2 and _worker_pids(run), 30, what="2 workers")
    _answers_from(port, workers)
    run.processes()
    os.kill(run.pid, signal.SIGKILL)
    print("after SIGKILL to twistd, every process gone in %.2fs" % run.wait_gone(timeout=10))


def test_prefork_on_two_endpoints_runs_a_pool_per_socket(twistd):
    run = twistd(["--server", "test_service_apps.GenerationSpork", "-s", "2",
                  "-e", "tcp:0:interface=127.0.0.1", "-e", "tcp6:0:interface=\\:\\:1"])
    wait_for(lambda: len(re.findall(r"started supervisor pid", run.log())) == 2, 30, what="2 supervisors")
    ports = [int(p) for p in re.findall(r"on tcp \[?[^\s\]]*\]?:(\d+)", run.log())]
    assert len(ports) == 2
    workers = wait_for(lambda: len(_worker_pids(run)) == 4 and _worker_pids(run), 30, what="2 workers per pool")
    assert wait_for(lambda: _try(ask, ports[0]), 20, what="an IPv4 answer")[0] in workers
    assert wait_for(lambda: _try(ask, ports[1], b"hi", "::1"), 20, what="an IPv6 answer")[0] in workers
    run.processes()
    run.signal(signal.SIGTERM)
    print("TERM stop of twistd + 2 supervisors + 4 idle workers: %.2fs" % run.wait_gone())


# -- configuration and log format ---------------------------------------------------------------


def _twistd_once(workdir, spoon_args, env=None):
    """twistd as a daemon would start (no -n), for options that must exit before it does."""
    return subprocess.run(
        [TWISTD, "--pidfile", os.path.join(workdir, "twistd.pid"),
         "--logfile", os.path.join(workdir, "twistd.log"), "spoon"] + spoon_args,
        cwd=workdir, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=HERE, **(env or {})),
    )


def test_version_check_and_print_config_exit_before_twistd_binds_or_daemonises(workdir):
    from spoon import __version__

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    server = ["--server", "test_service_apps.GenerationSpork", "-I", "127.0.0.1", "-P", str(port)]
    try:
        done = _twistd_once(workdir, ["--version"])
        assert (done.returncode, done.stdout) == (0, "spoon %s\n" % __version__), done.stderr

        # The port is taken by this test: binding it would fail, daemonising would return 0
        # with no output on the terminal and leave a pid file and a log.
        done = _twistd_once(workdir, server + ["--check-config"])
        assert (done.returncode, done.stdout) == (0, "configuration OK: test_service_apps.GenerationSpork\n"), done.stderr

        done = _twistd_once(workdir, server + ["--print-config"], env={"SPOON_WORKERS": "3"})
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert "workers = 3  (env SPOON_WORKERS)" in lines, lines
        assert "port = %d  (option --port)" % port in lines, lines
        assert 'pid_file = "%s"  (twistd --pidfile)' % os.path.join(workdir, "twistd.pid") in lines, lines

        bad = os.path.join(workdir, "bad.toml")
        with open(bad, "w") as f:
            f.write('workers = 0\nlog_format = "xml"\n')
        done = _twistd_once(workdir, server + ["--config", bad, "--graceful-timeout", "x", "--check-config"])
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            "3 configuration error(s):",
            "  --graceful-timeout: must be a number of seconds, not 'x'",
            "  %s line 1: workers: must be at least 1, not 0" % bad,
            "  %s line 2: log_format: must be one of text, json, not 'xml'" % bad,
        ]
        assert sorted(os.listdir(workdir)) == ["bad.toml"]
    finally:
        held.close()


BOOM_APP = """
from test_service_apps import GenerationSpoon, Report


class Boom(Report):
    def handle(self):
        if self.rfile.readline().strip() == b"boom":
            raise ValueError("boom from the handler")
        self.wfile.write(b"fine\\n")


class BoomSpoon(GenerationSpoon):
    handler_klass = Boom
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_of_twistds_log_has_spoons_format(twistd, workdir, log_format):
    """twistd's own lines, Twisted's events and the server's stdlib records (a traceback
    too): one shape, in text or in JSON."""
    import datetime
    import json

    with open(os.path.join(workdir, "boom_app.py"), "w") as f:
        f.write(BOOM_APP)
    run = twistd(["--server", "boom_app.BoomSpoon", "-I", "127.0.0.1", "-P", "0",
                  "--log-format", log_format])
    port = run.port()
    assert request(("127.0.0.1", port), b"fine\n", timeout=10) == b"fine\n"
    request(("127.0.0.1", port), b"boom\n", timeout=10)
    wait_for(lambda: "boom from the handler" in run.log(), 20, what="the traceback in the log")
    run.signal(signal.SIGTERM)
    run.wait_gone()
    lines = run.log().splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines]
    else:
        records = []
        for line in lines:
            match = LOG_LINE.match(line)
            if match is None:
                assert line.startswith("\t") and records, line
                records[-1].setdefault("traceback", []).append(line[1:])
                continue
            time, level, pid, logger, message = match.groups()
            records.append(dict(time=time, level=level, pid=int(pid), logger=logger, message=message))
        for record in records:
            if "traceback" in record:
                record["traceback"] = "\n".join(record["traceback"])
    # Until twistd daemonises its lines carry the pid of the process that was started.
    launcher = records[0]["pid"]
    for record in records:
        assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None
        assert record["pid"] in (launcher, run.pid), record
    assert [r["pid"] for r in records if "listening on" in r["message"]] == [run.pid]
    assert any(r["message"].startswith("twistd ") and "starting up" in r["message"]
               and r["logger"].startswith("twisted.") for r in records), records
    assert any(r["logger"] == "gen-server" and r["message"] == "config generation 1" for r in records)
    [failure] = [r for r in records if "traceback" in r]
    assert (failure["level"], failure["logger"], failure["pid"]) == ("ERROR", "gen-server", run.pid)
    assert failure["traceback"].splitlines()[-1] == "ValueError: boom from the handler"


def test_json_log_of_a_pool_keeps_the_pid_of_each_writer(twistd):
    import json

    run = twistd(["--server", "test_service_apps.GenerationSpork", "-I", "127.0.0.1", "-P", "0",
                  "-s", "2", "--log-format", "json"])
    wait_for(lambda: len(_worker_pids(run)) == 2, 30, what="2 workers")
    [supervisor] = children_of(run.pid)
    run.signal(signal.SIGTERM)
    run.wait_gone()
    records = [json.loads(line) for line in run.log().splitlines()]
    generation = [r for r in records if r["message"] == "config generation 1"]
    assert generation and {r["pid"] for r in generation} == {supervisor}, generation
    assert {r["pid"] for r in records} >= {run.pid, supervisor}
