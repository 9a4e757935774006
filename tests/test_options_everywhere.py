"""The same option works in every entry point that offers it: one test per option, run
through ``twistd spoon``, the ``spoon`` command (``start -D``), ``python -m spoon.prefork``
and a plain script (``MyServer(addr).serve_forever()``, which reads ``SPOON_*``), each as a
real process whose answers (``option_servers.Facts``) or output show the option's effect.

Entry points that do not offer an option are left out of its parameters (the pool's
supervisor is handed its socket, so it has no endpoint or port; a script's only command
line is its own program, so it reads the environment and ``SPOON_CONFIG``).
"""

import json
import os
import pwd
import signal
import socket
import subprocess
import sys

import pytest

import spoon
from support import HERE, LOG_LINE, ROOT, children_of, kill_group, request, wait_for

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PROBE = "option_servers.OptionProbe"

SCRIPT = """
import sys
import option_servers
getattr(option_servers, sys.argv[2])(("127.0.0.1", int(sys.argv[1]))).serve_forever()
"""


#: What systemd does for a socket unit: bind, pass the socket as descriptor 3 with
#: LISTEN_FDS=1, LISTEN_FDNAMES (systemd 227 on) and LISTEN_PID naming the process it
#: executes (the same pid: exec).
SYSTEMD = """
import os, socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen(64)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="spoon.socket")
os.execv(sys.argv[2], sys.argv[2:])
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Run:
    """One entry point serving ``option_servers.OptionProbe`` on 127.0.0.1 in a scratch
    directory; its stdout and stderr go to ``out.log`` there."""

    def __init__(self, entry, tmp_path, args=(), env=None, twistd_args=(), klass=PROBE, port=None,
                 unix=None, systemd=False):
        self.entry = entry
        self.dir = tmp_path
        self.port = port or _free_port()
        self.address = unix or ("127.0.0.1", self.port)
        self.out = str(tmp_path / "out.log")
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]), PYTHONUNBUFFERED="1")
        self.env.update(env or {})
        args = list(args)
        listen = [] if any(a in ("-e", "--endpoint") for a in args) else ["-P", str(self.port)]
        self.sock = None
        pass_fds = ()
        if entry == "twistd":
            pidfile = [] if "--pidfile" in twistd_args else ["--pidfile", ""]
            self.argv = [TWISTD, "-n", *pidfile, *twistd_args, "spoon", "--server", klass,
                         *listen, *args]
        elif entry == "daemon":
            self.argv = [sys.executable, "-m", "spoon.daemon", klass, "start", "-D", *listen, *args]
        elif entry == "prefork":
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", self.port))
            self.sock.listen(64)
            pass_fds = (self.sock.fileno(),)
            self.argv = [sys.executable, "-m", "spoon.prefork", "--fd", str(self.sock.fileno()),
                         "--target", klass, *args]
        else:
            self.argv = [sys.executable, "-c", SCRIPT, str(self.port), klass.rpartition(".")[2]]
        if systemd:
            self.argv = [sys.executable, "-c", SYSTEMD, str(self.port)] + self.argv
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=str(tmp_path), env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds, start_new_session=True,
            )
        if self.sock is not None:
            self.sock.close()  # the supervisor holds its own copy
        self.pid = self.proc.pid

    def output(self):
        with open(self.out, encoding="utf8", errors="replace") as f:
            return f.read()

    def ask(self, word="facts", timeout=30):
        """The serving process's facts (waiting until it serves)."""

        def answer():
            if self.proc.poll() is not None:
                raise AssertionError("%s exited %s:\n%s" % (self.entry, self.proc.returncode, self.output()))
            try:
                return json.loads(request(self.address, word.encode() + b"\n", timeout=10))
            except (OSError, ValueError):
                return None

        return wait_for(answer, timeout=timeout, interval=0.05, what="%s serving" % self.entry)

    def stop(self):
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=20)
        finally:
            kill_group(self.proc)


@pytest.fixture
def run(tmp_path):
    started = []

    def start(entry, *args, **kwargs):
        r = Run(entry, tmp_path, args, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def _records(text):
    """(logger, level, pid, message) of every line in spoon's text or JSON format."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            found.append((r["logger"], r["level"], r["pid"], r["message"]))
            continue
        match = LOG_LINE.match(line)
        if match:
            found.append((match.group(4), match.group(2), int(match.group(3)), match.group(5)))
    return found


def _handled_by(text, pid):
    return [r for r in _records(text) if r[0] == "option-probe" and r[3] == "handled facts" and r[2] == pid]


# -- serving: the option's effect ---------------------------------------------------------


@pytest.mark.parametrize("entry", ["twistd", "daemon"])
def test_endpoint(run, entry):
    port = _free_port()
    r = run(entry, "-e", "tcp:%d:interface=127.0.0.1" % port, port=port)
    assert r.ask()["pid"] == r.pid


@pytest.mark.parametrize("entry", ["twistd", "daemon"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_unix_endpoint_in_one_process_or_pre_forked(run, entry, workers, tmp_path):
    path = str(tmp_path / "server.sock")
    r = run(entry, "-e", "unix:" + path, "-s", workers, unix=path)
    facts = r.ask()
    assert (facts["client_address"], facts["sockname"]) == ("", path)
    if workers == "2":
        _workers_of(r)
    else:
        assert facts["pid"] == r.pid
    if entry == "twistd" and workers == "1":
        # The listening port says where it listens (its getHost()), as for TCP.
        assert "listening on unix %s" % path in r.output()


@pytest.mark.parametrize("entry", ["twistd", "daemon"])
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("choice", ["index=0", "name=spoon.socket"])
def test_a_systemd_socket_in_one_process_or_pre_forked(run, entry, workers, choice):
    r = run(entry, "-e", "systemd:domain=INET:" + choice, "-s", workers, systemd=True)
    facts = r.ask()
    if workers == "2":
        _workers_of(r)
    else:
        assert facts["pid"] == r.pid


@pytest.mark.parametrize("entry", ["twistd", "daemon"])
def test_a_systemd_socket_name_that_was_not_passed_is_one_line_naming_those_that_were(run, entry):
    r = run(entry, "-e", "systemd:domain=INET:name=other.socket", systemd=True)
    assert r.proc.wait(timeout=30) != 0
    out = r.output()
    assert "systemd:name=other.socket" in out and "names passed: spoon.socket" in out, out
    if entry == "daemon":  # twistd reports a service that cannot start with its traceback
        assert "Traceback" not in out, out


@pytest.mark.parametrize("entry", ["twistd", "daemon"])
def test_port_and_interface(run, entry):
    r = run(entry, "-I", "127.0.0.1")
    assert r.ask()["pid"] == r.pid


def _workers_of(r, count=2):
    facts = r.ask()
    supervisor = facts["ppid"]
    assert facts["pid"] != r.pid
    wait_for(lambda: len(children_of(supervisor)) == count, timeout=20, what="%d workers" % count)
    return supervisor, facts


@pytest.mark.parametrize("entry, args", [("twistd", ["-s", "2"]), ("daemon", ["-s", "2"]),
                                         ("prefork", ["--workers", "2"])])
def test_workers(run, entry, args):
    r = run(entry, *args)
    supervisor, _ = _workers_of(r)
    # twistd runs the pool's supervisor as its child; the others are the supervisor.
    assert supervisor in ([r.pid] if entry != "twistd" else children_of(r.pid))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
@pytest.mark.parametrize("entry", ["twistd", "daemon", "prefork"])
def test_uid_and_gid(run, entry):
    nobody = pwd.getpwnam("nobody")
    ids = ["--uid", "nobody", "--gid", str(nobody.pw_gid)]
    r = run(entry, *([] if entry == "twistd" else ids), twistd_args=ids if entry == "twistd" else ())
    facts = r.ask()
    assert (facts["uid"], facts["gid"]) == (nobody.pw_uid, nobody.pw_gid)


@pytest.mark.parametrize("entry, workers", [("twistd", "-s"), ("daemon", "-s"), ("prefork", "--workers")])
def test_graceful_timeout(run, entry, workers):
    # The pool gives its workers its own drain limit: the option's, not the class's (3).
    _, facts = _workers_of(run(entry, workers, "2", "--graceful-timeout", "2.5"))
    assert facts["graceful_timeout"] == 2.5


@pytest.mark.parametrize("entry, workers", [("twistd", "-s"), ("daemon", "-s"), ("prefork", "--workers")])
def test_worker_timeout(run, entry, workers):
    """A worker stuck in a handler is replaced after the option's 1 s, not the default 30."""
    r = run(entry, workers, "2", "--worker-timeout", "1")
    supervisor, _ = _workers_of(r)
    before = set(children_of(supervisor))
    stuck = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    try:
        stuck.sendall(b"stuck\n")
        wait_for(lambda: len(before - set(children_of(supervisor))) == 1, timeout=15,
                 what="the stuck worker replaced")
    finally:
        stuck.close()


@pytest.mark.parametrize("entry", ["twistd", "daemon", "prefork"])
def test_reactor(run, entry):
    chosen = ["--reactor", "poll"]
    r = run(entry, *([] if entry == "twistd" else chosen), twistd_args=chosen if entry == "twistd" else ())
    assert r.ask()["reactor"] == "twisted.internet.pollreactor"


@pytest.mark.parametrize("entry", ["twistd", "daemon"])
def test_pid_file(run, entry, tmp_path):
    path = str(tmp_path / "server.pid")
    r = run(entry, *(["-p", path] if entry == "daemon" else []),
            twistd_args=["--pidfile", path] if entry == "twistd" else ())
    r.ask()
    with open(path) as f:
        assert int(f.read()) == r.pid


@pytest.mark.parametrize("entry", ["twistd", "daemon", "prefork", "script"])
def test_log_file(run, entry, tmp_path):
    path = str(tmp_path / "server.log")
    r = run(entry, *(["-L", path] if entry in ("daemon", "prefork") else []),
            twistd_args=["--logfile", path] if entry == "twistd" else (),
            env={"SPOON_LOG_FILE": path} if entry == "script" else None)
    pid = r.ask()["pid"]

    def written():
        with open(path) as f:
            return f.read()

    wait_for(lambda: _handled_by(written(), pid), timeout=10, what="the record in " + path)
    assert all(LOG_LINE.match(line) or line.startswith("\t") for line in written().splitlines())


@pytest.mark.parametrize("entry, args", [
    ("twistd", ["-s", "2", "--log-level", "debug"]),  # relayed from the pool too
    ("daemon", ["--log-level", "debug"]),
    ("prefork", ["--log-level", "debug"]),
    ("script", []),
])
def test_log_level(run, entry, args):
    r = run(entry, *args, env={"SPOON_LOG_LEVEL": "debug"} if entry == "script" else None)
    pid = r.ask()["pid"]
    wait_for(lambda: ("option-probe.debug", "DEBUG", pid, "probe debug record") in _records(r.output()),
             timeout=10, what="the debug record:\n" + r.output())


def _json_lines(r, pid):
    wait_for(lambda: _handled_by(r.output(), pid), timeout=10, what="the record:\n" + r.output())
    lines = [line for line in r.output().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), lines
    assert all(json.loads(line)["level"] for line in lines)


@pytest.mark.parametrize("entry", ["twistd", "daemon", "prefork", "script"])
def test_log_format(run, entry):
    r = run(entry, *([] if entry == "script" else ["--log-format", "json"]),
            env={"SPOON_LOG_FORMAT": "json"} if entry == "script" else None)
    _json_lines(r, r.ask()["pid"])


def test_nice(run):
    r = run("daemon", "-n", "5")
    assert r.ask()["nice"] - os.getpriority(os.PRIO_PROCESS, 0) == 5


@pytest.mark.parametrize("entry", ["twistd", "daemon", "prefork", "script"])
def test_config_file(run, entry, tmp_path):
    path = tmp_path / "spoon.toml"
    path.write_text('log_format = "json"\n')
    r = run(entry, *([] if entry == "script" else ["--config", str(path)]),
            env={"SPOON_CONFIG": str(path)} if entry == "script" else None)
    _json_lines(r, r.ask()["pid"])


@pytest.mark.parametrize("entry, args", [("twistd", ["-s", "2"]), ("daemon", ["-s", "2"]),
                                         ("prefork", ["--workers", "2"]), ("script", [])])
def test_metrics(run, entry, args):
    """The pool's supervisor serves Prometheus metrics where --metrics (SPOON_METRICS for
    a script) says."""
    import urllib.request

    port = _free_port()
    where = "tcp:%d:interface=127.0.0.1" % port
    r = run(entry, *(args + ([] if entry == "script" else ["--metrics", where])),
            klass="option_servers.OptionPool" if entry == "script" else PROBE,
            env={"SPOON_METRICS": where, "SPOON_WORKERS": "2"} if entry == "script" else None)
    _workers_of(r)

    def scraped():
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as reply:
                return reply.read().decode()
        except OSError:
            return None

    text = wait_for(scraped, timeout=20, what="metrics on port %d" % port)
    assert "spoon_workers" in text or "spoon_worker" in text, text[:500]


@pytest.mark.parametrize("entry, workers", [("twistd", "-s"), ("daemon", "-s"), ("prefork", "--workers")])
def test_worker_limits_reach_the_workers(run, entry, workers):
    """--max-requests, --max-requests-jitter, --max-worker-memory (read by the workers,
    spoon.pool.retire) are set on the server each worker serves, not only parsed."""
    r = run(entry, workers, "2", "--max-requests", "500", "--max-requests-jitter", "7",
            "--max-worker-memory", "900000000")
    _, facts = _workers_of(r)
    assert (facts["max_requests"], facts["max_requests_jitter"], facts["max_worker_memory"]) == (
        500, 7, 900000000)


@pytest.mark.parametrize("entry, args", [("twistd", ["-s", "1"]), ("twistd", ["-s", "2"]),
                                         ("daemon", ["-s", "1"]), ("daemon", ["-s", "2"]),
                                         ("prefork", ["--workers", "2"])])
def test_proxy_allow_from_reaches_the_serving_process(run, entry, args):
    r = run(entry, *args, "--proxy-allow-from", "10.0.0.0/8,::1")
    assert r.ask()["proxy_allow_from"] == ["10.0.0.0/8", "::1"]


def test_a_bad_proxy_allow_from_is_one_line_and_status_2(tmp_path):
    result = _command("daemon", "start", "-D", "--proxy-allow-from", "10.0.0.300")
    assert result.returncode == 2
    assert "'10.0.0.300' is not an address or a network" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_script_pool_takes_its_worker_limits_from_the_environment(run):
    r = run("script", klass="option_servers.OptionPool",
            env={"SPOON_WORKERS": "2", "SPOON_MAX_REQUESTS": "500", "SPOON_MAX_WORKER_MEMORY": "900000000"})
    _, facts = _workers_of(r)
    assert (facts["max_requests"], facts["max_worker_memory"]) == (500, 900000000)


def test_a_script_pool_takes_workers_and_timeouts_from_the_environment(run):
    r = run("script", klass="option_servers.OptionPool",  # the class says 4 workers, 3 s
            env={"SPOON_WORKERS": "2", "SPOON_GRACEFUL_TIMEOUT": "2.5"})
    _, facts = _workers_of(r)
    assert facts["graceful_timeout"] == 2.5 and facts["prefork"] == 2


def test_an_option_beats_the_environment(run):
    # A Spork class served in one process (-s 1) runs its own serve_forever(), which must
    # not read SPOON_WORKERS over the command line.
    r = run("daemon", "-s", "1", klass="option_servers.OptionPool", env={"SPOON_WORKERS": "2"})
    facts = r.ask()
    assert facts["pid"] == r.pid and facts["prefork"] == 1


@pytest.mark.parametrize("entry", ["twistd", "daemon", "prefork", "script"])
def test_spoon_environment_variables(run, entry):
    if entry == "script":
        r = run(entry, env={"SPOON_LOG_FORMAT": "json"})
        _json_lines(r, r.ask()["pid"])
    else:
        _workers_of(run(entry, env={"SPOON_WORKERS": "2"}))


# -- without serving: checking, printing, the version, refused classes -----------------------


def _command(entry, *args, klass=PROBE):
    if entry == "twistd":
        argv = [TWISTD, "-n", "--pidfile", "", "spoon", "--server", klass, *args]
    elif entry == "daemon":
        argv = [sys.executable, "-m", "spoon.daemon", klass, *args]
    else:
        argv = [sys.executable, "-m", "spoon.prefork", "--target", klass, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT])))


ENTRIES = ["twistd", "daemon", "prefork"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_check_config(entry):
    done = _command(entry, "--check-config", "-s", "2")
    assert (done.returncode, done.stdout) == (0, "configuration OK: %s\n" % PROBE), done.stderr
    done = _command(entry, "--check-config", "-s", "0", "--log-format", "xml")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "2 configuration error(s):",
        "  --spork: must be at least 1, not 0",
        "  --log-format: must be one of text, json, not 'xml'",
    ]


@pytest.mark.parametrize("entry", ENTRIES)
def test_print_config(entry):
    done = _command(entry, "--print-config", "--workers", "3", "--graceful-timeout", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "workers = 3  (option --spork)" in lines  # (--spork and --workers: one setting)
    assert "graceful_timeout = 4.0  (option --graceful-timeout)" in lines
    assert "worker_timeout = 30.0  (default)" in lines


@pytest.mark.parametrize("entry", ENTRIES)
def test_version(entry):
    argv = {"twistd": [TWISTD, "spoon", "--version"],
            "daemon": [sys.executable, "-m", "spoon.daemon", "--version"],
            "prefork": [sys.executable, "-m", "spoon.prefork", "--version"]}[entry]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout) == (0, "spoon %s\n" % spoon.__version__), done.stderr


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("klass, message", [
    ("option_servers.NoHandler", "NoHandler has no handler: set handler_klass to a subclass of spoon.server.Gulp"),
    ("option_servers.BadPort", "must be between 0 and 65535, not 70000"),
])
def test_a_server_class_spoon_cannot_serve_is_one_line_and_status_2(entry, klass, message):
    if klass.endswith("BadPort") and entry == "prefork":
        pytest.skip("the pool's supervisor binds nothing: it is handed its socket")
    done = _command(entry, *(["start", "-D"] if entry == "daemon" else []), klass=klass)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert message in line
