"""Supervision of a pre-forked pool: dead workers are replaced, a crash loop is slowed
down, stuck workers are killed, and workers never outlive their supervisor."""

import os
import re
import signal
import time

from support import children_of, cpu_seconds, pid_alive, wait_for
from test_prefork import ask, assert_gone, output_so_far, serving_pids, start_spork


def test_killed_worker_is_replaced_within_a_second(server_process):
    proc = start_spork(server_process, prefork=2)
    before = set(children_of(proc.pid))
    serving_pids(proc.port, before)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    new = wait_for(
        lambda: set(children_of(proc.pid)) - before, timeout=5, interval=0.005, what="a new worker"
    )
    replaced_after = time.monotonic() - killed_at
    print("worker replaced %.3fs after SIGKILL" % replaced_after)
    assert replaced_after < 1.0
    assert not pid_alive(victim)
    serving_pids(proc.port, (before - {victim}) | new)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    out = proc.read_output()
    assert "Worker %d died (killed by SIGKILL)" % victim in out


CRASHING = """
import logging, os, sys
import spoon.server

logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s")
FLAG = sys.argv[1]

class Handler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d 0 True\\n" % os.getpid())

class Server(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = 2

    def protocol_factory(self, reactor=None):
        # Runs in each worker at start-up: a broken deployment.
        if os.path.exists(FLAG):
            raise RuntimeError("cannot start")
        return super().protocol_factory(reactor)

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""


def test_crash_loop_backs_off_to_one_fork_per_second(server_process, tmp_path):
    flag = tmp_path / "broken"
    proc = server_process(CRASHING, args=[str(flag)])
    wait_for(lambda: len(children_of(proc.pid)) == 2, timeout=15)
    first = set(children_of(proc.pid))
    serving_pids(proc.port, first)
    flag.write_text("x")
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    backoff = "died at start-up: forking at most one worker every 1.0s"

    def forks_after_backoff():
        lines = output_so_far(proc)
        at = [i for i, line in enumerate(lines) if backoff in line]
        return at and len([l for l in lines[at[0]:] if "Forked worker" in l]) >= 3

    wait_for(forks_after_backoff, timeout=30, interval=0.05, what="forks after the back-off")
    lines = output_so_far(proc)
    start = [i for i, line in enumerate(lines) if backoff in line][0]
    quick = [_stamp(l) for l in lines[:start] if "Forked worker" in l and _stamp(l)]
    slow = [_stamp(l) for l in lines[start:] if "Forked worker" in l]
    # Five quick deaths in a row, then at most one fork per second.
    assert len(quick) >= 2 + 3, lines  # the first two (killed young) count as quick too
    gaps = [b - a for a, b in zip(slow, slow[1:])]
    assert gaps and all(g >= 0.9 for g in gaps), gaps
    # Repaired: the pool serves again.
    flag.unlink()
    wait_for(lambda: len(children_of(proc.pid)) == 2 and _serves(proc.port), timeout=15)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def _stamp(line):
    """Seconds (of the day) of a log line's "%(asctime)s" stamp, None if it has none."""
    try:
        clock = line.split()[1]
        h, m, rest = clock.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000.0
    except (IndexError, ValueError):
        return None


def _serves(port):
    try:
        ask(port, timeout=2)
        return True
    except (OSError, ValueError):
        return False


def test_stuck_workers_are_killed_and_replaced(server_process):
    """A handler spinning the CPU and one blocked in a call both stop the heartbeat."""
    import socket

    proc = start_spork(server_process, prefork=2, worker_timeout=1.5)
    before = set(children_of(proc.pid))
    serving_pids(proc.port, before)
    # Two requests that never finish: each one ties up one worker's reactor.
    hung = []
    cpu = {pid: cpu_seconds(pid) for pid in before}
    for command in (b"spin 600", b"block 600"):
        s = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
        s.sendall(command + b"\n")
        hung.append(s)
        if command.startswith(b"spin"):
            # One worker is now spinning (and cannot accept): the next goes to the other.
            wait_for(lambda: any(cpu_seconds(p) > cpu[p] + 0.2 for p in before), timeout=10)
    try:
        assert_gone(before, timeout=15)
        wait_for(lambda: len(children_of(proc.pid)) == 2, timeout=10)
        after = set(children_of(proc.pid))
        assert not after & before
        serving_pids(proc.port, after)
    finally:
        for s in hung:
            s.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    out = proc.read_output()
    for pid in before:
        assert "Worker %d timed out: no heartbeat" % pid in out, out
    # Where they were stuck (the spin loop, the sleep) was dumped before the kill, each
    # dump after a line naming its worker.
    assert len(re.findall(r'File "<string>", line \d+ in handle', out)) >= 2, out
    for pid in before:
        header = out.index("Worker %d: no heartbeat for" % pid)
        killed = out.index("Worker %d timed out: no heartbeat" % pid)
        assert header < killed
        assert re.search(r'(Current thread|Thread 0x).*\n  File "<string>", line \d+ in handle',
                         out[header:killed]), out


def test_workers_exit_when_the_master_is_killed(server_process):
    proc = start_spork(server_process, prefork=3)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert_gone(workers, timeout=5)
    gone_after = time.monotonic() - killed_at
    print("workers gone %.3fs after the master's SIGKILL" % gone_after)
    assert gone_after < 2.0
