"""The supervisor of a pre-forked pool: it binds nothing and serves nothing itself; it forks
workers that serve the listening socket it holds, keeps their number, replaces the ones that
die or hang, and turns signals into pool-wide actions.

Its main loop never runs a reactor (a forked worker must start from a process without one).
Signal handlers only queue the signal and write a byte to a wake-up pipe; the loop drains
the queue and calls one ``handle_<signal>`` method per signal, so the real work never runs
inside a signal handler:

- TERM: graceful stop.  New connection attempts are refused at the socket, the workers
  drain what the kernel already accepted and finish their in-flight handlers, and the ones
  still running after ``graceful_timeout`` are killed.  INT and QUIT: fast stop.
- USR1: ``load_config()`` in every worker (and here, for workers forked later).
- HUP: ``load_config()`` here, then each worker is replaced by a fresh fork, one at a time:
  the new one is serving before the old one stops accepting, so no connection is refused.
- TTIN / TTOU: one worker more / fewer (never fewer than one).

Workers write a heartbeat from their reactor into a pipe; a worker silent for longer than
``worker_timeout`` is stuck (a CPU loop or a blocking call in a handler) and is killed.

``python -m spoon.prefork --fd FD --target DOTTED.PATH`` runs this supervisor around an
inherited listening socket; that is how a process with a running reactor (twistd, the
embedding service) gets a pool without forking its own reactor.
"""

import argparse
import collections
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from spoon import linux, worker
from spoon.factory_server import DatagramFactoryServer, FactoryServer
from spoon.server import _SpoonMixIn, using_socket
from spoon.targets import resolve

__all__ = ["Supervisor", "FactoryServer", "DatagramFactoryServer", "main"]

#: A worker that dies before it serves, or within this many seconds of its birth, died
#: "at start-up".
QUICK_DEATH = 1.0
#: After this many start-up deaths in a row, fork at most one worker per second.
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_FORK_INTERVAL = 1.0
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


class WorkerRecord:
    """What the supervisor knows about one worker."""

    __slots__ = ("pid", "fd", "born", "last_beat", "ready", "retiring", "retire_deadline", "killed", "dumped_at")

    def __init__(self, pid, fd, now):
        self.pid = pid
        self.fd = fd
        self.born = now
        self.last_beat = now
        self.ready = False
        self.retiring = False
        self.retire_deadline = None
        self.killed = False
        self.dumped_at = None  # when its tracebacks were asked for (its heartbeat late)


class Supervisor:
    """Run a pre-forked pool for ``server`` (an object built by a Spoon/Spork class, whose
    socket is bound and listening) until it is stopped.

    ``workers``, ``graceful_timeout`` and ``worker_timeout`` default to the server's
    ``prefork``, ``graceful_timeout`` and ``worker_timeout``.  ``parent_pid``: stop the
    pool when this process stops being our parent (used by the command line entry).
    ``reactor_name``: a twistd reactor short name (``poll``, ``select``, ``epoll``...) that
    every worker installs instead of the default reactor.
    """

    def __init__(
        self, server, workers=None, graceful_timeout=None, worker_timeout=None, parent_pid=None, reactor_name=None
    ):
        self.server = server
        #: Reactor short name each worker installs (None: the default reactor).
        self.reactor_name = reactor_name
        self._reactor_module = None
        self.log = getattr(server, "log", None) or logging.getLogger("spoon.prefork")
        self.target = max(1, int(workers if workers is not None else (server.prefork or 1)))
        self.graceful_timeout = float(
            graceful_timeout if graceful_timeout is not None else server.graceful_timeout
        )
        self.worker_timeout = float(
            worker_timeout
            if worker_timeout is not None
            else getattr(server, "worker_timeout", None) or DEFAULT_WORKER_TIMEOUT
        )
        self.heartbeat_interval = heartbeat_interval(self.worker_timeout)
        # Tracebacks of a stuck worker reach the log shortly before it is killed.
        self.dump_after = max(
            self.worker_timeout - 2 * self.heartbeat_interval, self.worker_timeout * 0.6
        )
        # The workers' own drain limit is the pool's (set before they are forked).
        server.graceful_timeout = self.graceful_timeout
        self.parent_pid = parent_pid
        self.workers = {}
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
        self._loop_thread = None
        self._done = threading.Event()
        self._handlers = self._signal_handlers()

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
        }
        # The server class may move its reload and shutdown to other signals.
        shutdown = getattr(self.server, "signal_shutdown", None)
        if shutdown is not None:
            handlers[shutdown] = self.handle_term
        reload = getattr(self.server, "signal_reload", None)
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
        sig = getattr(self.server, "signal_reload", None) or signal.SIGUSR1
        self.log.info("Reloading configuration in %d worker(s)", len(self.workers))
        for w in list(self.workers.values()):
            self._kill(w.pid, sig)
        # Also here, so that workers forked later start with the same configuration.
        self.server._reload()

    def handle_hup(self):
        if self._stopping:
            return
        self.log.info("SIGHUP: reloading configuration and replacing workers one by one")
        self.server._reload()
        self._replace_queue = sorted(
            (w.pid for w in self.workers.values() if not w.retiring),
            key=lambda pid: self.workers[pid].born,
        )

    def handle_ttin(self):
        if self._stopping:
            return
        self.target += 1
        self.log.info("SIGTTIN: %d worker(s) wanted", self.target)

    def handle_ttou(self):
        if self._stopping:
            return
        if self.target <= 1:
            self.log.info("SIGTTOU ignored: a pool keeps at least one worker")
            return
        self.target -= 1
        self.log.info("SIGTTOU: %d worker(s) wanted", self.target)

    # -- the loop -------------------------------------------------------------------------

    def run(self):
        """Fork the workers and supervise them until the pool has stopped."""
        server = self.server
        worker.check_forkable()
        if getattr(server, "_shutdown_requested", False):
            server._shutdown_requested = False
            return
        sock = server.socket
        if sock.type == socket.SOCK_STREAM:
            # A previous graceful stop may have left the SYN filter on this socket.
            linux.accept_new_connections(sock)
        # Objects that exist now are shared with the workers copy-on-write; the cyclic
        # garbage collector would write to every one of them in each worker (and copy
        # their pages) when it scans them.  Freezing takes them out of its sight.
        extra = []
        if self.reactor_name and self._reactor_module is None:
            # Shared copy-on-write, and an unknown name fails here rather than in each worker.
            self._reactor_module = worker.check_reactor_choice(self.reactor_name).moduleName
        if self._reactor_module:
            extra.append(self._reactor_module)
        worker.preload(extra)
        gc.freeze()
        self.pid = os.getpid()
        self._loop_thread = threading.get_ident()
        self._done.clear()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        server.pids = []
        server._supervisor = self
        self._install_signals()
        self.log.info(
            "Supervisor %d: %d worker(s), graceful_timeout=%ss, worker_timeout=%ss",
            self.pid,
            self.target,
            self.graceful_timeout,
            self.worker_timeout,
        )
        try:
            while True:
                self._drain_signals()
                self._reap()
                if self._stopping and not self.workers:
                    break
                self._check_parent()
                self._murder()
                self._manage()
                self._sleep()
            self.log.info("Supervisor %d: all workers gone", self.pid)
        finally:
            self._kill_all_now()
            self._restore_signals()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = None
            server._supervisor = None
            server.pids = []
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
        now = time.monotonic()
        timeout = LOOP_TICK
        if self._stopping and self._stop_deadline is not None:
            timeout = min(timeout, self._stop_deadline - now)
        if self._crash_looping and len(self._active()) < self.target:
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
        if self._queue:
            timeout = 0
        self._poll(timeout)

    def _poll(self, timeout):
        """Wait up to ``timeout`` seconds for a signal, a heartbeat or a worker's exit."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd = {}
        for w in self.workers.values():
            if w.fd is not None:
                poller.register(w.fd, select.POLLIN)
                by_fd[w.fd] = w
        try:
            events = poller.poll(max(0.0, timeout) * 1000.0)
        except InterruptedError:
            events = []
        now = time.monotonic()
        for fd, _ in events:
            if fd == self._wake_r:
                try:
                    while os.read(fd, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            w = by_fd.get(fd)
            if w is not None:
                self._read_heartbeat(w, now)

    def _read_heartbeat(self, w, now):
        try:
            data = os.read(w.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The worker closed its end: it is exiting; the reaper will see it.
            os.close(w.fd)
            w.fd = None
            return
        w.last_beat = now
        w.dumped_at = None
        if not w.ready and worker.Heartbeat.READY in data:
            w.ready = True
            self.log.info("Worker %d serving", w.pid)
        if self._quick_deaths and w.ready and now - w.born > QUICK_DEATH:
            if self._crash_looping:
                self.log.info("Workers start again; forking at full speed")
            self._quick_deaths = 0
            self._crash_looping = False

    def _check_parent(self):
        if self.parent_pid is None or self._stopping:
            return
        if os.getppid() != self.parent_pid:
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
        while len(active) < self.target:
            w = self._spawn()
            if w is None:
                return
            active.append(w)
        if len(active) > self.target:
            # Retire the oldest first: the newest carry the latest configuration.
            for w in sorted(active, key=lambda w: w.born)[: len(active) - self.target]:
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
        w.retire_deadline = time.monotonic() + self.graceful_timeout
        self.log.info("Stopping worker %d (%s)", w.pid, why)
        self._kill(w.pid, self._graceful_signal())

    def _graceful_signal(self):
        return getattr(self.server, "signal_shutdown", None) or signal.SIGTERM

    def _spawn(self):
        now = time.monotonic()
        if self._crash_looping and now < self._last_fork + CRASH_LOOP_FORK_INTERVAL:
            return None
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        blocked = list(worker.SUPERVISOR_SIGNALS)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(read_fd)
            os.close(write_fd)
            self.log.error("fork() failed: %s", e)
            self._last_fork = now
            return None
        if pid == 0:
            # The worker.  Never returns.
            close = [read_fd, self._wake_r, self._wake_w]
            close.extend(w.fd for w in self.workers.values() if w.fd is not None)
            server = self.server
            server.pids = None
            server._supervisor = None
            self._queue.clear()
            worker.run_worker(
                server,
                write_fd,
                self.pid,
                self.heartbeat_interval,
                close,
                reactor_module=self._reactor_module,
            )
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(write_fd)
        w = WorkerRecord(pid, read_fd, now)
        self.workers[pid] = w
        self.server.pids.append(pid)
        self._last_fork = now
        self.log.info("Forked worker %d", pid)
        return w

    def _reap(self):
        for pid in list(self.workers):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, None
            except InterruptedError:
                continue
            if got == 0:
                continue
            self._forget(pid, status)

    def _forget(self, pid, status):
        w = self.workers.pop(pid)
        try:
            self.server.pids.remove(pid)
        except ValueError:
            pass
        if w.fd is not None:
            os.close(w.fd)
            w.fd = None
        now = time.monotonic()
        lifetime = now - w.born
        how = _describe_status(status)
        if self._stopping or w.retiring:
            self.log.info("Worker %d exited (%s)", pid, how)
            return
        self.log.warning("Worker %d died (%s) after %.1fs; replacing it", pid, how, lifetime)
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

    def _murder(self):
        # Beats that arrived while this loop was busy (a long load_config() on HUP, say)
        # must count before anyone is judged silent.
        self._poll(0)
        now = time.monotonic()
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
                _flush_log_handlers(self.log)
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
                    self.graceful_timeout,
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

    def _stop(self, graceful):
        if self._stopping == "fast" or (self._stopping and graceful):
            return
        self._stopping = "graceful" if graceful else "fast"
        self._replace_queue = []
        self._rolling = None
        timeout = self.graceful_timeout if graceful else min(FAST_STOP_TIMEOUT, self.graceful_timeout)
        self._stop_deadline = time.monotonic() + timeout
        sock = self.server.socket
        if graceful and sock is not None and sock.type == socket.SOCK_STREAM:
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
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all_now(self):
        """Leave no child behind, whatever made the loop end."""
        if not self.workers:
            return
        for pid in list(self.workers):
            self._kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.workers and time.monotonic() < deadline:
            for pid in list(self.workers):
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    got, status = pid, None
                if got:
                    self._forget(pid, status)
            if self.workers:
                time.sleep(0.01)


def _flush_log_handlers(log):
    """Flush the handlers ``log`` writes through (a worker's dump goes straight to the
    shared stderr and must come after the line announcing it)."""
    logger = log
    while logger is not None:
        for handler in getattr(logger, "handlers", ()):
            try:
                handler.flush()
            except Exception:
                pass
        if not getattr(logger, "propagate", False):
            break
        logger = logger.parent
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# -- the command line -----------------------------------------------------------------


def build_target(sock, target, udp=False):
    """The server object for ``target``: a spoon server class (built around ``sock``) or
    a callable returning a Twisted factory (wrapped by :func:`FactoryServer`)."""
    if isinstance(target, type) and issubclass(target, _SpoonMixIn):
        wants = target.socket_type
        if wants != sock.type:
            raise ValueError(
                "%s serves %s sockets but descriptor %d is a %s socket"
                % (target.__name__, _type_name(wants), sock.fileno(), _type_name(sock.type))
            )
        with using_socket(sock):
            return target(sock.getsockname())
    if not callable(target):
        raise ValueError("%r is neither a spoon server class nor a callable" % (target,))
    return (DatagramFactoryServer if udp else FactoryServer)(sock, target)


def _type_name(sock_type):
    return {socket.SOCK_STREAM: "stream (TCP)", socket.SOCK_DGRAM: "datagram (UDP)"}.get(
        sock_type, str(sock_type)
    )


LOG_FORMAT = "%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s"


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m spoon.prefork",
        description="Supervise a pre-forked pool serving an inherited listening socket.",
    )
    p.add_argument("--fd", type=int, required=True, help="inherited bound (listening) socket")
    p.add_argument(
        "--target",
        required=True,
        help="dotted path of a spoon server class, or of a callable returning a Twisted "
        "protocol factory",
    )
    p.add_argument("--workers", type=int, default=None, help="default: the class's prefork")
    p.add_argument("--graceful-timeout", type=float, default=None)
    p.add_argument("--worker-timeout", type=float, default=None)
    p.add_argument("--udp", action="store_true", help="the callable returns a DatagramProtocol")
    p.add_argument(
        "--reactor",
        default=None,
        metavar="NAME",
        help="reactor the workers install, by twistd short name (epoll, poll, select, "
        "asyncio...); default: Twisted's default",
    )
    p.add_argument(
        "--uid",
        default=None,
        help="user (name or number) the supervisor and its workers run as: switched to "
        "after the imports, before the server is built and any worker forked",
    )
    p.add_argument("--gid", default=None, help="group (name or number); default: the user's")
    p.add_argument("--log-level", default="INFO")
    return p


#: Imported before switching user, beyond :data:`spoon.worker.PRELOAD`: what the pool may
#: need later and could not import once the interpreter's files are out of reach (an
#: interpreter under a directory only root can read, say).
PRELOAD_BEFORE_SWITCH = (
    "spoon.adapter",
    "spoon.server",
    "twisted.internet.pollreactor",
    "twisted.internet.selectreactor",
    "twisted.application.reactors",
)


def _user_ids(uid, gid):
    """(uid, gid, user name) from names or numbers; gid defaults to the user's group."""
    import grp
    import pwd

    name = None
    if uid is not None:
        if str(uid).isdigit():
            uid = int(uid)
            try:
                entry = pwd.getpwuid(uid)
            except KeyError:
                entry = None  # a number without a passwd entry: it needs --gid
                if gid is None:
                    raise KeyError("uid %d has no passwd entry: give --gid" % uid) from None
        else:
            entry = pwd.getpwnam(uid)
        if entry is not None:
            uid, name = entry.pw_uid, entry.pw_name
            if gid is None:
                gid = entry.pw_gid
    if gid is not None:
        gid = int(gid) if str(gid).isdigit() else grp.getgrnam(gid).gr_gid
    return uid, gid, name


def switch_user(uid, gid, name=None):
    """Become ``uid``/``gid`` (either may be None): group first, while still allowed,
    with the user's supplementary groups (or only ``gid`` for a uid without a name)."""
    if gid is not None and gid != os.getgid():
        os.setgid(gid)
    if uid is not None and uid != os.getuid():
        try:
            os.initgroups(name, gid if gid is not None else os.getgid())
        except (TypeError, KeyError, OSError):
            os.setgroups([gid if gid is not None else os.getgid()])
        os.setuid(uid)
    elif gid is not None and os.geteuid() == 0:
        os.setgroups([gid])


def _target_module(path):
    import importlib

    module = path.rpartition(".")[0]
    while module:
        try:
            return importlib.import_module(module)
        except ImportError:
            module = module.rpartition(".")[0]
        except Exception:
            return None  # reported when the target is resolved
    return None


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format=LOG_FORMAT)
    log = logging.getLogger("spoon.prefork")
    # Die with the process that started us (twistd): a graceful stop of the pool.
    parent = os.getppid()
    linux.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        log.error("Parent exited before the supervisor started")
        return 1
    try:
        sock = socket.socket(fileno=args.fd)
    except OSError as e:
        log.error("--fd %d is not a usable socket: %s", args.fd, e)
        return 2
    if sock.type == socket.SOCK_DGRAM:
        args.udp = True
    reactor_module = None
    if args.reactor:
        try:
            reactor_module = worker.check_reactor_choice(args.reactor).moduleName
        except ValueError as e:
            log.error("%s", e)
            return 2
    if args.uid is not None or args.gid is not None:
        # Everything the pool imports is imported now, while this process may still read
        # it: the target's module, the workers' modules, the reactor's.
        try:
            uid, gid, name = _user_ids(args.uid, args.gid)
        except (KeyError, ValueError) as e:
            log.error("--uid %s --gid %s: no such user or group (%s)", args.uid, args.gid, e)
            return 2
        _target_module(args.target)
        worker.preload(PRELOAD_BEFORE_SWITCH + ((reactor_module,) if reactor_module else ()))
        try:
            switch_user(uid, gid, name)
        except OSError as e:
            log.error("Cannot switch to uid %s gid %s: %s", uid, gid, e)
            return 2
        log.info("Supervisor runs as uid %d gid %d", os.getuid(), os.getgid())
        # A change of credentials clears the parent-death signal: set it again.
        linux.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            log.error("Parent exited while the supervisor switched user")
            return 1
    try:
        target = resolve(args.target)
        server = build_target(sock, target, udp=args.udp)
    except Exception as e:
        log.error("Cannot build the pool's server from %s: %s", args.target, e)
        return 2
    workers = args.workers
    if workers is None:
        workers = getattr(server, "prefork", None) or 1
    supervisor = Supervisor(
        server,
        workers=workers,
        graceful_timeout=args.graceful_timeout,
        worker_timeout=args.worker_timeout,
        parent_pid=parent if parent != 1 else None,
        reactor_name=args.reactor,
    )
    try:
        supervisor.run()
    except worker.CannotFork as e:
        log.error("%s", e)
        return 3
    finally:
        try:
            server.server_close()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
