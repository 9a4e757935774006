"""The supervisor's state machine in memory: a fake clock, fake processes and a fake poller
(no fork, no real worker), the real :class:`spoon.pool.supervisor.Supervisor`.

Each fake worker is a record the test controls: whether it beats (a healthy reactor), when
it is ready, when it exits.  The fake poller moves the clock forward by the time the
supervisor would have slept, so that timeouts and back-off happen in fake time.
"""

import logging
import os
import select
import signal

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from spoon.pool import supervisor as supervisor_module
from spoon.pool.supervisor import (
    BOOT_FAILURES_TO_HALT,
    CRASH_LOOP_DEATHS,
    CRASH_LOOP_FORK_INTERVAL,
    PoolHalted,
    Supervisor,
)
from spoon.pool.target import IPool, IPoolTarget
from spoon.pool.worker import DUMP_SIGNAL


#: The least the supervisor must wait beyond a worker's own grace period before killing it.
MARGIN = 1.0

#: Fake seconds between two beats of a healthy fake worker.
BEAT_INTERVAL = 0.25


def exit_status(code):
    return code << 8


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeWorker:
    def __init__(self, pid, fd, born):
        self.pid = pid
        self.fd = fd
        self.born = born
        self.beating = True  # a healthy reactor beats every BEAT_INTERVAL
        self.last_written = None
        self.ready_sent = False
        self.hold_ready = False  # not serving yet (a rolling restart waits for it)
        self.status = None  # set when it has exited
        self.signals = []
        self.pending = b""
        self.closed_pipe = False


class FakeProcesses:
    """Stands for fork/kill/waitpid/getppid and the heartbeat pipes."""

    def __init__(self, clock):
        self.clock = clock
        self.workers = {}
        self.by_fd = {}
        self.forks = []  # (time, pid)
        self.kills = []  # (time, pid, signal)
        self.next_pid = 100
        self.next_fd = 1000
        self.crash_on_start = False
        self.last_words = b""  # what a worker that crashes at start writes on its pipe
        self.hold_new_workers = False
        self.ppid = 1
        self.prepared = None
        self.quit_on_term = False  # workers exit the moment they get SIGTERM

    # -- what the supervisor calls --------------------------------------------------------

    def prepare(self, preload_modules, title):
        self.prepared = (list(preload_modules), title)

    def getpid(self):
        return 1

    def getppid(self):
        return self.ppid

    def fork_worker(self, child):
        pid, fd = self.next_pid, self.next_fd
        self.next_pid += 1
        self.next_fd += 1
        w = FakeWorker(pid, fd, self.clock())
        w.hold_ready = self.hold_new_workers
        self.workers[pid] = w
        self.by_fd[fd] = w
        self.forks.append((self.clock(), pid))
        if self.crash_on_start:
            w.pending = self.last_words
            self.exit(pid, 1)
        return pid, fd

    def read(self, fd):
        w = self.by_fd[fd]
        if w.pending:
            data, w.pending = w.pending, b""
            return data
        return b"" if w.closed_pipe else None

    def close(self, fd):
        self.by_fd.pop(fd, None)

    def kill(self, pid, sig):
        self.kills.append((self.clock(), pid, sig))
        w = self.workers.get(pid)
        if w is None or w.status is not None:
            return
        w.signals.append(sig)
        if sig == signal.SIGKILL:
            self.exit(pid, None, signal.SIGKILL)
        elif sig == signal.SIGTERM and self.quit_on_term:
            self.exit(pid, 0)

    def waitpid(self, pid):
        w = self.workers.get(pid)
        if w is None or w.status is None:
            return 0, 0
        del self.workers[pid]
        return pid, w.status

    # -- what the test does ---------------------------------------------------------------

    def exit(self, pid, code, by_signal=None):
        w = self.workers[pid]
        w.beating = False
        w.closed_pipe = True
        w.status = by_signal if by_signal is not None else exit_status(code)

    def ask_replacement(self, pid):
        self.workers[pid].pending += b"X"

    def release(self, pid):
        self.workers[pid].hold_ready = False

    def live(self):
        return sorted(pid for pid, w in self.workers.items() if w.status is None)

    def beat_all(self):
        now = self.clock()
        for w in self.workers.values():
            if not w.beating or w.hold_ready:
                continue
            if w.last_written is None or now - w.last_written >= BEAT_INTERVAL:
                w.pending += b"." if w.ready_sent else b"R"
                w.ready_sent = True
                w.last_written = now

    def signals_of(self, pid):
        return [sig for _, p, sig in self.kills if p == pid]


class FakePoll:
    """``select.poll`` over the fake pipes: reports the workers with a beat waiting; when
    none has, the supervisor "sleeps" and the clock moves by its timeout."""

    def __init__(self, processes, clock):
        self.processes = processes
        self.clock = clock
        self.fds = []

    def register(self, fd, mask):
        self.fds.append(fd)

    def poll(self, timeout_ms):
        self.processes.beat_all()
        ready = [
            (fd, select.POLLIN)
            for fd in self.fds
            if fd in self.processes.by_fd
            and (self.processes.by_fd[fd].pending or self.processes.by_fd[fd].closed_pipe)
        ]
        if not ready:
            self.clock.now += max(timeout_ms, 1.0) / 1000.0
        return ready


@implementer(IPoolTarget)
class FakeTarget:
    socket = None
    pool_name = "tests.FakeServer"
    pool_workers = 2
    graceful_timeout = 10.0
    worker_timeout = 5.0
    signal_shutdown = signal.SIGTERM
    signal_reload = signal.SIGUSR1
    log = logging.getLogger("test.pool")

    def __init__(self):
        self.reloads = 0
        self.pool = None
        self.pids = None
        self.stopped = False

    def reload(self):
        self.reloads += 1

    def serve(self, reactor, shared):
        raise AssertionError("the supervisor never serves")

    def begin_stop(self, graceful):
        raise AssertionError("the supervisor never serves")

    def signal_handlers(self):
        return {}

    def pool_started(self, pool):
        self.pool = pool
        self.pids = pool.pids

    def pool_stopped(self):
        self.stopped = True

    def became_worker(self, number):
        raise AssertionError("no fork here")


@pytest.fixture
def pool():
    clock = FakeClock()
    processes = FakeProcesses(clock)
    target = FakeTarget()
    sup = Supervisor(
        target,
        clock=clock,
        processes=processes,
        poller=lambda: FakePoll(processes, clock),
        signals=False,
    )
    sup.start()
    sup.processes_fake = processes
    sup.clock_fake = clock
    yield sup
    if sup._wake_r is not None:
        sup.finish()


def run_until(sup, condition, limit=2000):
    """Step the loop until ``condition()``; the loop must still be running."""
    for _ in range(limit):
        if condition():
            return
        assert sup.step(), "the pool stopped"
    raise AssertionError("condition never met in %d steps" % limit)


def sent_at(processes, pid, sig):
    """When the supervisor sent ``sig`` to ``pid`` (fake time)."""
    return next(t for t, p, s in processes.kills if p == pid and s == sig)


def run_for(sup, seconds):
    """Step the loop for ``seconds`` of fake time; it must keep running."""
    end = sup.clock_fake.now + seconds
    while sup.clock_fake.now < end:
        assert sup.step(), "the pool stopped"


def two_serving(sup):
    """Run until both workers serve; their pids, oldest first."""
    run_until(sup, serving(sup, 2))
    return sup.processes_fake.live()


def serving(sup, n):
    return lambda: sum(1 for w in sup.workers.values() if w.ready and not w.retiring) == n


def test_the_target_sees_the_pool_and_its_pids(pool):
    run_until(pool, serving(pool, 2))
    target = pool.target
    assert verifyObject(IPool, target.pool)
    assert target.pids is pool.pids and sorted(target.pids) == pool.processes_fake.live()
    assert pool.processes_fake.prepared[1] == "spoon: supervisor tests.FakeServer [?]"


def test_a_dead_worker_is_replaced(pool):
    procs = pool.processes_fake
    victim = two_serving(pool)[0]
    pool.clock_fake.now += 5  # long after its start: not a crash at start-up
    procs.exit(victim, 1)
    run_until(pool, lambda: victim not in pool.pids and len(pool.pids) == 2)
    run_until(pool, serving(pool, 2))
    assert len(procs.forks) == 3
    assert victim not in procs.live() and len(procs.live()) == 2


def test_a_crash_loop_forks_at_most_one_worker_per_interval(pool):
    procs = pool.processes_fake
    first = two_serving(pool)
    pool.clock_fake.now += 5
    procs.crash_on_start = True
    for pid in first:
        procs.exit(pid, 1)
    run_until(pool, lambda: len(procs.forks) >= len(first) + CRASH_LOOP_DEATHS + 6)
    times = [t for t, _ in procs.forks[len(first):]]
    # Until the crash loop is noticed, replacements are forked at once...
    assert times[CRASH_LOOP_DEATHS - 1] - times[0] < CRASH_LOOP_FORK_INTERVAL
    # ...then at most one per interval.
    gaps = [b - a for a, b in zip(times[CRASH_LOOP_DEATHS:], times[CRASH_LOOP_DEATHS + 1 :])]
    assert gaps and min(gaps) >= CRASH_LOOP_FORK_INTERVAL - 1e-9, gaps
    # Workers that start again bring back full speed.
    procs.crash_on_start = False
    run_until(pool, serving(pool, 2))
    pool.clock_fake.now += 2
    run_until(pool, lambda: not pool._crash_looping)


def test_a_silent_worker_is_asked_for_its_tracebacks_then_killed(pool):
    procs = pool.processes_fake
    stuck = two_serving(pool)[0]
    procs.workers[stuck].beating = False
    went_silent = pool.clock_fake.now
    run_until(pool, lambda: stuck not in pool.pids)
    sent = [(t, sig) for t, pid, sig in procs.kills if pid == stuck]
    assert [sig for _, sig in sent] == [DUMP_SIGNAL, signal.SIGKILL]
    (dumped_at, _), (killed_at, _) = sent
    assert went_silent + pool.dump_after <= dumped_at < went_silent + pool.worker_timeout
    assert killed_at >= went_silent + pool.worker_timeout
    assert killed_at - dumped_at >= supervisor_module.DUMP_GRACE
    # Replaced, and the healthy one was left alone.
    run_until(pool, serving(pool, 2))
    other = [pid for pid in pool.pids if pid < stuck + 2 and pid != stuck]
    assert all(procs.signals_of(pid) == [] for pid in other)


def test_hup_reloads_then_replaces_each_worker_only_once_its_successor_serves(pool):
    procs = pool.processes_fake
    old = two_serving(pool)
    procs.hold_new_workers = True
    pool.request(signal.SIGHUP)
    run_until(pool, lambda: len(procs.forks) == 3)
    assert pool.target.reloads == 1
    first_new = procs.forks[-1][1]
    # While the new worker is not serving yet, the old one keeps serving.
    run_for(pool, 2.0)
    assert all(procs.signals_of(pid) == [] for pid in old)
    assert len(procs.forks) == 3
    procs.release(first_new)
    run_until(pool, lambda: procs.signals_of(old[0]) == [signal.SIGTERM])
    assert procs.signals_of(old[1]) == []
    procs.exit(old[0], 0)
    run_until(pool, lambda: len(procs.forks) == 4)
    second_new = procs.forks[-1][1]
    run_for(pool, 2.0)
    assert procs.signals_of(old[1]) == []
    procs.release(second_new)
    run_until(pool, lambda: procs.signals_of(old[1]) == [signal.SIGTERM])
    procs.exit(old[1], 0)
    run_until(pool, lambda: sorted(pool.pids) == sorted([first_new, second_new]))
    assert len(procs.forks) == 4


def test_ttin_adds_a_worker_and_ttou_retires_the_oldest_but_never_the_last(pool):
    procs = pool.processes_fake
    oldest, younger = two_serving(pool)
    pool.request(signal.SIGTTIN)
    run_until(pool, serving(pool, 3))
    for retired, left in ((oldest, 2), (younger, 1)):
        pool.request(signal.SIGTTOU)
        run_until(pool, lambda: procs.signals_of(retired) == [signal.SIGTERM])
        procs.exit(retired, 0)
        run_until(pool, lambda: len(pool.pids) == left)
    pool.request(signal.SIGTTOU)  # ignored: one worker is the least
    run_for(pool, 5.0)
    assert pool.wanted == 1 and len(pool.pids) == 1
    assert len(procs.forks) == 3


def test_graceful_stop_signals_every_worker_and_kills_the_late_ones_after_the_grace(pool):
    procs = pool.processes_fake
    quick, slow = two_serving(pool)
    pool.request(signal.SIGTERM)
    run_until(pool, lambda: procs.signals_of(slow) == [signal.SIGTERM])
    stop_began = sent_at(procs, slow, signal.SIGTERM)
    assert procs.signals_of(quick) == [signal.SIGTERM]
    procs.exit(quick, 0)
    steps = 0
    while pool.step():
        steps += 1
        assert steps < 5000
    killed = [t for t, pid, sig in procs.kills if pid == slow and sig == signal.SIGKILL]
    # Not before the worker's own grace timer (graceful_timeout) has had time to close its
    # connections itself.
    assert len(killed) == 1 and killed[0] >= stop_began + pool.graceful_timeout + MARGIN
    assert procs.signals_of(quick) == [signal.SIGTERM]
    assert len(procs.forks) == 2  # nobody replaced during the stop
    pool.finish()
    assert pool.target.stopped and pool.pids == []


class RecordingNotifier:
    """Stands for spoon.systemd.Notifier: what a ``Type=notify`` unit would be told."""

    enabled = True
    watchdog_interval = None

    def __init__(self):
        self.sent = []

    def ready(self, status=None, mainpid=None):
        self.sent.append("READY=1")

    def reloading(self):
        self.sent.append("RELOADING=1")

    def stopping(self):
        self.sent.append("STOPPING=1")

    def send(self, *states):
        self.sent.extend(states)


def test_systemd_hears_stopping_even_when_every_worker_is_gone_within_the_same_turn():
    clock = FakeClock()
    processes = FakeProcesses(clock)
    notifier = RecordingNotifier()
    sup = Supervisor(FakeTarget(), clock=clock, processes=processes,
                     poller=lambda: FakePoll(processes, clock), signals=False, notifier=notifier)
    sup.start()
    try:
        run_until(sup, lambda: notifier.sent == ["READY=1"])
        processes.quit_on_term = True  # reaped in the turn that signals them
        sup.request(signal.SIGTERM)
        steps = 0
        while sup.step():
            steps += 1
            assert steps < 10
        assert notifier.sent == ["READY=1", "STOPPING=1"]
    finally:
        sup.finish()


def test_fast_stop_interrupts_the_workers_and_kills_after_a_short_wait(pool):
    procs = pool.processes_fake
    run_until(pool, serving(pool, 2))
    pool.request(signal.SIGINT)
    run_until(pool, lambda: all(procs.signals_of(pid) == [signal.SIGINT] for pid in procs.live()))
    began = sent_at(procs, procs.live()[0], signal.SIGINT)
    steps = 0
    while pool.step():
        steps += 1
        assert steps < 5000
    killed = sorted(t for t, _, sig in procs.kills if sig == signal.SIGKILL)
    assert len(killed) == 2
    deadline = began + min(supervisor_module.FAST_STOP_TIMEOUT, pool.graceful_timeout)
    assert deadline <= killed[0] < began + pool.graceful_timeout


def test_parent_gone_means_a_graceful_stop(pool):
    procs = pool.processes_fake
    pool.parent_pid = 1
    run_until(pool, serving(pool, 2))
    procs.ppid = 4242
    run_until(pool, lambda: all(procs.signals_of(pid) == [signal.SIGTERM] for pid in procs.live()))
    for pid in procs.live():
        procs.exit(pid, 0)
    while pool.step():
        pass
    assert os.getpid() != 1  # the real process was never asked anything


TRACEBACK = b"Traceback (most recent call last):\n  ...\nImportError: No module named 'nowhere'\n"


def test_a_pool_whose_first_workers_die_before_serving_halts_and_says_why_once(pool, caplog):
    import socket

    procs = pool.processes_fake
    procs.crash_on_start = True
    procs.last_words = b"F" + TRACEBACK
    pool.target.socket = listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    steps = 0
    with caplog.at_level(logging.INFO, logger="test.pool"):
        while pool.step():
            steps += 1
            assert steps < 1000
    assert BOOT_FAILURES_TO_HALT <= len(procs.forks) < BOOT_FAILURES_TO_HALT + pool.wanted
    assert pool.halted and listening.fileno() == -1  # the port is closed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "Halting the pool" in errors[0].getMessage()
    assert TRACEBACK.decode().strip() in errors[0].getMessage()


def test_run_raises_pool_halted_so_that_the_process_exits_non_zero():
    clock = FakeClock()
    processes = FakeProcesses(clock)
    processes.crash_on_start = True
    polls = []

    def bounded_poller():
        polls.append(1)
        assert len(polls) < 10000, "the pool never halted"
        return FakePoll(processes, clock)

    sup = Supervisor(FakeTarget(), clock=clock, processes=processes, poller=bounded_poller, signals=False)
    with pytest.raises(PoolHalted):
        sup.run()
    assert sup.target.stopped and processes.live() == []


def test_deaths_before_serving_do_not_halt_a_pool_that_has_served(pool):
    procs = pool.processes_fake
    first = two_serving(pool)
    procs.crash_on_start = True
    for pid in first:
        procs.exit(pid, 1)
    run_until(pool, lambda: len(procs.forks) >= len(first) + 3 * BOOT_FAILURES_TO_HALT)
    assert pool.halted is None


def test_a_worker_asking_to_be_replaced_stops_only_once_its_successor_serves(pool):
    procs = pool.processes_fake
    old, other = two_serving(pool)
    procs.hold_new_workers = True
    procs.ask_replacement(old)
    run_until(pool, lambda: len(procs.forks) == 3)
    new = procs.forks[-1][1]
    run_for(pool, 2.0)
    assert procs.signals_of(old) == []  # still serving: its successor does not yet
    procs.release(new)
    run_until(pool, lambda: procs.signals_of(old) == [signal.SIGTERM])
    assert procs.signals_of(other) == [] and len(procs.forks) == 3
    asked = sent_at(procs, old, signal.SIGTERM)
    # Stuck in its drain: killed only after its own grace period and the margin.
    run_until(pool, lambda: signal.SIGKILL in procs.signals_of(old))
    assert sent_at(procs, old, signal.SIGKILL) >= asked + pool.graceful_timeout + MARGIN
    run_until(pool, lambda: old not in pool.pids)
    assert sorted(pool.pids) == sorted([other, new]) and len(procs.forks) == 3


def test_the_traceback_of_a_worker_reaped_before_its_pipe_was_read_still_counts(pool, caplog):
    procs = pool.processes_fake
    procs.hold_new_workers = True  # never ready: no beat is read before they die
    steps = 0
    with caplog.at_level(logging.ERROR, logger="test.pool"):
        while pool.halted is None:
            for pid in procs.live():
                # Its last words and its exit arrive together: the reaper sees it first.
                procs.workers[pid].pending = b"F" + TRACEBACK
                procs.exit(pid, 1)
            pool.step()
            steps += 1
            assert steps < 100
    assert TRACEBACK.decode().strip() in caplog.records[-1].getMessage()
