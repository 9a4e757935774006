"""The scenarios of issue 5, each run against one started server.

Each function returns plain data (dicts of numbers) for the report.  The load generator
always runs as its own process (bench/loadgen.py), pinned to the generator's cores.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import procstat
from peers import OUT, log

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN = os.path.join(HERE, "loadgen.py")
PAYLOAD = "Hello World FROM the Bench\n"


class Settings:
    """How long and how hard: the full run, or ``--quick`` for development."""

    def __init__(self, quick=False):
        self.quick = quick
        self.warmup = 0.2 if quick else 0.5
        self.duration = 0.6 if quick else 2.0
        self.short_conc = [1, 8, 64]
        self.pingpong_conc = [1, 16, 100, 1000] if quick else [1, 10, 16, 100, 1000]
        self.slowloris_conns = 200
        self.slowloris_fast = 8
        self.cpu_conc = 8
        self.cpu_duration = 1.0 if quick else 3.0
        self.idle_steps = [0, 1000] if quick else [0, 1000, 5000, 10000]
        self.big_bytes = (20 if quick else 100) << 20
        self.shape_reps = 3  # repetitions of each load shape (bench/shapes.py)
        ncpu = len(os.sched_getaffinity(0))
        self.all_cpus = sorted(os.sched_getaffinity(0))
        if ncpu >= 2:
            self.server_cpus = [self.all_cpus[0]]
            self.gen_cpus = [self.all_cpus[1]]
        else:
            self.server_cpus = self.gen_cpus = None


def loadgen(mode, port, s, conc, cpus=None, procs=1, measure_pid=None, extra=(),
            duration=None, stderr_to=None):
    """Run the generator once and return its JSON report."""
    duration = s.duration if duration is None else duration
    argv = [sys.executable, LOADGEN, mode, "--port", str(port), "--conc", str(conc),
            "--warmup", str(s.warmup), "--duration", str(duration), "--procs", str(procs),
            "--payload", PAYLOAD]
    if cpus:
        argv += ["--cpus", ",".join(map(str, cpus))]
    if measure_pid:
        argv += ["--measure-pid", str(measure_pid)]
    argv += list(extra)
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=s.warmup + duration + 90)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError("loadgen %s failed (%s): %s" % (mode, out.returncode, out.stderr[-2000:]))
    return json.loads(lines[-1])


def brief(r):
    keys = ("rps", "p99_ms", "server_cpu_per_req_us", "served_fraction", "errors", "bad")
    parts = []
    for k in keys:
        v = r.get(k)
        if v is not None:
            parts.append("%s=%s" % (k, ("%.4g" % v) if isinstance(v, float) else v))
    return " ".join(parts)


# -- 1. short connections and 3. slowloris (the echo handler) --------------------------------


def short(server, s):
    """Connect, one line, half-close, read to EOF, at each concurrency."""
    results = {}
    for conc in s.short_conc:
        r = loadgen("short", server.port, s, conc, cpus=s.gen_cpus, measure_pid=server.pid)
        log("  short c=%d: %s" % (conc, brief(r)))
        results[conc] = r
    return results


def slowloris(server, s, clean):
    """200 connections sending a byte a second while 8 fast clients run short requests."""
    slow_for = s.warmup + s.duration + 15.0
    argv = [sys.executable, LOADGEN, "slowloris", "--port", str(server.port),
            "--conc", str(s.slowloris_conns), "--warmup", "0", "--duration", str(slow_for)]
    if s.gen_cpus:
        argv += ["--cpus", ",".join(map(str, s.gen_cpus))]
    slow = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready = _read_line(slow.stderr, "SLOWLORIS-READY", 20.0)
        # Let the server accept them (its descriptor count grows by as many).
        base = procstat.fd_count(server.pids())
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if procstat.fd_count(server.pids()) >= base + s.slowloris_conns * 0.95:
                break
            time.sleep(0.05)
        fast = loadgen("short", server.port, s, s.slowloris_fast, cpus=s.gen_cpus,
                       measure_pid=server.pid)
    finally:
        try:
            os.killpg(slow.pid, signal.SIGKILL)  # the generator and its forked worker
        except ProcessLookupError:
            pass
        slow.communicate()
    clean_rps = clean.get("rps") or 0.0
    fast["slow_connected"] = int(ready.split()[1]) if ready else 0
    fast["relative"] = fast["rps"] / clean_rps if clean_rps else None
    log("  slowloris: %s relative=%s" % (brief(fast), fast["relative"]))
    return fast


def _read_line(stream, prefix, timeout):
    deadline = time.monotonic() + timeout
    buf = ""
    while time.monotonic() < deadline:
        r, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = stream.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
        buf += line
    return None


# -- 2. persistent ping-pong ------------------------------------------------------------------


def pingpong(server, s):
    results = {}
    for conc in s.pingpong_conc:
        r = loadgen("pingpong", server.port, s, conc, cpus=s.gen_cpus, measure_pid=server.pid)
        log("  pingpong c=%d: %s" % (conc, brief(r)))
        results[conc] = r
    return results


# -- 4. CPU-bound handler ---------------------------------------------------------------------


def cpu_bound(server, s):
    """8 clients, 20 ms of CPU per request; server and generator on every core."""
    workers = server.worker_pids()
    r = loadgen("short", server.port, s, s.cpu_conc, cpus=None, procs=1,
                measure_pid=server.pid, extra=["--tally"], duration=s.cpu_duration)
    tally = r.pop("tally", {}) or {}
    per_worker = {}
    for key, n in tally.items():
        if key.isdigit():
            per_worker[int(key)] = n
    r["per_worker"] = {str(k): v for k, v in sorted(per_worker.items())}
    if server.peer.workers > 1 and len(workers) == server.peer.workers:
        counts = [per_worker.get(pid, 0) for pid in workers]
        r["balance"] = (max(counts) / min(counts)) if min(counts) else float("inf")
    else:
        r["balance"] = None
    log("  cpu-bound: %s balance=%s per_worker=%s" % (brief(r), r["balance"], r["per_worker"]))
    return r


# -- 5. memory against idle connections -------------------------------------------------------


def _idle_capacity():
    """Connections one idle-generator process may hold: its descriptor limit (the hard
    limit may be fixed, e.g. in a container) less some room."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(100, min(hard, 50000) - 512)


class IdleClients:
    """Idle connections held by as many generator processes as their descriptor limit
    requires; ``open(n)`` opens n more and returns (total open, failed)."""

    def __init__(self, port, s):
        self.port = port
        self.s = s
        self.capacity = _idle_capacity()
        self.procs = []  # [Popen, connections it holds, failures it reported]
        self.failed = 0

    def _spawn(self):
        argv = [sys.executable, LOADGEN, "idle", "--port", str(self.port), "--payload", PAYLOAD,
                "--max-seconds", "300", "--step-timeout", "60"]
        if self.s.gen_cpus:
            argv += ["--cpus", ",".join(map(str, self.s.gen_cpus))]
        gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self.procs.append([gen, 0, 0])
        return self.procs[-1]

    def open(self, n):
        while n > 0:
            entry = self.procs[-1] if self.procs and self.procs[-1][1] < self.capacity else self._spawn()
            gen = entry[0]
            k = min(n, self.capacity - entry[1])
            gen.stdin.write("OPEN %d\n" % k)
            gen.stdin.flush()
            line = _read_line(gen.stdout, "OPENED", 120.0)
            if line is None:
                gen.kill()
                raise RuntimeError("idle generator gave no answer: %s" % gen.stderr.read()[-600:])
            held, failed = int(line.split()[1]), int(line.split()[2])
            self.failed += failed - entry[2]
            entry[1:] = [held, failed]
            n -= k
            if failed:
                break
        return sum(e[1] for e in self.procs), self.failed

    def close(self):
        for entry in self.procs:
            gen = entry[0]
            try:
                gen.stdin.close()
            except OSError:
                pass
            try:
                gen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gen.kill()
                gen.wait()


def memory(server, s, cap=None):
    """RSS and PSS of the server (all its processes) with 0..N idle connections per worker;
    each idle connection has had one line answered, so its handler waits in readline."""
    workers = max(1, server.peer.workers)
    clients = IdleClients(server.port, s)
    points = []
    opened = 0
    try:
        for per_worker in s.idle_steps:
            total = per_worker * workers
            if cap is not None:
                total = min(total, cap)
            if points and total <= opened:
                continue
            failed = 0
            if total > opened:
                opened, failed = clients.open(total - opened)
            time.sleep(0.2)  # let freed buffers settle; the handlers are already waiting
            pids = server.pids()
            point = {
                "per_worker": opened / workers,
                "open": opened,
                "failed": failed,
                "rss_kib": procstat.rss_kib(pids),
                "pss_kib": procstat.pss_kib(pids),
                "processes": len(pids),
            }
            if opened:
                point["fds_per_process"] = [procstat.fd_count([p]) for p in pids]
            points.append(point)
            log("  memory: %d open (%d failed): RSS %d KiB, PSS %d KiB" % (
                opened, failed, point["rss_kib"], point["pss_kib"]))
            if failed:
                break
    finally:
        clients.close()
    result = {"points": points}
    if len(points) >= 2 and points[-1]["open"]:
        n = points[-1]["open"]
        result["rss_kib_per_conn"] = (points[-1]["rss_kib"] - points[0]["rss_kib"]) / n
        result["pss_kib_per_conn"] = (points[-1]["pss_kib"] - points[0]["pss_kib"]) / n
        result["max_open"] = n
    return result


# -- 6. large transfer ------------------------------------------------------------------------


def large(server, s):
    """One 100 MiB request body and a 100 MiB response: throughput and peak RSS growth."""
    root = server.pid
    before = {pid: procstat.rss_kib([pid]) for pid in server.pids()}
    for pid in before:
        procstat.reset_hwm(pid)
    peak = {pid: procstat.hwm_kib(pid) for pid in before}
    argv = [sys.executable, LOADGEN, "large", "--port", str(server.port),
            "--big-in", str(s.big_bytes), "--big-out", str(s.big_bytes), "--max-seconds", "120"]
    if s.gen_cpus:
        argv += ["--cpus", ",".join(map(str, s.gen_cpus))]
    gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while gen.poll() is None and time.monotonic() < deadline:
        for pid in server.pids():
            peak[pid] = max(peak.get(pid, 0), procstat.hwm_kib(pid), procstat.rss_kib([pid]))
        time.sleep(0.02)
    if gen.poll() is None:
        gen.kill()
    out, err = gen.communicate()
    for pid in server.pids():
        peak[pid] = max(peak.get(pid, 0), procstat.hwm_kib(pid))
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError("large transfer generator failed: %s" % err[-2000:])
    r = json.loads(lines[-1])
    base_new = before.get(root, 0)
    growth = {pid: peak[pid] - before.get(pid, base_new) for pid in peak}
    r["rss_growth_kib"] = max(growth.values()) if growth else None
    r["mib"] = s.big_bytes >> 20
    log("  large: ok=%s %.1f MiB/s, peak RSS growth %s KiB" % (
        r["ok"], r["mib_per_s"], r["rss_growth_kib"]))
    return r


# -- the generator's own ceiling --------------------------------------------------------------


def ceiling(s):
    """The generator against the fastest server we have (C epoll if a compiler is here)."""
    exe = os.path.join(OUT, "trivial_server")
    src = os.path.join(HERE, "trivial_server.c")
    kind = "C epoll server (bench/trivial_server.c)"
    try:
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
            os.makedirs(OUT, exist_ok=True)
            subprocess.run(["cc", "-O2", "-o", exe, src], check=True, timeout=120,
                           capture_output=True)
        argv = [exe, "300"]
    except (OSError, subprocess.SubprocessError):
        argv = [sys.executable, os.path.join(HERE, "servers", "trivial.py"), "300"]
        kind = "Python epoll server (bench/servers/trivial.py; no C compiler here)"

    def pin():
        if s.server_cpus:
            os.sched_setaffinity(0, s.server_cpus)

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=pin,
                            start_new_session=True)
    try:
        line = _read_line(proc.stdout, "READY", 20.0)
        if line is None:
            raise RuntimeError("trivial server did not start")
        port = int(line.split()[1])
        result = {"server": kind}
        for mode, conc in (("short", 64), ("pingpong", 100)):
            r = loadgen(mode, port, s, conc, cpus=s.gen_cpus, measure_pid=proc.pid)
            log("  ceiling %s c=%d: %s gen_cpu/req=%.1f us" % (
                mode, conc, brief(r), r.get("gen_cpu_per_req_us") or 0))
            result[mode] = r
        return result
    finally:
        proc.kill()
        proc.wait()


# -- the pre-fork engineer's standalone scripts -----------------------------------------------


def _json_line(text, prefix):
    for line in reversed(text.splitlines()):
        if line.startswith(prefix + " "):
            return json.loads(line[len(prefix) + 1:])
    return None


def prefork_extras(s):
    """bench/prefork_balance.py and bench/prefork_cow.py, when they exist: each prints its
    figures and a ``NAME_JSON {...}`` line that goes into the report."""
    out = {}
    scripts = (
        ("balance", "prefork_balance.py", ["--seconds", "1" if s.quick else "2"], "BALANCE_JSON"),
        ("cow", "prefork_cow.py", ["--mib", "50" if s.quick else "200", "--workers", "4"], "COW_JSON"),
    )
    for name, script, args, prefix in scripts:
        path = os.path.join(HERE, script)
        if not os.path.exists(path):
            out[name] = {"error": "pending: bench/%s is not there yet" % script}
            continue
        try:
            r = subprocess.run([sys.executable, path, *args], capture_output=True, text=True,
                               timeout=180, cwd=os.path.dirname(HERE))
            data = _json_line(r.stdout, prefix)
            if r.returncode != 0 or data is None:
                raise RuntimeError("exit %s: %s" % (r.returncode, (r.stderr or r.stdout)[-500:]))
            out[name] = {"data": data, "args": " ".join(args)}
            log("  %s: %s" % (script, [l for l in r.stdout.splitlines() if not l.startswith(prefix)][-3:]))
        except Exception as e:
            log("  %s failed: %s" % (script, e))
            out[name] = {"error": str(e).splitlines()[0][:300] if str(e) else repr(e)}
    return out
