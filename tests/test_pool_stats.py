"""The counters' path from a worker to the supervisor, and how the supervisor judges a
pool's health from them."""

import os
import signal
import time

from spoon.daemon import DEGRADED, DOWN, HEALTHY, pool_health
from spoon.pool.stats import COUNTER_FIELDS, CounterBlock, PoolStats, WorkerCounters
from spoon.pool.supervisor import WorkerRecord


def test_a_forked_worker_publishes_counters_the_supervisor_reads_without_a_pipe():
    block = CounterBlock()
    assert block.read() is None  # nothing published yet
    pid = os.fork()
    if pid == 0:
        counters = WorkerCounters()
        counters.requests_finished = 7
        counters.bytes_in = 1 << 40
        block.publish(counters, now=1234.5)
        os._exit(0)
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    record = block.read()
    assert record["requests_finished"] == 7
    assert record["bytes_in"] == 1 << 40
    assert record["pid"] == pid
    assert record["published_at"] == 1234.5
    assert record["rss_bytes"] > 0
    block.close()


def test_reset_keeps_the_configuration_generation():
    counters = WorkerCounters()
    counters.requests_started = 3
    counters.generation = 2
    counters.reset()
    assert counters.requests_started == 0 and counters.generation == 2


def record(pid, number, ready=True, retiring=False, killed=False):
    w = WorkerRecord(pid, None, 0.0, number)
    w.ready, w.retiring, w.killed = ready, retiring, killed
    return w


def test_each_death_is_counted_with_its_cause_and_its_requests_stay_in_the_totals():
    now = [100.0]
    stats = PoolStats(clock=lambda: now[0])
    cases = [
        (record(11, 1), 9 << 8, False, "crashed"),  # exit code 9 while serving
        (record(12, 1), signal.SIGKILL, False, "killed"),
        (record(13, 1, ready=False), 1 << 8, False, "boot_failure"),
        (record(14, 1, killed=True), signal.SIGKILL, False, "timeout"),
        (record(15, 1, retiring=True), 0, False, "retired"),
        (record(16, 1), 0, True, "stopped"),
    ]
    for w, status, stopping, cause in cases:
        block = stats.prepare_worker()
        stats.worker_started(w.pid)
        counters = WorkerCounters()
        counters.requests_finished = 10
        block.publish(counters)
        assert stats.worker_exited(w, status, stopping, "detail") == cause
    assert stats.starts == 6
    assert all(n == 1 for n in stats.deaths.values())
    snap = stats.snapshot([], {}, 1, 2, "serving", 30.0)
    assert snap["totals"]["requests_finished"] == 60
    assert [d["cause"] for d in snap["recent_deaths"]] == [c[3] for c in cases]
    stats.close()


def test_snapshot_rows_show_each_workers_state_and_counters():
    now = [100.0]
    stats = PoolStats(clock=lambda: now[0])
    workers, blocks = [], []
    for pid, number in ((21, 1), (22, 2), (23, 3)):
        blocks.append(stats.prepare_worker())
        stats.worker_started(pid)
        workers.append(record(pid, number))
    workers[2].ready = False
    counters = WorkerCounters()
    counters.connections_open = 2
    blocks[0].publish(counters)
    now[0] = 105.0
    snap = stats.snapshot(workers, {21: 0.1, 22: 20.0, 23: 0.0}, 1, 3, "serving", 30.0)
    assert [(r["pid"], r["state"]) for r in snap["workers"]] == [
        (21, "serving"), (22, "late"), (23, "booting")
    ]
    assert snap["workers"][0]["age"] == 5.0
    assert snap["workers"][0]["connections_open"] == 2
    assert snap["totals"]["connections_open"] == 2
    assert set(COUNTER_FIELDS) <= set(snap["workers"][1])
    stats.close()


def status(states, wanted=2, written_ago=0.5, now=1000.0):
    return {
        "supervisor": {"workers_wanted": wanted, "written_at": now - written_ago},
        "workers": [{"pid": 100 + i, "state": s} for i, s in enumerate(states)],
    }


def test_health_is_what_a_monitoring_check_expects():
    assert pool_health(status(["serving", "serving"]), 1000.0)[0] == HEALTHY
    assert pool_health(status(["serving", "booting"]), 1000.0)[0] == DEGRADED
    code, reason = pool_health(status(["serving", "late"]), 1000.0)
    assert code == DEGRADED
    assert pool_health(status(["serving", "serving", "late"]), 1000.0) == (
        DEGRADED, "late heartbeat: worker 102"
    )
    assert pool_health(status(["booting", "retiring"]), 1000.0)[0] == DOWN
    code, reason = pool_health(status(["serving", "serving"], written_ago=30), 1000.0)
    assert code == DEGRADED and "has not updated its status" in reason
