"""Log bytes per bad request, and accept() failure lines per second, in two checkouts.

    python bench/log_bytes.py --before /path/to/old/checkout [--after .] [-n 200]

A hostile client can make a server log on every request: a traceback per reset or per
undecodable line turns into a log flood.  For each kind of bad request this starts each
checkout's server (a ``TCPSpoon`` written against the compat API, so both versions run the
same code, logging with ``logging.basicConfig`` at INFO to a file), sends ``n`` bad
requests, waits for the log to settle (past the 10 s after which a rate-limited error is
summed up in one line) and reports the log bytes per bad request:

raise       a handler that raises after reading its line
utf8        the README's handler (readline, decode UTF-8, lower, write) sent invalid UTF-8
reset       a client that resets (RST) in the middle of a line
timeout     an idle client closed by the handler's ``timeout`` (0.2 s)
ctrl-c      a client still connected when the server is stopped with Ctrl-C (SIGINT): the
            bytes logged during a stop with ``n`` sessions open, less those of a stop with
            none, per session

Then, under ``ulimit -n 64``, a two-worker ``TCPSpork`` is sent 300 clients that stay
connected: accept() fails with EMFILE, and the log lines (and bytes) per second per worker
are measured over ``--exhaust`` seconds.

It is a quick measurement, not a benchmark: one run of each, numbers to compare, not to
time.  Nothing here depends on this checkout's spoon: each server puts its own checkout
first on ``sys.path``.
"""

import argparse
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

#: The servers, in a file of their own run by each checkout: ``server.py CHECKOUT KIND LOG``.
SERVERS = r'''
import logging
import os
import sys

sys.path.insert(0, sys.argv[1])

import spoon.server


class Raises(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        raise RuntimeError("handler bug hit on purpose")


class Readme(spoon.server.Gulp):
    def handle(self):
        request = self.rfile.readline().decode("utf8")
        response = request.lower().encode("utf8")
        self.wfile.write(response)


class Impatient(Readme):
    timeout = 0.2


class Session(spoon.server.Gulp):
    """A persistent protocol that says goodbye when its client is done."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"ok " + line)
        self.wfile.write(b"bye\n")


HANDLERS = {"raise": Raises, "utf8": Readme, "reset": Readme, "timeout": Impatient,
            "ctrl-c": Session, "emfile": Session}


class Server(spoon.server.TCPSpoon):
    server_logger = "bench"
    handler_klass = HANDLERS[sys.argv[2]]


class Pool(Server, spoon.server.TCPSpork):
    prefork = 2


logging.basicConfig(
    level=logging.INFO,
    filename=sys.argv[3],
    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
)
server = (Pool if sys.argv[2] == "emfile" else Server)(("127.0.0.1", 0))
print("READY", server.server_address[1], spoon.server.__file__, flush=True)
server.serve_forever()
'''

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \w+ \[(\d+)\] ")


class Server:
    """One server process of one checkout, logging to its own file."""

    def __init__(self, script, checkout, kind, workdir, fd_limit=None):
        self.log = os.path.join(workdir, "%s-%s.log" % (os.path.basename(checkout), kind))
        self.stderr = self.log + ".stderr"
        if os.path.exists(self.log):
            os.unlink(self.log)

        def limit():
            os.setsid()
            if fd_limit:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, script, checkout, kind, self.log],
                stdout=subprocess.PIPE, stderr=err, preexec_fn=limit,
            )
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError("%s server of %s did not start: %s%s" % (
                kind, checkout, line, open(self.stderr).read()))
        _, port, module = line.split()
        if not module.startswith(os.path.abspath(checkout)):
            self.kill()
            raise RuntimeError("%s imported spoon from %s" % (checkout, module))
        self.address = ("127.0.0.1", int(port))

    def size(self):
        try:
            return os.path.getsize(self.log)
        except FileNotFoundError:
            return 0

    def settle(self, since, at_least):
        """Wait until ``at_least`` seconds after ``since`` and the log has stopped growing
        for a second (bounded); return the log's size."""
        deadline = time.monotonic() + at_least + 30
        size, stable_since = self.size(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.size()
            if now != size:
                size, stable_since = now, time.monotonic()
            elif time.monotonic() - since >= at_least and time.monotonic() - stable_since >= 1:
                break
        return size

    def stop(self, signum=signal.SIGTERM, timeout=40):
        os.kill(self.proc.pid, signum)
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def _connect(address, timeout=10):
    sock = socket.create_connection(address, timeout=timeout)
    return sock


def _exchange(address, payload):
    """Send ``payload``, half-close, read to EOF; errors from the server's side are fine."""
    with _connect(address) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass


def _reset_mid_line(address):
    sock = _connect(address)
    sock.sendall(b"a line cut short by a reset, no end of line")
    time.sleep(0.005)  # let the server read it before the RST
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _idle_until_closed(address, n):
    """``n`` clients that connect and send nothing, all at once; wait for the server to
    close each of them (its handler's timeout)."""
    socks = [_connect(address, timeout=30) for _ in range(n)]
    for sock in socks:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        sock.close()


def bad_requests(kind, server, n):
    """Send ``n`` bad requests of ``kind``."""
    if kind == "raise":
        for _ in range(n):
            _exchange(server.address, b"boom\n")
    elif kind == "utf8":
        for _ in range(n):
            _exchange(server.address, b"caf\xe9 \xff\n")
    elif kind == "reset":
        for _ in range(n):
            _reset_mid_line(server.address)
    elif kind == "timeout":
        _idle_until_closed(server.address, n)
    else:
        raise ValueError(kind)


def per_request(script, checkout, kind, n, workdir, settle):
    """Log bytes per bad request of ``kind`` (the start-up lines not counted)."""
    if kind == "ctrl-c":
        return ctrl_c_per_session(script, checkout, n, workdir)
    server = Server(script, checkout, kind, workdir)
    try:
        start = server.settle(time.monotonic(), 0.5)
        t0 = time.monotonic()
        bad_requests(kind, server, n)
        end = server.settle(t0, settle)
    finally:
        server.stop()
    return (end - start) / n


def ctrl_c_per_session(script, checkout, n, workdir):
    """Log bytes of a Ctrl-C stop with ``n`` sessions open, less those of one with none,
    per session."""
    logged = []
    for sessions in (0, n):
        server = Server(script, checkout, "ctrl-c", workdir)
        socks = []
        try:
            for i in range(sessions):
                sock = _connect(server.address)
                sock.sendall(b"hello %d\n" % i)
                sock.recv(100)
                socks.append(sock)
            before = server.settle(time.monotonic(), 0.5)
            server.stop(signal.SIGINT)
            logged.append(server.size() - before)
        finally:
            for sock in socks:
                sock.close()
            server.kill()
    return (logged[1] - logged[0]) / n


def accept_failures(script, checkout, workdir, clients, seconds):
    """Under RLIMIT_NOFILE 64, ``clients`` connections held open against a 2-worker pool:
    {pid: (log lines per second, log bytes per second)} while accept() fails (each worker
    logs; the supervisor has nothing to say meanwhile), and the bytes written to stderr."""
    server = Server(script, checkout, "emfile", workdir, fd_limit=64)
    socks = []
    try:
        for _ in range(clients):
            socks.append(_connect(server.address))
        time.sleep(1.0)  # every worker is out of descriptors by now
        offset = server.size()
        time.sleep(seconds)
        with open(server.log, "rb") as f:
            f.seek(offset)
            window = f.read()
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    per_pid = {}  # pid -> [lines, bytes]; a traceback's lines count for its record's pid
    pid = None
    for line in window.decode("utf8", "replace").splitlines():
        match = RECORD.match(line)
        if match:
            pid = int(match.group(1))
        counts = per_pid.setdefault(pid, [0, 0])
        counts[0] += 1
        counts[1] += len(line) + 1
    rates = {pid: (c[0] / seconds, c[1] / seconds) for pid, c in per_pid.items()}
    return rates, os.path.getsize(server.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the checkout to compare against")
    p.add_argument("--after", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="default: this checkout")
    p.add_argument("-n", type=int, default=200, help="bad requests of each kind")
    p.add_argument("--kinds", default="raise,utf8,reset,timeout,ctrl-c")
    p.add_argument("--settle", type=float, default=11.0,
                   help="seconds to wait after a batch before reading the log's size (the "
                        "repeat summary of a rate-limited error comes 10 s after the first)")
    p.add_argument("--clients", type=int, default=300, help="clients for the EMFILE case")
    p.add_argument("--exhaust", type=float, default=5.0, help="seconds of EMFILE measured")
    p.add_argument("--keep", metavar="DIR", help="write the logs there and keep them")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + args.n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + args.n + 100), hard))
    checkouts = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    with tempfile.TemporaryDirectory(prefix="spoon-log-bytes-") as workdir:
        if args.keep:
            workdir = args.keep
        script = os.path.join(workdir, "server.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(SERVERS))
        print("log bytes per bad request (n=%d of each kind)" % args.n)
        print("%-10s %10s %10s" % ("kind", "before", "after"), flush=True)
        for kind in [k for k in args.kinds.split(",") if k]:
            row = [per_request(script, checkouts[w], kind, args.n, workdir, args.settle)
                   for w in ("before", "after")]
            print("%-10s %10.1f %10.1f" % (kind, row[0], row[1]), flush=True)
        if args.clients:
            print("accept() failing (RLIMIT_NOFILE 64, %d clients held, %gs): per worker"
                  % (args.clients, args.exhaust))
            for which in ("before", "after"):
                rates, stderr = accept_failures(
                    script, checkouts[which], workdir, args.clients, args.exhaust)
                print("%-7s %s  (stderr: %d bytes)" % (which, "; ".join(
                    "pid %s: %.1f lines/s, %.0f bytes/s" % (pid, lines, nbytes)
                    for pid, (lines, nbytes) in sorted(rates.items(), key=str)) or "nothing logged",
                    stderr), flush=True)


if __name__ == "__main__":
    main()
