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
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children_of(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def rss_kib(pid):
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def pss_kib(pid):
    """Proportional set size of ``pid`` in KiB (smaps_rollup)."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss for %d" % pid)


def cpu_seconds(pid):
    """User + system CPU time of ``pid`` in seconds (from /proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def connect(address, timeout=5.0):
    """A connected client socket with ``timeout`` on every operation."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


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
