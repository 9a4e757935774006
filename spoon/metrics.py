"""What the supervisor publishes about its pool: a status file for ``spoon status``,
Prometheus metrics (``--metrics``) and a statsd push (``--statsd``).

All three are fed from one snapshot (:meth:`spoon.pool.stats.PoolStats.snapshot`) taken by
the supervisor's loop once a second; the Prometheus endpoint is served by a thread of the
supervisor process (no worker is involved, so a stuck worker cannot hide the metrics) and
reads only the last snapshot, never the loop's live state.

``prometheus_client`` is an optional extra (``pip install spoon[metrics]``): without it
``--metrics`` fails at start with a message saying so.

Metric names (each per ``worker`` number unless said otherwise)::

    spoon_workers{state}                       workers by state (serving, booting, ...)
    spoon_workers_wanted                       the pool's target size
    spoon_connections_open{worker}             open connections
    spoon_connections_total{worker}            accepted connections
    spoon_requests_started_total{worker}       handler runs started
    spoon_requests_total{worker}               handler runs finished
    spoon_request_errors_total{worker}         handler errors (bugs, with a traceback)
    spoon_peer_resets_total{worker}            clients that reset or went away
    spoon_peer_timeouts_total{worker}          clients that timed out
    spoon_received_bytes_total{worker}         bytes read from clients
    spoon_sent_bytes_total{worker}             bytes written to clients
    spoon_worker_resident_memory_bytes{worker} RSS
    spoon_worker_heartbeat_age_seconds{worker} seconds since the last heartbeat
    spoon_worker_config_generation{worker}     configuration reloads the worker has seen
    spoon_worker_start_time_seconds{worker,pid}  when the worker started (Unix time)
    spoon_worker_starts_total                  workers forked
    spoon_worker_deaths_total{cause}           workers ended, by cause
    spoon_worker_retirements_total{reason}     workers asked to stop, by reason
    spoon_worker_recycles_total{reason}        workers replaced for age/requests/memory
"""

import json
import os
import socket

from spoon.net import format_address, parse_socket_endpoint

__all__ = [
    "PoolObserver",
    "settings_from_environment",
    "status_path_for",
    "read_status",
    "write_status",
    "parse_statsd_address",
    "MetricsUnavailable",
]

#: Seconds between two publications (status file, statsd push).
PUBLISH_INTERVAL = 1.0

#: Suffix of the status file beside a pid file.
STATUS_SUFFIX = ".status"

#: Per-worker series: snapshot row key, metric name (without _total), kind, help; one a
#: line, fields separated by " | ".
_WORKER_SERIES_TABLE = """
connections_open | spoon_connections_open | gauge | Open connections.
connections_total | spoon_connections | counter | Accepted connections.
requests_started | spoon_requests_started | counter | Handler runs started.
requests_finished | spoon_requests | counter | Handler runs finished.
errors | spoon_request_errors | counter | Handler errors (server bugs).
peer_resets | spoon_peer_resets | counter | Clients that reset or went away.
timeouts | spoon_peer_timeouts | counter | Clients that timed out.
bytes_in | spoon_received_bytes | counter | Bytes read from clients.
bytes_out | spoon_sent_bytes | counter | Bytes written to clients.
rss_bytes | spoon_worker_resident_memory_bytes | gauge | Resident memory.
heartbeat_age | spoon_worker_heartbeat_age_seconds | gauge | Seconds since the last heartbeat.
generation | spoon_worker_config_generation | gauge | Configuration reloads seen.
"""
# (key, name, help, kind) tuples, as the collector reads them.
_WORKER_SERIES = tuple(
    (key, name, text, kind)
    for key, name, kind, text in (
        [field.strip() for field in line.split(" | ")]
        for line in _WORKER_SERIES_TABLE.strip().splitlines()
    )
)


class MetricsUnavailable(RuntimeError):
    """``--metrics`` was asked for but prometheus_client is not installed."""


def status_path_for(pid_file):
    """Where the supervisor holding ``pid_file`` writes its status."""
    return pid_file + STATUS_SUFFIX


def settings_from_environment(environ=None):
    """``(metrics endpoint, statsd address, status file)`` from ``SPOON_METRICS``,
    ``SPOON_STATSD`` and ``SPOON_STATUS_FILE`` (the configuration table's variables), each
    None when unset; the status file defaults to the one beside the pid file this process
    holds."""
    from spoon.pidfile import held_pidfiles

    environ = os.environ if environ is None else environ
    status = environ.get("SPOON_STATUS_FILE") or None
    if status is None:
        held = held_pidfiles()
        status = status_path_for(held[0]) if held else None
    return environ.get("SPOON_METRICS") or None, environ.get("SPOON_STATSD") or None, status


def parse_statsd_address(text):
    """``(host, port)`` from "HOST:PORT" or "[V6HOST]:PORT"; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError("statsd address must be HOST:PORT, not %r" % text)
    return host.strip("[]"), int(port)


def write_status(path, snapshot):
    """Replace ``path`` with ``snapshot`` as JSON (readers see the old or the new one)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(snapshot, f, sort_keys=True)
    os.replace(tmp, path)


def read_status(path):
    """The snapshot in ``path`` (a dict), or None when there is none or it is unreadable."""
    try:
        with open(path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


class _Collector:
    """A prometheus_client collector over the last snapshot the loop published."""

    def __init__(self, observer):
        self.observer = observer

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.observer.latest
        if snap is None:
            return
        rows = snap["workers"]
        states = GaugeMetricFamily("spoon_workers", "Workers by state.", labels=["state"])
        counts = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        for state in ("serving", "booting", "late", "retiring", "killed"):
            states.add_metric([state], counts.get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "spoon_workers_wanted", "The pool's target size.",
            value=snap["supervisor"]["workers_wanted"],
        )
        for key, name, text, kind in _WORKER_SERIES:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=["worker"]
            )
            for row in rows:
                if row.get(key) is not None:
                    family.add_metric([str(row["worker"])], row[key])
            yield family
        started = GaugeMetricFamily(
            "spoon_worker_start_time_seconds", "When the worker started (Unix time).",
            labels=["worker", "pid"],
        )
        now = snap["supervisor"]["written_at"]
        for row in rows:
            started.add_metric([str(row["worker"]), str(row["pid"])], now - row["age"])
        yield started
        yield CounterMetricFamily(
            "spoon_worker_starts", "Workers forked.", value=snap["worker_starts"]
        )
        for key, name, label, text in (
            ("worker_deaths", "spoon_worker_deaths", "cause", "Workers ended, by cause."),
            ("worker_retirements", "spoon_worker_retirements", "reason", "Workers asked to stop."),
            ("worker_recycles", "spoon_worker_recycles", "reason", "Workers recycled."),
        ):
            family = CounterMetricFamily(name, text, labels=[label])
            for value, count in sorted(snap[key].items()):
                family.add_metric([value], count)
            yield family


class _Statsd:
    """Pushes the pool's totals (deltas as counters) and sizes (gauges) to statsd."""

    def __init__(self, address, prefix="spoon"):
        host, port = parse_statsd_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address = (host, port)
        self.prefix = prefix
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.previous = {}

    def push(self, snap):
        lines = []
        totals = dict(snap["totals"])
        totals["worker_starts"] = snap["worker_starts"]
        totals["worker_deaths"] = sum(snap["worker_deaths"].values())
        for name, value in sorted(totals.items()):
            if name in ("connections_open", "generation"):
                continue
            delta = value - self.previous.get(name, 0)
            self.previous[name] = value
            if delta > 0:
                lines.append("%s.%s:%d|c" % (self.prefix, name, delta))
        serving = sum(1 for row in snap["workers"] if row["state"] == "serving")
        lines.append("%s.workers:%d|g" % (self.prefix, len(snap["workers"])))
        lines.append("%s.workers_serving:%d|g" % (self.prefix, serving))
        lines.append("%s.connections_open:%d|g" % (self.prefix, totals["connections_open"]))
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            pass  # statsd is best effort: a full buffer or no listener loses one push

    def close(self):
        self.sock.close()


class PoolObserver:
    """The supervisor's publications: call :meth:`publish` with a snapshot (at most once
    per :data:`PUBLISH_INTERVAL`), :meth:`close_inherited` in a forked worker,
    :meth:`close` when the pool stops."""

    def __init__(self, metrics=None, statsd=None, status_file=None, log=None):
        self.latest = None
        self.status_file = status_file
        self.log = log
        self.http = None
        self.statsd = _Statsd(statsd) if statsd else None
        if metrics:
            self._serve_metrics(metrics)

    def _serve_metrics(self, endpoint):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise MetricsUnavailable(
                "--metrics needs prometheus_client: pip install 'spoon[metrics]'"
            ) from None
        spec = parse_socket_endpoint(endpoint)
        if spec is None or spec.kind != "tcp":
            raise ValueError("--metrics needs a tcp: endpoint, not %r" % endpoint)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        self.http, _ = start_http_server(spec.port, addr=spec.host, registry=registry)
        if self.log is not None:
            self.log.info("Metrics on http://%s/metrics", format_address(self.http.server_address))

    @property
    def metrics_address(self):
        return self.http.server_address[:2] if self.http is not None else None

    def publish(self, snapshot):
        address = self.metrics_address
        snapshot["supervisor"]["metrics"] = list(address) if address else None
        self.latest = snapshot
        if self.status_file:
            try:
                write_status(self.status_file, snapshot)
            except OSError as e:
                if self.log is not None:
                    self.log.warning("Cannot write the status file %s: %s", self.status_file, e)
                self.status_file = None
        if self.statsd is not None:
            self.statsd.push(snapshot)

    def close_inherited(self):
        """In a forked worker: let go of the supervisor's sockets (the worker must not
        keep the metrics port open)."""
        if self.http is not None:
            self.http.socket.close()
        if self.statsd is not None:
            self.statsd.close()

    def close(self):
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        if self.statsd is not None:
            self.statsd.close()
            self.statsd = None
        if self.status_file:
            try:
                os.unlink(self.status_file)
            except OSError:
                pass

