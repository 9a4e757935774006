"""Python time per short request by layer (Twisted, greenlet bridge, ours, socketserver,
stdlib socket), from a deterministic profile of the serving processes.

    python bench/profile_layers.py [--seconds 3] [--conc 16] [--spork] [--pinned]

py-spy samples wall time of running *or runnable* threads, which on a loaded host smears
the cost over whatever line a process was preempted at.  This script instead runs a
TCPSpoon (one process: the same per-connection path as a TCPSpork worker, without the
sibling-aware accept policy) under cProfile in a child process, or with ``--spork`` a
TCPSpork prefork=2 with each worker under cProfile (the shared accept policy and the
reactor iterations it costs), drives it with the generator's short exchange (unpinned, or
with ``--pinned`` the server on the first core and the generator on the second), and
prints each layer's own Python time and call count per request, and how many objects per
request only the cyclic garbage collector frees.  cProfile inflates every call by a
similar amount, so read the shares and the call counts, not the absolute microseconds.
Under ``flock /work/notes/bench.lock``.
"""

import argparse
import cProfile
import gc
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import scenarios  # noqa: E402

LAYERS = (
    ("spoon/listener.py", "ours: listener"),
    ("spoon/transport.py", "ours: lean transport"),
    ("spoon/greenio.py", "ours: greenlet bridge"),
    ("spoon/", "ours: server and the rest"),
    ("twisted/", "Twisted"),
    ("socketserver.py", "socketserver"),
    ("socket.py", "stdlib socket"),
    ("handlers.py", "the handler"),
    ("greenlet", "greenlet"),
)


def layer(filename, name):
    if filename == "~" and "epoll" in name:
        return "epoll wait (idle included)"
    if filename == "~" and "_socket.socket" in name:
        return "socket system calls"
    for key, label in LAYERS:
        if key in filename or key in name:
            return label
    if filename == "~":
        return "builtins and C calls"
    return "other Python"


def profile_until_winch(out):
    """Profile this process from now until SIGWINCH, then write the profile to ``out``
    (and the cyclic collector's counts to ``out.gc``) and exit."""
    prof = cProfile.Profile()
    before = gc.get_stats()

    def stop(*_):
        prof.disable()
        prof.dump_stats(out)
        after = gc.get_stats()
        with open(out + ".gc", "w") as f:
            json.dump({"collections": sum(a["collections"] - b["collections"]
                                          for a, b in zip(after, before)),
                       "collected": sum(a["collected"] - b["collected"]
                                        for a, b in zip(after, before))}, f)
        os._exit(0)

    signal.signal(signal.SIGWINCH, stop)  # TERM and INT are the reactor's
    prof.enable()


def serve(out, tree, spork):
    """Child: a TCPSpoon (or with ``spork`` a TCPSpork whose two workers are each
    profiled, into ``out.<worker number>``), spoon from checkout ``tree``, serving the
    bench's echo handler under cProfile."""
    sys.path.insert(0, tree)
    sys.path.insert(0, os.path.join(HERE, "servers"))
    from handlers import make_handlers, ready
    from spoon.server import Gulp, TCPSpoon, TCPSpork

    if spork:
        class Server(TCPSpork):
            prefork = 2
            handler_klass = make_handlers(Gulp)["echo"]

            def post_fork(self, number):
                profile_until_winch("%s.%d" % (out, number))

        server = Server(("127.0.0.1", 0))
        ready(server.server_address[1])
        server.serve_forever()
        return

    class Server(TCPSpoon):
        handler_klass = make_handlers(Gulp)["echo"]

    server = Server(("127.0.0.1", 0))
    ready(server.server_address[1])
    profile_until_winch(out)
    server.serve_forever()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--conc", type=int, default=16)
    p.add_argument("--tree", default=ROOT, help="profile spoon from this checkout")
    p.add_argument("--calls", action="store_true",
                   help="also list every Python function of spoon/ with its calls per request")
    p.add_argument("--spork", action="store_true",
                   help="profile the two workers of a TCPSpork prefork=2 (the shared "
                        "accept policy) instead of one TCPSpoon")
    p.add_argument("--pinned", action="store_true",
                   help="the server on the first core and the generator on the second "
                        "(scenario 1's shape; give --conc 8) instead of both free")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return serve(args.child, os.path.abspath(args.tree), args.spork)
    out = tempfile.mktemp(prefix="spoon-layers-", suffix=".prof")
    command = [sys.executable, __file__, "--child", out, "--tree", args.tree]
    s = scenarios.Settings()
    s.warmup = 0.0
    gen_cpus = None
    if args.pinned:
        if not s.server_cpus:
            raise SystemExit("--pinned needs two usable cores")
        # The bench's own split of the cores (scenario 1).
        gen_cpus = s.gen_cpus
        command = ["taskset", "-c", ",".join(map(str, s.server_cpus))] + command
    child = subprocess.Popen(command + (["--spork"] if args.spork else []),
                             stdout=subprocess.PIPE, text=True)
    outs = [out]
    try:
        line = child.stdout.readline()
        port = int(line.split()[1])
        r = scenarios.loadgen("short", port, s, args.conc, cpus=gen_cpus, duration=args.seconds)
        if args.spork:
            with open("/proc/%d/task/%d/children" % (child.pid, child.pid)) as f:
                workers = [int(pid) for pid in f.read().split()]
            # Worker numbers start at 1.
            outs = ["%s.%d" % (out, number) for number in range(1, len(workers) + 1)]
            for pid in workers:
                os.kill(pid, signal.SIGWINCH)
            deadline = time.monotonic() + 60
            while not all(os.path.exists(o + ".gc") for o in outs):
                if time.monotonic() > deadline:
                    raise SystemExit("the workers wrote no profile within 60 s")
                time.sleep(0.05)
            child.terminate()
        else:
            child.send_signal(signal.SIGWINCH)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # No warm-up: the generator's window covers (nearly) every request the profile saw.
    n = r.get("requests")
    stats = pstats.Stats(*outs)
    collected = {"collections": 0, "collected": 0}
    for o in outs:
        with open(o + ".gc") as f:
            for key, value in json.load(f).items():
                collected[key] += value
        os.unlink(o)
        os.unlink(o + ".gc")
    own, calls = {}, {}
    for (filename, _line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        key = layer(filename, name)
        own[key] = own.get(key, 0.0) + tt
        calls[key] = calls.get(key, 0) + nc
    total = sum(own.values())
    print("%d requests (generator: %s); cProfile-inflated Python time per request:" % (n, scenarios.brief(r)))
    for key in sorted(own, key=own.get, reverse=True):
        print("  %-28s %5.1f%%  %6.2f us  %5.1f calls" % (
            key, 100 * own[key] / total, own[key] * 1e6 / n, calls[key] / n))
    print("cyclic garbage collector: %.2f collections and %.1f objects freed by it per "
          "request (objects in reference cycles outlive their connection)" % (
              collected["collections"] / n, collected["collected"] / n))
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]
    print("top functions by own time (us/request, calls/request):")
    for (filename, line, name), (cc, nc, tt, ct, callers) in top:
        print("  %6.2f %5.2f  %s:%d %s" % (tt * 1e6 / n, nc / n, os.path.basename(filename), line, name))
    if args.calls:
        print("spoon's Python functions by calls per request:")
        ours = [(nc / n, os.path.relpath(filename, args.tree), line, name)
                for (filename, line, name), (cc, nc, tt, ct, callers) in stats.stats.items()
                if "/spoon/" in filename]
        for per, filename, line, name in sorted(ours, reverse=True):
            print("  %5.2f  %s:%d %s" % (per, filename, line, name))
    print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    sys.exit(main())
