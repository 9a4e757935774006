"""Compare our server's CPU per short request between two checkouts, in one run.

    python bench/ab.py --before /path/to/old/checkout [--after .] [--rounds 5]

A change's cost on the short-connection path is a few per cent, less than the noise
between two ``make bench`` runs on this host.  So both versions run here in alternating
rounds (before, after, after, before, ...), each round a fresh server pinned to one core
and the load generator on the other, with the same settings as scenario 1 (8 clients);
the report gives the median, min and max of each and the ratio of the medians.
``--shape unpinned`` measures bench/shapes.py's other shape instead: the server and the
generator free on every core (with ``--conc 16``, the issue 13 shape).
``git worktree add /tmp/before HEAD~1`` makes a checkout to compare with.
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import scenarios  # noqa: E402
from peers import Peer, Server  # noqa: E402


def measure(tree, kind, s, conc, envs, server_cpus, gen_cpus):
    script = os.path.join(os.path.abspath(tree), "bench", "servers", "ours.py")
    args = ["--kind", kind] + (["--workers", "2"] if kind == "spork" else [])
    peer = Peer("%s-%s" % (kind, os.path.basename(os.path.abspath(tree))), kind, "",
                script=script, args=args,
                workers=2 if kind == "spork" else 1, ours=True)
    with Server(peer, "echo", peer.python(envs), server_cpus, tag="-ab").start() as server:
        r = scenarios.loadgen("short", server.port, s, conc, cpus=gen_cpus,
                              measure_pid=server.pid)
    return r["server_cpu_per_req_us"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the checkout to compare against")
    p.add_argument("--after", default=os.path.dirname(HERE), help="default: this checkout")
    p.add_argument("--kinds", default="spoon,spork", help="spoon, spork or both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shape", choices=["pinned", "unpinned"], default="pinned")
    p.add_argument("--conc", type=int, default=8)
    p.add_argument("--duration", type=float, default=2.0)
    args = p.parse_args(argv)
    s = scenarios.Settings()
    s.duration = args.duration
    if args.shape == "pinned":
        server_cpus, gen_cpus = s.server_cpus, s.gen_cpus
    else:
        server_cpus = gen_cpus = None
    envs = {"project": sys.executable}  # both checkouts' servers put their own spoon first
    for kind in [k for k in args.kinds.split(",") if k]:
        results = {"before": [], "after": []}
        for i in range(args.rounds):
            order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
            for which in order:
                tree = args.before if which == "before" else args.after
                results[which].append(measure(tree, kind, s, args.conc, envs, server_cpus,
                                              gen_cpus))
        line = []
        for which in ("before", "after"):
            v = results[which]
            line.append("%s median %.1f us (min %.1f, max %.1f)"
                        % (which, statistics.median(v), min(v), max(v)))
        ratio = statistics.median(results["after"]) / statistics.median(results["before"])
        print("%s %s c=%d, %d rounds: %s; after/before %.3f"
              % (kind, args.shape, args.conc, args.rounds, "; ".join(line), ratio), flush=True)


if __name__ == "__main__":
    main()
