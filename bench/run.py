"""Run every benchmark scenario against every peer and write bench/RESULTS.md with plots.

``make bench`` runs this (``BENCH_ARGS=--quick`` for a short development run, whose report
goes to bench/out/quick/ instead).  Peers that need packages are installed into their own
virtual environments under bench/out/ on first use.  See bench/RESULTS.md for how the
numbers were taken.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
import peers as peers_mod  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402
import shapes  # noqa: E402
from peers import OUT, PEERS, ROOT, Server, log  # noqa: E402

SCENARIOS = ["short", "pingpong", "slowloris", "cpu", "memory", "large", "shapes", "prefork"]


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = "%.1f GiB" % (int(f.readline().split()[1]) / 1024 / 1024)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "memory": mem,
        "hostname": platform.node(),
    }


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "spoon"],
                               capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        return rev + (" (spoon/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short windows, fewer points (~2 min)")
    p.add_argument("--peers", default="", help="comma-separated peer names (default: all)")
    p.add_argument("--scenarios", default="", help="comma-separated: " + ",".join(SCENARIOS))
    p.add_argument("--out", default=None, help="where RESULTS.md and the plots go")
    p.add_argument("--no-ceiling", action="store_true", help="skip the generator ceiling")
    args = p.parse_args(argv)
    names = [peer.name for peer in PEERS]
    args.peer_names = [n for n in args.peers.split(",") if n] or names
    for n in args.peer_names:
        if n not in names:
            p.error("unknown peer %r (known: %s)" % (n, ", ".join(names)))
    args.scenario_names = [n for n in args.scenarios.split(",") if n] or SCENARIOS
    for n in args.scenario_names:
        if n not in SCENARIOS:
            p.error("unknown scenario %r (known: %s)" % (n, ", ".join(SCENARIOS)))
    if args.out is None:
        args.out = os.path.join(OUT, "quick") if args.quick else HERE
    return args


def run_peer(peer, python, s, wanted):
    """All scenarios for one peer; a failing scenario is recorded and the others go on."""
    res = {"errors": {}, "notes": []}

    def attempt(name, handler, fn, cpus):
        try:
            with Server(peer, handler, python, cpus).start() as server:
                if server.note:
                    res["notes"].append("%s: %s" % (handler, server.note))
                fn(server)
        except Exception as e:  # recorded in the report, the run goes on
            log("  %s failed: %s" % (name, e))
            res["errors"][name] = str(e).splitlines()[0][:300] if str(e) else repr(e)

    if "short" in wanted or "slowloris" in wanted:
        def echo(server):
            res["short"] = scenarios.short(server, s)
            if "slowloris" in wanted:
                clean = res["short"].get(s.slowloris_fast, {})
                res["slowloris"] = scenarios.slowloris(server, s, clean)
        attempt("short", "echo", echo, s.server_cpus)
    if "pingpong" in wanted:
        def pp(server):
            res["pingpong"] = scenarios.pingpong(server, s)
        attempt("pingpong", "pingpong", pp, s.server_cpus)
    if "memory" in wanted:
        if peer.idle_cap == 0:
            res["memory"] = {"skipped": peer.idle_reason}
        else:
            def mem(server):
                res["memory"] = scenarios.memory(server, s, peer.idle_cap)
                if peer.idle_cap:
                    res["memory"]["capped"] = peer.idle_cap
            attempt("memory", "pingpong", mem, s.server_cpus)
    if "cpu" in wanted:
        def cpu(server):
            res["cpu"] = scenarios.cpu_bound(server, s)
        attempt("cpu", "cpu", cpu, s.all_cpus)
    if "large" in wanted:
        def big(server):
            res["large"] = scenarios.large(server, s)
        attempt("large", "big", big, s.server_cpus)
    return res


def main(argv=None):
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so every started server is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit("bench: terminated"))
    t0 = time.monotonic()
    os.sched_setaffinity(0, range(os.cpu_count()))
    loadgen.raise_nofile(peers_mod.NOFILE)
    s = scenarios.Settings(args.quick)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "settings": {k: v for k, v in vars(s).items()},
        "machine": machine(),
        "revision": git_revision(),
        "loadavg": {"start": os.getloadavg()},
        "versions": {
            "python": platform.python_version(),
            "spoon (ours)": _dist_version("spoon"),
            "Twisted": _dist_version("Twisted"),
            "greenlet": _dist_version("greenlet"),
            "zope.interface": _dist_version("zope.interface"),
            "matplotlib": _dist_version("matplotlib"),
        },
        "peers": {},
        "order": args.peer_names,
    }
    selected = [p for p in PEERS if p.name in args.peer_names]
    envs = {"project": sys.executable}
    for name in sorted({p.env for p in selected} - {"project"}):
        py, err = peers_mod.ensure_env(name)
        if err:
            log(err)
        envs[name] = py
        for p in selected:
            if p.env == name and err:
                p.unavailable = err
    if envs.get("spoon106"):
        results["versions"]["original spoon"] = peers_mod.env_version(envs["spoon106"], "spoon")
    if envs.get("gevent"):
        results["versions"]["gevent"] = peers_mod.env_version(envs["gevent"], "gevent")
        results["versions"]["gevent's greenlet"] = peers_mod.env_version(envs["gevent"], "greenlet")
    for p in selected:
        if p.requires and not p.unavailable:
            why = peers_mod.feature_ready(p.requires, sys.executable)
            if why:
                p.unavailable = why
    if not args.no_ceiling:
        log("generator ceiling")
        try:
            results["ceiling"] = scenarios.ceiling(s)
        except Exception as e:
            log("ceiling failed: %s" % e)
            results["ceiling"] = {"error": str(e)}
    for p in selected:
        entry = {"label": p.label, "model": p.model, "workers": p.workers, "ours": p.ours}
        if p.unavailable:
            entry["status"] = p.unavailable
            log("%s: %s" % (p.name, p.unavailable))
        else:
            log("%s (%s)" % (p.name, p.label))
            entry["status"] = "ok"
            wanted = [n for n in args.scenario_names if p.only is None or n in p.only]
            entry.update(run_peer(p, envs[p.env], s, wanted))
            if entry["notes"] and p.requires:
                # e.g. a Spork that did not fork: its numbers are not the Spork's.
                entry["status"] = "pending: " + "; ".join(entry["notes"])
        results["peers"][p.name] = entry
    if "shapes" in args.scenario_names:
        runnable = [p for p in selected if p.name in shapes.PEERS and not p.unavailable]
        log("load shapes, %d rounds: %s" % (s.shape_reps, ", ".join(p.name for p in runnable)))
        results["shapes"] = shapes.run(runnable, envs, s, s.shape_reps)
    if "prefork" in args.scenario_names:
        log("pre-fork balance and copy-on-write (bench/prefork_*.py)")
        results["prefork"] = scenarios.prefork_extras(s)
    results["elapsed_s"] = time.monotonic() - t0
    results["loadavg"]["end"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=str)
    paths = report.write(results, args.out)
    print(report.targets_text(results))
    print("wrote %s in %.0f s" % (", ".join(os.path.relpath(p, ROOT) for p in paths),
                                   results["elapsed_s"]))


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
