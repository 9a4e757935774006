"""Pre-forking: a Spork's serve_forever() forks workers that serve the inherited socket.

Real processes and sockets throughout; the helpers here are shared with the other
``test_prefork_*`` modules.
"""

import os
import signal
import socket
import threading
import sys
import time

import pytest


from support import children_of, pid_alive, pss_kib, recv_all, wait_for

# A Spork whose handler answers "<worker pid> <config generation> <pids is None>" and can
# be asked to wait (cooperatively), spin the CPU or block.  argv: prefork worker_timeout
# graceful_timeout [flag file: shutdown() from a thread once it exists].
SPORK = """
import logging, os, sys, threading, time
import spoon.server

logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s")

class Handler(spoon.server.Gulp):
    def handle(self):
        words = self.rfile.readline().split()
        cmd = words[0] if words else b"pid"
        arg = float(words[1]) if len(words) > 1 else 0.0
        if cmd == b"wait":
            from twisted.internet import reactor, task
            self.wait(task.deferLater(reactor, arg, lambda: None))
        elif cmd == b"spin":
            end = time.monotonic() + arg
            while time.monotonic() < end:
                pass
        elif cmd == b"block":
            time.sleep(arg)
        self.wfile.write(b"%d %d %s\\n" % (os.getpid(), self.server.generation,
                                           str(self.server.pids is None).encode()))

class Server(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = int(sys.argv[1])
    worker_timeout = float(sys.argv[2])
    graceful_timeout = float(sys.argv[3])
    generation = 0

    def load_config(self):
        self.generation += 1

server = Server(("127.0.0.1", 0))

def report_pids():
    while len(server.pids or ()) < server.prefork:
        time.sleep(0.01)
    print("PIDS", " ".join(map(str, server.pids)), flush=True)
    print("MASTER REACTOR", "twisted.internet.reactor" in sys.modules, flush=True)

threading.Thread(target=report_pids, daemon=True).start()

if len(sys.argv) > 4:
    flag = sys.argv[4]
    def shutdown_when_flagged():
        while not os.path.exists(flag):
            time.sleep(0.02)
        server.shutdown()
        print("SHUTDOWN RETURNED", flush=True)
    stopper = threading.Thread(target=shutdown_when_flagged, daemon=True)
    stopper.start()

print("READY", server.server_address[1], os.getpid(), flush=True)
server.serve_forever()
print("RETURNED pids=%r" % (server.pids,), flush=True)
if len(sys.argv) > 4:
    stopper.join(10)
"""


def start_spork(server_process, prefork=2, worker_timeout=30, graceful_timeout=30, extra=()):
    args = [str(prefork), str(worker_timeout), str(graceful_timeout), *extra]
    proc = server_process(SPORK, args=args)
    wait_for(lambda: len(children_of(proc.pid)) == prefork, timeout=15, what="workers forked")
    return proc


def ask(port, command=b"pid", timeout=10.0):
    """Send one command; return (worker pid, config generation, pids-is-None)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = recv_all(sock)
    pid, generation, none = data.split()
    return int(pid), int(generation), none == b"True"


def serving_pids(port, expected, timeout=15.0):
    """Ask until every pid in ``expected`` has answered; return the answers seen."""
    seen = {}

    def all_seen():
        pid, gen, _ = ask(port)
        seen[pid] = gen
        return set(expected) <= set(seen)

    wait_for(all_seen, timeout=timeout, interval=0, what="answers from %s" % sorted(expected))
    return seen


def serving_pids_concurrently(port, expected, clients=4, timeout=60.0):
    """Ask from ``clients`` threads at once until every pid in ``expected`` has answered
    (or ``timeout`` passed); return the set of pids that answered."""
    seen = set()
    failures = []
    deadline = time.monotonic() + timeout

    def asker():
        while not set(expected) <= seen and time.monotonic() < deadline:
            try:
                seen.add(ask(port)[0])
            except Exception as e:  # reported below, with what was seen
                failures.append(e)
                return

    threads = [threading.Thread(target=asker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout + 15)
    assert not failures, failures
    return seen


def assert_gone(pids, timeout=10.0):
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=timeout, what="%s gone" % pids)


def output_so_far(proc):
    """Lines a ServerProcess printed so far (reads its output pipe without blocking, which
    also keeps a chatty server from filling the pipe)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.proc.stdout, selectors.EVENT_READ)
    chunks = []
    try:
        while sel.select(0):
            chunk = os.read(proc.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sel.close()
    text = proc._pending + b"".join(chunks)
    lines = text.split(b"\n")
    proc._pending = lines.pop()
    proc.output.extend(line.decode("utf8", "replace") for line in lines)
    return proc.output


class Load:
    """Client threads sending requests in a loop; counts what succeeded and what failed.

    A connection refused (nobody listening) is counted apart from a failure (a connection
    the server accepted that then broke or got no answer).
    """

    def __init__(self, port, clients=4, command=b"pid"):
        self.port = port
        self.command = command
        self.ok = 0
        self.refused = 0
        self.failures = []
        self.by_pid = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)

    def _run(self):
        while not self._stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                time.sleep(0.01)
                continue
            except OSError:
                # A SYN dropped by a stopping pool times out: never accepted either.
                with self._lock:
                    self.refused += 1
                continue
            try:
                with sock:
                    sock.sendall(self.command + b"\n")
                    sock.shutdown(socket.SHUT_WR)
                    data = recv_all(sock)
                pid = int(data.split()[0])
            except (OSError, ValueError, IndexError) as e:
                with self._lock:
                    self.failures.append(repr(e))
                continue
            with self._lock:
                self.ok += 1
                self.by_pid[pid] = self.by_pid.get(pid, 0) + 1


# -- tests --------------------------------------------------------------------------------


def test_workers_serve_and_pids_lists_them(server_process):
    proc = start_spork(server_process, prefork=3)
    master = int(proc.ready_words[2])
    workers = set(children_of(master))
    seen = serving_pids(proc.port, workers)
    assert master not in seen
    # In a worker, pids is None.
    assert ask(proc.port)[2] is True
    # The script's thread prints the supervisor's pids once it lists every worker.
    wait_for(lambda: any(l.startswith("PIDS ") for l in proc.lines_so_far()), what="the PIDS line")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    out = proc.read_output()
    pids_line = [line for line in out.splitlines() if line.startswith("PIDS ")][0]
    assert set(map(int, pids_line.split()[1:])) == workers
    # The supervisor never imported (installed) a reactor.
    assert "MASTER REACTOR False" in out
    assert "RETURNED pids=[]" in out
    assert_gone(workers)


def test_prefork_one_serves_in_this_process(server_process):
    proc = server_process(SPORK, args=["1", "30", "30"])
    assert ask(proc.port)[0] == proc.pid
    assert children_of(proc.pid) == []
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


REACTOR_IMPORTED = """
import os, sys
from twisted.internet import reactor, task   # imported (and installed) before forking
import spoon.server

class Handler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        # Needs this worker's own reactor to fire the timer.
        self.wait(task.deferLater(reactor, 0.05, lambda: None))
        self.wfile.write(b"%d 0 True\\n" % os.getpid())

class Server(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = 2

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""


def test_reactor_imported_before_forking_each_worker_gets_its_own(server_process):
    proc = server_process(REACTOR_IMPORTED)
    wait_for(lambda: len(children_of(proc.pid)) == 2, timeout=15)
    workers = set(children_of(proc.pid))
    # Both workers answer, each through its own reactor; concurrent requests do not hang.
    # Asked by several clients at once: one client asking again and again may be served
    # by the same worker for many seconds (the worker that just answered is awake and
    # takes the next connection before its idle sibling is scheduled), which says nothing
    # about the reactors.
    seen = serving_pids_concurrently(proc.port, workers, timeout=60)
    assert seen == workers
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ask(proc.port, timeout=10)[0]))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert len(results) == 6 and set(results) <= workers
    # No two processes share an epoll instance (kcmp compares the open files).
    procs = [proc.pid, *workers]
    for i, a in enumerate(procs):
        for b in procs[i + 1 :]:
            assert not _share_epoll(a, b), (a, b)
    assert all(_epoll_fds(w) for w in workers)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def _epoll_fds(pid):
    fds = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:[eventpoll]":
                fds.append(int(fd))
        except OSError:
            pass
    return fds


def _share_epoll(pid_a, pid_b):
    """True if the two processes hold the same epoll open file (kcmp(2), KCMP_FILE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    SYS_kcmp, KCMP_FILE = 312, 0  # x86_64
    for fa in _epoll_fds(pid_a):
        for fb in _epoll_fds(pid_b):
            if libc.syscall(SYS_kcmp, pid_a, pid_b, KCMP_FILE, fa, fb) == 0:
                return True
    return False


ASYNCIO_REACTOR = """
from twisted.internet import asyncioreactor
asyncioreactor.install()
import spoon.server

class Echo(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(self.rfile.readline())

class Server(spoon.server.TCPSpork):
    handler_klass = Echo
    prefork = 2

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
try:
    server.serve_forever()
except RuntimeError as e:
    print("REFUSED", e, flush=True)
    raise SystemExit(7)
"""


def test_unrenewable_reactor_fails_at_once_with_reason(server_process):
    proc = server_process(ASYNCIO_REACTOR)
    assert proc.wait(timeout=10) == 7
    out = proc.read_output()
    assert "REFUSED" in out and "asyncio" in out.lower() and "import" in out
    assert children_of(proc.pid) == []


def test_config_shared_copy_on_write(server_process):
    """load_config() data loaded in the master is shared by the workers (PSS)."""
    script = """
import os, sys, zlib
import spoon.server

class Handler(spoon.server.Gulp):
    def handle(self):
        key = self.rfile.readline()
        # Look a rule up, as a handler would.
        rule = self.server.rules[zlib.crc32(key) % len(self.server.rules)]
        self.wfile.write(b"%d " % os.getpid() + b"%d True\\n" % len(rule))

class Server(spoon.server.KLASS):
    handler_klass = Handler
    prefork = PREFORK
    def load_config(self):
        self.rules = [os.urandom(64) * 16 for _ in range(CHUNKS)]   # 1 KiB each

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""

    def source(klass, prefork, chunks):
        return (
            script.replace("KLASS", klass)
            .replace("PREFORK", str(prefork))
            .replace("CHUNKS", str(chunks))
        )

    chunks = 96 * 1024  # 96 MiB
    single = server_process(source("TCPSpoon", 1, chunks), ready_timeout=60)
    ask(single.port)
    single_pss = pss_kib(single.pid)
    single.kill()
    pool = server_process(source("TCPSpork", 4, chunks), ready_timeout=60)
    wait_for(lambda: len(children_of(pool.pid)) == 4, timeout=20)
    workers = children_of(pool.pid)
    serving_pids(pool.port, workers, timeout=30)
    total = pss_kib(pool.pid) + sum(pss_kib(w) for w in workers)
    ratio = total / single_pss
    print("CoW: single %d KiB, master+4 workers %d KiB, ratio %.2f" % (single_pss, total, ratio))
    assert ratio < 1.5


UDP_SPORK = """
import os
import spoon.server

class Handler(spoon.server.UDPGulp):
    def handle(self):
        self.wfile.write(b"%d" % os.getpid())

class Server(spoon.server.UDPSpork):   # defined in __main__, as in a script
    handler_klass = Handler
    prefork = 2

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
print("RETURNED", flush=True)
"""


def test_udp_spork_workers_answer_datagrams(server_process):
    proc = server_process(UDP_SPORK)
    wait_for(lambda: len(children_of(proc.pid)) == 2, timeout=15)
    workers = set(children_of(proc.pid))
    seen = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(1)

        def both_answered():
            client.sendto(b"?", ("127.0.0.1", proc.port))
            try:
                seen.add(int(client.recv(100)))
            except socket.timeout:
                pass
            return workers <= seen

        # Which worker reads a datagram is the kernel's choice: ask until both did.
        wait_for(both_answered, timeout=20, interval=0, what="datagrams from both workers")
    assert seen == workers
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "RETURNED" in proc.read_output()
    assert_gone(workers)


INSIDE_RUNNING_REACTOR = """
from twisted.internet import reactor
import spoon.server

class Echo(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(self.rfile.readline())

class Server(spoon.server.TCPSpork):
    handler_klass = Echo
    prefork = 2

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)

def serve():
    try:
        server.serve_forever()
    except RuntimeError as e:
        print("REFUSED", e, flush=True)
    reactor.stop()

reactor.callWhenRunning(serve)
reactor.run()
"""


def test_forking_from_a_running_reactor_is_refused(server_process):
    proc = server_process(INSIDE_RUNNING_REACTOR)
    assert proc.wait(timeout=10) == 0
    out = proc.read_output()
    assert "REFUSED" in out and "running" in out and "spoon.service" in out
    assert children_of(proc.pid) == []
