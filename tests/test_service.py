"""PreforkService embedded in a program with a running reactor (not twistd): a real
program, a real supervisor spawned by fork and exec, real workers and sockets.

The program prints ``READY <port> <supervisor pid>`` once the pool is spawned, logs Twisted
events to its stdout, and on SIGUSR2 calls ``stopService()`` and prints ``STOPPED`` when
the Deferred fires.
"""

import os
import signal
import sys
import time
import urllib.request

from support import children_of, pid_alive, request, wait_for

EMBED = """
    import os, signal, sys
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from spoon.service import PreforkService

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    target, workers, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    kwargs = {}
    if extra:
        kwargs = dict(python=extra[0], graceful_timeout=float(extra[1]))
    pool = PreforkService(target, ("127.0.0.1", 0), workers=workers,
                          restart_delay=(0.2, 1.0), **kwargs)
    if extra:
        pool.stop_margin = 0.5
    pool.startService()

    def stopped(_):
        print("STOPPED", flush=True)
        reactor.stop()

    def stop():
        print("STOPPING", flush=True)
        pool.stopService().addCallback(stopped)

    signal.signal(signal.SIGUSR2, lambda *a: reactor.callFromThread(stop))
    signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(pool.reload))
    reactor.callWhenRunning(lambda: print("READY", pool.address[1], pool.pid, flush=True))
    reactor.run()
"""


def _descendants(pid):
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _ask(port, line=b"hi"):
    pid, generation, _ = request(("127.0.0.1", port), line + b"\n", timeout=10).split()
    return int(pid), int(generation)


def _answers(ask, count, timeout=30.0):
    """Ask until ``count`` different pids have answered; return {pid: answer}."""
    seen = {}

    def enough():
        try:
            pid, answer = ask()
        except OSError:
            return False
        seen[pid] = answer
        return len(seen) >= count

    wait_for(enough, timeout, interval=0, what="%d different workers (seen %s)" % (count, seen))
    return seen


def _stop_and_check_nothing_left(program, started_pids):
    everyone = set(started_pids) | set(_descendants(program.pid))
    program.signal(signal.SIGUSR2)
    assert program.wait(timeout=40) == 0
    output = program.read_output()
    assert "STOPPED" in output, output
    # stopService fired only once the supervisor *and* its workers were gone.
    assert not [p for p in everyone if pid_alive(p)], output
    return output


def test_pool_of_a_spoon_server_in_a_running_reactor(server_process):
    program = server_process(EMBED, args=["test_service_apps.GenerationSpork", "2"],
                             env={"PYTHONPATH": os.path.dirname(__file__)})
    supervisor = int(program.ready_words[2])
    assert children_of(program.pid) == [supervisor]
    seen = _answers(lambda: _ask(program.port), 2)
    workers = set(seen)
    assert program.pid not in workers and supervisor not in workers
    assert set(children_of(supervisor)) == workers

    # Relayed signal: load_config() in every worker.
    program.signal(signal.SIGUSR1)
    wait_for(lambda: set(_answers(lambda: _ask(program.port), 2).values()) == {2}, 30,
             interval=0, what="generation 2 in both workers")

    # The supervisor dies: a new one is started (after the back-off) and serves.
    os.kill(supervisor, signal.SIGKILL)
    killed_at = time.monotonic()
    new_supervisor = wait_for(
        lambda: [p for p in children_of(program.pid) if p != supervisor], 20, what="a new supervisor"
    )[0]
    _answers(lambda: _ask(program.port), 2)
    print("supervisor replaced and serving again after %.2fs" % (time.monotonic() - killed_at))
    # The old workers died with their supervisor (parent-death signal).
    wait_for(lambda: not any(pid_alive(p) for p in workers), 10, what="old workers gone")

    output = _stop_and_check_nothing_left(program, [supervisor, new_supervisor])
    # Worker log lines reach the embedding program's log, one event per line, with pids.
    for pid in workers:
        assert "[gen-server#info pid=%d] config generation 2" % pid in output, output
    assert "supervisor pid %d killed by signal 9" % supervisor in output, output


def test_pool_serving_a_plain_twisted_web_site(server_process):
    """Any Twisted factory, pre-forked: a callable returning a twisted.web Site."""
    program = server_process(EMBED, args=["test_service_apps.make_site", "2"],
                             env={"PYTHONPATH": os.path.dirname(__file__)})
    supervisor = int(program.ready_words[2])

    def get():
        with urllib.request.urlopen("http://127.0.0.1:%d/any/page" % program.port, timeout=10) as r:
            return int(r.read()), r.status

    seen = _answers(get, 2)
    assert set(seen.values()) == {200}
    assert set(seen) == set(children_of(supervisor))
    _stop_and_check_nothing_left(program, [supervisor])


STUBBORN = """#!/bin/sh
# Stands in for the interpreter: a "supervisor" with a child that ignore SIGTERM.
trap '' TERM
sh -c "trap '' TERM; while :; do sleep 0.05; done" &
echo "[$$] stubborn supervisor up" >&2
while :; do sleep 0.05; done
"""


def test_a_pool_that_ignores_term_is_killed_after_the_grace_period(server_process, tmp_path):
    script = tmp_path / "stubborn.sh"
    script.write_text(STUBBORN)
    script.chmod(0o755)
    program = server_process(
        EMBED, args=["test_service_apps.GenerationSpork", "2", str(script), "0.5"],
        env={"PYTHONPATH": os.path.dirname(__file__)},
    )
    supervisor = int(program.ready_words[2])
    wait_for(lambda: children_of(supervisor), 10, what="the stubborn child")
    started = time.monotonic()
    output = _stop_and_check_nothing_left(program, [supervisor])
    elapsed = time.monotonic() - started
    assert "pool did not stop in time" in output, output
    assert elapsed < 20
