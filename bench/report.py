"""Turn a run's results (the dict run.py builds) into RESULTS.md, a targets table and PNG
plots.  Plots need matplotlib (the optional ``bench`` extra); without it the report says
so and still has every number."""

import math
import os

TARGET_CONC = 8  # short-connection CPU per request is compared at this many clients
PINGPONG_TARGET_CONC = 100


def _f(v, fmt="%.1f", none="–"):
    if v is None:
        return none
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return fmt % v


def _int(v):
    return "–" if v is None else "{:,}".format(int(round(v)))


def _peers(results):
    order = results.get("order") or list(results["peers"])
    return [(name, results["peers"][name]) for name in order if name in results["peers"]]


def _ok(entry):
    return entry.get("status") == "ok"


def _get(results, peer, *path):
    v = results["peers"].get(peer)
    if v is None or not _ok(v):
        return None
    for key in path:
        if isinstance(v, dict):
            v = v.get(key, v.get(str(key)))
        else:
            return None
        if v is None:
            return None
    return v


# -- targets ----------------------------------------------------------------------------------


def _ratio_row(name, threshold, num, den, fmt, cmp, note=""):
    if num is None or den is None or not den:
        return (name, threshold, "–", "pending" if num is None or den is None else "n/a", note)
    r = num / den
    return (name, threshold, fmt % (r, num, den), "met" if cmp(r) else "not met", note)


def targets(results):
    """The issue targets as rows (target, threshold, measured, verdict, note)."""
    rows = []
    spork_ok = _ok(results["peers"].get("spork", {}))
    ours = "spork" if spork_ok else "spoon"
    spork = results["peers"].get("spork")
    stand_in = "" if spork_ok else "TCPSpork %s: TCPSpoon stands in" % (
        "not run" if spork is None else "pending")
    c = TARGET_CONC

    rows.append(_ratio_row(
        "CPU/request, ours (TCPSpoon) vs raw Twisted, short c=%d (issue 2)" % c, "≤ 1.15x",
        _get(results, "spoon", "short", c, "server_cpu_per_req_us"),
        _get(results, "twisted", "short", c, "server_cpu_per_req_us"),
        "%.2fx (%.1f vs %.1f µs)", lambda r: r <= 1.15))
    if _ok(results["peers"].get("twisted-prefork", {})) and spork_ok:
        rows.append(_ratio_row(
            "CPU/request, TCPSpork vs raw Twisted on our prefork, short c=%d" % c, "≤ 1.15x",
            _get(results, "spork", "short", c, "server_cpu_per_req_us"),
            _get(results, "twisted-prefork", "short", c, "server_cpu_per_req_us"),
            "%.2fx (%.1f vs %.1f µs)", lambda r: r <= 1.15))
    rows.append(_ratio_row(
        "CPU/request, ours vs original spoon 1.0.6, short c=%d" % c, "≤ 1.5x",
        _get(results, ours, "short", c, "server_cpu_per_req_us"),
        _get(results, "spoon-1.0.6", "short", c, "server_cpu_per_req_us"),
        "%.2fx (%.1f vs %.1f µs)", lambda r: r <= 1.5, stand_in))
    n = PINGPONG_TARGET_CONC
    row = _ratio_row(
        "ping-pong req/s with %d clients, ours vs original" % n, "≥ 5x, all served",
        _get(results, ours, "pingpong", n, "rps"),
        _get(results, "spoon-1.0.6", "pingpong", n, "rps"),
        "%.2fx (%.0f vs %.0f req/s)", lambda r: r >= 5, stand_in)
    served = _get(results, ours, "pingpong", n, "served_fraction")
    theirs = _get(results, "spoon-1.0.6", "pingpong", n, "served_fraction")
    if theirs is not None and theirs < 1.0:
        row = list(row)
        row[4] = "; ".join(x for x in (row[4], (
            "closed loop: the original served %.0f%% of the connections (one per worker, flat "
            "out) and starved the rest" % (theirs * 100))) if x)
        row = tuple(row)
    if served is not None:
        row = list(row)
        row[2] += ", ours served %.0f%%" % (served * 100)
        if row[3] == "met" and served < 1.0:
            row[3] = "not met"
        row = tuple(row)
    rows.append(row)
    for n in PINGPONG_ISSUE13_CONC:
        rows.append(pingpong_row(results, n, ours, stand_in))
    rows.extend(shape_targets(results))
    rel = _get(results, ours, "slowloris", "relative")
    rows.append(("slowloris: fast-client throughput vs clean (ours)", "≥ 0.9x",
                 _f(rel, "%.2fx"), "pending" if rel is None else ("met" if rel >= 0.9 else "not met"),
                 stand_in))
    bal = _get(results, "spork", "cpu", "balance")
    rows.append(("CPU-bound balance max/min per worker (TCPSpork)", "≤ 1.5",
                 _f(bal, "%.2f"), "pending" if bal is None else ("met" if bal <= 1.5 else "not met"),
                 "" if spork_ok else "TCPSpork not run" if spork is None else "TCPSpork pending"))
    for peer in ("spoon", "spork"):
        per = _get(results, peer, "memory", "pss_kib_per_conn")
        rss = _get(results, peer, "memory", "rss_kib_per_conn")
        n_open = _get(results, peer, "memory", "max_open")
        note = ""
        if n_open is not None and n_open < 10000:
            note = "measured with %d connections, not 10,000" % n_open
        rows.append(("memory per idle connection (%s), PSS" % results["peers"].get(peer, {}).get("label", peer),
                     "≤ 6 KiB",
                     "–" if per is None else "%.2f KiB (RSS %.2f KiB), %s open" % (per, rss, _int(n_open)),
                     "pending" if per is None else ("met" if per <= 6 else "not met"), note))
    for peer in ("spoon", "spork"):
        g = _get(results, peer, "large", "rss_growth_kib")
        ok = _get(results, peer, "large", "ok")
        mib = _get(results, peer, "large", "mib")
        verdict = "pending" if g is None else ("met" if g < 32 * 1024 and ok else "not met")
        rows.append(("large transfer peak RSS growth (%s)" % results["peers"].get(peer, {}).get("label", peer),
                     "< 32 MiB", "–" if g is None else "%.1f MiB (%d MiB each way)" % (g / 1024, mib),
                     verdict, "" if ok or ok is None else "transfer failed"))
    pre = results.get("prefork") or {}
    bal = (pre.get("balance") or {}).get("data")
    if bal:
        mine = [r for r in bal if r.get("kind") == "one-by-one"]
        worst = max((r.get("ratio") or float("inf")) for r in mine) if mine else None
        rows.append(("pre-fork balance, Spork accept (prefork_balance.py, worst load shape)",
                     "≤ 1.5", _f(worst, "%.2f"),
                     "pending" if worst is None else ("met" if worst <= 1.5 else "not met"), "issue 3"))
    cow = (pre.get("cow") or {}).get("data")
    if cow:
        ratio = cow.get("ratio")
        rows.append(("copy-on-write: PSS of supervisor + %s workers vs one process, %s MiB config"
                     % (cow.get("workers"), cow.get("mib")), "< 1.5x", _f(ratio, "%.2fx"),
                     "pending" if ratio is None else ("met" if ratio < 1.5 else "not met"), "issue 3"))
    return rows


#: Ping-pong against the original at these many persistent clients (issue 13: >= 2x its
#: req/s with every client served).
PINGPONG_ISSUE13_CONC = (16, 100)


def pingpong_row(results, n, ours, note):
    row = list(_ratio_row(
        "ping-pong req/s with %d clients, ours vs original (issue 13)" % n, "≥ 2x, all served",
        _get(results, ours, "pingpong", n, "rps"), _get(results, "spoon-1.0.6", "pingpong", n, "rps"),
        "%.2fx (%.0f vs %.0f req/s)", lambda r: r >= 2, note))
    served = _get(results, ours, "pingpong", n, "served_fraction")
    if served is not None and row[2] != "–":
        row[2] += ", ours served %.0f%%" % (served * 100)
        if served < 1.0:
            row[3] = "not met"
    return tuple(row)


#: Per load shape (bench/shapes.py): the number of clients its target is read at.
SHAPE_TARGET_CONC = {"pinned": 8, "unpinned": 16}


def _shape_cell(results, shape, peer, conc):
    cell = (((results.get("shapes") or {}).get(shape) or {}).get("peers") or {}).get(peer) or {}
    cell = cell.get(conc, cell.get(str(conc))) or {}
    cpu = cell.get("cpu_us") or {}
    return cpu if cpu.get("median") is not None else None


#: Our peers read against the original in each load shape: the default (a row always,
#: pending when it did not run), and the opt-in for protocols where the client speaks
#: first (a row only when that peer ran).  (peer, label, note, always)
SHAPE_OURS = (
    ("spork", "TCPSpork", "", True),
    ("spork-csf", "TCPSpork with client_speaks_first",
     "opt-in for protocols where the client speaks first, as the bench's echo does", False),
)


def shape_targets(results):
    """One row per load shape and peer of ours: its server CPU per short request against
    the original spoon 1.0.6's, the ratio of the medians, with each side's min-max spread."""
    rows = []
    for shape, data in sorted((results.get("shapes") or {}).items()):
        for peer, label, why, always in SHAPE_OURS:
            if not always and peer not in (data.get("peers") or {}):
                continue
            rows.append(_shape_row(results, shape, data, peer, label, why))
    return rows


def _shape_row(results, shape, data, peer, label, why):
    conc = SHAPE_TARGET_CONC.get(shape, (data.get("concs") or [None])[0])
    ours = _shape_cell(results, shape, peer, conc)
    theirs = _shape_cell(results, shape, "spoon-1.0.6", conc)
    name = "CPU/request, %s vs spoon 1.0.6, %s c=%s, median of %s" % (
        label, shape, conc, data.get("reps"))
    load = data.get("load") or {}
    note = "; ".join(x for x in (why, "load avg %s-%s" % (
        _f(load.get("min"), "%.1f"), _f(load.get("max"), "%.1f"))) if x)
    if ours is None or theirs is None:
        return (name, "≤ 1.0x", "–", "pending", note)
    r = ours["median"] / theirs["median"]
    low, high = ours["min"] / theirs["max"], ours["max"] / theirs["min"]
    if low <= 1.0 < high:
        note += "; 1.0x is within the spread"
    return (name, "≤ 1.0x", "%.2fx (%.1f vs %.1f µs; spread %.2f-%.2fx)" % (
        r, ours["median"], theirs["median"], low, high), "met" if r <= 1.0 else "not met", note)


def targets_text(results):
    lines = ["Targets:"]
    for name, threshold, measured, verdict, note in targets(results):
        lines.append("  %-9s %s: %s (target %s)%s" % (
            verdict.upper(), name, measured, threshold, "  [%s]" % note if note else ""))
    return "\n".join(lines)


# -- RESULTS.md -------------------------------------------------------------------------------


def _table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(out)


def _status_rows(results, scenario):
    """Rows for peers that did not run a scenario: pending, unavailable or failed."""
    rows = []
    for name, e in _peers(results):
        if not _ok(e):
            rows.append((e["label"], e["status"]))
        elif scenario in e.get("errors", {}):
            rows.append((e["label"], "failed: " + e["errors"][scenario]))
    return rows


def _notes(results, scenario):
    rows = _status_rows(results, scenario)
    if not rows:
        return ""
    return "\n" + "\n".join("- %s: %s" % r for r in rows) + "\n"


def markdown(results, plots):
    m = results["machine"]
    s = results["settings"]
    v = results["versions"]
    md = []
    md.append("# Benchmark results\n")
    md.append("Measured %s%s by `make bench%s` (%.0f s), revision %s.\n" % (
        results["date"], " (quick mode: short windows, fewer points)" if results["quick"] else "",
        " BENCH_ARGS=--quick" if results["quick"] else "", results.get("elapsed_s", 0),
        results.get("revision", "?")))
    md.append("**Machine:** %s, %s cores (%s usable), %s RAM, Linux %s.\n" % (
        m["cpu"], m["cores"], m["cores_usable"], m["memory"], m["kernel"]))
    md.append("**Versions:** " + ", ".join("%s %s" % (k, v[k]) for k in v if v[k]) + ".\n")
    pinned = bool(s.get("server_cpus"))
    md.append("## How it was run\n")
    md.append(
        "- Every peer serves the same handler logic (`bench/servers/handlers.py`: the README's "
        "echo-lowercase handler; a persistent line loop for ping-pong; 20 ms of CPU for the "
        "CPU-bound case; a counted body and response for the large transfer), listening on "
        "127.0.0.1 with a listen backlog of 1024.\n"
        "- The load generator (`bench/loadgen.py`) is Python: one epoll loop per process over "
        "non-blocking sockets.  It and the servers share this machine.\n"
        + ("- Scenarios 1, 2, 3, 5 and 6: every server process (workers included) is pinned to "
           "CPU %s and the generator to CPU %s, so req/s is what one core of server gives and the "
           "server's CPU per request is not disturbed by the generator.  Scenario 4 (CPU-bound) "
           "runs the server and the generator on all cores.\n" % (
               s["server_cpus"][0], s["gen_cpus"][0]) if pinned else
           "- Only one core is usable: server and generator share it.\n")
        + "- **Server CPU per request** = utime+stime (plus reaped children) of all the server's "
        "processes from /proc/PID/stat, sampled at the edges of the counting window, divided "
        "by the requests completed in it.  Window: %.1f s after %.1f s of warm-up.  It includes "
        "the kernel's work done in the server's system calls (accept, recv, send, close); on "
        "loopback the TCP handshake itself runs in the connecting client's context, so it is "
        "charged to the generator, the same way for every peer.\n"
        "- Latencies are per request (short: connect to EOF; ping-pong: line to reply) over "
        "the requests completed in the window.  In ping-pong, *served* is the fraction of "
        "connections that got at least one reply in the window; latencies cover only those.\n"
        "- Every run is closed-loop: a client sends its next request when it has the "
        "previous reply, so a server that stalls gets fewer requests, not a growing queue.\n"
        "- Memory: each idle connection first gets one line answered (so its handler now "
        "waits in `readline()`), then stays silent.  RSS and PSS are summed over the server's "
        "processes (PSS counts copy-on-write pages shared by pre-forked workers once); per "
        "connection = (at N − at 0) / N.\n"
        "- Large transfer: one connection sends %d MiB and reads a %d MiB response; peak RSS "
        "growth is each server process's VmHWM (reset beforehand through clear_refs) minus its "
        "RSS before, the largest over the processes.\n" % (
            s["duration"], s["warmup"], s["big_bytes"] >> 20, s["big_bytes"] >> 20))

    # ceiling
    md.append("## Load generator ceiling\n")
    c = results.get("ceiling") or {}
    if "error" in c or not c:
        md.append("Not measured: %s\n" % c.get("error", "skipped"))
    else:
        rows = []
        for mode, conc in (("short", 64), ("pingpong", 100)):
            r = c.get(mode) or {}
            gcpu = r.get("gen_cpu_per_req_us")
            share = r.get("gen_kernel_share")
            rows.append((mode, conc, _int(r.get("rps")), _f(gcpu),
                         "–" if share is None else "%.0f%%" % (share * 100),
                         _int(1e6 / gcpu if gcpu else None), _f(r.get("server_cpu_per_req_us"))))
        md.append("Against %s, the generator on one core:\n" % c.get("server"))
        md.append(_table(["mode", "connections", "req/s", "generator CPU µs/req",
                          "of it in the kernel", "generator max req/s per core",
                          "trivial server CPU µs/req"], rows))
        md.append("\nThe generator's cost per short connection is mostly the kernel's (a loopback "
                  "connect runs the TCP handshake of both ends in the caller's context), so a "
                  "generator in C would not be much faster.  Where a peer's req/s comes near "
                  "the generator's max, the generator is the limit: compare the servers' CPU "
                  "per request instead, which does not depend on it.\n")

    md.append("## Targets\n")
    md.append(_table(["target", "threshold", "measured", "verdict", "note"], targets(results)))
    md.append("")

    # 1. short
    md.append("## 1. Short connections\n")
    md.append("Connect, send one line, half-close, read the reply to EOF; N clients in a closed loop.\n")
    rows = []
    for name, e in _peers(results):
        for conc, r in sorted((e.get("short") or {}).items(), key=lambda kv: int(kv[0])):
            rows.append((e["label"], conc, _int(r.get("rps")), _f(r.get("p50_ms"), "%.2f"),
                         _f(r.get("p99_ms"), "%.2f"), _f(r.get("server_cpu_per_req_us")),
                         _int(r.get("errors", 0) + r.get("bad", 0))))
    md.append(_table(["peer", "clients", "req/s", "p50 ms", "p99 ms", "server CPU µs/req",
                      "errors"], rows))
    md.append(_notes(results, "short"))

    # 2. ping-pong
    md.append("## 2. Persistent ping-pong\n")
    md.append("N connections, each sends a line and waits for the reply before the next.\n")
    rows = []
    for name, e in _peers(results):
        for conc, r in sorted((e.get("pingpong") or {}).items(), key=lambda kv: int(kv[0])):
            rows.append((e["label"], conc, "%.0f%%" % (100 * (r.get("served_fraction") or 0)),
                         _int(r.get("rps")), _f(r.get("p50_ms"), "%.2f"),
                         _f(r.get("p99_ms"), "%.2f"), _f(r.get("server_cpu_per_req_us"))))
    md.append(_table(["peer", "connections", "served", "req/s", "p50 ms", "p99 ms",
                      "server CPU µs/req"], rows))
    md.append(_notes(results, "pingpong"))

    # 3. slowloris
    md.append("## 3. Slowloris\n")
    md.append("%d connections each send one byte per second while %d clients run short "
              "connections; their throughput relative to the clean run above.\n" % (
                  s["slowloris_conns"], s["slowloris_fast"]))
    rows = []
    for name, e in _peers(results):
        r = e.get("slowloris")
        if not r:
            continue
        clean = (e.get("short") or {}).get(s["slowloris_fast"]) or (e.get("short") or {}).get(
            str(s["slowloris_fast"])) or {}
        rows.append((e["label"], _int(clean.get("rps")), _int(r.get("rps")),
                     _f(r.get("relative"), "%.2f"), _f(r.get("p99_ms"), "%.2f"),
                     r.get("slow_connected", "–")))
    md.append(_table(["peer", "clean req/s", "with slowloris req/s", "relative",
                      "p99 ms", "slow connections"], rows))
    md.append(_notes(results, "short"))

    # 4. CPU-bound
    md.append("## 4. CPU-bound handler\n")
    md.append("%d clients, each request burns 20 ms of CPU in the handler and replies with the "
              "worker's pid; server and generator on all cores.\n" % s["cpu_conc"])
    rows = []
    for name, e in _peers(results):
        r = e.get("cpu")
        if not r:
            continue
        pw = r.get("per_worker") or {}
        if e["workers"] > 1:
            spread = " / ".join(str(n) for n in pw.values()) if len(pw) <= 4 else "%d pids" % len(pw)
        else:
            spread = "%d pid%s" % (len(pw), "" if len(pw) == 1 else "s")
        rows.append((e["label"], _f(r.get("rps")), _f(r.get("p50_ms")), _f(r.get("p99_ms")),
                     spread, _f(r.get("balance"), "%.2f", "n/a")))
    md.append(_table(["peer", "req/s", "p50 ms", "p99 ms", "requests per worker",
                      "balance max/min"], rows))
    md.append(_notes(results, "cpu"))

    # 5. memory
    md.append("## 5. Memory against idle connections\n")
    rows = []
    skipped = []
    for name, e in _peers(results):
        r = e.get("memory")
        if not r:
            continue
        if "skipped" in r:
            skipped.append("- %s: not measured (%s)" % (e["label"], r["skipped"]))
            continue
        for p in r.get("points", []):
            rows.append((e["label"], _int(p["open"]), _int(p["per_worker"]),
                         _f(p["rss_kib"] / 1024), _f(p["pss_kib"] / 1024), p["processes"]))
        rows.append((e["label"], "**per connection**", "",
                     "**%s KiB**" % _f(r.get("rss_kib_per_conn"), "%.2f"),
                     "**%s KiB**" % _f(r.get("pss_kib_per_conn"), "%.2f"),
                     "capped at %d" % r["capped"] if r.get("capped") else ""))
    md.append(_table(["peer", "idle connections", "per worker", "RSS MiB", "PSS MiB",
                      "processes"], rows))
    if skipped:
        md.append("\n" + "\n".join(skipped))
    md.append(_notes(results, "memory"))

    # 6. large
    md.append("## 6. Large transfer\n")
    rows = []
    for name, e in _peers(results):
        r = e.get("large")
        if not r:
            continue
        rows.append((e["label"], "%d + %d" % (r.get("mib", 0), r.get("mib", 0)),
                     _f(r.get("seconds"), "%.2f"), _f(r.get("mib_per_s")),
                     _f((r.get("rss_growth_kib") or 0) / 1024), "yes" if r.get("ok") else
                     "no: %s" % r.get("error")))
    md.append(_table(["peer", "MiB in + out", "seconds", "MiB/s (both ways)",
                      "peak RSS growth MiB", "complete"], rows))
    md.append(_notes(results, "large"))

    md.append(_shapes_md(results))
    md.append(_prefork_md(results))
    md.append("## Plots\n")
    if plots:
        for p in plots:
            md.append("![%s](%s)\n" % (os.path.splitext(os.path.basename(p))[0], os.path.basename(p)))
    else:
        md.append("No plots: matplotlib is not installed (`pip install -e .[bench]`).\n")
    md.append("## Peers\n")
    md.append(_table(["peer", "how it serves", "status"],
                     [(e["label"], e["model"], "ran" if _ok(e) else e["status"])
                      for name, e in _peers(results)]))
    md.append("")
    return "\n".join(md)


def _shapes_md(results):
    data = results.get("shapes")
    if not data:
        return ""
    labels = {name: e["label"] for name, e in _peers(results)}
    md = ["## 1b. Load shapes: CPU per short request, repeated\n",
          "The short-connection exchange of scenario 1 against the pre-forked peers "
          "(`bench/shapes.py`), each repetition on a fresh server, the peers in interleaved "
          "rounds; median, min and max of the repetitions.\n"]
    rows = []
    for shape, d in sorted(data.items()):
        load = d.get("load") or {}
        for name, per_conc in d.get("peers", {}).items():
            for conc, cell in sorted(per_conc.items(), key=lambda kv: int(kv[0])):
                cpu, rps = cell.get("cpu_us") or {}, cell.get("rps") or {}
                rows.append(("%s (%s)" % (shape, d.get("text")), labels.get(name, name), conc,
                             len(cpu.get("runs") or []), _f(cpu.get("median")), _f(cpu.get("min")),
                             _f(cpu.get("max")), _int(rps.get("median")),
                             _int(cell.get("errors")),
                             "%s-%s" % (_f(load.get("min")), _f(load.get("max")))))
        for name, why in (d.get("failures") or {}).items():
            rows.append((shape, labels.get(name, name), "–", "–", "failed: " + why, "", "", "", "", ""))
    md.append(_table(["shape", "peer", "clients", "runs", "CPU µs/req median", "min", "max",
                      "req/s median", "errors", "load avg"], rows))
    return "\n".join(md) + "\n"


def _prefork_md(results):
    pre = results.get("prefork")
    if not pre:
        return ""
    md = ["## Pre-fork: accept balance and copy-on-write\n"]
    bal = pre.get("balance") or {}
    if "data" in bal:
        md.append("`bench/prefork_balance.py %s`: a TCPSpork with a 20 ms CPU-bound handler, "
                  "requests per worker for each way of accepting (*one-by-one* is what Spork "
                  "workers use).\n" % bal.get("args", ""))
        rows = []
        for r in bal["data"]:
            rows.append((r.get("mode"), r.get("kind"), " / ".join(map(str, r.get("per_worker", []))),
                         _f(r.get("ratio"), "%.2f"), _f(r.get("req_per_s")), _f(r.get("p99_ms")),
                         _f(r.get("round_ms"), "%.1f") + (" (ideal %s)" % _f(r.get("ideal_round_ms"), "%.0f")
                                                         if r.get("ideal_round_ms") else "")))
        md.append(_table(["load", "accept", "per worker", "max/min", "req/s", "p99 ms",
                          "burst round ms"], rows))
        md.append("")
    else:
        md.append("Balance: %s\n" % bal.get("error", "not run"))
    cow = pre.get("cow") or {}
    if "data" in cow:
        d = cow["data"]
        md.append("`bench/prefork_cow.py %s`: PSS of one process that loaded %s MiB of "
                  "configuration: %.1f MiB; supervisor + %s workers: %s MiB in total (%s); ratio "
                  "**%.2f**.\n" % (
                      cow.get("args", ""), d.get("mib"), d.get("single_kib", 0) / 1024, d.get("workers"),
                      _f(sum(d.get("pool_kib", [])) / 1024), ", ".join(_f(k / 1024) for k in d.get("pool_kib", [])),
                      d.get("ratio") or 0))
    else:
        md.append("Copy-on-write: %s\n" % cow.get("error", "not run"))
    return "\n".join(md) + "\n"


# -- plots ------------------------------------------------------------------------------------


def plots(results, outdir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    peers = [(n, e) for n, e in _peers(results) if _ok(e)]

    def style(e):
        return {"linewidth": 2.5 if e.get("ours") else 1.3, "marker": "o",
                "linestyle": "-" if e.get("ours") else "--"}

    def series(e, scenario, key):
        data = e.get(scenario) or {}
        xs, ys = [], []
        for conc in sorted(data, key=int):
            y = data[conc].get(key)
            if y is not None:
                xs.append(int(conc))
                ys.append(y)
        return xs, ys

    # 1 and 2: throughput and p99 against concurrency
    for scenario, extra, title in (("short", False, "Short connections"),
                                   ("pingpong", True, "Persistent ping-pong")):
        if not any(e.get(scenario) for name, e in peers):
            continue
        cols = 3 if extra else 2
        fig, axes = plt.subplots(1, cols, figsize=(5.5 * cols, 4.5))
        for name, e in peers:
            xs, ys = series(e, scenario, "rps")
            if xs:
                axes[0].plot(xs, ys, label=e["label"], **style(e))
            xs, ys = series(e, scenario, "p99_ms")
            if extra:
                # A p99 over the few connections a server serves at all would flatter it.
                served = dict(zip(*series(e, scenario, "served_fraction")))
                keep = [(x, y) for x, y in zip(xs, ys) if served.get(x, 0) >= 0.99]
                xs, ys = [x for x, _ in keep], [y for _, y in keep]
            if xs:
                axes[1].plot(xs, ys, label=e["label"], **style(e))
            if extra:
                xs, ys = series(e, scenario, "served_fraction")
                if xs:
                    axes[2].plot(xs, [100 * y for y in ys], label=e["label"], **style(e))
        axes[0].set_title("%s: throughput" % title)
        axes[0].set_ylabel("requests/s")
        axes[1].set_title("%s: p99 latency%s" % (title, " (all served)" if extra else ""))
        axes[1].set_ylabel("ms")
        axes[1].set_yscale("log")
        if extra:
            axes[2].set_title("connections served at all")
            axes[2].set_ylabel("%")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("concurrent connections")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(outdir, "%s.png" % scenario)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    # CPU per request
    labels, short_cpu, pp_cpu = [], [], []
    for name, e in peers:
        a = ((e.get("short") or {}).get(TARGET_CONC) or (e.get("short") or {}).get(str(TARGET_CONC)) or {})
        b = ((e.get("pingpong") or {}).get(PINGPONG_TARGET_CONC)
             or (e.get("pingpong") or {}).get(str(PINGPONG_TARGET_CONC)) or {})
        if a.get("server_cpu_per_req_us") is None and b.get("server_cpu_per_req_us") is None:
            continue
        labels.append(e["label"])
        short_cpu.append(a.get("server_cpu_per_req_us") or 0)
        pp_cpu.append(b.get("server_cpu_per_req_us") or 0)
    if labels:
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.5))
        ys = range(len(labels))
        ax.barh([y - 0.2 for y in ys], short_cpu, height=0.4,
                label="short connection (%d clients)" % TARGET_CONC)
        ax.barh([y + 0.2 for y in ys], pp_cpu, height=0.4,
                label="ping-pong request (%d connections)" % PINGPONG_TARGET_CONC)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for y, (a, b) in enumerate(zip(short_cpu, pp_cpu)):
            if a:
                ax.text(a, y - 0.2, " %.0f" % a, va="center", fontsize=7)
            if b:
                ax.text(b, y + 0.2, " %.0f" % b, va="center", fontsize=7)
        ax.set_xlabel("server CPU time per request, µs, log scale (lower is better)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "cpu_per_request.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    # memory
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for name, e in peers:
        pts = (e.get("memory") or {}).get("points") or []
        if len(pts) < 2:
            continue
        ax.plot([p["per_worker"] for p in pts], [p["pss_kib"] / 1024 for p in pts],
                label=e["label"], **style(e))
        drawn = True
    if drawn:
        ax.set_xlabel("idle connections per worker (handler waiting in readline)")
        ax.set_ylabel("PSS of all server processes, MiB")
        ax.set_title("Memory against idle connections")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, "memory.png")
        fig.savefig(path, dpi=90)
        written.append(path)
    plt.close(fig)
    return written


def write(results, outdir):
    """Write RESULTS.md and the plots into ``outdir``; return the paths written."""
    written = plots(results, outdir)
    path = os.path.join(outdir, "RESULTS.md")
    with open(path, "w") as f:
        f.write(markdown(results, written))
    return [path] + written
