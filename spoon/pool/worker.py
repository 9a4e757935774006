"""A forked worker's life: a fresh reactor serving the inherited socket, a heartbeat to the
supervisor, and death with the supervisor.

The worker knows its target only through :class:`spoon.pool.target.IPoolTarget`: it asks it
to serve with ``shared=True`` (the socket is shared with the other workers, so connections
are taken one by one), installs the signal handlers the target declares, and stops the
reactor when the target's serving has ended.
"""

import faulthandler
import importlib
import logging
import os
import signal
import sys
import traceback

from spoon import linux
from spoon.pool.hooks import call_hook
from spoon.pool.proctitle import set_title, worker_title
from spoon.pool.stats import COUNTERS
from spoon.pool.reactor import install_reactor_module, renew_inherited_reactor
from spoon.pool.retire import RetirePolicy
from spoon.pool.target import IRequestCounting

__all__ = [
    "Heartbeat",
    "run_worker",
    "serve_shared",
    "preload",
    "flush_logs",
    "SUPERVISOR_SIGNALS",
    "DUMP_SIGNAL",
]

log = logging.getLogger("spoon.worker")

#: Signals the supervisor handles itself; blocked around fork, reset in a worker.
SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)

#: Sent by the supervisor to a worker whose heartbeat is late, just after logging which
#: worker it is: faulthandler writes every thread's traceback to stderr from the C signal
#: handler (so even a worker stuck in a CPU loop or a blocking call answers).  A real-time
#: signal, which no server class uses for reload or shutdown.
DUMP_SIGNAL = signal.SIGRTMIN + 1

#: Modules every worker needs; imported once in the supervisor so that the workers share
#: them copy-on-write, and so that a worker forked after a user switch imports nothing it
#: might no longer be allowed to read.  None of them installs a reactor.
PRELOAD = (
    "twisted.internet.default",
    "twisted.internet.base",
    "twisted.internet.abstract",
    "twisted.internet.error",
    "twisted.internet.protocol",
    "twisted.python.failure",
    "twisted.python.log",
    "twisted.protocols.policies",
    "greenlet",
    "spoon.transport",
    "spoon.greenio",
    "spoon.lifecycle",
    "spoon.errorlog",
    "twisted.internet.epollreactor",
    "twisted.internet.posixbase",
    "twisted.internet.tcp",
    "twisted.internet.udp",
    "twisted.internet.task",
    "twisted.internet.defer",
    "twisted.logger",
    "spoon.listener",
    "spoon.reactors",
    "spoon.logs",
    # Optional, imported only when used, and so after a user switch unless here: process
    # titles, the Prometheus endpoint, TLS.
    "setproctitle",
    "prometheus_client",
    "prometheus_client.exposition",
    "twisted.internet.ssl",
    "twisted.protocols.tls",
)


def preload(extra=()):
    """Import :data:`PRELOAD`, every module of spoon and ``extra`` (those that exist),
    before forking, and before a switch of user: once the process runs as another user
    the interpreter's and the checkout's files may be out of its reach, so whatever the
    supervisor or a worker imports later (metrics, the pid file, the PROXY protocol...)
    must already be there.  None of them installs a reactor."""
    for name in PRELOAD + spoon_modules() + tuple(extra):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def spoon_modules():
    """The names of every module of the spoon package (not the ``__main__`` entries)."""
    import pkgutil

    import spoon

    return tuple(
        m.name
        for m in pkgutil.walk_packages(spoon.__path__, "spoon.")
        if not m.name.endswith("__main__")
    )


def flush_logs(logger=None):
    """Flush the handlers ``logger`` (default: the root logger) writes through, and the
    standard streams: before a worker exits, and before a stuck worker's tracebacks go
    straight to the shared stderr after the line announcing them."""
    current = logger or logging.getLogger()
    while current is not None:
        for handler in getattr(current, "handlers", ()):
            try:
                handler.flush()
            except Exception:
                pass
        if not getattr(current, "propagate", False):
            break
        current = current.parent
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


class Heartbeat:
    """Written from the worker's reactor every ``interval`` seconds to the supervisor's
    pipe: the first beat says "ready" (listening, reactor running); when beats stop, the
    supervisor knows the reactor is stuck.  Also the worker's watch on its supervisor: if
    the pipe is broken or the parent changed, the master is gone and the worker stops."""

    READY = b"R"
    BEAT = b"."
    #: "Replace me": the worker wants to retire (see :mod:`spoon.pool.retire`).
    REPLACE_ME = b"X"
    #: Followed by the traceback of a worker that failed (its last words on the pipe).
    FAILED = b"F"

    def __init__(self, fd, interval, master_pid, on_orphaned):
        self.fd = fd
        self.interval = interval
        self.master_pid = master_pid
        self.on_orphaned = on_orphaned
        self._loop = None
        self._first = True
        self._orphaned = False

    def start(self, reactor):
        from twisted.internet.task import LoopingCall

        self._loop = LoopingCall(self.beat)
        self._loop.clock = reactor
        self._loop.start(self.interval, now=True)

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    @property
    def served(self):
        """Whether this worker said it serves."""
        return not self._first

    def ask_replacement(self):
        self._send(self.REPLACE_ME)

    def report_failure(self, text):
        """Send the supervisor the traceback of this failing worker; False if it cannot
        be sent (then the worker logs it itself)."""
        return self._send(self.FAILED + text.encode("utf-8", "replace")[:16000])

    def _send(self, data):
        try:
            return os.write(self.fd, data) == len(data)
        except OSError:
            return False

    def beat(self):
        if os.getppid() != self.master_pid:
            self._orphan("parent %d is gone" % self.master_pid)
            return
        try:
            os.write(self.fd, self.READY if self._first else self.BEAT)
            self._first = False
        except BlockingIOError:
            pass  # the supervisor is behind on reading; it is alive
        except OSError:
            self._orphan("heartbeat pipe closed")

    def _orphan(self, why):
        if self._orphaned:
            return
        self._orphaned = True
        self.stop()
        self.on_orphaned(why)


def run_worker(
    target, heartbeat_fd, master_pid, heartbeat_interval, number=1, reactor_module=None,
    counter_block=None,
):
    """Body of a forked worker: serve ``target`` (an ``IPoolTarget`` whose socket was
    inherited) until stopped, then exit the process.  ``reactor_module``: module of the
    reactor to install (default: Twisted's default).  ``counter_block``: where the worker
    publishes its counters at each heartbeat (:class:`spoon.pool.stats.CounterBlock`).
    Never returns."""
    code = 1
    heartbeat = Heartbeat(heartbeat_fd, heartbeat_interval, master_pid, None)
    try:
        code = _serve(target, heartbeat, number, reactor_module, counter_block)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        try:
            # Before serving, the supervisor says why (once, however many workers fail).
            if heartbeat.served or not heartbeat.report_failure(traceback.format_exc()):
                log.exception("Worker %d failed", os.getpid())
        except BaseException:
            pass
    finally:
        flush_logs()
        os._exit(code)


def serve_shared(target, reactor):
    """Have ``target`` serve in ``reactor`` on the socket shared with the other workers
    (so with the one-by-one accept policy), and stop the reactor once serving has ended."""
    from spoon.lifecycle import stop_reactor

    served = target.serve(reactor, True)
    served.addCallback(lambda _: stop_reactor(reactor))
    return served


def _install(handlers):
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _serve(target, heartbeat, number, reactor_module, counter_block=None):
    from spoon.logs import bridge_twisted_to_stdlib
    from spoon.reactors import mark_ran, reactor_for_serving

    set_title(worker_title(number, target.pool_name))
    # The supervisor's handlers are not ours; job-control and terminal signals are for it.
    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    try:
        faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    except (ValueError, AttributeError, OSError, RuntimeError):
        pass  # no usable stderr: the supervisor's log line is all there will be
    # A worker never outlives its supervisor, even one killed by SIGKILL.
    linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != heartbeat.master_pid:
        return 1  # the supervisor died before the line above

    renew_inherited_reactor()
    if reactor_module:
        install_reactor_module(reactor_module)
    reactor = reactor_for_serving()
    target.became_worker(number)
    bridge_twisted_to_stdlib()
    call_hook(target, "post_fork", target.log or log, number, fatal=True)

    def orphaned(why):
        log.warning("Worker %d: supervisor gone (%s); stopping now", os.getpid(), why)
        reactor.callLater(1.0, os._exit, 1)
        target.begin_stop(False)

    heartbeat.on_orphaned = orphaned
    if IRequestCounting.providedBy(target):
        RetirePolicy.of(target, heartbeat.ask_replacement).watch(target)
    serve_shared(target, reactor)
    handlers = target.signal_handlers()
    _install(handlers)
    # The supervisor blocked its signals around fork(); now that the target serves and its
    # handlers are in place, whatever arrived meanwhile reaches them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
    reactor.callWhenRunning(heartbeat.start, reactor)
    reactor.callWhenRunning(_publish_counters, reactor, counter_block, heartbeat.interval)
    # reactor.run() installs Twisted's own SIGINT/SIGTERM handlers: the target's win.
    reactor.callWhenRunning(_install, handlers)
    mark_ran(reactor)
    reactor.run()
    heartbeat.stop()
    if counter_block is not None:
        counter_block.publish(COUNTERS)  # the last requests count in the pool's totals
    call_hook(target, "worker_exit", target.log or log, number)
    return 0


def _publish_counters(reactor, block, interval):
    """Copy this worker's counters into the supervisor's block at heartbeat pace."""
    if block is None:
        return
    from twisted.internet.task import LoopingCall

    loop = LoopingCall(block.publish, COUNTERS)
    loop.clock = reactor
    loop.start(interval, now=True)
