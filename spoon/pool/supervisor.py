"""The supervisor of a pre-forked pool: it serves nothing itself; it forks workers that
serve the listening socket of its target, keeps their number, replaces the ones that die or
hang, and turns signals into pool-wide actions.

It drives its target only through :class:`spoon.pool.target.IPoolTarget` and never imports
:mod:`spoon.server`.  Its clock, process operations (:class:`OSProcesses`: fork, kill,
waitpid, getppid, heartbeat pipes) and poller are injected, so that its state machine runs
in unit tests with fake ones.

Its main loop never runs a reactor (a forked worker must start from a process without one).
Signal handlers only queue the signal and write a byte to a wake-up pipe; the loop drains
the queue and calls one ``handle_<signal>`` method per signal, so the real work never runs
inside a signal handler:

- TERM: graceful stop.  New connection attempts are refused at the socket, the workers
  drain what the kernel already accepted and finish their in-flight handlers, and the ones
  still running after ``graceful_timeout`` are killed.  INT and QUIT: fast stop.
- USR1: ``reload()`` in every worker (and here, for workers forked later).
- HUP: ``reload()`` here, then each worker is replaced by a fresh fork, one at a time:
  the new one is serving before the old one stops accepting, so no connection is refused.
- TTIN / TTOU: one worker more / fewer (never fewer than one).
- USR2: zero-downtime code upgrade (:mod:`spoon.pool.upgrade`): this process's command line
  is executed again on the same listening socket; once the new generation's workers all
  serve, this one stops gracefully (without refusing connections at the socket, which the
  new workers accept on); if the new one fails to serve, this one keeps serving.  A
  supervisor started by a pool service (twistd) is upgraded by that service, which sends
  this USR2 once the new supervisor it started serves: then it only stops, the same way.

Workers write a heartbeat from their reactor into a pipe; a worker silent for longer than
``worker_timeout`` is stuck (a CPU loop or a blocking call in a handler): its threads'
tracebacks are asked for, then it is killed.

A pool that has never served halts when its first workers all die before serving
(:data:`BOOT_FAILURES_TO_HALT` in a row: they cannot import, cannot install their
reactor...): it closes the port, logs the reason once with the traceback the last worker sent
through its heartbeat pipe, and :meth:`Supervisor.run` raises :class:`PoolHalted`, so that
the process exits non-zero instead of keeping a port open that nothing answers.  Once the
pool has served, deaths keep the crash-loop back-off.

A worker may ask to be replaced (it served ``max_requests``, outgrew ``max_worker_memory``
or a MemoryError escaped a handler): it is replaced as in a HUP, the new one serving before
the old one stops accepting.
"""

import collections
import gc
import logging
import os
import select
import signal
import socket
import threading
import time

from zope.interface import implementer

from spoon import linux, metrics
from spoon.pool import stats, upgrade, worker
from spoon.pool.hooks import call_hook
from spoon.pool.notify import PoolNotifier
from spoon.pool.proctitle import set_title, supervisor_title
from spoon.pool.reactor import DEFAULT_REACTOR_MODULE, CannotFork, check_forkable, check_reactor_choice
from spoon.pool.target import IPool, IPoolTarget

__all__ = ["Supervisor", "OSProcesses", "WorkerRecord", "PoolHalted"]


#: A worker that dies before it serves, or within this many seconds of its birth, died
#: "at start-up".
QUICK_DEATH = 1.0
#: After this many start-up deaths in a row, fork at most one worker per second.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_FORK_INTERVAL = 1.0
#: A pool that has never served halts after this many workers in a row died before serving.
BOOT_FAILURES_TO_HALT = 5
#: Most bytes of a failing worker's traceback kept.
FAILURE_TEXT_LIMIT = 16384
#: Seconds the supervisor waits beyond ``graceful_timeout`` before it kills a worker it asked
#: to stop: the worker's own grace timer fires first and closes its connections itself.
KILL_MARGIN = 5.0
#: Seconds a fast stop (INT/QUIT) waits before killing the workers.
FAST_STOP_TIMEOUT = 3.0
#: Default seconds without a heartbeat after which a worker is killed.
DEFAULT_WORKER_TIMEOUT = 30
#: Seconds between asking a silent worker for its tracebacks and killing it, so that the
#: dump is written before the SIGKILL; also between two workers' dumps, so that each one
#: follows the log line naming its worker.
DUMP_GRACE = 0.2
#: Longest sleep of the supervisor loop (it also polls for dead workers and its parent).
LOOP_TICK = 0.5


class PoolHalted(CannotFork):
    """The pool's first workers all died before serving: it closed its port and stopped."""


def heartbeat_interval(worker_timeout):
    """Beat often enough that a few missed beats are not yet a timeout."""
    return max(0.05, min(1.0, worker_timeout / 4.0))


def _describe_status(status):
    if status is None:
        return "already reaped"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "killed by %s" % name
    if os.WIFEXITED(status):
        return "exit code %d" % os.WEXITSTATUS(status)
    return "status %r" % status


class OSProcesses:
    """The process operations of a real supervisor (tests give a fake one)."""

    def prepare(self, preload_modules, title):
        """Before the first fork: refuse if workers could not get a reactor of their own,
        import what they share, keep the cyclic collector off the shared objects, and
        take the supervisor's process title."""
        check_forkable()
        worker.preload(preload_modules)
        # Objects that exist now are shared with the workers copy-on-write; the cyclic
        # garbage collector would write to every one of them in each worker (and copy
        # their pages) when it scans them.  Freezing takes them out of its sight.
        gc.freeze()
        set_title(title)

    def fork_worker(self, child):
        """Fork a worker that runs ``child(heartbeat_fd)`` (which never returns); return
        ``(pid, fd)``, the read end of its heartbeat pipe, or raise OSError."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        # The child's signal handlers are not in place yet: what arrives meanwhile waits.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, worker.SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:
            os.close(read_fd)
            child(write_fd)  # unblocks the signals once its handlers are in place
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(write_fd)
        return pid, read_fd

    def getpid(self):
        return os.getpid()

    def read(self, fd):
        """What the worker wrote (b"" at its end; None when nothing waits)."""
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def close(self, fd):
        os.close(fd)

    def kill(self, pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def waitpid(self, pid):
        """``(pid, status)`` of an exited child, ``(0, 0)`` while it runs, ``(pid,
        None)`` when it was reaped elsewhere."""
        try:
            return os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return pid, None
        except InterruptedError:
            return 0, 0

    def getppid(self):
        return os.getppid()


class WorkerRecord:
    """What the supervisor knows about one worker."""

    __slots__ = (
        "pid", "number", "fd", "born", "last_beat", "ready", "retiring", "retire_deadline", "killed", "dumped_at",
        "failure", "wants_replacing",
    )

    def __init__(self, pid, fd, now, number=1):
        self.pid, self.number, self.fd = pid, number, fd
        self.born = self.last_beat = now
        self.ready = self.retiring = self.killed = self.wants_replacing = False
        self.retire_deadline = None
        self.dumped_at = None  # when its tracebacks were asked for (its heartbeat late)
        self.failure = None  # bytearray: the traceback it sent before dying


@implementer(IPool)
class Supervisor:
    """Run a pre-forked pool of ``target`` (an :class:`IPoolTarget` whose socket is bound
    and listening) until it is stopped.

    ``workers``, ``graceful_timeout`` and ``worker_timeout`` default to the target's
    ``pool_workers``, ``graceful_timeout`` and ``worker_timeout``.  ``parent_pid``: stop
    the pool when this process stops being our parent (used by the command line entry).
    ``reactor_name``: a twistd reactor short name (``poll``, ``select``, ``epoll``...) that
    every worker installs instead of the default reactor.  ``clock`` (seconds, monotonic),
    ``processes`` (:class:`OSProcesses`) and ``poller`` (a ``select.poll`` factory) are the
    real ones unless given; ``signals=False`` installs no signal handlers.
    """

    def __init__(
        self,
        target,
        workers=None,
        graceful_timeout=None,
        worker_timeout=None,
        parent_pid=None,
        reactor_name=None,
        clock=time.monotonic,
        processes=None,
        poller=select.poll,
        signals=True,
        notifier=None,
        metrics_endpoint=None,
        statsd=None,
        upgrade_timeout=None,
    ):
        self.target = IPoolTarget(target)
        self.clock = clock
        #: What the pool tells systemd (spoon.systemd.Notifier; default: from the
        #: environment, silent without NOTIFY_SOCKET).
        self.notifier = notifier
        self.notify = None
        #: Where the pool publishes (a Prometheus endpoint string, a statsd HOST:PORT);
        #: None: SPOON_METRICS / SPOON_STATSD, as a pool started by twistd is told.
        self.metrics_endpoint = metrics_endpoint
        self.statsd = statsd
        self.processes = processes if processes is not None else OSProcesses()
        self.poller = poller
        self.install_signals = signals
        #: Reactor short name each worker installs (None: the default reactor).
        self.reactor_name = reactor_name
        self._reactor_module = None
        self.log = target.log or logging.getLogger("spoon.prefork")
        self.wanted = max(1, int(workers if workers is not None else target.pool_workers))
        self.graceful_timeout = float(
            graceful_timeout if graceful_timeout is not None else target.graceful_timeout
        )
        self.worker_timeout = float(
            worker_timeout if worker_timeout is not None else target.worker_timeout or DEFAULT_WORKER_TIMEOUT
        )
        self.heartbeat_interval = heartbeat_interval(self.worker_timeout)
        # Tracebacks of a stuck worker reach the log shortly before it is killed.
        self.dump_after = max(
            self.worker_timeout - 2 * self.heartbeat_interval, self.worker_timeout * 0.6
        )
        # The workers' own drain limit is the pool's (set before they are forked).
        target.graceful_timeout = self.graceful_timeout
        self.parent_pid = parent_pid
        self.workers = {}
        #: The live workers' pids (IPool), kept current.
        self.pids = []
        self.pid = None
        self._queue = collections.deque()
        self._wake_r = self._wake_w = None
        self._old_handlers = {}
        self._stopping = None  # None, "graceful" or "fast"
        self._stop_deadline = None
        self._killed_all = False
        self._replace_queue = []
        self._rolling = None  # (old pid, new pid) while a HUP replacement is under way
        self._quick_deaths = 0
        self._crash_looping = False
        self._last_fork = 0.0
        self._last_dump = float("-inf")
        #: Whether any worker of this pool ever served (then deaths never halt it).
        self.served = False
        self._boot_failures = 0
        self._last_failure = None
        #: Why the pool halted (None: it did not).
        self.halted = None
        self._loop_thread = None
        self._done = threading.Event()
        #: The new generation of a USR2 upgrade (:class:`spoon.pool.upgrade.Successor`).
        if upgrade_timeout is None:
            upgrade_timeout = getattr(target, "upgrade_timeout", None) or upgrade.UPGRADE_TIMEOUT
        self.upgrade_timeout = float(upgrade_timeout)
        self._successor = None
        #: New generations that failed, until their process has exited (reaped, and
        #: killed if a TERM was not enough).
        self._failed_successors = []
        self._handlers = self._signal_handlers()
        self._init_observing()

    # -- signals --------------------------------------------------------------------------

    def _signal_handlers(self):
        handlers = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGHUP: self.handle_hup,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
            signal.SIGUSR2: self.handle_usr2,
        }
        # The server class may move its reload and shutdown to other signals.
        shutdown = self.target.signal_shutdown
        if shutdown is not None:
            handlers[shutdown] = self.handle_term
        reload = self.target.signal_reload
        if reload is not None:
            handlers[reload] = self.handle_usr1
        return handlers

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            self.log.debug("Supervisor not in the main thread: no signal handlers")
            return
        for signum in list(self._handlers) + [signal.SIGCHLD]:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signals(self):
        for signum, old in self._old_handlers.items():
            try:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    def _on_signal(self, signum, frame):
        if signum != signal.SIGCHLD:
            self._queue.append(signum)
        self._wake()

    def _wake(self):
        fd = self._wake_w
        if fd is None:
            return
        try:
            os.write(fd, b"!")
        except OSError:
            pass

    def request(self, signum):
        """Queue ``signum`` as if it had been received (any thread)."""
        self._queue.append(signum)
        self._wake()

    def request_stop(self, graceful=True):
        """Stop the pool (any thread); from another thread than the loop's, wait until the
        loop has returned, as socketserver's shutdown() does."""
        self._queue.append(self.handle_term if graceful else self.handle_int)
        self._wake()
        thread = self._loop_thread
        if thread is not None and thread != threading.get_ident():
            self._done.wait()

    def handle_term(self):
        self._stop(graceful=True)

    def handle_int(self):
        self._stop(graceful=False)

    def handle_quit(self):
        self._stop(graceful=False)

    def handle_usr1(self):
        if self._stopping:
            return
        sig = self.target.signal_reload or signal.SIGUSR1
        self._hook("on_reload")
        self.notify.reloading()
        self.log.info("Reloading configuration in %d worker(s)", len(self.workers))
        for w in list(self.workers.values()):
            self._kill(w.pid, sig)
        # Also here, so that workers forked later start with the same configuration.
        self.target.reload()

    def handle_hup(self):
        if self._stopping:
            return
        self._hook("on_reload")
        self.notify.reloading()
        self.log.info("SIGHUP: reloading configuration and replacing workers one by one")
        self.target.reload()
        self._replace_queue = sorted(
            (w.pid for w in self.workers.values() if not w.retiring),
            key=lambda pid: self.workers[pid].born,
        )

    def handle_ttin(self):
        if self._stopping:
            return
        self.wanted += 1
        self.log.info("SIGTTIN: %d worker(s) wanted", self.wanted)

    def handle_ttou(self):
        if self._stopping:
            return
        if self.wanted <= 1:
            self.log.info("SIGTTOU ignored: a pool keeps at least one worker")
            return
        self.wanted -= 1
        self.log.info("SIGTTOU: %d worker(s) wanted", self.wanted)

    def handle_usr2(self):
        """Start a new generation of the pool from the code as it is now on disk."""
        if self._stopping:
            return
        if self.parent_pid is not None:
            # Started by a pool service (twistd), which upgrades by starting a new
            # supervisor: this USR2 says that one serves now.
            self.log.info(
                "SIGUSR2 from process %d: a new generation serves; stopping this one (%d) "
                "gracefully", self.parent_pid, self.pid,
            )
            self.notify.handed_over(None)
            self._stop(graceful=True, refuse=False)
            return
        if self._successor is not None:
            self.log.info("SIGUSR2 ignored: an upgrade is under way (new generation %d)",
                          self._successor.pid)
            return
        sock = self.target.socket
        if sock is None:
            self.log.error("SIGUSR2: no listening socket to hand to a new generation")
            return
        try:
            self._successor = upgrade.Successor.start([sock], self.clock, self.upgrade_timeout)
        except OSError as e:
            self._upgrade_failed("it could not be started: %s" % e)
            return
        self.log.info(
            "SIGUSR2: upgrading; new generation %d starting from %s on the same socket",
            self._successor.pid, upgrade.STARTUP_DIRECTORY,
        )

    def _watch_successor(self):
        """Act on what the new generation of an upgrade did: serve (this generation hands
        over and stops) or fail (this one keeps serving)."""
        for failed in list(self._failed_successors):
            failed.check_time()
            if failed.exited():
                self._failed_successors.remove(failed)
        successor = self._successor
        if successor is None:
            return
        state = successor.check_time()
        if state == "ready":
            self._successor = None
            successor.abandon()
            self.log.info(
                "Upgrade: new generation %d serves; stopping this generation (%d) gracefully",
                successor.pid, self.pid,
            )
            self.notify.handed_over(successor.pid)
            self._stop(graceful=True, refuse=False)
        elif state == "failed":
            self._successor = None
            self._failed_successors.append(successor)
            self._upgrade_failed("new generation %d %s" % (successor.pid, successor.reason))

    def _upgrade_failed(self, reason):
        self.log.error("Upgrade failed: %s; this generation (%d) keeps serving", reason, self.pid)
        upgrade.record_result("failed", reason)

    # -- the loop -------------------------------------------------------------------------

    def run(self):
        """Fork the workers and supervise them until the pool has stopped."""
        self.start()
        try:
            while self.step():
                pass
            self.log.info("Supervisor %d: all workers gone", self.pid)
        finally:
            self.finish()
        if self.halted is not None:
            raise PoolHalted(self.halted)

    def start(self):
        """Get ready to fork: check this process, preload, pipes, signals."""
        target = self.target
        sock = target.socket
        if sock is not None and sock.type == socket.SOCK_STREAM:
            # A previous graceful stop may have left the SYN filter on this socket.
            linux.accept_new_connections(sock)
        extra = []
        if self.reactor_name and self._reactor_module is None:
            # Shared copy-on-write, and an unknown name fails here rather than in each worker.
            self._reactor_module = check_reactor_choice(self.reactor_name).moduleName
        if self._reactor_module is None:
            # Workers install it by module: they import nothing new after a user switch.
            self._reactor_module = DEFAULT_REACTOR_MODULE
        if self._reactor_module:
            extra.append(self._reactor_module)
        self.processes.prepare(extra, supervisor_title(target.pool_name, sock))
        self._start_observing()  # a --metrics port in use fails here, before any fork
        self.pid = self.processes.getpid()
        self._loop_thread = threading.get_ident()
        self._done.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        del self.pids[:]
        self.notify = PoolNotifier(self.pid, self.notifier)
        upgrade.announce_started(self.pid)
        target.pool_started(self)
        if self.install_signals:
            self._install_signals()
        self.log.info(
            "Supervisor %d: %d worker(s), graceful_timeout=%ss, worker_timeout=%ss",
            self.pid,
            self.wanted,
            self.graceful_timeout,
            self.worker_timeout,
        )

    def step(self):
        """One turn of the loop; False once the pool has stopped."""
        self._drain_signals()
        self._reap()
        if self._stopping and not self.workers:
            return False
        self._check_parent()
        self._watch_successor()
        self._murder()
        self._manage()
        self._observe()
        self._tell_systemd()
        self._sleep()
        return True

    def _tell_systemd(self):
        """READY/RELOADING/STOPPING/WATCHDOG for a ``Type=notify`` unit (spoon.pool.notify)."""
        serving = sum(1 for w in self.workers.values() if w.ready and not w.retiring)
        self.notify.step(
            self.clock(),
            serving,
            self.wanted,
            stopping=bool(self._stopping),
            replacing=bool(self._replace_queue) or self._rolling is not None,
        )

    def finish(self):
        """Leave no worker behind and undo :meth:`start`."""
        try:
            self._kill_all_now()
        finally:
            self._restore_signals()
            self._stop_observing()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = None
            self.target.pool_stopped()
            self._loop_thread = None
            self._done.set()

    def _drain_signals(self):
        while self._queue:
            signum = self._queue.popleft()
            handler = signum if callable(signum) else self._handlers.get(signum)
            if handler is None:
                continue
            try:
                handler()
            except Exception:
                self.log.exception("Handling signal %s failed", signum)

    def _sleep(self):
        now = self.clock()
        timeout = LOOP_TICK
        if self._stopping and self._stop_deadline is not None:
            timeout = min(timeout, self._stop_deadline - now)
        if self._crash_looping and len(self._active()) < self.wanted:
            timeout = min(timeout, self._last_fork + CRASH_LOOP_FORK_INTERVAL - now)
        for w in self.workers.values():
            if w.killed:
                continue
            if w.dumped_at is None:
                timeout = min(
                    timeout, max(w.last_beat + self.dump_after, self._last_dump + DUMP_GRACE) - now
                )
            else:
                timeout = min(
                    timeout,
                    max(w.last_beat + self.worker_timeout, w.dumped_at + DUMP_GRACE) - now,
                )
        if self._successor is not None:
            left = self._successor.seconds_left()
            if left is not None:
                timeout = min(timeout, left)
        if self._queue:
            timeout = 0
        self._poll(timeout)

    def _poll(self, timeout):
        """Wait up to ``timeout`` seconds for a signal, a heartbeat or a worker's exit."""
        poller = self.poller()
        poller.register(self._wake_r, select.POLLIN)
        by_fd = {}
        for w in self.workers.values():
            if w.fd is not None:
                poller.register(w.fd, select.POLLIN)
                by_fd[w.fd] = w
        successor_fd = self._successor.fd if self._successor is not None else None
        if successor_fd is not None:
            poller.register(successor_fd, select.POLLIN)
        try:
            events = poller.poll(max(0.0, timeout) * 1000.0)
        except InterruptedError:
            events = []
        now = self.clock()
        for fd, _ in events:
            if fd == self._wake_r:
                try:
                    while os.read(fd, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if fd == successor_fd and self._successor is not None:
                self._successor.feed()
                continue
            w = by_fd.get(fd)
            if w is not None:
                self._read_heartbeat(w, now)

    def _read_heartbeat(self, w, now):
        self._take(w, self.processes.read(w.fd), now)

    def _take(self, w, data, now):
        """What worker ``w`` wrote (None: nothing waits; b"": its end of the pipe closed)."""
        if data is None:
            return
        if not data:
            # The worker closed its end: it is exiting; the reaper will see it.
            self.processes.close(w.fd)
            w.fd = None
            return
        if w.failure is not None:
            self._keep_failure(w, data)
            return
        data, failed, trail = data.partition(worker.Heartbeat.FAILED)
        if failed:
            w.failure = bytearray()
            self._keep_failure(w, trail)
        w.last_beat = now
        w.dumped_at = None
        if not w.ready and worker.Heartbeat.READY in data:
            w.ready = True
            self.served = True
            self.log.info("Worker %d serving", w.pid)
            self._check_pool_ready()
        if worker.Heartbeat.REPLACE_ME in data:
            self._replace_on_request(w)
        if self._quick_deaths and w.ready and now - w.born > QUICK_DEATH:
            if self._crash_looping:
                self.log.info("Workers start again; forking at full speed")
            self._quick_deaths = 0
            self._crash_looping = False

    @staticmethod
    def _keep_failure(w, data):
        room = FAILURE_TEXT_LIMIT - len(w.failure)
        if room > 0:
            w.failure += data[:room]

    def _drain_pipe(self, w):
        """Read what a dead worker wrote and the loop has not read yet (its traceback)."""
        while w.fd is not None:
            data = self.processes.read(w.fd)
            if data is None:
                return
            self._take(w, data, self.clock())

    def _replace_on_request(self, w):
        """The worker asked to be replaced: a HUP's replacement, for it alone."""
        if self._stopping or w.retiring or w.wants_replacing:
            return
        w.wants_replacing = True
        self.stats.recycled("worker_request")
        self.log.info("Worker %d asks to be replaced; forking its successor", w.pid)
        if w.pid not in self._replace_queue:
            self._replace_queue.append(w.pid)

    def _check_parent(self):
        if self.parent_pid is None or self._stopping:
            return
        if self.processes.getppid() != self.parent_pid:
            self.log.warning("Supervisor's parent %d is gone: stopping", self.parent_pid)
            self._stop(graceful=True)

    # -- workers --------------------------------------------------------------------------

    def _active(self):
        """Workers that count towards the target: not retiring, and not the new one of a
        HUP replacement under way (its old one still counts)."""
        rolling_new = self._rolling[1] if self._rolling else None
        return [
            w for w in self.workers.values() if not w.retiring and w.pid != rolling_new
        ]

    def _manage(self):
        if self._stopping:
            return
        active = self._active()
        while len(active) < self.wanted:
            w = self._spawn()
            if w is None:
                return
            active.append(w)
        if len(active) > self.wanted:
            # Retire the oldest first: the newest carry the latest configuration.
            for w in sorted(active, key=lambda w: w.born)[: len(active) - self.wanted]:
                self._retire(w, "too many workers")
        self._roll()

    def _roll(self):
        """One step of a HUP replacement: fork a new worker, wait until it serves, then
        retire the old one, then the next."""
        if self._rolling is not None:
            old_pid, new_pid = self._rolling
            new = self.workers.get(new_pid)
            if new is None:
                # The new one died before serving: try again for the same old one.
                self._rolling = None
                self._replace_queue.insert(0, old_pid)
            elif not new.ready:
                return
            else:
                old = self.workers.get(old_pid)
                if old is not None and not old.retiring:
                    self._retire(old, "replaced by %d" % new_pid)
                self._rolling = None
        while self._replace_queue and self._rolling is None:
            old_pid = self._replace_queue[0]
            old = self.workers.get(old_pid)
            if old is None or old.retiring:
                self._replace_queue.pop(0)
                continue
            new = self._spawn()
            if new is None:
                return
            self._replace_queue.pop(0)
            self._rolling = (old_pid, new.pid)

    def _retire(self, w, why):
        w.retiring = True
        w.retire_deadline = self.clock() + self.graceful_timeout + KILL_MARGIN
        self.log.info("Stopping worker %d (%s)", w.pid, why)
        self.stats.retiring(stats.retirement_reason(why))
        self._kill(w.pid, self._graceful_signal())

    def _graceful_signal(self):
        return self.target.signal_shutdown or signal.SIGTERM

    def _spawn(self):
        now = self.clock()
        if self._crash_looping and now < self._last_fork + CRASH_LOOP_FORK_INTERVAL:
            return None
        taken = {w.number for w in self.workers.values()}
        number = next(n for n in range(1, len(taken) + 2) if n not in taken)
        self._before_fork(number)
        try:
            pid, fd = self.processes.fork_worker(lambda beat_fd: self._become_worker(number, beat_fd))
        except OSError as e:
            self.log.error("fork() failed: %s", e)
            self._last_fork = now
            return None
        w = WorkerRecord(pid, fd, now, number)
        self.stats.worker_started(pid)
        self.workers[pid] = w
        self.pids.append(pid)
        self._last_fork = now
        self.log.info("Forked worker %d (worker %d)", pid, number)
        return w

    def _become_worker(self, number, beat_fd):
        """In the forked child: drop the supervisor's state and serve.  Never returns."""
        successor_fd = self._successor.fd if self._successor is not None else None
        for fd in [self._wake_r, self._wake_w, successor_fd] + [w.fd for w in self.workers.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._queue.clear()
        block = self._observe_in_worker()
        worker.run_worker(
            self.target, beat_fd, self.pid, self.heartbeat_interval, number, self._reactor_module,
            block,
        )

    def _reap(self):
        for pid in list(self.workers):
            got, status = self.processes.waitpid(pid)
            if got == 0:
                continue
            self._forget(pid, status)

    def _forget(self, pid, status):
        w = self.workers.pop(pid)
        try:
            self.pids.remove(pid)
        except ValueError:
            pass
        self._drain_pipe(w)
        if w.fd is not None:
            self.processes.close(w.fd)
            w.fd = None
        now = self.clock()
        lifetime = now - w.born
        how = _describe_status(status)
        self._count_exit(w, status, how)
        if self._stopping or w.retiring:
            self.log.info("Worker %d exited (%s)", pid, how)
            return
        failure = bytes(w.failure or b"").decode("utf-8", "replace").rstrip()
        if not w.ready and not w.killed and not self.served:
            self._boot_failures += 1
            if self._boot_failures >= BOOT_FAILURES_TO_HALT:
                self._halt(pid, how, failure)
                return
        if failure and self.served and failure != self._last_failure:
            # The same reason over and over is written once.
            self.log.error("Worker %d failed before serving:\n%s", pid, failure)
        self._last_failure = failure or self._last_failure
        self.log.warning(
            "Worker %d died (%s) after %.1fs%s; replacing it",
            pid,
            how,
            lifetime,
            ": " + failure.splitlines()[-1] if failure else "",
        )
        if w.killed or (w.ready and lifetime >= QUICK_DEATH):
            self._quick_deaths = 0
            return
        self._quick_deaths += 1
        if self._quick_deaths >= CRASH_LOOP_DEATHS and not self._crash_looping:
            self._crash_looping = True
            self.log.error(
                "%d workers in a row died at start-up: forking at most one worker every %ss",
                self._quick_deaths,
                CRASH_LOOP_FORK_INTERVAL,
            )

    def _halt(self, pid, how, failure):
        """The pool's first workers all died before serving: close the port (a client is
        refused rather than left waiting), say why once, stop."""
        self.halted = "the first %d workers died before serving; the last one, %d, %s" % (
            self._boot_failures,
            pid,
            how,
        )
        self.log.error(
            "Halting the pool: %s.  %s",
            self.halted,
            "Its traceback:\n" + failure if failure else "It sent no traceback (see its output above).",
        )
        sock = self.target.socket
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self._stopping = "fast"
        self._replace_queue = []
        self._rolling = None
        self._stop_deadline = self.clock()
        for w in list(self.workers.values()):
            w.killed = True
            self._kill(w.pid, signal.SIGKILL)

    def _murder(self):
        # Beats that arrived while this loop was busy (a long load_config() on HUP, say)
        # must count before anyone is judged silent.
        self._poll(0)
        now = self.clock()
        for w in list(self.workers.values()):
            if w.killed:
                continue
            silent = now - w.last_beat
            if w.dumped_at is None and silent > self.dump_after:
                if now < self._last_dump + DUMP_GRACE:
                    continue  # one dump at a time, so that two do not interleave
                # The log says which worker the traceback that follows belongs to.
                self.log.error(
                    "Worker %d: no heartbeat for %.1fs; the tracebacks of its threads follow",
                    w.pid,
                    silent,
                )
                worker.flush_logs(self.log)
                w.dumped_at = self._last_dump = now
                self._kill(w.pid, worker.DUMP_SIGNAL)
                continue
            if silent > self.worker_timeout and now - w.dumped_at >= DUMP_GRACE:
                self.log.error(
                    "Worker %d timed out: no heartbeat for %.1fs (worker_timeout %ss); killing it",
                    w.pid,
                    silent,
                    self.worker_timeout,
                )
                w.killed = True
                self._kill(w.pid, signal.SIGKILL)
            elif w.retiring and w.retire_deadline is not None and now > w.retire_deadline:
                self.log.warning(
                    "Worker %d still running %ss after being asked to stop; killing it",
                    w.pid,
                    self.graceful_timeout + KILL_MARGIN,
                )
                w.killed = True
                self._kill(w.pid, signal.SIGKILL)
        if self._stopping and not self._killed_all and now >= self._stop_deadline:
            self._killed_all = True
            left = [w.pid for w in self.workers.values() if not w.killed]
            if left:
                self.log.warning(
                    "Stop timed out: killing %d worker(s) still running: %s",
                    len(left),
                    " ".join(map(str, left)),
                )
            for pid in left:
                self.workers[pid].killed = True
                self._kill(pid, signal.SIGKILL)

    def _stop(self, graceful, refuse=True):
        """Stop every worker; ``refuse``: new connections are refused at the socket
        during a graceful stop (not when a new generation accepts on it)."""
        if self._stopping == "fast" or (self._stopping and graceful):
            return
        if self._successor is not None:
            # Stopped while an upgrade was starting: the new generation goes too.
            self.log.info("Stopping the new generation %d of the upgrade under way", self._successor.pid)
            self._successor.stop()
            self._failed_successors.append(self._successor)
            self._successor = None
        # A new generation that never took over shares its socket with the old one, which
        # serves on: no filter on it, and no STOPPING=1 for the service, which goes on.
        if upgrade.is_successor():
            refuse = False
            if self.notify is not None:
                self.notify.handed_over(None)
        self._stopping = "graceful" if graceful else "fast"
        self._replace_queue = []
        self._rolling = None
        timeout = (
            self.graceful_timeout + KILL_MARGIN
            if graceful
            else min(FAST_STOP_TIMEOUT, self.graceful_timeout)
        )
        self._stop_deadline = self.clock() + timeout
        # Now, not at the end of this turn: workers quick to go may all be reaped before
        # it, and the loop ends without another turn.
        if self.notify is not None:
            self._tell_systemd()
        sock = self.target.socket
        if graceful and refuse and sock is not None and sock.type == socket.SOCK_STREAM:
            # Let the workers empty the accept queue before the socket closes, instead of
            # the kernel resetting connections it already completed.
            linux.refuse_new_connections(sock)
        sig = self._graceful_signal() if graceful else signal.SIGINT
        self.log.info(
            "%s stop of %d worker(s)%s",
            "Graceful" if graceful else "Fast",
            len(self.workers),
            " (at most %ss)" % timeout if self.workers else "",
        )
        for w in list(self.workers.values()):
            self._kill(w.pid, sig)

    def _kill(self, pid, sig):
        self.processes.kill(pid, sig)

    def _kill_all_now(self):
        """Leave no child behind, whatever made the loop end."""
        if not self.workers:
            return
        for pid in list(self.workers):
            self._kill(pid, signal.SIGKILL)
        deadline = self.clock() + 5.0
        while self.workers and self.clock() < deadline:
            for pid in list(self.workers):
                got, status = self.processes.waitpid(pid)
                if got:
                    self._forget(pid, status)
            if self.workers:
                self._poll(0.01)

    # -- observation: counters, status, metrics, hooks -------------------------------------

    def _init_observing(self):
        self.stats = stats.PoolStats()
        self.observer = None
        self._published = float("-inf")
        self._announced_ready = False

    def _hook(self, name, *args):
        call_hook(self.target, name, self.log, *args)

    def _start_observing(self):
        """Open what the pool publishes to (``SPOON_METRICS``, ``SPOON_STATSD``, the status
        file beside this process's pid file or ``SPOON_STATUS_FILE``)."""
        self._announced_ready = False
        if self.observer is None:
            metrics_endpoint, statsd, status_file = metrics.settings_from_environment()
            self.observer = metrics.PoolObserver(
                self.metrics_endpoint or metrics_endpoint, self.statsd or statsd, status_file, self.log
            )

    def _stop_observing(self):
        observer, self.observer = self.observer, None
        if observer is not None:
            observer.close()
        self.stats.close()

    def _observe(self, force=False):
        """Publish a snapshot of the pool, at most once a second."""
        now = self.clock()
        if self.observer is None or (not force and now < self._published + metrics.PUBLISH_INTERVAL):
            return
        self._published = now
        if self._stopping:
            state = "stopping"
        elif len([w for w in self._active() if w.ready]) >= self.wanted:
            state = "serving"
        else:
            state = "starting"
        ages = {w.pid: now - w.last_beat for w in self.workers.values()}
        self.observer.publish(
            self.stats.snapshot(
                self.workers.values(), ages, self.pid, self.wanted, state, self.worker_timeout
            )
        )

    def _check_pool_ready(self):
        if self._announced_ready or self._stopping:
            return
        if len([w for w in self._active() if w.ready]) >= self.wanted:
            self._announced_ready = True
            self._observe(force=True)
            self._hook("when_ready")
            # A new generation of an upgrade: the old one may stop now.
            if not upgrade.announce_ready(self.pid, self.log):
                self.log.error("This new generation cannot take over; stopping it")
                self._stop(graceful=True)

    def _before_fork(self, number):
        self.stats.prepare_worker()
        self._hook("pre_fork", number)

    def _observe_in_worker(self):
        """In the forked child: drop the supervisor's publications; the counter block."""
        if self.observer is not None:
            self.observer.close_inherited()
            self.observer = None
        return self.stats.became_worker()

    def _count_exit(self, w, status, how):
        cause = self.stats.worker_exited(w, status, bool(self._stopping), how)
        self._hook("child_exit", w.pid, cause)
