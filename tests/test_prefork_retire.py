"""Workers make way for fresh ones (issue 10, point 4): after ``max_requests`` (plus
jitter), once their resident memory passes ``max_worker_memory``, or after a MemoryError
escaped a handler.  The replacement serves before the old worker stops accepting, so no
request fails meanwhile.  Real processes under real load."""

import collections
import signal

from support import PoolLoad, children_of, pid_alive, pool_log, request, rss_kib, start_pool, wait_for


def _serve(server_process, tmp_path, name):
    server = start_pool(server_process, name, tmp_path / "pool.log")
    wait_for(lambda: len(children_of(server.pid)) == 2, timeout=20, what="2 workers")
    return server


def _stop(server):
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    return pool_log(server)


def test_max_requests_replaces_each_worker_without_failing_a_request(server_process, tmp_path):
    server = _serve(server_process, tmp_path, "RecycledPool")
    first = set(children_of(server.pid))
    load = PoolLoad(server.port, threads=4)
    try:
        # Without max_requests the same 2 workers would serve everything.
        wait_for(lambda: len(load.pids()) >= 6, timeout=60, what="6 workers having served")
    finally:
        load.stop()
    assert load.failures == [] and load.refused == 0
    wait_for(lambda: not first & set(children_of(server.pid)), timeout=20, what="the first workers gone")
    # None was replaced before its 50th request (it serves on until its successor does,
    # so it may serve more: how many depends on the request rate).
    served_by = collections.Counter(pid for pid, _ in load.answers)
    for pid in first:
        assert served_by[pid] >= 50, served_by
    wait_for(lambda: len(children_of(server.pid)) == 2, timeout=20, what="2 workers again")
    out = _stop(server)
    assert "asks to be replaced" in out and "max_requests" in out


def test_a_leaking_worker_is_replaced_before_its_memory_passes_the_limit(server_process, tmp_path):
    """100 KiB kept per request, max_worker_memory = start + 20 MiB: without recycling
    2,000 requests would grow the two workers by ~100 MiB each."""
    server = _serve(server_process, tmp_path, "LeakyPool")
    start_kib = max(rss_kib(pid) for pid in children_of(server.pid))
    limit_kib = start_kib + 20 * 1024
    peak = [0]

    def sample():
        for pid in children_of(server.pid):
            try:
                peak[0] = max(peak[0], rss_kib(pid))
            except (OSError, AssertionError):
                pass  # it exited meanwhile

    # Two clients: the old worker serves on while its successor starts, and leaks meanwhile
    # in proportion to the request rate.
    load = PoolLoad(server.port, threads=2)
    try:
        target = 2000
        while load.ok < target and not load.failures:
            sample()
            load.wait_for_answers(10, timeout=30)
    finally:
        load.stop()
    assert load.failures == [] and load.refused == 0
    assert len(load.pids()) >= 4, load.pids()  # replaced, more than once
    # Bounded: the limit, plus what the old worker leaked while its successor started.
    assert peak[0] < limit_kib + 32 * 1024, (peak[0], limit_kib)
    print("leak: peak worker RSS %d KiB, limit %d KiB, %d workers over %d requests"
          % (peak[0], limit_kib, len(load.pids()), load.ok))
    out = _stop(server)
    assert "max_worker_memory" in out


def test_a_memory_error_escaping_a_handler_retires_its_worker(server_process, tmp_path):
    server = _serve(server_process, tmp_path, "OutOfMemoryPool")
    load = PoolLoad(server.port, threads=2)
    try:
        # "oom": the handler answers with its pid, then raises MemoryError.
        victim = int(request(("127.0.0.1", server.port), b"oom\n", timeout=10).split()[0])
        wait_for(lambda: not pid_alive(victim), timeout=30, what="worker %d retired" % victim)
        load.wait_for_answers(50)
    finally:
        load.stop()
    assert load.failures == [] and load.refused == 0
    wait_for(lambda: len(children_of(server.pid)) == 2, timeout=20, what="2 workers again")
    out = _stop(server)
    assert "a MemoryError escaped a handler" in out
