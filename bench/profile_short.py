"""Profile TCPSpork's short-connection path in the unpinned shape (bench/shapes.py).

    python bench/profile_short.py [--seconds 10] [--conc 16] [--out bench/profile-short-unpinned.svg]

Starts ``ours: TCPSpork prefork=2`` (bench/servers/ours.py; ``--peer spoon-1.0.6`` for the
original, ``--tree DIR`` for ours from another checkout) with every process free on all
cores, drives it with the generator's short exchange (also unpinned), and records its
workers with py-spy (``--subprocesses``; ``--native`` adds the C frames of greenlet and
CPython) into a flame graph, or with ``--perf`` records them with perf and prints their
on-CPU time by binary: the kernel, libpython (all Python code), greenlet, libc.  py-spy is
installed on first use into bench/out/venv-tools (from PyPI), never into the project's
environment; it stops the process for each sample, which adds some system time.  Also
prints the workers' user/system CPU split per request from /proc.  Run it under
``flock /work/notes/bench.lock`` on a shared host.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import scenarios  # noqa: E402
import peers  # noqa: E402
import procstat  # noqa: E402
from peers import OUT, PEERS, Server, log  # noqa: E402

TOOLS = os.path.join(OUT, "venv-tools")


def py_spy():
    exe = os.path.join(TOOLS, "bin", "py-spy")
    if not os.path.exists(exe):
        log("installing py-spy into %s" % TOOLS)
        subprocess.run([sys.executable, "-m", "venv", TOOLS], check=True, timeout=300)
        subprocess.run([os.path.join(TOOLS, "bin", "pip"), "install", "-q",
                        "--disable-pip-version-check", "py-spy"], check=True, timeout=600)
    return exe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", default=os.path.join(HERE, "profile-short-unpinned.svg"))
    p.add_argument("--peer", default="spork", help="a pre-forked peer of bench/peers.py")
    p.add_argument("--no-spy", action="store_true", help="only the user/system split")
    p.add_argument("--raw", action="store_true", help="collapsed stacks instead of an SVG")
    p.add_argument("--native", action="store_true", help="C frames too (greenlet, CPython)")
    p.add_argument("--perf", action="store_true",
                   help="instead of py-spy: perf record, on-CPU time by binary (kernel, "
                        "libpython, greenlet, libc)")
    p.add_argument("--tree", default=None, help="serve ours from this checkout instead")
    args = p.parse_args(argv)
    exe = None if args.no_spy or args.perf else py_spy()
    peer = next(peer for peer in PEERS if peer.name == args.peer)
    if args.tree:
        peer = peers.Peer(peer.name, peer.label, peer.model, script=os.path.join(
            os.path.abspath(args.tree), "bench", "servers", "ours.py"), args=peer.args,
            workers=peer.workers)
    python = sys.executable
    if peer.env != "project":
        python, err = peers.ensure_env(peer.env)
        if err:
            sys.exit(err)
    s = scenarios.Settings()
    s.warmup = 0.5
    with Server(peer, "echo", python, None, tag="-profile").start() as server:
        workers = server.worker_pids()
        before = procstat.user_system_seconds(workers)
        spy = None
        if exe is not None:
            argv = [exe, "record", "--format", "raw" if args.raw else "flamegraph",
                    "--rate", str(args.rate), "--duration", str(int(args.seconds)),
                    "--output", args.out, "--pid", str(server.pid), "--subprocesses"]
            spy = subprocess.Popen(argv + (["--native"] if args.native else []),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        recorder = None
        if args.perf:
            data = os.path.join(OUT, "perf-%s.data" % peer.name)
            recorder = subprocess.Popen(["perf", "record", "-F", "2000", "-o", data, "-p",
                                         ",".join(map(str, workers))],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = scenarios.loadgen("short", server.port, s, args.conc, cpus=None,
                              measure_pid=server.pid, duration=args.seconds)
        after = procstat.user_system_seconds(workers)
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=60)
        out = spy.communicate(timeout=60)[0] if spy else ""
    n = r.get("requests") or 0
    user, system = after[0] - before[0], after[1] - before[1]
    print(scenarios.brief(r))
    if n:
        print("workers: user %.1f us/req, system %.1f us/req (%d requests%s)" % (
                  user * 1e6 / n, system * 1e6 / n, n, "" if spy is None else
                  "; py-spy overhead included"))
    if args.perf and n:
        report = subprocess.run(["perf", "report", "-i", data, "--sort", "dso", "--stdio"],
                                capture_output=True, text=True, timeout=300).stdout
        total = r.get("server_cpu_per_req_us") or 0
        print("on-CPU time of the workers by binary (share, us/request of %.1f):" % total)
        for line in report.splitlines():
            if line.strip() and not line.startswith("#"):
                share, dso = line.split(None, 1)
                share = float(share.rstrip("%"))
                if share >= 0.2:
                    print("  %5.1f%%  %5.1f us  %s" % (share, share * total / 100, dso.strip()))
    print("load average %.2f %.2f %.2f" % os.getloadavg())
    if spy is not None:
        print(out.strip().splitlines()[-1] if out.strip() else "py-spy: no output")


if __name__ == "__main__":
    main()
