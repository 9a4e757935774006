"""Scenario "shapes": server CPU per short request of the pre-forked peers in two load
shapes, repeated, so that a ratio between two peers is read with its noise.

- **pinned**: every server process on the first core, the generator on the second,
  8 clients (the shape of scenario 1);
- **unpinned**: prefork = cores, every server process and the generator free on all
  cores, 16 and 64 clients.

The peers run in interleaved rounds (round 1: A, B, C; round 2: B, C, A; ...), each
measurement on a freshly started server, so a slow minute on this shared host touches every
peer instead of one.  A repetition's figure is the generator's ``server_cpu_per_req_us``;
the report gives the median, min and max of the repetitions.
"""

import os
import statistics

import scenarios
from peers import Server, log

#: The peers compared (ours pre-forked, with and without the client_speaks_first opt-in,
#: the original's, raw Twisted on our pre-fork).
PEERS = ("spork", "spork-csf", "spoon-1.0.6", "twisted-prefork")


class Shape:
    """Where the server and the generator may run, and with how many clients."""

    def __init__(self, name, server_cpus, gen_cpus, concs, text):
        self.name = name
        self.server_cpus = server_cpus
        self.gen_cpus = gen_cpus
        self.concs = concs
        self.text = text


def shapes(s):
    """The two shapes for settings ``s`` (pinned needs two usable cores)."""
    out = []
    if s.server_cpus:
        out.append(Shape("pinned", s.server_cpus, s.gen_cpus, [8],
                         "server on CPU %s, generator on CPU %s" % (s.server_cpus[0], s.gen_cpus[0])))
    out.append(Shape("unpinned", None, None, [16, 64],
                     "server and generator free on all %d cores" % len(s.all_cpus)))
    return out


def summary(values):
    """Median, min and max of a list of figures (None where there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"runs": [], "median": None, "min": None, "max": None}
    return {"runs": values, "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def run(peers, envs, s, reps=3):
    """Measure every peer of ``peers`` (Peer objects that can run) in every shape,
    ``reps`` rounds.  Returns {shape: {"text", "concs", "load", "peers": {name: {conc:
    {"cpu_us": summary, "rps": summary, "errors": n}}}, "failures": {name: text}}}."""
    result = {}
    for shape in shapes(s):
        raw = {p.name: {c: {"cpu": [], "rps": [], "errors": 0} for c in shape.concs}
               for p in peers}
        failures = {}
        load = [os.getloadavg()[0]]
        for i in range(reps):
            order = peers[i % len(peers):] + peers[:i % len(peers)] if peers else []
            for peer in order:
                try:
                    with Server(peer, "echo", envs[peer.env], shape.server_cpus,
                                tag="-" + shape.name).start() as server:
                        for conc in shape.concs:
                            r = scenarios.loadgen("short", server.port, s, conc,
                                                  cpus=shape.gen_cpus, measure_pid=server.pid)
                            cell = raw[peer.name][conc]
                            cell["cpu"].append(r.get("server_cpu_per_req_us"))
                            cell["rps"].append(r.get("rps"))
                            cell["errors"] += r.get("errors", 0) + r.get("bad", 0)
                            log("  %s %s c=%d round %d: %s" % (
                                shape.name, peer.name, conc, i + 1, scenarios.brief(r)))
                except Exception as e:  # recorded, the other peers go on
                    log("  %s %s failed: %s" % (shape.name, peer.name, e))
                    failures[peer.name] = str(e).splitlines()[0][:300] if str(e) else repr(e)
            load.append(os.getloadavg()[0])
        result[shape.name] = {
            "text": shape.text,
            "concs": shape.concs,
            "reps": reps,
            "load": {"min": min(load), "max": max(load)},
            "failures": failures,
            "peers": {
                name: {conc: {"cpu_us": summary(cell["cpu"]), "rps": summary(cell["rps"]),
                              "errors": cell["errors"]}
                       for conc, cell in per_conc.items()}
                for name, per_conc in raw.items()
            },
        }
    return result
