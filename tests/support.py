"""Shared helpers for functional tests: real processes, real sockets, bounded waits.

Every wait here has a deadline and every process started here is killed by pid when the
test ends (use the ``procs`` fixture from ``conftest.py``).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from spoon.linux import process_ids, process_stat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: One line of spoon's text log format (README "Logging"), written independently of
#: ``spoon.logs`` so that a change of the format there fails the tests: groups time, level,
#: pid, logger, message.  A line starting with a tab continues the record above it.
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) "
    r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \[(\d+)\] (\S+): (.*)$"
)


def wait_for(condition, timeout=10.0, interval=0.01, what=None):
    """Poll ``condition()`` until it returns a true value; return that value.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what or condition))
        time.sleep(interval)


def pid_alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = process_stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children_of(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    kids = []
    for candidate in process_ids():
        try:
            fields = process_stat(candidate)
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(candidate)
    return kids


def rss_kib(pid, field="VmRSS"):
    """Resident set size of ``pid`` in KiB: now (VmRSS), or with ``field="VmHWM"`` the
    highest it has been (the kernel's high-water mark)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for %d" % (field, pid))


def pss_kib(pid):
    """Proportional set size of ``pid`` in KiB (smaps_rollup)."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss for %d" % pid)


def cpu_seconds(pid):
    """User + system CPU time of ``pid`` in seconds (from /proc/PID/stat)."""
    fields = process_stat(pid)
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def connect(address, timeout=5.0):
    """A connected client socket with ``timeout`` on every operation; ``address`` a
    (host, port) pair or the path of a UNIX socket."""
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def kill_group(proc, timeout=10):
    """SIGKILL the process group ``proc`` leads (started with ``start_new_session``), then
    reap ``proc``: nothing of it is left behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def recv_all(sock, limit=1 << 20):
    """Read until EOF (bounded by the socket's timeout and ``limit`` bytes)."""
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def request(address, payload, timeout=5.0, half_close=True):
    """Connect, send ``payload``, half-close, return everything read until EOF."""
    with connect(address, timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


class ServerProcess:
    """A Python program run as a real child process that prints ``READY <port>`` (and
    optionally more words) once it listens.

    ``source`` is dedented Python code; it runs with the repository on ``sys.path``.
    """

    def __init__(self, source, args=(), env=None, ready_timeout=15.0, cwd=None):
        self.source = textwrap.dedent(source)
        code = "import sys; sys.path[:0] = [%r, %r]\n" % (ROOT, HERE) + self.source
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.output = []
        self.ready_words = self._wait_ready(ready_timeout)
        self.port = int(self.ready_words[1])

    def _wait_ready(self, timeout):
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    break
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode("utf8", "replace")
                    self.output.append(text)
                    if text.startswith("READY "):
                        self._pending = buf
                        return text.split()
        finally:
            sel.close()
        self.kill()
        raise AssertionError(
            "server did not become ready:\n%s" % "\n".join(self.output + [buf.decode("utf8", "replace")])
        )

    def signal(self, signum):
        os.kill(self.pid, signum)

    def lines_so_far(self):
        """Every line printed so far, without waiting (also kept in ``output``)."""
        import select

        fd = self.proc.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            self.output.append(line.decode("utf8", "replace"))
        return self.output

    def wait(self, timeout=10.0):
        """Wait for exit (bounded); return the exit code."""
        return self.proc.wait(timeout=timeout)

    def read_output(self, timeout=10.0):
        """Everything the process printed, once it has exited (bounded wait)."""
        out, _ = self.proc.communicate(timeout=timeout)
        text = self._pending.decode("utf8", "replace") + (out or b"").decode("utf8", "replace")
        self._pending = b""
        self.output.extend(text.splitlines())
        return "\n".join(self.output)

    def kill(self):
        """Kill the whole process group (the server and anything it forked)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    _pending = b""


class SentryCollector:
    """A real HTTP server on 127.0.0.1 standing in for Sentry: records every (path, body)
    it is sent (gzip bodies decompressed).  Use as a context manager; ``dsn(project)``
    is a DSN pointing at it."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Collector(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                received.append((self.path, body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}
        )

    def dsn(self, project):
        return "http://publickey@127.0.0.1:%d/%d" % (self.server.server_address[1], project)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join(timeout=10)
        self.server.server_close()


def read_events(path):
    """Lines ``<pid> <what> <client port>`` appended by server processes to ``path``
    (tests/socketserver_servers.py), as tuples of strings."""
    try:
        with open(path) as f:
            return [tuple(line.split()) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# -- the spoon command (spoon.daemon) ---------------------------------------------------------

PROBE_MODULE = '''
"""A server whose answers show what the daemon did: its config generation and pid."""
import os

import spoon.server
from twisted.logger import Logger

_twisted_log = Logger(namespace="probe.twisted")


class Handler(spoon.server.Gulp):
    def handle(self):
        line = self.rfile.readline().decode()
        word = line.strip()
        self.server.log.info("handled %r", word)
        _twisted_log.info("twisted saw {word}", word=word)
        if word == "gen":
            answer = "%d %d" % (self.server.generation, os.getpid())
        elif word == "warn":
            self.server.log.warning("probe warning from %d", os.getpid())
            answer = "warned"
        elif word == "prefork":
            answer = str(getattr(self.server, "prefork", None))
        elif word == "hold":
            # Keep this connection in flight until the client closes it (or the graceful
            # stop times out): mid-request (a body read), which a graceful stop waits for.
            self.rfile.read(1)
            answer = "released"
        else:
            answer = line.lower()
        self.wfile.write(answer.encode() + b"\\n")


class ProbeServer(spoon.server.TCPSpoon):
    server_logger = "probe-server"
    handler_klass = Handler
    graceful_timeout = 3
    generation = 0
    command_line_defaults = dict(
        spoon.server.TCPSpoon.command_line_defaults, port=0, interface="127.0.0.1"
    )

    def __init__(self, address):
        super().__init__(address)
        # Tell the test the port (bound to 0) before the daemon detaches.
        target = os.environ["PROBE_PORT_FILE"]
        with open(target + ".tmp", "w") as f:
            f.write("%d\\n" % self.server_address[1])
        os.replace(target + ".tmp", target)

    def load_config(self):
        self.generation += 1


class ProbeSpork(ProbeServer, spoon.server.TCPSpork):
    prefork = 2


class NotAServer:
    pass
'''


def processes_with_token(token):
    """Pids whose environment holds ``token`` (any process this test started)."""
    needle = ("SPOON_TEST_TOKEN=%s" % token).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


class Daemons:
    """Runs ``python -m spoon.daemon`` in a scratch directory with the probe module."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        (tmp_path / "probe_servers.py").write_text(PROBE_MODULE)
        self.token = uuid.uuid4().hex
        self.pid_file = str(tmp_path / "probe.pid")
        self.port_file = str(tmp_path / "probe.port")
        self.log_file = str(tmp_path / "probe.log")
        self.pid_files = [self.pid_file]
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]),
            PROBE_PORT_FILE=self.port_file,
            SPOON_TEST_TOKEN=self.token,
            PYTHONUNBUFFERED="1",
        )

    def run(self, *args, timeout=60, klass="probe_servers.ProbeServer"):
        """Run the command line to completion (bounded); return the CompletedProcess."""
        return subprocess.run(
            [sys.executable, "-m", "spoon.daemon", klass, *args],
            cwd=str(self.dir),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *extra, klass="probe_servers.ProbeServer"):
        for path in (self.port_file,):
            if os.path.exists(path):
                os.unlink(path)
        result = self.run("start", "-p", self.pid_file, *extra, klass=klass)
        assert result.returncode == 0, result.stderr
        return self.pid(), self.port()

    def pid(self, path=None):
        with open(path or self.pid_file) as f:
            return int(f.read())

    def port(self):
        with open(self.port_file) as f:
            return int(f.read())

    def ask(self, port, word, timeout=10.0):
        return request(("127.0.0.1", port), word.encode() + b"\n", timeout=timeout).decode()

    def kill_all(self):
        """SIGKILL every process of this test until none is left: a supervisor killed
        after its workers may have forked a replacement in between, so one pass is not
        enough."""
        def alive():
            pids = set(processes_with_token(self.token))
            for path in self.pid_files:
                try:
                    pids.add(self.pid(path))
                except (OSError, ValueError):
                    pass
            return [p for p in pids if p != os.getpid() and pid_alive(p)]

        def kill_round():
            for pid in alive():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not alive()

        wait_for(kill_round, timeout=20, interval=0.05, what="every daemon process to die")


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path)
    yield d
    d.kill_all()
    assert not [p for p in processes_with_token(d.token) if pid_alive(p)]


def log_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def bound_client(host, kind=socket.SOCK_STREAM, timeout=5.0):
    """A client socket bound to ``host`` (a loopback alias such as 127.0.0.2), so that a
    server sees it come from that address."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(timeout)
    sock.bind((host, 0))
    return sock


def lines_matching(path, name, text):
    """(pid, message) of the log lines from logger ``name`` containing ``text``."""
    found = []
    for line in log_lines(path):
        match = LOG_LINE.match(line)
        if match and match.group(4) == name and text in match.group(5):
            found.append((int(match.group(3)), match.group(5)))
    return found


def workers_of(master, count):
    """The ``count`` live children of ``master``, once it has that many (bounded)."""
    return wait_for(
        lambda: (lambda kids: kids if len(kids) == count else None)(
            [k for k in children_of(master) if pid_alive(k)]
        ),
        timeout=30,
        what="%d workers of %d" % (count, master),
    )


def proc_ids(pid):
    """(real, effective, saved, fs) uids and the same gids of ``pid``, from /proc."""
    ids = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                ids[key] = [int(x) for x in value.split()]
    return ids["Uid"], ids["Gid"]


def readable_by_others(path):
    """True when a user who neither owns nor shares a group with the files on the way (as
    ``nobody``) can read ``path``: every directory above it lets others search it, and it
    lets others read it."""
    path = os.path.realpath(path)
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent):
        if not os.stat(parent).st_mode & 0o001:
            return False
        parent = os.path.dirname(parent)
    return bool(os.stat(path).st_mode & 0o004)


@pytest.fixture
def sleeper():
    """A real process to signal, unrelated to spoon; killed at the end whatever happened.
    A plain ``sleep``, so that a signal has its default effect at any moment (a Python
    child would turn an early SIGINT into KeyboardInterrupt depending on how far its
    start-up got) and a signal sent by mistake shows."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def process_title(pid):
    """The command line of ``pid`` as ``ps`` shows it (what a process title replaces)."""
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return b" ".join(part for part in f.read().split(b"\0") if part).decode("utf8", "replace")


def proxy_v1(source, destination):
    """A PROXY protocol v1 header (what HAProxy's ``send-proxy`` sends) for IPv4 or IPv6
    (host, port) pairs, written from the specification for the tests."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (family, source[0], destination[0], source[1], destination[1])).encode()


#: The twelve bytes that open every PROXY protocol v2 header.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(source=None, destination=None, command=1, tlvs=b""):
    """A PROXY protocol v2 header (``send-proxy-v2``): ``command`` 1 (PROXY) with stream
    addresses, or 0 (LOCAL, a health check) with none; ``tlvs`` appended to the block."""
    import ipaddress
    import struct

    if source is None:
        block, family = b"", 0x00
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        family = 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    block += tlvs
    return PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


class PoolLoad:
    """Requests from ``threads`` threads, one connection each, until :meth:`stop`: each
    sends ``payload`` (bytes, or a callable of a ``random.Random`` returning them),
    half-closes and reads the answer ``"<pid> <generation>"`` lines.

    A connection the kernel refused (the port closed by a stop) is counted in ``refused``,
    not as a failure: a failure is a request that was accepted and then not answered in
    full (``failures``: (kind, exception); ``failure_times``: when, monotonic).
    ``answers``: (pid, generation) of each."""

    def __init__(self, port, threads=4, payload=b"x\n", timeout=20.0, host="127.0.0.1"):
        import threading

        self.address = (host, port)
        self.payload = payload
        self.timeout = timeout
        self.answers = []
        self.failures = []
        self.failure_times = []
        self.requests = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def ok(self):
        return len(self.answers)

    def pids(self):
        with self._lock:
            return {pid for pid, _ in self.answers}

    def _fail(self, kind, error):
        with self._lock:
            self.failures.append((kind, repr(error)))
            self.failure_times.append(time.monotonic())

    def _run(self, seed):
        import random

        rng = random.Random(seed)
        while not self._stop.is_set():
            payload = self.payload(rng) if callable(self.payload) else self.payload
            expected = payload.count(b"\n")
            try:
                sock = socket.create_connection(self.address, timeout=self.timeout)
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                time.sleep(0.01)
                continue
            except OSError as e:
                self._fail("connect", e)
                continue
            try:
                with sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    lines = recv_all(sock).split(b"\n")[:-1]
                    if len(lines) != expected:
                        raise EOFError("%d of %d answers: %r" % (len(lines), expected, lines))
                    answers = [tuple(int(x) for x in line.split()) for line in lines]
            except Exception as e:
                self._fail("request", e)
            else:
                with self._lock:
                    self.answers.extend(answers)
            finally:
                with self._lock:
                    self.requests += 1

    def wait_for_answers(self, count, timeout=30.0):
        """Until ``count`` more requests have been answered (bounded)."""
        target = self.ok + count
        wait_for(lambda: self.ok >= target, timeout=timeout, what="%d answers (%d failures)" % (count, len(self.failures)))

    def stop(self, timeout=30.0):
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), "a load thread is stuck"
        return self


def start_pool(server_process, name, log_path, config=None, **settings):
    """Start ``tests/pool_fault_servers.py``'s ``name`` (a pool), logging to the file
    ``log_path`` (so that its processes never block on a full output pipe); ``config``:
    the file its ``load_config()`` reads its generation from; ``settings``: class
    attributes to override (``prefork=4``, ``graceful_timeout=2``)."""
    env = {"POOL_" + key.upper(): str(value) for key, value in settings.items()}
    env["POOL_LOG"] = str(log_path)
    if config is not None:
        env["POOL_CONFIG"] = str(config)
    server = server_process("import pool_fault_servers as s; s.main(%r)" % name, env=env)
    server.log_path = str(log_path)
    return server


def pool_log(server):
    """What a pool started by :func:`start_pool` has logged so far."""
    with open(server.log_path, encoding="utf8", errors="replace") as f:
        return f.read()
