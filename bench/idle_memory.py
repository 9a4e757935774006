"""Memory per idle connection of our servers, for one or two checkouts, in one run.

    python bench/idle_memory.py [--trees BEFORE,AFTER] [--conns 10000] [--kinds spoon,spork]

The bench's memory scenario (``scenarios.memory``, the same idle generator and the same
PSS sums) with just two points, 0 and ``--conns`` connections in all (a TCPSpork's
workers share them), so that a change to the per-connection objects can be measured
without the full ``make bench``.  Each idle connection has had one line answered by the
ping-pong handler, so its handler waits in ``readline()``.  Prints KiB of PSS (and RSS)
per connection for each checkout and server kind.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import scenarios  # noqa: E402
from peers import Peer, Server  # noqa: E402


def measure(tree, kind, conns, s, envs):
    script = os.path.join(os.path.abspath(tree), "bench", "servers", "ours.py")
    workers = 2 if kind == "spork" else 1
    args = ["--kind", kind] + (["--workers", "2"] if kind == "spork" else [])
    peer = Peer("%s-%s" % (kind, os.path.basename(os.path.abspath(tree))), kind, "",
                script=script, args=args, workers=workers, ours=True)
    s.idle_steps = [0, conns // workers]
    with Server(peer, "pingpong", peer.python(envs), s.server_cpus, tag="-mem").start() as server:
        return scenarios.memory(server, s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=os.path.dirname(HERE),
                   help="comma-separated checkouts (default: this one)")
    p.add_argument("--kinds", default="spoon,spork")
    p.add_argument("--conns", type=int, default=10000)
    args = p.parse_args(argv)
    s = scenarios.Settings()
    envs = {"project": sys.executable}  # each checkout's server puts its own spoon first
    for kind in [k for k in args.kinds.split(",") if k]:
        for tree in [t for t in args.trees.split(",") if t]:
            r = measure(tree, kind, args.conns, s, envs)
            print("%s %s: %d idle connections: PSS %.2f KiB, RSS %.2f KiB per connection"
                  % (kind, tree, r.get("max_open", 0), r.get("pss_kib_per_conn", float("nan")),
                     r.get("rss_kib_per_conn", float("nan"))), flush=True)


if __name__ == "__main__":
    main()
