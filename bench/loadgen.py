"""The load generator: many non-blocking client connections per process, epoll-driven.

Why not an existing tool: wrk and friends speak HTTP, and the scenarios here are raw line
protocols (a line, a half-close, read to EOF).  One generator process drives all of its
connections from one epoll loop, so it costs a few microseconds of CPU per request; more
processes (``--procs``) use more cores.  Every run is bounded in time and in connections,
targets loopback only, and stops by itself.

Modes (``python bench/loadgen.py MODE --port P ...``, prints one JSON object):

- ``short``: ``--conc`` clients, each in a loop: connect, send the line, half-close
  (SHUT_WR), read to EOF.
- ``pingpong``: ``--conc`` persistent connections, each sends a line and waits for the
  reply line before sending the next.  Reports the fraction of connections served at all.
- ``slowloris``: ``--conc`` connections that each send one byte per second.
- ``idle``: reads commands on stdin: ``OPEN n`` opens n more connections (each sends one
  line, waits for its reply, then stays open and idle) and answers ``OPENED total failed``;
  ``CLOSE`` or EOF ends.
- ``large``: one connection sends ``BIG in out`` + ``in`` bytes of body, half-closes and
  reads the ``out``-byte response to EOF.

Counting happens in a window (``--warmup`` seconds after the start, ``--duration`` long);
with ``--measure-pid`` the server's CPU time (its whole process tree, from /proc) is
sampled at the window's edges, so CPU per request covers exactly the counted requests.
"""

import argparse
import array
import errno
import json
import os
import pickle
import resource
import select
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import procstat  # noqa: E402

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_CONNECTIONS = 50000
MAX_SECONDS = 600
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP


def raise_nofile(want):
    """Raise RLIMIT_NOFILE towards ``want`` (as far as the hard limit, or beyond it when
    privileged); return the soft limit obtained."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def target(host, port):
    """The (family, sockaddr) of a loopback target; anything else is refused."""
    if host not in LOOPBACK:
        raise SystemExit("loadgen: only loopback targets (127.0.0.1, ::1), not %r" % host)
    if host == "localhost":
        host = "127.0.0.1"
    if ":" in host:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


class Window:
    """The counting window, in time.monotonic() seconds, shared by all processes."""

    def __init__(self, start, end, hard_end):
        self.start = start
        self.end = end
        self.hard_end = hard_end


def _pin(cpus):
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass


# -- workers (one per process) ----------------------------------------------------------------


def short_worker(cfg, win, conc, out):
    """Closed loop of ``conc`` clients: connect, send, SHUT_WR, read to EOF, again."""
    family, addr = cfg.family, cfg.addr
    payload = cfg.payload
    expect = cfg.expect
    tally = {} if cfg.tally else None
    ep = select.epoll()
    conns = {}
    lat = array.array("d")
    now = time.monotonic
    stats = {"requests": 0, "errors": 0, "bad": 0, "retries": 0}
    state_connecting, state_reading = 1, 2
    cpu0 = cpu1 = None
    backlog = [0]  # launches postponed after an error (e.g. no free local port)

    spread = cfg.spread
    launched = [0]

    def launch():
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        if spread:
            launched[0] += 1
            _spread_source(s, cfg, launched[0])
        t0 = now()
        err = s.connect_ex(addr)
        fd = s.fileno()
        if err == 0:
            try:
                s.send(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                s.close()
                stats["errors"] += 1
                backlog[0] += 1
                return
            conns[fd] = [s, t0, state_reading, b""]
            ep.register(fd, EPOLLIN)
        elif err == errno.EINPROGRESS:
            conns[fd] = [s, t0, state_connecting, b""]
            ep.register(fd, EPOLLOUT)
        else:
            s.close()
            stats["retries"] += 1
            backlog[0] += 1

    for _ in range(conc):
        launch()
    while True:
        t = now()
        if cpu0 is None and t >= win.start:
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if t >= win.end:
            break
        timeout = 0.001 if backlog[0] else min(0.05, win.end - t)
        if backlog[0]:
            n, backlog[0] = backlog[0], 0
            for _ in range(n):
                launch()
        for fd, ev in ep.poll(timeout):
            c = conns.get(fd)
            if c is None:
                continue
            s = c[0]
            if c[2] == state_connecting:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    ep.unregister(fd)
                    del conns[fd]
                    s.close()
                    stats["errors"] += 1
                    launch()
                    continue
                try:
                    s.send(payload)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    ep.unregister(fd)
                    del conns[fd]
                    s.close()
                    stats["errors"] += 1
                    launch()
                    continue
                c[2] = state_reading
                ep.modify(fd, EPOLLIN)
                continue
            done = False
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                except OSError:
                    data = None
                    stats["errors"] += 1
                    done = True
                    break
                if not data:
                    done = True
                    break
                c[3] += data
            if not done:
                continue
            ep.unregister(fd)
            del conns[fd]
            s.close()
            t1 = now()
            if data is not None and win.start <= t1 < win.end:
                stats["requests"] += 1
                lat.append(t1 - c[1])
                reply = c[3]
                if expect is not None and reply != expect:
                    stats["bad"] += 1
                if tally is not None:
                    key = reply.decode("ascii", "replace").strip()
                    tally[key] = tally.get(key, 0) + 1
            launch()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in conns.values():
        c[0].close()
    cpu0 = cpu0 or cpu1
    stats["gen_cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stats["gen_sys"] = cpu1.ru_stime - cpu0.ru_stime
    stats["lat"] = lat.tobytes()
    stats["tally"] = tally
    out(stats)


def pingpong_worker(cfg, win, conc, out):
    """``conc`` persistent connections, each in a loop: send a line, wait for the reply."""
    family, addr = cfg.family, cfg.addr
    payload = cfg.payload
    expect = cfg.expect
    ep = select.epoll()
    conns = {}
    lat = array.array("d")
    now = time.monotonic
    stats = {"requests": 0, "errors": 0, "bad": 0, "closed": 0, "connected": 0}
    served = set()
    cpu0 = None
    for i in range(conc):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(addr)
        fd = s.fileno()
        if err not in (0, errno.EINPROGRESS):
            s.close()
            stats["errors"] += 1
            continue
        # [socket, t_sent, connected, reply buffer]
        conns[fd] = [s, 0.0, False, b""]
        ep.register(fd, EPOLLOUT)
    while True:
        t = now()
        if cpu0 is None and t >= win.start:
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if t >= win.end:
            break
        for fd, ev in ep.poll(min(0.05, win.end - t)):
            c = conns.get(fd)
            if c is None:
                continue
            s = c[0]
            if not c[2]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    ep.unregister(fd)
                    del conns[fd]
                    s.close()
                    stats["errors"] += 1
                    continue
                c[2] = True
                stats["connected"] += 1
                ep.modify(fd, EPOLLIN)
                c[1] = now()
                s.send(payload)
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del conns[fd]
                s.close()
                stats["closed"] += 1
                continue
            buf = c[3] + data
            if not buf.endswith(b"\n"):
                c[3] = buf
                continue
            c[3] = b""
            t1 = now()
            if win.start <= t1 < win.end:
                stats["requests"] += 1
                lat.append(t1 - c[1])
                served.add(fd)
                if expect is not None and buf != expect:
                    stats["bad"] += 1
            c[1] = t1
            try:
                s.send(payload)
            except OSError:
                ep.unregister(fd)
                del conns[fd]
                s.close()
                stats["closed"] += 1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in conns.values():
        c[0].close()
    stats["served"] = len(served)
    cpu0 = cpu0 or cpu1
    stats["gen_cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stats["gen_sys"] = cpu1.ru_stime - cpu0.ru_stime
    stats["lat"] = lat.tobytes()
    out(stats)


def slowloris_worker(cfg, win, conc, out):
    """``conc`` connections that each send one byte per second (never a whole line)."""
    family, addr = cfg.family, cfg.addr
    ep = select.epoll()
    conns = {}
    stats = {"errors": 0, "closed": 0, "bytes": 0}
    for i in range(conc):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            stats["errors"] += 1
            continue
        conns[s.fileno()] = s
        ep.register(s.fileno(), EPOLLIN | select.EPOLLRDHUP)
    fds = list(conns)
    now = time.monotonic
    # Report on stderr once every connection is established, so that the fast clients
    # start against a server that already holds the slow ones.
    writable = select.epoll()
    for fd in fds:
        writable.register(fd, EPOLLOUT)
    pending = set(fds)
    limit = now() + 10.0
    while pending and now() < limit:
        for fd, ev in writable.poll(0.05):
            pending.discard(fd)
            writable.unregister(fd)
    writable.close()
    sys.stderr.write("SLOWLORIS-READY %d\n" % (len(fds) - len(pending)))
    sys.stderr.flush()
    t_begin = now()
    # Connection i sends at t_begin + i/n + k seconds: spread evenly over each second.
    schedule = [(t_begin + i / max(1, len(fds)), fd) for i, fd in enumerate(fds)]
    k = 0
    i = 0
    while True:
        t = now()
        if t >= win.end:
            break
        while i < len(schedule) and schedule[i][0] + k <= t:
            fd = schedule[i][1]
            s = conns.get(fd)
            if s is not None:
                try:
                    stats["bytes"] += s.send(b"a")
                except OSError:
                    pass
            i += 1
        if i >= len(schedule):
            i = 0
            k += 1
        nxt = schedule[i][0] + k if schedule else win.end
        for fd, ev in ep.poll(max(0.0, min(nxt, win.end) - now())):
            s = conns.pop(fd, None)
            if s is not None:
                ep.unregister(fd)
                s.close()
                stats["closed"] += 1
    stats["open_at_end"] = len(conns)
    for s in conns.values():
        s.close()
    out(stats)


# -- the coordinator --------------------------------------------------------------------------

WORKERS = {"short": short_worker, "pingpong": pingpong_worker, "slowloris": slowloris_worker}


def _percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def run_closed_loop(cfg):
    """Fork ``cfg.procs`` workers sharing ``cfg.conc`` connections; merge their reports."""
    t0 = time.monotonic() + 0.05
    win = Window(t0 + cfg.warmup, t0 + cfg.warmup + cfg.duration, 0)
    win.hard_end = win.end + 10.0
    worker = WORKERS[cfg.mode]
    procs = max(1, min(cfg.procs, cfg.conc))
    children = []
    for w in range(procs):
        share = cfg.conc // procs + (1 if w < cfg.conc % procs else 0)
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 1
            try:
                if cfg.cpus:
                    _pin([cfg.cpus[w % len(cfg.cpus)]])
                signal.alarm(int(win.hard_end - time.monotonic()) + 2)

                def out(stats, _w=wfd):
                    data = pickle.dumps(stats)
                    with os.fdopen(_w, "wb") as f:
                        f.write(data)

                worker(cfg, win, share, out)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(wfd)
        children.append((pid, r))

    def stop(signum, frame):
        for pid, _ in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server_cpu = None
    if cfg.measure_pid:
        time.sleep(max(0.0, win.start - time.monotonic()))
        c0 = procstat.cpu_seconds(procstat.tree(cfg.measure_pid))
        time.sleep(max(0.0, win.end - time.monotonic()))
        c1 = procstat.cpu_seconds(procstat.tree(cfg.measure_pid))
        server_cpu = c1 - c0
    reports = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        if data:
            reports.append(pickle.loads(data))
    return merge(cfg, reports, server_cpu)


def merge(cfg, reports, server_cpu):
    result = {"mode": cfg.mode, "conc": cfg.conc, "procs": cfg.procs, "window": cfg.duration}
    result["workers_reported"] = len(reports)
    if cfg.mode == "slowloris":
        for key in ("errors", "closed", "bytes", "open_at_end"):
            result[key] = sum(r.get(key, 0) for r in reports)
        return result
    lat = array.array("d")
    for r in reports:
        lat.frombytes(r.pop("lat"))
    lat = sorted(lat)
    keys = ("requests", "errors", "bad", "retries", "closed", "connected", "served", "gen_cpu",
            "gen_sys")
    for key in keys:
        if any(key in r for r in reports):
            result[key] = sum(r.get(key, 0) for r in reports)
    n = result.get("requests", 0)
    result["rps"] = n / cfg.duration
    for name, q in (("p50_ms", 0.50), ("p99_ms", 0.99), ("max_ms", 1.0)):
        v = _percentile(lat, q)
        result[name] = None if v is None else v * 1000.0
    if n:
        result["gen_cpu_per_req_us"] = result["gen_cpu"] / n * 1e6
    if result.get("gen_cpu"):
        result["gen_kernel_share"] = result.get("gen_sys", 0) / result["gen_cpu"]
    if server_cpu is not None:
        result["server_cpu_s"] = server_cpu
        result["server_cpu_per_req_us"] = server_cpu / n * 1e6 if n else None
    if cfg.mode == "pingpong":
        result["served_fraction"] = result.get("served", 0) / cfg.conc
    if cfg.tally:
        tally = {}
        for r in reports:
            for k, v in (r.get("tally") or {}).items():
                tally[k] = tally.get(k, 0) + v
        result["tally"] = tally
    return result


# -- idle and large (single process, simple) --------------------------------------------------


def run_idle(cfg, commands=sys.stdin, answer=sys.stdout):
    """Open idle connections in steps, on command; each proves it is being served (one
    line and its reply) and then stays silent, its handler waiting in readline."""
    ep = select.epoll()
    idle = []
    failed = 0
    deadline = time.monotonic() + cfg.max_seconds
    signal.alarm(int(cfg.max_seconds) + 5)
    for line in commands:
        words = line.split()
        if not words or words[0] != "OPEN":
            break
        want = min(int(words[1]), MAX_CONNECTIONS - len(idle))
        pending = {}
        for _ in range(want):
            s = socket.socket(cfg.family, socket.SOCK_STREAM)
            s.setblocking(False)
            _spread_source(s, cfg, len(idle) + len(pending))
            err = s.connect_ex(cfg.addr)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                failed += 1
                continue
            pending[s.fileno()] = [s, False, b""]
            ep.register(s.fileno(), EPOLLOUT)
            if len(pending) >= 512:
                failed += _drive(ep, pending, idle, cfg, deadline, keep=256)
        failed += _drive(ep, pending, idle, cfg, min(deadline, time.monotonic() + cfg.step_timeout))
        answer.write("OPENED %d %d\n" % (len(idle), failed))
        answer.flush()
    for s in idle:
        s.close()


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _spread_source(sock, cfg, i):
    """Use source addresses 127.0.0.1-4 in turn (IPv4 only): each has its own range of
    ephemeral ports, so tens of thousands of connections to one port do not make the
    kernel's port search crawl."""
    if cfg.family != socket.AF_INET:
        return
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind(("127.0.0.%d" % (1 + i % 4), 0))
    except OSError:
        pass


def _drive(ep, pending, idle, cfg, deadline, keep=0):
    """Advance ``pending`` connections (connect, send a line, read the reply) until at
    most ``keep`` remain or the deadline passes; return how many failed."""
    failed = 0
    while len(pending) > keep and time.monotonic() < deadline:
        for fd, ev in ep.poll(0.05):
            c = pending.get(fd)
            if c is None:
                continue
            s = c[0]
            if not c[1]:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    ep.unregister(fd)
                    del pending[fd]
                    s.close()
                    failed += 1
                    continue
                c[1] = True
                s.send(cfg.payload)
                ep.modify(fd, EPOLLIN)
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del pending[fd]
                s.close()
                failed += 1
                continue
            c[2] += data
            if c[2].endswith(b"\n"):
                ep.unregister(fd)
                del pending[fd]
                idle.append(s)
    if keep == 0:
        for fd, c in list(pending.items()):
            ep.unregister(fd)
            c[0].close()
            failed += 1
        pending.clear()
    return failed


def run_large(cfg):
    """One transfer of ``cfg.big_in`` bytes up and ``cfg.big_out`` bytes down."""
    signal.alarm(int(cfg.max_seconds) + 5)
    s = socket.socket(cfg.family, socket.SOCK_STREAM)
    s.settimeout(cfg.op_timeout)
    s.connect(cfg.addr)
    got = [0, None]

    def reader():
        try:
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got[0] += len(data)
        except OSError as e:
            got[1] = repr(e)

    cpu0 = time.process_time()
    t0 = time.monotonic()
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    error = None
    try:
        s.sendall(b"BIG %d %d\n" % (cfg.big_in, cfg.big_out))
        block = memoryview(b"x" * (1 << 20))
        left = cfg.big_in
        while left > 0:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
    except OSError as e:
        error = repr(e)
    th.join(cfg.max_seconds)
    elapsed = time.monotonic() - t0
    s.close()
    ok = error is None and got[1] is None and got[0] == cfg.big_out
    if not ok and error is None and got[1] is None:
        error = "the server closed after %d of %d response bytes" % (got[0], cfg.big_out)
    return {
        "mode": "large",
        "bytes_in": cfg.big_in,
        "bytes_out": got[0],
        "ok": ok,
        "error": error or got[1],
        "seconds": elapsed,
        "mib_per_s": (cfg.big_in + got[0]) / elapsed / (1 << 20),
        "gen_cpu": time.process_time() - cpu0,
    }


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["short", "pingpong", "slowloris", "idle", "large"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conc", type=int, default=8, help="concurrent connections")
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--cpus", default="", help="comma-separated CPUs to pin processes to")
    p.add_argument("--duration", type=float, default=2.0, help="counting window, seconds")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--payload", default="Hello World FROM the Bench\n")
    p.add_argument("--expect", default=None, help="expected reply (default: payload lower-cased)")
    p.add_argument("--no-expect", action="store_true", help="do not check replies")
    p.add_argument("--tally", action="store_true", help="count distinct replies")
    p.add_argument("--spread", action="store_true",
                   help="short mode: rotate source addresses 127.0.0.1-4")
    p.add_argument("--measure-pid", type=int, default=0, help="server pid: its tree's CPU")
    p.add_argument("--big-in", type=int, default=100 << 20)
    p.add_argument("--big-out", type=int, default=100 << 20)
    p.add_argument("--op-timeout", type=float, default=30.0)
    p.add_argument("--step-timeout", type=float, default=60.0)
    p.add_argument("--max-seconds", type=float, default=300.0)
    cfg = p.parse_args(argv)
    cfg.family, cfg.addr = target(cfg.host, cfg.port)
    cfg.payload = cfg.payload.encode()
    if cfg.no_expect or cfg.tally:
        cfg.expect = None
    else:
        cfg.expect = cfg.expect.encode() if cfg.expect is not None else cfg.payload.lower()
    cfg.cpus = [int(c) for c in cfg.cpus.split(",") if c.strip()]
    if cfg.conc > MAX_CONNECTIONS:
        p.error("at most %d connections" % MAX_CONNECTIONS)
    if cfg.warmup + cfg.duration > MAX_SECONDS or cfg.max_seconds > MAX_SECONDS:
        p.error("at most %d seconds" % MAX_SECONDS)
    return cfg


def main(argv=None):
    cfg = parse(argv)
    raise_nofile(min(MAX_CONNECTIONS, cfg.conc) + 4096 if cfg.mode != "idle" else MAX_CONNECTIONS + 1024)
    if cfg.cpus:
        _pin(cfg.cpus)
    if cfg.mode == "idle":
        run_idle(cfg)
        return
    if cfg.mode == "large":
        result = run_large(cfg)
    else:
        result = run_closed_loop(cfg)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
