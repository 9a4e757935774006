"""Copy-on-write sharing of the configuration a Spork loads before forking.

``load_config()`` loads ``--mib`` MiB of rules (1 KiB byte strings in a list, as a rule set
would be); handlers look one rule up per request.  Prints the PSS (smaps_rollup) of one
single-process server, and the summed PSS of the supervisor and its ``--workers`` workers,
after each served ``--requests`` requests, and their ratio (target < 1.5).

Usage: python bench/prefork_cow.py [--mib 200] [--workers 4]
The last line is ``COW_JSON {...}`` for the bench report.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import procstat  # bench/procstat.py: /proc readings shared by the benchmarks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import os, sys, zlib
sys.path.insert(0, %(root)r)
import spoon.server

class Handler(spoon.server.Gulp):
    def handle(self):
        key = self.rfile.readline()
        rule = self.server.rules[zlib.crc32(key) %% len(self.server.rules)]
        self.wfile.write(b"%%d %%d\n" %% (os.getpid(), len(rule)))

class Server(spoon.server.%(klass)s):
    handler_klass = Handler
    prefork = %(workers)d
    def load_config(self):
        self.rules = [os.urandom(64) * 16 for _ in range(%(chunks)d)]

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""






def request(port, i):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"key-%d\n" % i)
        s.shutdown(socket.SHUT_WR)
        data = s.makefile("rb").read()  # to EOF
    return int(data.split()[0])


def measure(klass, workers, chunks, requests):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER % dict(root=ROOT, klass=klass, workers=workers, chunks=chunks)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port = int(proc.stdout.readline().split()[1])
        deadline = time.monotonic() + 60
        expected = workers if klass == "TCPSpork" else 0
        while len(procstat.descendants(proc.pid)) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = procstat.descendants(proc.pid)
        seen = set()
        for i in range(requests * max(1, len(pids))):
            seen.add(request(port, i))
        for _ in range(200):
            if set(pids) <= seen:
                break
            seen.add(request(port, 0))
        time.sleep(0.5)  # let the processes settle before reading smaps (a measurement)
        per_process = [procstat.pss_kib([proc.pid])] + [procstat.pss_kib([p]) for p in pids]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    return per_process


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=200)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--requests", type=int, default=200, help="per worker")
    args = p.parse_args(argv)
    chunks = args.mib * 1024
    single = measure("TCPSpoon", 1, chunks, args.requests)[0]
    pool = measure("TCPSpork", args.workers, chunks, args.requests)
    ratio = sum(pool) / single
    print("config %d MiB: one process PSS %.1f MiB" % (args.mib, single / 1024))
    print(
        "supervisor + %d workers PSS %.1f MiB (supervisor %.1f, workers %s MiB)"
        % (args.workers, sum(pool) / 1024, pool[0] / 1024, ", ".join("%.1f" % (w / 1024) for w in pool[1:]))
    )
    print("ratio %.2f (target < 1.5)" % ratio)
    print(
        "COW_JSON "
        + json.dumps(
            {"mib": args.mib, "workers": args.workers, "single_kib": single, "pool_kib": pool, "ratio": round(ratio, 3)}
        )
    )


if __name__ == "__main__":
    main()
