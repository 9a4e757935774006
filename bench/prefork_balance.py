"""Balance of a pre-forked pool under a CPU-bound handler.

A TCPSpork with ``--workers`` workers serves a handler that busy-loops ``--busy-ms`` per
request; ``--clients`` client threads send requests back to back for ``--seconds``.  Prints,
for each way of accepting connections, the requests completed per worker, max/min, the
latency percentiles and each worker's CPU use:

- ``twisted``: Twisted's own ``tcp.Port`` (``adoptStreamPort``): many accepts per wake-up;
- ``one-by-one``: what spoon servers use (``spoon.listener``): a connection is accepted
  only while the worker is not busy with another one.

Two load shapes: ``closed-loop`` (each client sends its next request when it has its reply)
and ``burst`` (rounds in which all clients send at the same moment; a round ideally takes
busy-ms x clients / workers).  "accepts/wake-up" counts the connections accepted in one
call from the reactor: with Twisted's port they are all held before any is served (that
is the hoarding); with spoon's ports each one is served before the next accept.

Usage: python bench/prefork_balance.py [--seconds 5] [--kinds twisted,one-by-one]
Prints one line per kind, then a JSON line (``BALANCE_JSON {...}``) for the bench report.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import procstat  # bench/procstat.py: /proc readings shared by the benchmarks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import os, sys, time
sys.path.insert(0, %(root)r)
import spoon.server

BUSY = %(busy)f
KIND = %(kind)r

# Instrumentation (this benchmark only): how many connections each wake-up of the
# listening socket accepted.
import spoon.greenio, spoon.listener
from twisted.internet import tcp
built = [0]
batches = []
_build = spoon.greenio.GulpFactory.buildProtocol
def buildProtocol(self, addr):
    built[0] += 1
    return _build(self, addr)
spoon.greenio.GulpFactory.buildProtocol = buildProtocol
def counted(method):
    def wrapper(self, *args):
        before = built[0]
        try:
            return method(self, *args)
        finally:
            if built[0] > before:
                batches.append(built[0] - before)
    return wrapper
tcp.Port.doRead = counted(tcp.Port.doRead)
spoon.listener.OneByOnePort.doRead = counted(spoon.listener.OneByOnePort.doRead)
spoon.listener.OneByOnePort._accept_later = counted(spoon.listener.OneByOnePort._accept_later)

class Handler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        end = time.perf_counter() + BUSY
        while time.perf_counter() < end:
            pass
        self.wfile.write(b"%%d %%d %%d\n" %% (os.getpid(), max(batches or [0]), len(batches)))

class Server(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = %(workers)d

    if KIND == "twisted":
        def _listen(self, reactor):
            self._factory = self.protocol_factory(reactor)
            self._port = reactor.adoptStreamPort(
                self.socket.fileno(), self.address_family, self._factory)

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""






def one_request(port):
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"x\n")
        s.shutdown(socket.SHUT_WR)
        data = s.makefile("rb").read()  # to EOF
    pid, max_batch, wakeups = map(int, data.split())
    return pid, time.perf_counter() - start, max_batch, wakeups


def run(kind, seconds=5.0, clients=8, workers=2, busy_ms=20.0, burst=False):
    """Closed loop (each client sends its next request when it has its reply) or, with
    ``burst``, rounds in which all clients send at the same moment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER % dict(root=ROOT, busy=busy_ms / 1000.0, kind=kind, workers=workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline().split()
        port = int(line[1])
        deadline = time.monotonic() + 15
        while len(procstat.descendants(proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = procstat.descendants(proc.pid)
        # Warm up: every worker answers once.
        seen = set()
        while set(pids) - seen and time.monotonic() < deadline:
            seen.add(one_request(port)[0])
        counts = {pid: 0 for pid in pids}
        batch, wake = {}, {}
        latencies = []
        lock = threading.Lock()
        stop = threading.Event()
        errors = []

        barrier = threading.Barrier(clients) if burst else None
        rounds = []

        def client():
            while not stop.is_set():
                if barrier is not None:
                    try:
                        if barrier.wait(timeout=30) == 0:
                            rounds.append(time.perf_counter())
                    except threading.BrokenBarrierError:
                        return
                try:
                    pid, latency, max_batch, wakeups = one_request(port)
                except Exception as e:  # counted, reported
                    errors.append(repr(e))
                    continue
                with lock:
                    counts[pid] = counts.get(pid, 0) + 1
                    latencies.append(latency)
                    batch[pid] = max(batch.get(pid, 0), max_batch)
                    wake[pid] = max(wake.get(pid, 0), wakeups)

        cpu0 = {pid: procstat.cpu_seconds([pid]) for pid in pids}
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        if barrier is not None:
            barrier.abort()
        for t in threads:
            t.join(timeout=30)
        elapsed = time.monotonic() - t0
        cpu = {pid: (procstat.cpu_seconds([pid]) - cpu0[pid]) / elapsed for pid in pids}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    latencies.sort()
    done = [counts[p] for p in pids]

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {
        "kind": kind,
        "workers": workers,
        "clients": clients,
        "busy_ms": busy_ms,
        "seconds": round(elapsed, 2),
        "per_worker": done,
        "ratio": (max(done) / min(done)) if min(done) else float("inf"),
        "req_per_s": round(sum(done) / elapsed, 1),
        "p50_ms": round(pct(0.5) * 1000, 1) if latencies else None,
        "p99_ms": round(pct(0.99) * 1000, 1) if latencies else None,
        "cpu_share": [round(cpu[p], 2) for p in pids],
        "errors": len(errors),
        "max_accepts_per_wakeup": max(batch.values() or [0]),
        "mean_accepts_per_wakeup": round(sum(done) / max(1, sum(wake.values())), 2),
        "mode": "burst" if burst else "closed-loop",
        "round_ms": round(1000 * (rounds[-1] - rounds[0]) / (len(rounds) - 1), 1)
        if len(rounds) > 1
        else None,
        "ideal_round_ms": round(busy_ms * clients / workers, 1) if burst else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--busy-ms", type=float, default=20.0)
    p.add_argument("--kinds", default="twisted,one-by-one")
    p.add_argument("--modes", default="closed-loop,burst")
    args = p.parse_args(argv)
    results = []
    for mode in args.modes.split(","):
        for kind in args.kinds.split(","):
            r = run(kind, args.seconds, args.clients, args.workers, args.busy_ms, mode == "burst")
            results.append(r)
            print(
                "%(mode)-11s %(kind)-10s per worker %(per_worker)-12s max/min %(ratio).2f  "
                "%(req_per_s)5.1f req/s  p50 %(p50_ms)s ms  p99 %(p99_ms)s ms  "
                "worker CPU %(cpu_share)s  round %(round_ms)s ms (ideal %(ideal_round_ms)s)  "
                "accepts/wake-up max %(max_accepts_per_wakeup)d mean %(mean_accepts_per_wakeup).2f  "
                "errors %(errors)d" % dict(r, per_worker=str(r["per_worker"]), cpu_share=str(r["cpu_share"])),
                flush=True,
            )
    print("BALANCE_JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
