"""Operators see the pool: ``spoon status`` (table, JSON, exit codes) and the Prometheus
endpoint of the supervisor, while a load runs, after a worker is killed and after one is
retired."""

import json
import signal
import threading
import urllib.request

import pytest

from support import children_of, daemons, pid_alive, request, wait_for  # noqa: F401 (fixture)

prometheus_parser = pytest.importorskip("prometheus_client.parser")


class Load:
    """Requests in a loop from a thread until stopped (a running load)."""

    def __init__(self, port):
        self.port = port
        self.done = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                request(("127.0.0.1", self.port), b"ping\n", timeout=5)
                self.done += 1
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(10)


def status(daemons, *extra):
    result = daemons.run("status", "-p", daemons.pid_file, *extra, klass="probe_servers.ProbeSpork")
    return result


def status_json(daemons):
    """The pool's status as ``spoon status --json`` reads it (returncode, dict)."""
    from spoon.daemon import report_status
    import io

    out, err = io.StringIO(), io.StringIO()
    code = report_status(daemons.pid_file, out, err, as_json=True)
    return code, json.loads(out.getvalue())


def scrape(address):
    """{(name, labels...): value} from the supervisor's /metrics."""
    with urllib.request.urlopen("http://%s:%d/metrics" % tuple(address), timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name,) + tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def per_worker(samples, name):
    return {dict(key[1:])["worker"]: v for key, v in samples.items() if key[0] == name}


def pool_settles(daemons, count, condition=lambda s: True):
    def check():
        code, s = status_json(daemons)
        rows = s.get("workers", [])
        if code == 0 and len(rows) == count and all(r["state"] == "serving" for r in rows):
            return s if condition(s) else None
        return None

    return wait_for(check, timeout=20, interval=0.1, what="%d workers serving" % count)


def test_status_and_metrics_follow_load_a_killed_worker_and_a_retirement(daemons):
    daemons.env["SPOON_METRICS"] = "tcp:0:interface=127.0.0.1"
    supervisor, port = daemons.start("-s", "2", klass="probe_servers.ProbeSpork")
    load = Load(port)
    try:
        s = pool_settles(
            daemons, 2, lambda s: all(r["requests_finished"] > 0 for r in s["workers"])
        )
        assert s["supervisor"]["pid"] == supervisor
        first = {r["pid"] for r in s["workers"]}
        assert first == set(children_of(supervisor))
        address = s["supervisor"]["metrics"]

        table = status(daemons)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[1].split()[:8] == [
            "ROLE", "PID", "AGE", "STATE", "CONNS", "REQUESTS", "ERRORS", "RSS"
        ]
        assert lines[2].split()[:2] == ["supervisor", str(supervisor)]
        rows = {line.split()[2]: line.split() for line in lines[3:5]}
        assert set(map(int, rows)) == first
        assert all(row[0] == "worker" and row[4] == "serving" for row in rows.values())

        samples = scrape(address)
        served = per_worker(samples, "spoon_requests_total")
        assert set(served) == {"1", "2"} and all(v > 0 for v in served.values())
        assert per_worker(samples, "spoon_connections_total")["1"] > 0
        assert per_worker(samples, "spoon_received_bytes_total")["1"] >= 5
        assert per_worker(samples, "spoon_worker_resident_memory_bytes")["1"] > 1 << 20
        assert samples[("spoon_workers", ("state", "serving"))] == 2
        assert samples[("spoon_worker_starts_total",)] == 2

        # A worker killed: the replacement shows up, the dead one is gone, its death is
        # counted with its cause.
        victim = min(first)
        daemons_kill(victim)
        s = pool_settles(daemons, 2, lambda s: victim not in {r["pid"] for r in s["workers"]})
        assert s["worker_deaths"]["killed"] == 1
        assert s["recent_deaths"][-1]["pid"] == victim
        assert s["recent_deaths"][-1]["cause"] == "killed"
        samples = wait_for(
            lambda: (lambda m: m if m[("spoon_worker_deaths_total", ("cause", "killed"))] == 1 else None)(
                scrape(address)
            ),
            timeout=5, what="the death in the metrics",
        )
        assert samples[("spoon_worker_starts_total",)] == 3
        assert str(victim) not in {dict(k[1:]).get("pid") for k in samples if k[0] == "spoon_worker_start_time_seconds"}

        # A retirement (as a recycle does): one more worker, then one fewer.
        before = {r["pid"] for r in s["workers"]}
        daemons_signal(supervisor, signal.SIGTTIN)
        pool_settles(daemons, 3)
        daemons_signal(supervisor, signal.SIGTTOU)
        s = pool_settles(daemons, 2, lambda s: s["worker_deaths"]["retired"] == 1)
        assert s["worker_retirements"] == {"scale_down": 1}
        retired = s["recent_deaths"][-1]["pid"]
        assert retired in before and retired not in {r["pid"] for r in s["workers"]}
        samples = wait_for(
            lambda: (lambda m: m if ("spoon_worker_retirements_total", ("reason", "scale_down")) in m else None)(
                scrape(address)
            ),
            timeout=5, what="the retirement in the metrics",
        )
        assert samples[("spoon_worker_deaths_total", ("cause", "retired"))] == 1
    finally:
        load.close()
    assert load.done > 0
    stopped = daemons.run("stop", "-p", daemons.pid_file, klass="probe_servers.ProbeSpork")
    assert stopped.returncode == 0, stopped.stderr
    down = status(daemons)
    assert down.returncode == 2
    code, report = status_json(daemons)
    assert code == 2 and report["health"] == "down"


def daemons_kill(pid):
    import os

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), timeout=10, what="worker %d to die" % pid)


def daemons_signal(pid, signum):
    import os

    os.kill(pid, signum)


def test_status_of_a_single_process_server_says_running(daemons):
    supervisor, port = daemons.start()
    result = daemons.run("status", "-p", daemons.pid_file)
    assert result.returncode == 0
    assert result.stdout.startswith("running: pid %d" % supervisor)


FAULTY = """
import os, socket, sys
import spoon.server

class Handler(spoon.server.Gulp):
    timeout = 0.3

    def handle(self):
        word = self.rfile.readline().strip()
        if word == b"boom":
            raise RuntimeError("a handler bug")
        self.wfile.write(b"%d\\n" % os.getpid())

class Server(spoon.server.TCPSpoon):
    handler_klass = Handler

from spoon.pool.supervisor import Supervisor

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
Supervisor(server, workers=1).run()  # a pool of one worker
"""


def test_errors_resets_timeouts_and_bytes_are_counted_and_pushed_to_statsd(server_process, tmp_path):
    import socket
    import struct

    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 0))
    statsd.settimeout(10)
    status_file = str(tmp_path / "pool.status")
    proc = server_process(FAULTY, env={
        "SPOON_METRICS": "tcp:0:interface=127.0.0.1",
        "SPOON_STATSD": "127.0.0.1:%d" % statsd.getsockname()[1],
        "SPOON_STATUS_FILE": status_file,
    })
    from spoon.metrics import read_status

    address = wait_for(
        lambda: (read_status(status_file) or {}).get("supervisor", {}).get("metrics"),
        timeout=10, what="the status file",
    )
    worker = children_of(proc.pid)
    assert request(("127.0.0.1", proc.port), b"hello\n").strip().isdigit()
    request(("127.0.0.1", proc.port), b"boom\n")  # the handler raises: an error
    request(("127.0.0.1", proc.port), b"no end of line", half_close=False)  # times out
    rst = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    rst.sendall(b"half a line")
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()  # a reset while the handler waits for the rest

    def counted():
        m = scrape(address)
        wanted = {
            "spoon_request_errors_total": 1,
            "spoon_peer_timeouts_total": 1,
            "spoon_peer_resets_total": 1,
            "spoon_connections_total": 4,
            "spoon_requests_total": 4,
        }
        return m if all(per_worker(m, k).get("1") == v for k, v in wanted.items()) else None

    samples = wait_for(counted, timeout=10, what="the counters in the metrics")
    assert per_worker(samples, "spoon_received_bytes_total")["1"] == len(
        b"hello\n" b"boom\n" b"no end of line" b"half a line"
    )
    assert per_worker(samples, "spoon_sent_bytes_total")["1"] == len(b"%d\n" % worker[0])
    assert per_worker(samples, "spoon_connections_open")["1"] == 0

    pushed = b""
    while b"spoon.errors:1|c" not in pushed:
        pushed += statsd.recv(65536) + b"\n"
    assert b"spoon.workers_serving:1|g" in pushed
    statsd.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert read_status(status_file) is None  # removed when the pool stops


def test_status_reads_a_twistd_pool_through_twistds_pid_file(tmp_path):
    import os
    import subprocess
    import sys

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    pid_file = str(tmp_path / "twistd.pid")
    env = dict(os.environ)  # twistd passes its pid file's status path to the pool itself
    subprocess.run(
        [twistd, "--pidfile", pid_file, "--logfile", str(tmp_path / "twistd.log"), "spoon",
         "--server", "spoon.examples.EchoServer", "--port", "0", "--interface", "127.0.0.1",
         "--spork", "2"],
        env=env, cwd=str(tmp_path), timeout=30, check=True, stdin=subprocess.DEVNULL,
    )
    pids = []
    try:
        twistd_pid = wait_for(lambda: open(pid_file).read().strip(), timeout=15, what="twistd.pid")
        pids.append(int(twistd_pid))

        def healthy():
            result = subprocess.run(
                [sys.executable, "-m", "spoon.daemon", "spoon.examples.EchoServer", "status",
                 "-p", pid_file], capture_output=True, text=True, timeout=30,
            )
            return result if result.returncode == 0 and "worker 2" in result.stdout else None

        result = wait_for(healthy, timeout=20, interval=0.2, what="a healthy twistd pool")
        [supervisor] = children_of(int(twistd_pid))
        pids.append(supervisor)
        pids.extend(children_of(supervisor))
        assert "supervisor  %d" % supervisor in result.stdout
        assert len(children_of(supervisor)) == 2
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="twistd gone")


RECYCLING = """
import os, sys
sys.path[:0] = [%r]
import spoon.server

class Pid(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%%d\\n" %% os.getpid())

class Recycling(spoon.server.TCPSpork):
    handler_klass = Pid
    prefork = 2
    max_requests = 20

server = Recycling(("127.0.0.1", 0))
print("READY", server.server_address[1], os.getpid(), flush=True)
server.serve_forever()
"""


def test_a_recycle_shows_in_the_metrics_and_the_status(server_process, tmp_path):
    from support import ROOT
    from spoon.metrics import read_status

    status_file = str(tmp_path / "pool.status")
    proc = server_process(RECYCLING % ROOT, env={
        "SPOON_METRICS": "tcp:0:interface=127.0.0.1", "SPOON_STATUS_FILE": status_file,
    })
    address = wait_for(
        lambda: (read_status(status_file) or {}).get("supervisor", {}).get("metrics"),
        timeout=10, what="the status file",
    )
    first = set(children_of(proc.pid))
    recycles_of = lambda m: m.get(("spoon_worker_recycles_total", ("reason", "worker_request")), 0)

    def first_workers_recycled():
        # 20 requests a worker before it asks to be replaced; asked until both first
        # workers have been (one client's requests may all go to the worker that just
        # answered, so no fixed number is enough for both).
        for _ in range(10):
            request(("127.0.0.1", proc.port), b"x\n")
        proc.lines_so_far()  # the pool logs every recycle: keep its output pipe from filling
        return recycles_of(scrape(address)) >= 2 and not (set(children_of(proc.pid)) & first)

    wait_for(first_workers_recycled, timeout=30, what="both first workers recycled")

    def settled():
        m = scrape(address)
        status = read_status(status_file) or {}
        now = {w["pid"] for w in status.get("workers", [])}
        return recycles_of(m) >= 2 and len(now) == 2 and not (now & first) and (m, status)

    samples, status = wait_for(settled, timeout=30, what="recycled workers in the metrics")
    assert int(request(("127.0.0.1", proc.port), b"x\n")) not in first  # successors serve
    assert all(not pid_alive(p) for p in first)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
