"""Load spreads across workers: a busy worker does not hoard connections.

The figures before and after (Twisted's own port against spoon's) are in
bench/prefork_balance.py; here the target itself: a CPU-bound handler (20 ms), 2 workers,
8 clients, requests per worker within 1.5x.
"""

import signal
import socket
import threading
import time

from support import children_of, cpu_seconds, wait_for
from test_prefork import Load, ask, serving_pids, start_spork


def test_cpu_bound_requests_spread_evenly(server_process):
    proc = start_spork(server_process, prefork=2)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    with Load(proc.port, clients=8, command=b"spin 0.02") as load:
        deadline = time.monotonic() + 30
        while load.ok < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
    counts = [load.by_pid.get(pid, 0) for pid in workers]
    print("requests per worker (20 ms busy, 8 clients):", counts)
    assert load.failures == []
    assert min(counts) > 0 and max(counts) / min(counts) <= 1.5
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_idle_worker_takes_what_a_busy_worker_cannot(server_process):
    """While one worker runs a long handler, every new request is served by the other one,
    at once (none waits for the busy worker)."""
    proc = start_spork(server_process, prefork=2)
    workers = set(children_of(proc.pid))
    serving_pids(proc.port, workers)
    cpu = {pid: cpu_seconds(pid) for pid in workers}
    busy = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
    busy.sendall(b"spin 3\n")
    busy.shutdown(socket.SHUT_WR)
    wait_for(lambda: any(cpu_seconds(p) > cpu[p] + 0.1 for p in workers), timeout=10)
    try:
        answers = []
        threads = [
            threading.Thread(target=lambda: answers.append((ask(proc.port, b"spin 0.02"), time.monotonic())))
            for _ in range(6)
        ]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        busy_pid = int(busy.recv(100).split()[0])
        assert len(answers) == 6
        assert {pid for (pid, _, _), _ in answers} == workers - {busy_pid}
        assert max(at for _, at in answers) - start < 2.5  # not after the 3 s spin
    finally:
        busy.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
