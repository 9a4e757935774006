"""Soak a pre-forked pool: mixed load for ``--minutes`` (default 10) while a worker is killed
with SIGKILL every 30 s and the pool gets a HUP every 60 s.  Not part of the test suite
(``make soak``; a soak, not a benchmark: run it alone, once).

Reports the requests answered and failed, the failures outside the killed workers (a
request in flight on a worker killed with SIGKILL fails, and fails at once: failures ending
within a second after a kill, at most one per client thread, are counted as the kill's;
any other is a fault, target 0), each worker's resident memory drift over its life, and
the descriptors of the supervisor and of a worker (the first one alive) at the start and
the end.

The server is ``tests/pool_fault_servers.py``'s ``AnswersPool``: each request is one or
more lines, each answered with ``"<pid> <generation>"``; ``slow`` takes half a second.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
sys.path[:0] = [TESTS]

from support import PoolLoad  # noqa: E402  (the tests' load client)

#: The mix: (weight, payload).
MIX = (
    (60, b"x\n"),
    (20, b"x\nx\nx\nx\nx\n"),
    (10, b"slow\n"),
    (10, b"x\nslow\nx\n"),
)


def _stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(int(entry))
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return sorted(kids)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def mixed(rng):
    weights = [w for w, _ in MIX]
    return rng.choices([p for _, p in MIX], weights)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--kill-every", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--hup-every", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), PYTHONUNBUFFERED="1",
               POOL_PREFORK=str(args.workers), POOL_GRACEFUL_TIMEOUT="10")
    log_path = os.path.join(tempfile.gettempdir(), "spoon-soak-%d.log" % os.getpid())
    log = open(log_path, "wb")
    server = subprocess.Popen(
        [sys.executable, "-c", "import pool_fault_servers as s; s.main('AnswersPool')"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    for line in server.stdout:
        log.write(line)
        ready = line.split()
        if ready[:1] == [b"READY"]:
            break
    else:
        raise SystemExit("the server did not start: see %s" % log_path)
    port = int(ready[1])
    pumping = threading.Thread(target=lambda: [log.write(line) for line in server.stdout], daemon=True)
    pumping.start()
    deadline = time.monotonic() + 30
    while len(children(server.pid)) < args.workers and time.monotonic() < deadline:
        time.sleep(0.1)
    load = PoolLoad(port, threads=args.threads, payload=mixed, timeout=30)
    time.sleep(2)  # the workers serve and have warmed up
    start_fds = {"supervisor": fd_count(server.pid), "worker": fd_count(children(server.pid)[0])}
    start_rss = {"supervisor": rss_kib(server.pid)}
    first_rss, last_rss = {}, {}
    kills, hups = [], 0
    began = time.monotonic()
    end = began + args.minutes * 60
    next_kill = began + args.kill_every
    next_hup = began + args.hup_every
    rng = random.Random(0)
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            for pid in children(server.pid):
                try:
                    rss = rss_kib(pid)
                except OSError:
                    continue
                first_rss.setdefault(pid, (now, rss))
                last_rss[pid] = (now, rss)
            if server.poll() is not None:
                raise SystemExit("the supervisor exited (%s)" % server.returncode)
            if now >= next_kill:
                victim = rng.choice(children(server.pid))
                os.kill(victim, signal.SIGKILL)
                kills.append((time.monotonic(), victim))
                next_kill += args.kill_every
            if now >= next_hup:
                os.kill(server.pid, signal.SIGHUP)
                hups += 1
                next_hup += args.hup_every
            time.sleep(0.5)
        end_fds = {"supervisor": fd_count(server.pid), "worker": fd_count(children(server.pid)[0])}
        end_rss = {"supervisor": rss_kib(server.pid)}
    finally:
        load.stop(timeout=60)
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            code = "killed after 60 s"
        pumping.join(10)
        log.close()

    kill_times = [t for t, _ in kills]
    failures = list(zip(load.failure_times, load.failures))
    on_killed = [f for f in failures if any(0 <= f[0] - t <= 1.0 for t in kill_times)]
    outside = [f for f in failures if f not in on_killed]
    # Drift over each worker's life (those seen for at least 20 s).
    drifts = sorted(
        last_rss[pid][1] - first_rss[pid][1]
        for pid in first_rss
        if last_rss[pid][0] - first_rss[pid][0] >= 20
    )
    figures = {
        "minutes": args.minutes,
        "workers": args.workers,
        "client_threads": args.threads,
        "requests": load.requests,
        "answers": load.ok,
        "refused": load.refused,
        "failed": len(load.failures),
        "failed_on_killed_workers": len(on_killed),
        "failed_outside_killed_workers": len(outside),
        "outside_examples": [e for _, (_, e) in outside[:5]],
        "kills": len(kills),
        "hups": hups,
        "workers_seen": len(first_rss),
        "worker_rss_drift_kib": {
            "min": drifts[0] if drifts else None,
            "median": drifts[len(drifts) // 2] if drifts else None,
            "max": drifts[-1] if drifts else None,
            "workers": len(drifts),
        },
        "supervisor_rss_kib": [start_rss["supervisor"], end_rss["supervisor"]],
        "fds_start": start_fds,
        "fds_end": end_fds,
        "supervisor_exit": code,
        "log": log_path,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if not outside else 1


if __name__ == "__main__":
    sys.exit(main())
