"""The pool's fault suite (issue 10): real processes, real signals, under real load; each
case bounded well under a minute.

- kill -9 of one worker: only the requests in flight on it fail, and the pool is back to
  full size within a second;
- kill -9 of the master: its workers go within 2 s and the same pid file serves again at
  once;
- TERM and HUP under load, 20 times each: no accepted request fails;
- 200 USR1 and 50 HUP within 2 s: no crash, no process left behind, every worker on the
  supervisor's configuration generation;
- a handler stuck mid-request on a graceful stop: closed by its worker's own grace timer,
  not by the supervisor's SIGKILL.
"""

import os
import re
import signal
import socket
import time

import pytest

from support import (
    PoolLoad,
    children_of,
    connect,
    daemons,  # noqa: F401 (fixture)
    pid_alive,
    pool_log,
    recv_all,
    start_pool,
    wait_for,
    workers_of,
)


def _serve(server_process, tmp_path, name="AnswersPool", config=None, **settings):
    log_path = tmp_path / ("%s-%d.log" % (name, time.monotonic_ns()))
    server = start_pool(server_process, name, log_path, config, **settings)
    wait_for(lambda: len(_serving(server)) == 2, timeout=20, what="2 workers serving")
    return server


def _serving(server):
    """Pids of the workers the supervisor said are serving and that are still alive."""
    said = {int(p) for p in re.findall(r"Worker (\d+) serving", pool_log(server))}
    return {p for p in children_of(server.pid) if p in said}


def _stop(server, timeout=30):
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=timeout) == 0
    return pool_log(server)


def test_kill_9_of_a_worker_fails_only_its_requests_in_flight_and_is_replaced_at_once(server_process, tmp_path):
    server = _serve(server_process, tmp_path)
    victim, survivor = sorted(children_of(server.pid))
    load = PoolLoad(server.port, threads=4, payload=b"x\nslow\n")
    try:
        load.wait_for_answers(40)
        before = load.ok
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        back = wait_for(
            lambda: len([p for p in children_of(server.pid) if p != victim]) == 2,
            timeout=5, interval=0.005, what="a replacement",
        )
        refilled = time.monotonic() - killed_at
        load.wait_for_answers(40)
    finally:
        load.stop()
    # At most one request per load thread can have been in flight on the victim.
    assert len(load.failures) <= 4, load.failures
    assert all(kind == "request" for kind, _ in load.failures), load.failures
    assert load.refused == 0 and load.ok > before
    assert back and refilled < 1.0, refilled
    print("kill -9 worker: %d failed (in flight on it), %d answered, refilled in %.3fs"
          % (len(load.failures), load.ok, refilled))
    assert survivor in children_of(server.pid)
    _stop(server)


def test_kill_9_of_the_master_takes_its_workers_and_the_pid_file_serves_again_at_once(daemons):  # noqa: F811
    d = daemons
    master, port = d.start("-s", "2", klass="probe_servers.ProbeSpork")
    workers = workers_of(master, 2)
    assert d.ask(port, "gen").split()[0] == "1"
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=2, interval=0.005,
             what="the workers gone with their master")
    again, port = d.start("-s", "2", klass="probe_servers.ProbeSpork")
    assert again != master
    assert int(d.ask(port, "gen").split()[1]) in workers_of(again, 2)
    stop = d.run("stop", "-p", d.pid_file)
    assert stop.returncode == 0, stop.stderr


def test_hup_under_load_20_times_fails_no_request(server_process, tmp_path):
    server = _serve(server_process, tmp_path)
    load = PoolLoad(server.port, threads=4)
    try:
        for _ in range(20):
            old = _serving(server)
            server.signal(signal.SIGHUP)
            wait_for(lambda: len(_serving(server)) == 2 and not (_serving(server) & old), timeout=20,
                     what="every worker replaced")
            load.wait_for_answers(10)
    finally:
        load.stop()
    assert load.failures == [] and load.refused == 0, load.failures[:5]
    print("20 HUP under load: %d answered, 0 failed" % load.ok)
    _stop(server)


def test_term_under_load_20_times_fails_no_accepted_request(server_process, tmp_path):
    answered = refused = 0
    for _ in range(20):
        server = _serve(server_process, tmp_path, graceful_timeout=5)
        load = PoolLoad(server.port, threads=4, payload=b"x\nslow\n")
        try:
            load.wait_for_answers(4)
            server.signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0
        finally:
            load.stop()
        server.kill()
        assert load.failures == [], load.failures[:5]
        answered += load.ok
        refused += load.refused
    print("20 TERM under load: %d answered, %d refused after the stop, 0 failed" % (answered, refused))


def test_200_usr1_and_50_hup_in_2_seconds_leave_a_consistent_pool(server_process, tmp_path):
    """Each signal follows a new generation written to the configuration file; in the end
    the supervisor and every worker have loaded the last one (a worker that got several
    USR1 while it started may reload once for all of them: signals of one kind coalesce,
    as they do for any Unix daemon)."""
    config = tmp_path / "generation"

    def publish(generation):
        config.with_suffix(".new").write_text(str(generation))
        os.replace(config.with_suffix(".new"), config)

    publish(0)
    server = _serve(server_process, tmp_path, config=config)
    seen = set(children_of(server.pid))
    began = time.monotonic()
    for i in range(250):
        publish(i + 1)
        server.signal(signal.SIGHUP if i % 5 == 0 else signal.SIGUSR1)  # USR1 last
        seen.update(children_of(server.pid))
        time.sleep(max(0.0, began + (i + 1) * 1.9 / 250 - time.monotonic()))  # spread over 2 s
    assert time.monotonic() - began < 2.5
    assert pid_alive(server.pid)

    def supervisor_generation():
        return int(re.findall(r"\[%d\] pool-faults: generation (\d+)" % server.pid, pool_log(server))[-1])

    answers = {}

    def consistent():
        seen.update(children_of(server.pid))
        with connect(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"x\n")
            client.shutdown(socket.SHUT_WR)
            pid, generation = (int(x) for x in recv_all(client).split())
        answers[pid] = generation
        live = _serving(server)
        current = {p: g for p, g in answers.items() if p in live}
        return len(live) == 2 and set(current) == live and set(current.values()) == {250}

    wait_for(consistent, timeout=30, interval=0, what="every worker on generation 250")
    assert supervisor_generation() == 250
    out = _stop(server)
    assert "Traceback" not in out, out
    leaked = [p for p in seen if pid_alive(p)]
    assert leaked == []
    print("200 USR1 + 50 HUP: generation 250 everywhere, %d workers over the run" % len(seen))


def test_a_stuck_handler_is_closed_by_its_worker_not_by_the_supervisors_sigkill(server_process, tmp_path):
    server = _serve(server_process, tmp_path, "StuckPool")
    with connect(("127.0.0.1", server.port), timeout=30) as client:
        # The handler answers "x", then waits in "hold" for one more byte: mid-request.
        client.sendall(b"x\nhold\n")
        first = b""
        while not first.endswith(b"\n"):
            first += client.recv(1)
        server.signal(signal.SIGTERM)
        began = time.monotonic()
        try:
            ended = recv_all(client)
        except ConnectionResetError:
            ended = b""
        closed_after = time.monotonic() - began
    assert server.wait(timeout=30) == 0
    out = pool_log(server)
    assert ended == b"" and closed_after < 30
    assert "killed by SIGKILL" not in out and "Stop timed out" not in out, out
    assert len(re.findall(r"Worker \d+ exited \(exit code 0\)", out)) == 2, out
